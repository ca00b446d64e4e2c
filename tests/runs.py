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
from dsd_fast.data import GPUData, to_uint8
from dsd_fast.training import Options, train

# A seed's float image at two batch sizes: CPU convolutions pick different blockings per batch size, which moves
# the last bits (measured on cpu-tiny: 2.4e-7 one-step; 3e-4 after Heun from sigma_max = 80 to images as large as
# 197 -- an untrained teacher -- i.e. 1.5e-6 of the largest value). Floats are compared to TOL relative to the
# largest value, and uint8 images may differ by one level only where the float lies that close to a rounding
# boundary.
TOL = 1e-5


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


def tol(x):
    return TOL * max(1.0, x.abs().max().item())


def assert_uint8_matches(images, x_ref):
    """uint8 images equal to_uint8(x_ref), up to one level where x_ref is within tol(x_ref) of a rounding boundary."""
    want = to_uint8(x_ref).int()
    v = x_ref * 127.5 + 127.5
    near = (v - v.floor() - 0.5).abs() <= 127.5 * tol(x_ref)
    diff = (images.int() - want).abs()
    bad = (diff > 1) | ((diff == 1) & ~near)
    assert not bad.any(), f"{int(bad.sum())} pixels differ beyond rounding (max {int(diff.max())} levels)"
