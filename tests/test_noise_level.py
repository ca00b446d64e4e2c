"""dsd_fast.noise_level: sigma from the corrupted data set alone (Chen et al. 2015 PCA + Liu et al. 2013 weak
textures). Measured on Fashion-MNIST (first 2,000 training images, defaults: patch 8, 200k patches, seed 0):

    sigma   float y = x + sigma eps   uint8 (quantised + clipped, as convert_dataset writes it)
    0       0.0061 (clean)            0.0061
    0.02    0.0203 (+1.5 %)           0.0218 (+8.8 %)
    0.05    0.0511 (+2.3 %)           0.0542 (+8.3 %)
    0.1     0.1027 (+2.7 %)           0.1072 (+7.2 %)
    0.2     0.2054 (+2.7 %)           0.2112 (+5.6 %)
    0.4     0.4090 (+2.3 %)           0.3874 (-3.2 %)
    0.8     0.8087 (+1.1 %)           ValueError (no 8x8 patch without a clipped pixel)
    blur 1.0 + sigma 0.2: 0.1989 (-0.6 %) float, 0.1977 (-1.2 %) uint8
Over 5 corruption/subsample seeds on 1,000 images: float +2.0..+3.6 %, uint8 -4.4..+9.4 %, clean 0.0065-0.0073.
The bounds below (10 % float, 15 % uint8, clean < 0.02) are the issue's and a margin over these, not tuned.
"""

import random

import pytest
import torch

from dsd_fast.corruption import BlurNoiseCorruption, NoiseCorruption
from dsd_fast.data import datasets, load_images, to_float, to_uint8
from dsd_fast.noise_level import (
    chen_noise_variance,
    estimate_noise,
    estimate_sigma,
    gamma_quantile,
    gradient_operator,
)

N_IMAGES = 1000
have_fashion = pytest.mark.skipif(not (datasets.FASHION_MNIST_SYSTEM / "train-images-idx3-ubyte.gz").exists(),
                                  reason="Debian package dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def fashion():
    """uint8 [N, 1, 28, 28] and its float [-1, 1] form."""
    u = load_images(datasets.FASHION_MNIST_SYSTEM, max_images=N_IMAGES)
    return u, to_float(u)


def _corrupt(corruption, x):
    return corruption.corrupt(x, random.getrandbits(32), torch.arange(x.shape[0]))


# ---------------------------------------------------------------------------------------------------------
# The pieces

def test_gamma_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for q, shape, scale in ((0.5, 1.0, 1.0), (0.99, 30.0, 0.2), (1 - 1e-6, 60.0, 2 * 52.5 / 60), (1e-3, 4.5, 3.0)):
        assert gamma_quantile(q, shape, scale) == pytest.approx(stats.gamma.ppf(q, shape, scale=scale), rel=1e-9)
    with pytest.raises(ValueError, match="q: expected a probability"):
        gamma_quantile(1.0, 2.0, 1.0)


def test_gradient_operator_is_the_patch_gradient_energy():
    r = 5
    p = torch.randn(2, r, r, dtype=torch.float64)
    gh = (p[:, :, 2:] - p[:, :, :-2]) / 2
    gv = (p[:, 2:, :] - p[:, :-2, :]) / 2
    DD = gradient_operator(r, 2)
    v = p.reshape(-1)
    assert (v @ DD @ v).item() == pytest.approx((gh.square().sum() + gv.square().sum()).item(), rel=1e-12)
    assert torch.linalg.matrix_rank(DD).item() == 2 * (r * r - 4)  # constants and period-2 patterns vanish


def test_chen_rule_returns_the_noise_block():
    noise = 0.01 * (1 + 0.05 * torch.linspace(-1, 1, 40, dtype=torch.float64))  # symmetric: mean == median
    signal = torch.tensor([0.05, 0.3, 1.0, 4.0, 9.0], dtype=torch.float64)
    sigma2, m = chen_noise_variance(torch.cat([signal, noise])[torch.randperm(45)])
    assert m == 40 and sigma2 == pytest.approx(0.01, rel=1e-12)
    assert chen_noise_variance(torch.tensor([-1e-18, 0.0, 0.0, 1e-18]))[0] == 0.0  # rounding never < 0


def test_synthetic_smooth_images():
    """Low-frequency random images (a low-rank patch covariance) plus white noise: the method's own setting."""
    g = torch.Generator().manual_seed(random.getrandbits(32))
    clean = torch.nn.functional.interpolate(torch.rand(150, 3, 4, 4, generator=g) * 1.6 - 0.8, size=(24, 24),
                                            mode="bilinear", align_corners=True)
    for sigma in (0.03, 0.3):
        y = clean + sigma * torch.randn(clean.shape, generator=g)
        est = estimate_noise(y, seed=random.getrandbits(16))
        assert est.sigma == pytest.approx(sigma, rel=0.05), est
        # A float pixel can land exactly on +-1 (7 runs in 2,000): only the patches covering it go.
        clip = ((y == -1) | (y == 1)).any(dim=1, keepdim=True).to(torch.float32)
        covered = int((torch.nn.functional.max_pool2d(clip, est.patch, stride=1) > 0).sum())
        assert est.saturated == covered and est.components >= 1


# ---------------------------------------------------------------------------------------------------------
# Fashion-MNIST

@have_fashion
@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.2, 0.4])
def test_fashion_mnist_noise(fashion, sigma):
    _, x = fashion
    est = estimate_noise(_corrupt(NoiseCorruption(sigma), x), seed=random.getrandbits(16))
    assert abs(est.sigma / sigma - 1) < 0.10, est
    assert est.saturated < 0.001 * est.positions  # the float path is not clipped


