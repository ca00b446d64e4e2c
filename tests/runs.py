"""Tiny trained runs (cpu-tiny, a few steps on smooth random images) shared by the generation, FID and eval
tests: one noise run and one blur + noise run, each Phase I then Phase II, built once per test session; and the
2-process torchrun launcher of the multi-process tests."""

import os
import random
import subprocess
import sys

import torch
from click.testing import CliRunner

from dsd_fast.cli import main
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
    o = Options(preset="cpu-tiny", batch=4, seed=random.getrandbits(24), lr=1e-3, g_lr=1e-4,
                lr_rampup_kimg=0, log_every=1, grid_images=4, sample_steps=2, snapshot_kimg=1000,
                pretrain_kimg=0.016, distill_kimg=0.008, **extra, **kw)
    data = GPUData(smooth_images(n_images), device="cpu", corruption=o.make_corruption(), seed=o.seed)
    assert train(o, phases=("pretrain", "distill"), outdir=str(path), data=data, progress=False) == "done"
    return str(path)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*args):
    """`torchrun --standalone --nproc-per-node 2 -m dsd_fast ARGS` on the CPU (gloo); its stdout. Fails the test
    with the processes' output tails when they fail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsd_fast",
           *map(str, args)]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout


def invoke(*args):
    """`dsd-fast ARGS` in this process (arguments stringified)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    """invoke(*args), asserting exit code 0; returns the output."""
    r = invoke(*args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output
