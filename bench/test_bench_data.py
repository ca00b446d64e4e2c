"""Training-data loaders, img/s of rank 0's batches (y, index), each ready on the device, corrupted (noise, sigma = 0.2)
and flipped:

    resident  GPUData.batch: the uint8 set is on the device already; gather, corrupt, flip there
    dali      DALIData.batch: read the step's PNGs from the EDM zip, decode them (DALI's CPU threads: PNG has no
              GPU decoder), copy to the device, then the same corrupt and flip; prefetch_queue_depth 2

at 32x32, 64x64 and 256x256 RGB. The data: random uint8 images written by convert_dataset (PNGs at compress_level
0, as EDM's dataset_tool writes them; random pixels, so the files are the full 3 HW bytes and more). Nothing
else runs, so dali's number is the loader's own rate (its wait_fraction is near 1: the loop only waits for it);
in training it overlaps the step, and it is enough when it exceeds the step's img/s (bench/test_bench_train.py).
Each round is one epoch of N images in batches of B (the stream continues across rounds).

CUDA: N = 16384 / 8192 / 1024 images, B = 512 / 256 / 64, 5 timed rounds. $DSD_FAST_BENCH_IMAGES overrides N.
CPU: N = 16, B = 8, one round: a check that the suite runs, not a measurement.
The records carry img/s, not bytes: render_table.py's bandwidth table skips them.
"""

import os

import numpy as np
import pytest
import torch
from common import CUDA, DEVICE, WARMUP_ROUNDS, environment, sync

from dsd_fast.corruption import NoiseCorruption
from dsd_fast.data import GPUData, convert_dataset, load_images

RESOLUTIONS = (32, 64, 256)
if CUDA:
    IMAGES, BATCH, ROUNDS = {32: 16384, 64: 8192, 256: 1024}, {32: 512, 64: 256, 256: 64}, 5
else:
    IMAGES, BATCH, ROUNDS = dict.fromkeys(RESOLUTIONS, 16), dict.fromkeys(RESOLUTIONS, 8), 1
if os.environ.get("DSD_FAST_BENCH_IMAGES"):
    IMAGES = dict.fromkeys(RESOLUTIONS, int(os.environ["DSD_FAST_BENCH_IMAGES"]))
SIGMA = 0.2


@pytest.fixture(scope="module")
def zips(tmp_path_factory):
    """resolution -> an EDM zip of IMAGES[resolution] random RGB images, written on first use."""
    root, made = tmp_path_factory.mktemp("data"), {}

    def make(r):
        if r not in made:
            x = torch.randint(0, 256, (IMAGES[r], 3, r, r), dtype=torch.uint8)
            np.save(root / f"{r}.npy", x.numpy())
            made[r] = convert_dataset(root / f"{r}.npy", root / f"{r}.zip")
        return made[r]

    return make


def _loader(kind, source, r):
    corruption = NoiseCorruption(SIGMA)
    if kind == "resident":
        return GPUData(load_images(source), device=DEVICE, corruption=corruption)
    pytest.importorskip("nvidia.dali")
    from dsd_fast.data.dali import DALIData

    return DALIData(source, batch_size=BATCH[r], device=DEVICE, corruption=corruption)


@pytest.mark.parametrize("r", RESOLUTIONS)
@pytest.mark.parametrize("kind", ["resident", "dali"])
def test_loader(benchmark, zips, kind, r):
    benchmark.group = f"loader {r}x{r} N={IMAGES[r]} batch={BATCH[r]}"
    B, steps = BATCH[r], max(1, IMAGES[r] // BATCH[r])
    data, step = _loader(kind, zips(r), r), [0]

    def epoch():
        for _ in range(steps):
            y, index = data.batch(step[0], B)
            step[0] += 1
        sync()
        return y, index

    y, index = benchmark.pedantic(epoch, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    assert y.shape == (B, 3, r, r) and y.device.type == DEVICE.type and index.shape == (B,)
    benchmark.extra_info.update(environment(), loader=kind, resolution=r, images=steps * B, batch=B, sigma=SIGMA,
                                measurement="cuda" if CUDA else "cpu smoke (not a measurement)")
    if kind == "dali":
        stats = data.stats()
        benchmark.extra_info.update(wait_fraction=stats.wait_fraction, restarts=data.restarts, threads=data.num_threads)
        data.close()
    if benchmark.stats is not None:
        rate = steps * B / benchmark.stats.stats.median
        benchmark.extra_info.update(img_per_s=rate, uint8_MBps=rate * 3 * r * r / 1e6)