@have_fashion
def test_fashion_mnist_blur_and_noise(fashion):
    _, x = fashion
    est = estimate_noise(_corrupt(BlurNoiseCorruption(blur=1.0, sigma=0.2), x), seed=random.getrandbits(16))
    assert abs(est.sigma / 0.2 - 1) < 0.10, est


@have_fashion
def test_fashion_mnist_clean_is_near_zero(fashion):
    """Clean: the flat background is excluded (pixels at -1 count as clipped), the weakest textures give a
    floor of ~0.003-0.007; asserted < 0.02 (uint8 rounding alone would give (1/127.5)/sqrt(12) = 0.0023 if it
    were noise; it is not: a flat uint8 region is exactly flat)."""
    u, x = fashion
    seed = random.getrandbits(16)
    sigma = estimate_sigma(u, seed=seed)
    assert 0 <= sigma < 0.02
    assert estimate_sigma(x, seed=seed) == sigma  # uint8 and its float form are the same data


@have_fashion
@pytest.mark.parametrize("sigma", [0.05, 0.2])
def test_fashion_mnist_quantised_clipped(fashion, sigma):
    """The form convert_dataset(corruption=...) stores: to_uint8(y), rounded and clipped to [0, 255]. Patches
    with a clipped pixel are excluded; the rest are biased by up to ~+9 % (measured), asserted < 15 %."""
    _, x = fashion
    est = estimate_noise(to_uint8(_corrupt(NoiseCorruption(sigma), x)), seed=random.getrandbits(16))
    assert abs(est.sigma / sigma - 1) < 0.15, est
    assert est.saturated > 0.5 * est.positions  # the black background is clipped


@have_fashion
def test_fashion_mnist_fully_clipped_is_an_error(fashion):
    _, x = fashion
    y = to_uint8(_corrupt(NoiseCorruption(0.8), x[:200]))
    with pytest.raises(ValueError, match="images: only .* clip value .* too saturated"):
        estimate_sigma(y)


