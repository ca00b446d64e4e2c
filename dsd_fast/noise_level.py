"""Observation noise level sigma from the corrupted data set alone (DSD paper, Appendix A: unknown sigma).

Method: the PCA patch estimator of
  G. Chen, F. Zhu and P. A. Heng, "An Efficient Statistical Method for Image Noise Level Estimation",
  ICCV 2015, pp. 477-485 (the DSD paper's ref. [7]).
Overlapping r x r patches (r x r x C vectors, all channels in one vector), their covariance, its eigenvalues
lambda_1 <= ... <= lambda_d (d = r*r*C); clean patches span a low-dimensional subspace, so the smallest
eigenvalues are those of the noise alone: sigma^2 = mean(lambda_1..lambda_m) for the LARGEST m whose block
has mean == median (Chen et al.'s Algorithm 1; as in the authors' MATLAB code, "mean == median" is tested
as #{lambda_j > mean} == #{lambda_j < mean}).

Variant and deviations (all measured on Fashion-MNIST; numbers in tests/test_noise_level.py's docstring):
  * Pooled over the data set: the patches of many images go into ONE covariance (a 28x28 image alone gives
    441 8x8 patches, too few for 64 eigenvalues). Patch size r = 8 (the paper's default), stride 1.
    At most max_patches patches: each candidate patch is kept independently with probability
    max_patches / #candidates, drawn from a torch.Generator seeded with `seed` (deterministic).
  * Weak-texture patch selection before the PCA (Liu, Tanaka and Okutomi, "Single-image noise level
    estimation for blind denoising", IEEE TIP 22(12), 2013: the DSD paper's ref. [36]). Fashion-MNIST's
    clean 8x8 patches are NOT low-rank: their covariance's smallest eigenvalues are ~0.007 in the [-1, 1]
    scale, so the plain estimator returns ~0.14 for a clean set and +193 %/+21 % at sigma = 0.05/0.2 on
    2,000 images. As Liu et al.: a patch's gradient energy t = p^T (Dh^T Dh + Dv^T Dv) p (central
    differences [-1/2, 0, 1/2] inside the patch) of pure noise is ~ sigma^2 Gamma(k/2, 2 tr/k)
    (k = rank, tr = trace of the operator); keep the patches with t <= sigma_hat^2 tau0, tau0 its
    `confidence` quantile (Liu et al.'s code default 1 - 1e-6), re-estimate sigma_hat on them, and repeat on
    the kept set (nested, as their code) until it no longer changes; the start is the estimate on every
    candidate. Liu et al. estimate with the smallest eigenvalue; here each estimate is Chen et al.'s.
  * Clipping: a pixel exactly at a clip value (-1 or 1, i.e. uint8 0 or 255) is a censored observation
    (clip(x + sigma eps) loses the noise's tail), and Fashion-MNIST's black background makes half the pixels
    such. Patches holding such a pixel are excluded (principled: the model y = x + sigma eps does not hold
    there). The float path (training corrupts on the fly, never clipping) has no pixel exactly at +-1 once
    sigma > 0 (float32 rounding leaves a handful: 96 of 26.5 M patch positions on all of Fashion-MNIST at
    sigma = 0.2), so nothing is lost there. A clean data set loses its flat background, leaving a floor of
    its weakest textures: 0.003-0.007 on Fashion-MNIST (lower with more images). Data sets that
    convert_dataset writes with a corruption are quantised AND clipped (uint8): there the estimate is biased
    (+3..+9 % at sigma <= 0.2, -3..-4 % at 0.4 on Fashion-MNIST: the pure-noise background patches are the
    clipped ones, what is left is garment patches, whose weak textures leak in) and it fails with a
    ValueError when almost every patch is clipped (sigma = 0.8).

Units: sigma in the [-1, 1] scale x = u/127.5 - 1 (what training's --sigma means). uint8 input [0, 255]
is converted so; float input must already be in that scale (noisy values may exceed +-1).
Limitations: white Gaussian noise of one level over the whole data set (as DSD's y = A x + sigma eps: for
y = blur(x) + sigma eps the noise is still white, and the blur only makes the clean patches flatter);
signal-dependent or correlated noise is outside the model; the estimate is biased up by the weakest
textures that pass the selection (+1..+4 % on Fashion-MNIST's float path).
"""

