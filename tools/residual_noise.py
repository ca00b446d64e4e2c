"""Is a student's FID gap its residual pixel noise? (README, "Fashion-MNIST at sigma = 0.2")

Estimates the noise std left in generated images (npz from `dsd-fast generate`) with `dsd-fast estimate-sigma`'s
estimator, and writes a copy of a reference sample set (e.g. the teacher's Ambient-Truncated images) with that much
Gaussian noise added, in the [-1, 1] scale, so that `dsd-fast fid --images` can score both:

    .venv/bin/python tools/residual_noise.py STUDENT.npz --add-to TEACHER.npz --out TEACHER_NOISED.npz [--std S]
"""

import argparse

import numpy as np

from dsd_fast.data import load_images
from dsd_fast.noise_level import estimate_noise
from dsd_fast.rundir import atomic_write_bytes

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("student", help="npz of generated images (uint8 NHWC, from dsd-fast generate)")
p.add_argument("--add-to", required=True, help="npz to add the noise to")
p.add_argument("--out", required=True, help="output npz")
p.add_argument("--std", type=float, default=None, help="noise std to add [the student's estimate]")
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
estimate = estimate_noise(load_images(a.student))
std = estimate.sigma if a.std is None else a.std
print(f"residual noise of {a.student}: sigma = {estimate.sigma:.4f} ({estimate.selected} weak-texture patches); "
      f"adding std {std:.4f} to {a.add_to}")
with np.load(a.add_to) as d:
    images, seeds = d["images"], d["seeds"]
x = images.astype(np.float64) / 127.5 - 1 + std * np.random.default_rng(a.seed).standard_normal(images.shape)
noised = np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)
atomic_write_bytes(a.out, lambda f: np.savez(f, images=noised, seeds=seeds))
print(f"wrote {a.out}")
