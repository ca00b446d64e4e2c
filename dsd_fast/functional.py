"""Public op API (DESIGN §2). Validates arguments, then dispatches to the fastest eligible backend.

Per-sample losses are the SUM over C, H, W (shape [B]), so `.mean()` equals EDM/SiD's
`loss.sum() / batch`.
"""

import math
import numbers

import torch

from . import checks
from .ops import backend
from .ops import dct as _ops_dct
from .ops import losses as _ops_losses
from .ops import noise as _ops_noise
from .reference import dct as _dct
from .reference import edm as _edm
from .reference import losses as _losses
from .reference import philox as _philox

__all__ = ["corrupt", "add_noise", "ambient_loss", "ambient_loss_precond", "sid_generator_loss", "dmd_loss",
           "sds_loss", "dct2", "idct2", "dct_blur"]


# ----------------------------------------------------------------------------------------------------
# Validation: every error names the argument and what was expected.

def _check_image(name, x, ndim=4):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor (NCHW), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")


def _check_like(name, x, ref_name, ref):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (as {ref_name}), got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise ValueError(f"{name}: expected dtype {ref.dtype} (as {ref_name}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {x.device}")


def _check_per_sample(name, v, ref, *, greater_than=None, allow_scalar=True):
    """A per-sample value: a python scalar / 0-d tensor (broadcast) or a [B] tensor on ref's device."""
    B = ref.shape[0]
    if allow_scalar and (isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.ndim == 0)):
        v = torch.full((B,), float(v), dtype=ref.dtype, device=ref.device)
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape [{B}] or a number, got {type(v).__name__}")
    if v.shape != (B,):
        raise ValueError(f"{name}: expected shape [{B}] (one value per sample), got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {v.dtype}")
    if v.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device}, got {v.device}")
    vd = v.detach()
    if not checks.reads_values(vd):
        return v
    if not torch.isfinite(vd).all():
        raise ValueError(f"{name}: expected finite values, got {vd[~torch.isfinite(vd)][:4].tolist()}")
    if (vd < 0).any():
        raise ValueError(f"{name}: expected values >= 0, got min {vd.min().item()}")
    if greater_than is not None and (vd <= greater_than).any():
        raise ValueError(f"{name}: expected every value > sigma = {greater_than}, got min {vd.min().item()}")
    return v


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _check_index(index, ref):
    B = ref.shape[0]
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(index)
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"index: expected an integer tensor of shape [{B}], got dtype {index.dtype}")
    if index.shape != (B,):
        raise ValueError(f"index: expected shape [{B}] (one image index per sample), got {tuple(index.shape)}")
    if checks.reads_values(index) and (index < 0).any():
        raise ValueError(f"index: expected non-negative image indices, got min {index.min().item()}")
    return index.to(device=ref.device, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------
# Ops.

def corrupt(x, sigma, *, seed, index):
    """y = x + sigma * eps with eps[i] fixed by (seed, index[i]): the dataset's one corruption draw."""
    _check_image("x", x)
    sigma = checks.number("sigma", sigma)
    seed = _check_seed(seed)
    index = _check_index(index, x)
    if backend.choose("corrupt", x.device, _ops_noise.NOISE_SUPPORTED) != "reference":
        return _ops_noise.corrupt(x, sigma, seed, index)
    eps = _philox.corrupt_noise(seed, index, tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    return x + sigma * eps


def add_noise(y, sigma_t, sigma, *, seed, offset=0):
    """x_t = y + sqrt(sigma_t^2 - sigma^2) eps, eps = Philox stream (seed, offset + flat element index)."""
    _check_image("y", y)
    sigma = checks.number("sigma", sigma)
    sigma_t = _check_per_sample("sigma_t", sigma_t, y, greater_than=sigma)
    seed = _check_seed(seed)
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"offset: expected a non-negative integer, got {offset!r}")
    if backend.choose("add_noise", y.device, _ops_noise.NOISE_SUPPORTED) != "reference":
        return _ops_noise.add_noise(y, sigma_t, sigma, seed, int(offset))
    eps = _philox.stream_normal(seed, int(offset), tuple(y.shape), dtype=y.dtype, device=y.device)
    scale = _edm.added_variance(sigma_t, 1.0, sigma).sqrt().reshape(-1, 1, 1, 1)
    return y + scale * eps


def _check_ambient_args(name, first, x_t, y, sigma_t, sigma, weight):
    """The ambient losses' shared arguments: images like `first`, sigma >= 0, sigma_t > sigma, weight [B]."""
    _check_image(name, first)
    _check_like("x_t", x_t, name, first)
    _check_like("y", y, name, first)
    sigma = checks.number("sigma", sigma)
    sigma_t = _check_per_sample("sigma_t", sigma_t, first, greater_than=sigma)
    if weight is not None:
        weight = _check_per_sample("weight", weight, first)
    return sigma_t, sigma, weight


def ambient_loss(x0_hat, x_t, y, sigma_t, sigma, weight=None):
    """Per-sample ambient-Tweedie loss (DSD Eq. 3) [B]; weight None means EDM's w(sigma_t)."""
    sigma_t, sigma, weight = _check_ambient_args("x0_hat", x0_hat, x_t, y, sigma_t, sigma, weight)
    if backend.choose("ambient_loss", x0_hat.device, _ops_losses.SUPPORTED) != "reference":
        return _ops_losses.ambient_loss(x0_hat, x_t, y, sigma_t, sigma, weight)
    return _losses.ambient_loss(x0_hat, x_t, y, sigma_t, sigma, weight)


def ambient_loss_precond(F_x, x_t, y, sigma_t, sigma, weight=None):
    """ambient_loss of the EDM-preconditioned x0_hat = c_skip(sigma_t) x_t + c_out(sigma_t) F_x, F_x the raw
    network output; the fused op never materialises x0_hat."""
    sigma_t, sigma, weight = _check_ambient_args("F_x", F_x, x_t, y, sigma_t, sigma, weight)
    if backend.choose("ambient_loss_precond", F_x.device, _ops_losses.SUPPORTED) != "reference":
        return _ops_losses.ambient_loss_precond(F_x, x_t, y, sigma_t, sigma, weight)
    s = sigma_t.to(F_x.dtype).reshape(-1, 1, 1, 1)
    return _losses.ambient_loss(_edm.c_skip(s) * x_t + _edm.c_out(s) * F_x, x_t, y, sigma_t, sigma, weight)


def sid_generator_loss(f_phi, f_psi, x_g, alpha=1.2, weight=None):
    """Per-sample SiD generator loss (Eq. 10) [B]; weight None means w_g = 1 / mean|x_g - f_phi|."""
    _check_image("f_phi", f_phi)
    _check_like("f_psi", f_psi, "f_phi", f_phi)
    _check_like("x_g", x_g, "f_phi", f_phi)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha: expected a finite real number, got {alpha!r}")
    if weight is not None:
        weight = _check_per_sample("weight", weight, f_phi)
    if backend.choose("sid_generator_loss", f_phi.device, _ops_losses.SUPPORTED) != "reference":
        return _ops_losses.sid_generator_loss(f_phi, f_psi, x_g, float(alpha), weight)
    return _losses.sid_generator_loss(f_phi, f_psi, x_g, float(alpha), weight)


def dmd_loss(f_phi, f_psi, x_g, weight=None):
    """DMD surrogate (Eq. 9) [B]: its gradient w.r.t. x_g is w (f_psi - f_phi), scores held fixed; weight None
    means w = 1 / mean|x_g - f_phi|. Only x_g receives a gradient."""
    _check_image("f_phi", f_phi)
    _check_like("f_psi", f_psi, "f_phi", f_phi)
    _check_like("x_g", x_g, "f_phi", f_phi)
    if weight is not None:
        weight = _check_per_sample("weight", weight, f_phi)
    if backend.choose("dmd_loss", f_phi.device, _ops_losses.SUPPORTED) != "reference":
        return _ops_losses.dmd_loss(f_phi, f_psi, x_g, weight)
    return _losses.dmd_loss(f_phi, f_psi, x_g, weight)


def sds_loss(f_phi, x_t, eps, x_g, sigma_t, weight=None):
    """SDS surrogate (Eq. 8) [B]: its gradient w.r.t. x_g is w (eps_phi - eps), eps_phi = (x_t - f_phi) / sigma_t;
    weight None means w = sigma_t / mean|x_g - f_phi|. Only x_g receives a gradient."""
    _check_image("f_phi", f_phi)
    _check_like("x_t", x_t, "f_phi", f_phi)
    _check_like("eps", eps, "f_phi", f_phi)
    _check_like("x_g", x_g, "f_phi", f_phi)
    sigma_t = _check_per_sample("sigma_t", sigma_t, f_phi)
    if checks.reads_values(sigma_t) and (sigma_t.detach() == 0).any():
        raise ValueError("sigma_t: expected every value > 0 (eps_phi divides by sigma_t), got a zero")
    if weight is not None:
        weight = _check_per_sample("weight", weight, f_phi)
    if backend.choose("sds_loss", f_phi.device, _ops_losses.SUPPORTED) != "reference":
        return _ops_losses.sds_loss(f_phi, x_t, eps, x_g, sigma_t, weight)
    return _losses.sds_loss(f_phi, x_t, eps, x_g, sigma_t, weight)


def dct_inject(y, sigma_t, blur_t, sigma, blur, *, seed, offset=0):
    """X_s of the DCT blur + noise process at levels sigma_t from observations y = blur_blur(x) + sigma eps:
    D^T (r D y + sqrt(sigma_t^2 - r^2 sigma^2) D eps), r = exp(-lambda (blur_t^2 - blur^2) / 2), blur_t [B] the
    process's blur std at sigma_t; eps the add_noise stream (seed, offset + flat element index), drawn in-kernel."""
    _check_image("y", y)
    sigma, blur = checks.number("sigma", sigma), checks.number("blur", blur)
    sigma_t = _check_per_sample("sigma_t", sigma_t, y, greater_than=sigma)
    blur_t = _check_per_sample("blur_t", blur_t, y)
    seed = _check_seed(seed)
    offset = checks.integer("offset", offset, 0)
    if _ops_dct.can_fuse("dct_inject_seeded", y):  # else (fp64, a huge image) the reference
        return _ops_dct.dct_inject_seeded(y, sigma_t, blur_t, sigma, blur, _ops_noise.signed_seed(seed), offset)
    eps = _philox.stream_normal(seed, offset, tuple(y.shape), dtype=y.dtype, device=y.device)
    return _dct.dct_inject(y, eps, sigma_t, blur_t, sigma, blur)


def dct_ambient_loss(x0_hat, x_t, y, sigma_t, blur_t, sigma, blur, weight=None):
    """Per-sample ambient loss [B] of the DCT blur + noise process (paper 004 Section 3): weight ||y_hat - y||^2,
    y_hat = D^T (rho r D x_t + Lambda_n (1 - rho r^2) D x0_hat), rho = sigma^2/sigma_t^2; weight None means EDM's
    w(sigma_t). The fused op works in DCT space and fuses d/d x0_hat into its forward pass."""
    sigma_t, sigma, weight = _check_ambient_args("x0_hat", x0_hat, x_t, y, sigma_t, sigma, weight)
    blur = checks.number("blur", blur)
    blur_t = _check_per_sample("blur_t", blur_t, x0_hat)
    weight = _edm.edm_weight(sigma_t) if weight is None else weight
    if _ops_dct.can_fuse("dct_ambient_loss", x0_hat):  # else (fp64, a huge image) the reference
        return _ops_dct.dct_ambient_loss(x0_hat, x_t, y, sigma_t, blur_t, weight, sigma, blur)
    y_hat = _dct.dct_adjusted_prediction(x0_hat, x_t, sigma_t, blur_t, sigma, blur)
    return weight * (y_hat - y).square().flatten(1).sum(1)


def _check_dct_input(name, x):
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a floating-point tensor with >= 2 dims (..., H, W), got {got}")
    if x.shape[-1] > 256 or x.shape[-2] > 256:
        raise ValueError(f"{name}: expected H, W <= 256, got {tuple(x.shape[-2:])}")


def dct2(x):
    """Orthonormal 2-D DCT-II over the last two dims."""
    _check_dct_input("x", x)
    if backend.choose("dct2", x.device, _ops_dct.SUPPORTED) != "reference":
        return _ops_dct.dct2(x)
    return _dct.dct2(x)


def idct2(x):
    """Inverse of dct2 (orthonormal DCT-III) over the last two dims."""
    _check_dct_input("x", x)
    if backend.choose("idct2", x.device, _ops_dct.SUPPORTED) != "reference":
        return _ops_dct.idct2(x)
    return _dct.idct2(x)


def dct_blur(x, b):
    """Gaussian blur with std b pixels (reflective borders) as D^T diag(exp(-lambda b^2/2)) D; b per sample."""
    _check_image("x", x)
    b = _check_per_sample("b", b, x)
    if backend.choose("dct_blur", x.device, _ops_dct.SUPPORTED) != "reference":
        return _ops_dct.dct_blur(x, b)
    return _dct.dct_blur(x, b)