import math
import os
from dataclasses import asdict, dataclass

import torch

from . import checks
from .data import load_images, resolve_source

MIN_PATCHES_PER_DIM = 10  # every covariance is of >= 10 d patches: Marchenko-Pastur spread (1 +- sqrt(0.1))^2
DEFAULT_PATCH = 8  # Chen et al.'s default patch size
DEFAULT_MAX_PATCHES = 200_000
DEFAULT_CONFIDENCE = 1 - 1e-6  # Liu et al.'s weak-texture threshold quantile (their code's default)
MAX_ITERATIONS = 100
_CHUNK = 16_384  # patches gathered at a time (bounds memory to _CHUNK x d float64)

__all__ = ["NoiseEstimate", "chen_noise_variance", "estimate_noise", "estimate_sigma", "gamma_quantile"]


@dataclass(frozen=True)
class NoiseEstimate:
    """The estimate and what it rests on (for logs and options.json)."""

    sigma: float  # noise std in the [-1, 1] scale
    method: str  # citation key of the estimator
    patch: int  # r: patches are r x r x C
    positions: int  # r x r patch positions in the data set
    saturated: int  # positions excluded: a pixel at a clip value (+-1, uint8 0/255)
    candidates: int  # unsaturated patches sampled (<= max_patches in expectation)
    selected: int  # weak-texture patches in the final covariance
    components: int  # m: eigenvalues in the noise block (of d = r*r*C)
    iterations: int  # weak-texture selection rounds
    converged: bool  # the selection reached a fixed point (else: stopped by MAX_ITERATIONS or too few left)

    def as_dict(self):
        return asdict(self)


def _as_float_images(images):
    """uint8 [N, C, H, W] -> float32 in [-1, 1]; float NCHW is checked (finite, [-1, 1] scale) and kept."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images: expected a uint8 or floating-point torch.Tensor [N, C, H, W], "
                         f"got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images: expected a 4-D tensor [N, C, H, W], got shape {tuple(images.shape)}")
    if images.numel() == 0:
        raise ValueError(f"images: expected a non-empty tensor, got shape {tuple(images.shape)}")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1
    if not images.is_floating_point():
        raise ValueError(f"images: expected uint8 [0, 255] or floating point in the [-1, 1] scale, "
                         f"got dtype {images.dtype}")
    images = images.to(torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype)
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images: expected finite values, found NaN or inf")
    lo, hi = images.min().item(), images.max().item()
    if lo >= 0 and hi > 2:  # no [-1, 1]-scale image (clean or noisy) is all >= 0 with values > 2
        raise ValueError(f"images: expected the [-1, 1] scale (x = u/127.5 - 1), got values in [{lo:g}, {hi:g}] "
                         f"(a [0, 255] float array?): pass uint8 images or convert with x/127.5 - 1")
    return images


def gradient_operator(patch, channels):
    """DD = Dh^T Dh + Dv^T Dv [d, d] (d = patch^2 channels), Dh/Dv the central differences [-1/2, 0, 1/2]
    inside an r x r patch (Liu et al. 2013): p^T DD p is the patch's gradient energy."""
    r = patch
    eye = torch.eye(r * r, dtype=torch.float64).reshape(r * r, r, r)
    dh = (eye[:, :, 2:] - eye[:, :, :-2]) / 2
    dv = (eye[:, 2:, :] - eye[:, :-2, :]) / 2
    D = torch.cat([dh.reshape(r * r, -1), dv.reshape(r * r, -1)], dim=1).T
    return torch.block_diag(*[D.T @ D] * channels)


