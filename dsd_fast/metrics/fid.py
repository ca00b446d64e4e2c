"""FID statistics: Inception features in batches, float64 mean/covariance, Frechet distance, .npz stats.

Feature modes (how an image reaches the network's 299x299 input; reference and samples must use the same):
  edm   (default) uint8 at its own resolution straight into the network, which resizes it itself with TF1's
        resize_bilinear (FIDInceptionV3.preprocess): EDM's fid.py / StyleGAN's pipeline, the one the DSD paper's
        numbers (and EDM's reference files such as cifar10-32x32.npz) come from;
  clean clean-fid's PIL bicubic on the CPU (clean-fid's default, its reference files);
  gpu   the clean resize's kernel as an antialiased bicubic interpolate on the device (clean's numbers, faster).
Upscaling small images, edm and the bicubic modes differ by far more than round-off (FID ~100 between their
feature sets on 200 Fashion-MNIST images), so a number is comparable only with numbers of its own mode.

Stats files are `.npz` with `mu` [D] and `sigma` [D,D] (float64), the format clean-fid and EDM use, so
their reference stats load as they are.

The Frechet distance uses tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2): the right-hand matrix is symmetric
PSD, so two float64 `eigh` replace clean-fid's `scipy.linalg.sqrtm(S1 @ S2)` (a general Schur method,
slow at D=2048, complex-valued round-off, and an eps offset when the product is singular). Where
sqrtm is accurate the two agree to round-off (tests: 1e-6); no scipy needed.
"""

import os
import tempfile
import zipfile

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .inception import FEATURE_DIM, RESOLUTION, load_inception

RESIZE_MODES = ("edm", "clean", "gpu")


def _as_float64(x, name):
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values")
    return x


def _check_stats(mu, sigma, mu_name="mu", sigma_name="sigma"):
    mu, sigma = _as_float64(mu, mu_name), _as_float64(sigma, sigma_name)
    if mu.ndim != 1 or mu.size == 0:
        raise ValueError(f"{mu_name}: expected a mean vector [D], D >= 1, got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{sigma_name}: expected a covariance [D,D] with D={mu.shape[0]} as {mu_name}, "
                         f"got shape {sigma.shape}")
    # Relative to the matrix's scale: float32 covariances are symmetric only to their round-off.
    if np.abs(sigma - sigma.T).max() > 1e-6 * np.abs(sigma).max():
        raise ValueError(f"{sigma_name}: expected a symmetric covariance matrix")
    return mu, sigma


def feature_stats(features):
    """features [N,D] (torch or numpy, N >= 2) -> (mu [D], sigma [D,D]) in float64; sigma unbiased
    (divides by N - 1), as numpy.cov, clean-fid and EDM."""
    f = _as_float64(features, "features")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: expected [N,D] with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd(w):
    """Eigenvalues of a PSD matrix with round-off removed: below the numerical-rank cutoff (as
    numpy.linalg.matrix_rank) they are zeros, whose square roots would otherwise add ~1e-8 each."""
    return np.where(w > w.shape[0] * np.finfo(w.dtype).eps * max(w.max(), 0), w, 0)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64, as a Python float."""
    mu1, sigma1 = _check_stats(mu1, sigma1, "mu1", "sigma1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "mu2", "sigma2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu2: expected dimension {mu1.shape[0]} as mu1, got {mu2.shape[0]}")
    w, V = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (V * np.sqrt(_psd(w))) @ V.T
    m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(_psd(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def save_stats(path, mu, sigma):
    """Write `mu`, `sigma` (float64) to the .npz at `path` atomically (temp file + os.replace)."""
    mu, sigma = _check_stats(mu, sigma)
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".stats-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_stats(path):
    """(mu [D], sigma [D,D]) float64 from a stats .npz (ours, clean-fid's or EDM's)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: stats file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            missing = [k for k in ("mu", "sigma") if k not in z.files]
            if missing:
                raise ValueError(f"lacks {missing} (has {sorted(z.files)})")
            mu, sigma = z["mu"], z["sigma"]
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"path: {path!r} is not a stats file with 'mu' [D] and 'sigma' [D,D]: {e}") from e
    try:
        return _check_stats(mu, sigma)
    except ValueError as e:
        raise ValueError(f"path: {path!r}: {e}") from e


