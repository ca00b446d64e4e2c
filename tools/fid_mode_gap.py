"""How far apart the FID feature modes are (README, "Feature modes"): the Frechet distance between the edm-, gpu-
and clean-mode feature sets of the same Fashion-MNIST images, with the real FID InceptionV3 (~5 min on 2 cores).

    .venv/bin/python tools/fid_mode_gap.py [--images 200]
"""

import argparse
import time

import torch

from dsd_fast.data import load_images
from dsd_fast.metrics import InceptionFeatures, feature_stats, frechet_distance, load_inception

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
p.add_argument("--images", type=int, default=200)
a = p.parse_args()
x = load_images(a.data, max_images=a.images)
net = load_inception()
t0 = time.perf_counter()
stats = {m: feature_stats(InceptionFeatures(net, mode=m, batch_size=50)(x)) for m in ("edm", "gpu", "clean")}
print(f"{x.shape[0]} images {tuple(x.shape[1:])} from {a.data}, {time.perf_counter() - t0:.0f} s, torch "
      f"{torch.__version__}")
for m1, m2 in (("gpu", "clean"), ("edm", "gpu"), ("edm", "clean")):
    print(f"FID({m1} features, {m2} features) = {frechet_distance(*stats[m1], *stats[m2]):.4g}")