@have_fashion
def test_deterministic_and_seeded(fashion):
    _, x = fashion
    y = _corrupt(NoiseCorruption(0.1), x[:500])
    a = estimate_noise(y, max_patches=20_000, seed=3)
    assert estimate_noise(y, max_patches=20_000, seed=3) == a
    b = estimate_noise(y, max_patches=20_000, seed=4)
    assert b.sigma != a.sigma and abs(b.sigma / 0.1 - 1) < 0.10
    assert a.candidates == pytest.approx(20_000, rel=0.05)  # Bernoulli subsampling to ~max_patches
    assert estimate_noise(y.double(), max_patches=20_000, seed=3).sigma == pytest.approx(a.sigma, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Bad input

def _noisy(n=4, size=28, channels=1):
    return torch.randn(n, channels, size, size) * 0.1


@pytest.mark.parametrize("images, match", [
    ("not a tensor", "images: expected a uint8 or floating-point torch.Tensor"),
    (torch.zeros(4, 28, 28), r"images: expected a 4-D tensor \[N, C, H, W\], got shape \(4, 28, 28\)"),
    (torch.zeros(0, 1, 28, 28), "images: expected a non-empty tensor"),
    (torch.zeros(4, 1, 28, 28, dtype=torch.int32), "images: expected uint8 .* got dtype torch.int32"),
    (torch.full((4, 1, 28, 28), float("nan")), "images: expected finite values"),
    (torch.rand(4, 1, 28, 28) * 255, r"images: expected the \[-1, 1\] scale"),
    (torch.zeros(1, 1, 28, 28, dtype=torch.uint8), "images: 1 image.* give 441 patches .* at least 640"),
    (torch.zeros(4, 1, 28, 28, dtype=torch.uint8), "images: all 4 images are constant .zero variance."),
    (torch.full((4, 1, 28, 28), 0.3), "images: all 4 images are constant .zero variance."),
])
def test_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        estimate_sigma(images)


def test_too_few_patches_counts_channels():
    with pytest.raises(ValueError, match=r"patches of 8x8x3; .* at least 1920"):
        estimate_sigma(_noisy(n=4, channels=3))  # 4 x 441 = 1764 < 10 x 192
    estimate_sigma(_noisy(n=5, channels=3))


@pytest.mark.parametrize("kwargs, match", [
    ({"patch": 2}, r"patch: expected an int in \[3, 28\], got 2"),
    ({"patch": 29}, r"patch: expected an int in \[3, 28\], got 29"),
    ({"patch": 8.0}, "patch: expected an int"),
    ({"patch": True}, "patch: expected an int"),
    ({"max_patches": 100}, "max_patches: expected an int >= 640, got 100"),
    ({"confidence": 1.0}, r"confidence: expected a probability in \(0, 1\), got 1.0"),
    ({"confidence": 0}, "confidence: expected a probability"),
    ({"seed": -1}, "seed: expected an int >= 0, got -1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_sigma(_noisy(), **kwargs)



def test_cli_estimate_sigma(tmp_path):
    """`dsd-fast estimate-sigma` on a stored noisy data set (uint8 npy, as `dsd-fast dataset --corrupt` stores
    them): the estimate within 10 %, --json, and clear errors naming the file."""
    import json

    import numpy as np
    from runs import invoke, ok, smooth_images

    x = to_float(smooth_images(200, channels=1))
    y = NoiseCorruption(0.1).corrupt(x, random.getrandbits(24), torch.arange(200))
    np.save(tmp_path / "noisy.npy", to_uint8(y).permute(0, 2, 3, 1).numpy())
    estimate = json.loads(ok("estimate-sigma", "--dataset", tmp_path / "noisy.npy", "--json"))
    assert abs(estimate["sigma"] - 0.1) < 0.01 and estimate["source"].endswith("noisy.npy")
    assert "sigma = " in ok("estimate-sigma", "--dataset", tmp_path / "noisy.npy", "--max-images", 100)
    r = invoke("estimate-sigma", "--dataset", tmp_path / "missing.npy")
    assert r.exit_code == 1 and "missing.npy" in r.output
    np.save(tmp_path / "flat.npy", np.full((40, 32, 32, 1), 128, np.uint8))
    r = invoke("estimate-sigma", "--dataset", tmp_path / "flat.npy")
    assert r.exit_code == 1 and "variance" in r.output


def test_sigma_auto_trains_with_the_estimate(tmp_path):
    """`pretrain --sigma auto --noisy-data`: the run trains with the estimate (within 10 % of the true sigma) and
    records it in options.json; a resumed run keeps it; auto without --noisy-data, on resume or for distill is a
    clear error before anything is written."""
    import json

    import numpy as np
    from runs import invoke, ok, smooth_images

    sigma = 0.15
    x = to_float(smooth_images(64, channels=3))
    y = NoiseCorruption(sigma).corrupt(x, random.getrandbits(24), torch.arange(64))
    np.save(tmp_path / "noisy.npy", to_uint8(y).permute(0, 2, 3, 1).numpy())
    flags = ["--dataset", tmp_path / "noisy.npy", "--preset", "cpu-tiny", "--batch", 4, "--kimg", 0.008,
             "--lr-rampup-kimg", 0, "--grid-images", 0, "--sample-steps", 2]
    out = tmp_path / "run"
    text = ok("pretrain", "--sigma", "auto", "--noisy-data", *flags, "--outdir", out)
    options = json.loads((out / "options.json").read_text())
    assert abs(options["sigma"] - sigma) < 0.1 * sigma, options["sigma"]
    record = options["sigma_estimate"]
    assert record["sigma"] == options["sigma"] and record["source"].endswith("noisy.npy")
    assert record["method"] and record["selected"] > 0 and f"sigma = {options['sigma']:.4f}" in text
    ok("pretrain", "--resume", out, "--kimg", 0.016)
    assert json.loads((out / "options.json").read_text())["sigma_estimate"] == record
    for extra, match in ((["--outdir", tmp_path / "clean"], "needs --noisy-data"),
                         (["--noisy-data", "--resume", out], "a resumed run keeps its sigma")):
        r = invoke("pretrain", "--sigma", "auto", *flags, *extra)
        assert r.exit_code == 1 and match in r.output, r.output
    r = invoke("distill", "--sigma", "auto", "--teacher", out / "last.pt", "--kimg", 0.004, "--outdir", tmp_path / "d")
    assert r.exit_code == 1 and "distill takes its teacher's" in r.output, r.output
    assert not (tmp_path / "clean").exists() and not (tmp_path / "d").exists()
    r = invoke("pretrain", "--sigma", "often", *flags, "--outdir", tmp_path / "bad")
    assert r.exit_code == 2 and "often" in r.output