def _to_uint8(images):
    """uint8 0..255 as is; floats in [-1,1] quantised as EDM saves images: (x * 127.5 + 128) clipped, truncated."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images: expected a tensor [B,C,H,W] with C in (1, 3), got {shape}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images: expected uint8 (0..255) or floating ([-1,1]) dtype, got {images.dtype}")
    # 2, not 1: generators overshoot a little; 0..255 floats passed by mistake must not saturate silently.
    if images.numel() and images.abs().max() > 2:
        raise ValueError("images: floating images must be in [-1,1] (pass uint8 for 0..255)")
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _resize_clean(images):
    """clean-fid's resize: per channel, PIL bicubic on float32 ('F') images to 299x299, clipped to 0..255."""
    x = images.cpu().numpy()
    out = np.empty((*x.shape[:2], RESOLUTION, RESOLUTION), dtype=np.float32)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            img = PIL.Image.fromarray(x[b, c].astype(np.float32))
            out[b, c] = np.asarray(img.resize((RESOLUTION, RESOLUTION), PIL.Image.Resampling.BICUBIC))
    return torch.from_numpy(out.clip(0, 255))


def _resize_gpu(images):
    """Antialiased bicubic (PIL's a=-0.5 kernel) on the images' device, clipped to 0..255."""
    x = F.interpolate(images.float(), size=(RESOLUTION, RESOLUTION), mode="bicubic", align_corners=False,
                      antialias=True)
    return x.clamp(0, 255)


class InceptionFeatures:
    """Batched FID features from images.

    images: uint8 [B,C,H,W] in 0..255, or floating [B,C,H,W] in [-1,1] (quantised to uint8 first, so
    generated images are measured as their saved PNGs would be); C = 1 is repeated to RGB (as EDM does).
    mode 'edm': the network's own TF1 bilinear resize of the uint8 values (EDM / StyleGAN); 'clean': clean-fid's
    PIL bicubic resize on the CPU, per image; 'gpu': antialiased bicubic interpolate on `device` (module
    docstring). Images already 299x299 are not resized. bf16: run the network under bf16 autocast (resize and
    normalisation stay fp32). Features come back as float32 CPU tensors [B,2048].
    """

    def __init__(self, net=None, mode="edm", device="cpu", batch_size=64, bf16=False):
        if mode not in RESIZE_MODES:
            raise ValueError(f"mode: expected one of {RESIZE_MODES}, got {mode!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        self.device = torch.device(device)
        self.net = (net if net is not None else load_inception()).to(self.device).eval()
        self.mode, self.batch_size, self.bf16 = mode, batch_size, bf16

    @torch.no_grad()
    def __call__(self, images):
        images = _to_uint8(images)
        if images.shape[0] == 0:
            return torch.zeros(0, FEATURE_DIM)
        out = []
        for chunk in images.split(self.batch_size):
            chunk = chunk.expand(-1, 3, -1, -1)
            if chunk.shape[-2:] == (RESOLUTION, RESOLUTION) or self.mode == "edm":
                x = chunk.to(self.device).float()  # edm: the network's preprocess resizes
            elif self.mode == "clean":
                x = _resize_clean(chunk).to(self.device)
            else:
                x = _resize_gpu(chunk.to(self.device))  # uint8 crosses to the device: 4x less traffic
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out.append(self.net(x).float().cpu())
        return torch.cat(out)

    def iter_features(self, batches):
        """Yield the features of each image batch of an iterable (e.g. a generator of samples)."""
        for images in batches:
            yield self(images)

    def stats(self, batches):
        """(mu, sigma) float64 over all images of an iterable of batches."""
        return feature_stats(torch.cat(list(self.iter_features(batches))))