def gamma_quantile(q, shape, scale):
    """Inverse CDF of Gamma(shape, scale) at q in (0, 1), by bisection on torch.special.gammainc (float64)."""
    if not 0 < q < 1:
        raise ValueError(f"q: expected a probability in (0, 1), got {q!r}")
    a = torch.tensor(float(shape), dtype=torch.float64)
    cdf = lambda x: torch.special.gammainc(a, torch.tensor(x / scale, dtype=torch.float64)).item()
    lo, hi = 0.0, float(shape) * scale
    while cdf(hi) < q:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cdf(mid) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def chen_noise_variance(eigenvalues):
    """Chen et al.'s rule: (sigma^2, m) with m the largest block of the smallest eigenvalues whose mean is
    its median (#{> mean} == #{< mean}), sigma^2 its mean (>= 0: rounding can make a clean one negative)."""
    ev = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten().sort().values
    csum = ev.cumsum(0)
    for m in range(ev.numel(), 0, -1):
        block, mean = ev[:m], csum[m - 1] / m
        if int((block > mean).sum()) == int((block < mean).sum()):
            return max(mean.item(), 0.0), m
    raise AssertionError("unreachable: a single eigenvalue is its own mean and median")


class _Moments:
    """Running sum of patches and of their outer products (float64, about a shift) -> covariance."""

    def __init__(self, d, shift):
        self.n, self.shift = 0, shift
        self.s1 = torch.zeros(d, dtype=torch.float64)
        self.s2 = torch.zeros(d, d, dtype=torch.float64)

    def add(self, P, sign=1):
        P = P - self.shift
        self.n += sign * P.shape[0]
        self.s1 += sign * P.sum(0)
        self.s2 += sign * (P.T @ P)

    def covariance(self):
        mean = self.s1 / self.n
        cov = self.s2 / self.n - torch.outer(mean, mean)
        return 0.5 * (cov + cov.T)


def _positions(x, patch, max_patches, generator, chunk_images=2048):
    """Flat base offsets of the unsaturated patch positions, Bernoulli-subsampled to ~max_patches
    -> (base int64 [P], #positions, #saturated)."""
    N, C, H, W = x.shape
    Hp, Wp = H - patch + 1, W - patch + 1
    sat_counts, kept = [], []
    for start in range(0, N, chunk_images):
        xs = x[start:start + chunk_images]
        sat = ((xs == -1) | (xs == 1)).any(dim=1, keepdim=True).to(torch.float32)  # [n, 1, H, W]
        hit = torch.nn.functional.max_pool2d(sat, patch, stride=1)[:, 0] > 0  # [n, Hp, Wp]
        sat_counts.append(int(hit.sum()))
        kept.append(~hit)
    free = torch.cat(kept)  # [N, Hp, Wp] bool: candidate positions
    total_free = int(free.sum())
    p = min(1.0, max_patches / max(total_free, 1))
    bases = []
    for start in range(0, N, chunk_images):
        f = free[start:start + chunk_images]
        keep = f & (torch.rand(f.shape, generator=generator) < p) if p < 1 else f
        i, a, b = keep.nonzero(as_tuple=True)
        bases.append((i + start) * (C * H * W) + a * W + b)
    return torch.cat(bases), N * Hp * Wp, sum(sat_counts)


def _gather(flat, base, offsets):
    return flat[base[:, None] + offsets[None, :]].to(torch.float64)


