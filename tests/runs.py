"""Tiny trained runs (cpu-tiny, a few steps on smooth random images) shared by the generation, FID and eval
tests: one noise run and one blur + noise run, each Phase I then Phase II, built once per test session."""

import os

import torch

from dsd_fast.data import GPUData
from dsd_fast.training import Options, train


def smooth_images(n, channels=3, resolution=32, generator=None):
    """Smooth random uint8 images (bilinear upsampling of 4x4 noise)."""
    x = torch.rand(n, channels, 4, 4, generator=generator)
    x = torch.nn.functional.interpolate(x, size=resolution, mode="bilinear")
    return (x * 255).round().to(torch.uint8)


def make_run(path, corruption="noise", n_images=16, **kw):
    """Train a tiny run into `path` (Phase I 4 steps, Phase II 2 steps of batch 4) and return the path."""
    extra = dict(corruption="blur", blur=0.7) if corruption == "blur" else {}
    o = Options(preset="cpu-tiny", batch=4, seed=int.from_bytes(os.urandom(3), "little"), lr=1e-3, g_lr=1e-4,
                lr_rampup_kimg=0, log_every=1, grid_images=4, sample_steps=2, snapshot_kimg=1000,
                pretrain_kimg=0.016, distill_kimg=0.008, **extra, **kw)
    data = GPUData(smooth_images(n_images), device="cpu", corruption=o.make_corruption(), seed=o.seed)
    assert train(o, phases=("pretrain", "distill"), outdir=str(path), data=data, progress=False) == "done"
    return str(path)