def estimate_noise(images, *, patch=DEFAULT_PATCH, max_patches=DEFAULT_MAX_PATCHES,
                   confidence=DEFAULT_CONFIDENCE, seed=0):
    """Noise std sigma of a data set y = A x + sigma eps (white Gaussian eps) -> NoiseEstimate.

    images: uint8 [N, C, H, W] (0..255) or float [N, C, H, W] in the [-1, 1] scale (x = u/127.5 - 1);
    patch: r (patches r x r x C); max_patches: patches sampled (seeded by seed); confidence: the weak-texture
    quantile tau0. Raises ValueError (naming the argument) for bad input, constant images, or too few usable
    patches (fewer than 10 d, d = r*r*C)."""
    x = _as_float_images(images)
    N, C, H, W = x.shape
    checks.integer("patch", patch, 3, min(H, W))
    d = patch * patch * C
    need = MIN_PATCHES_PER_DIM * d
    checks.integer("max_patches", max_patches, need)
    checks.integer("seed", seed, 0)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a probability in (0, 1), got {confidence!r}")
    positions = N * (H - patch + 1) * (W - patch + 1)
    if positions < need:
        raise ValueError(f"images: {N} image(s) of {H}x{W} give {positions} patches of {patch}x{patch}x{C}; the "
                         f"patch covariance needs at least {need} (10 x {d} dimensions): pass more images "
                         f"or a smaller patch")
    flat_images = x.reshape(N, -1)
    if bool((flat_images.amax(1) == flat_images.amin(1)).all()):
        raise ValueError(f"images: all {N} images are constant (zero variance): no patch holds any noise, so "
                         f"there is nothing to estimate sigma from (a noisy data set is never constant)")

    generator = torch.Generator().manual_seed(seed)
    base, positions, saturated = _positions(x, patch, max_patches, generator)
    if base.numel() < need:
        raise ValueError(f"images: only {positions - saturated} of {positions} {patch}x{patch} patches hold no "
                         f"pixel at a clip value (-1 or 1, uint8 0 or 255), {base.numel()} sampled; need at "
                         f"least {need}. Clipped pixels do not follow y = x + sigma eps (the noise's tail is "
                         f"cut off), so they cannot be used: the data set is too saturated (strong noise stored "
                         f"as uint8?). Estimate on the float observations, or pass more images")
    c, di, dj = torch.meshgrid(torch.arange(C), torch.arange(patch), torch.arange(patch), indexing="ij")
    offsets = (c * H * W + di * W + dj).reshape(-1)
    flat = x.reshape(-1)
    DD = gradient_operator(patch, C)
    rank = int(torch.linalg.matrix_rank(DD))
    tau0 = gamma_quantile(confidence, rank / 2, 2 * DD.trace().item() / rank)

    shift = flat.to(torch.float64).mean().item()
    moments = _Moments(d, shift)
    energy = torch.empty(base.numel(), dtype=torch.float64)
    for start in range(0, base.numel(), _CHUNK):
        P = _gather(flat, base[start:start + _CHUNK], offsets)
        energy[start:start + P.shape[0]] = ((P @ DD) * P).sum(1)
        moments.add(P)
    candidates = base.numel()
    sigma2, m = chen_noise_variance(torch.linalg.eigvalsh(moments.covariance()))
    keep = torch.ones(candidates, dtype=torch.bool)
    iterations, converged = 0, False
    while iterations < MAX_ITERATIONS:
        new_keep = keep & (energy <= sigma2 * tau0)
        removed = keep & ~new_keep
        if not bool(removed.any()):
            converged = True
            break
        if int(new_keep.sum()) < need:  # Liu et al. stop when too few patches are left: keep the last estimate
            break
        gone = base[removed]
        for start in range(0, gone.numel(), _CHUNK):
            moments.add(_gather(flat, gone[start:start + _CHUNK], offsets), sign=-1)
        keep = new_keep
        iterations += 1
        sigma2, m = chen_noise_variance(torch.linalg.eigvalsh(moments.covariance()))
    return NoiseEstimate(sigma=math.sqrt(sigma2), method="chen2015-pca+liu2013-weak-texture", patch=patch,
                         positions=positions, saturated=saturated, candidates=candidates,
                         selected=int(keep.sum()), components=m, iterations=iterations, converged=converged)


def estimate_sigma(images, *, patch=DEFAULT_PATCH, max_patches=DEFAULT_MAX_PATCHES,
                   confidence=DEFAULT_CONFIDENCE, seed=0):
    """estimate_noise(...).sigma: the observation noise std in the [-1, 1] scale (training's --sigma)."""
    return estimate_noise(images, patch=patch, max_patches=max_patches, confidence=confidence, seed=seed).sigma


def estimate_dataset_noise(dataset, data=None, *, max_images=None, seed=0):
    """(NoiseEstimate, source path) of a data set named or given by path (data.resolve_source), read as it is
    stored: what `dsd-fast estimate-sigma` prints and `--sigma auto` trains with."""
    source = resolve_source(dataset, data)
    return estimate_noise(load_images(source, max_images=max_images), seed=seed), os.fspath(source)
