"""Orthonormal 2-D DCT-II and the Gaussian blur it diagonalises (paper 004, Section 2.2).

The heat equation with reflective (Neumann) borders, dX = 1/2 Laplacian X, has the DCT-II basis as its
eigenvectors with eigenvalues -lambda_kl = -((pi k/H)^2 + (pi l/W)^2); running it to time b^2 is a
Gaussian blur of std b pixels: X_b = D^T diag(exp(-lambda b^2/2)) D X. The blur + noise process's injection
and adjusted prediction (paper 004 Section 3) are diagonal in the same basis.
"""

import math

import torch

from .edm import added_variance, blur_excess

_dct_cache = {}


def dct_matrix(n, dtype=torch.float64, device=None):
    """D[k, j] = c_k cos(pi (2j+1) k / (2n)), c_0 = sqrt(1/n), c_k = sqrt(2/n) for k > 0.
    Rows are frequencies; D D^T = I. Built in float64, then cast; cached per (n, dtype, device)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (n, dtype, device)
    D = _dct_cache.get(key)
    if D is None:
        k = torch.arange(n, dtype=torch.int64)[:, None]
        j = torch.arange(n, dtype=torch.int64)[None, :]
        # Reduce the phase (2j+1)k modulo the period 4n in exact integers: keeps cos accurate at large n.
        m = ((2 * j + 1) * k) % (4 * n)
        D = torch.cos(m.double() * (math.pi / (2 * n))) * math.sqrt(2.0 / n)
        D[0] = 1.0 / math.sqrt(n)
        D = D.to(dtype=dtype, device=device)
        _dct_cache[key] = D
    return D


def _check_image(x, name):
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 2):
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a floating-point tensor [..., H, W], got {got}")


def dct2(x):
    """Orthonormal 2-D DCT-II over the last two dims: D_H x D_W^T."""
    _check_image(x, "x")
    H, W = x.shape[-2:]
    return dct_matrix(H, x.dtype, x.device) @ x @ dct_matrix(W, x.dtype, x.device).mT


def idct2(X):
    """Inverse of dct2 (the transpose, D orthonormal): D_H^T X D_W."""
    _check_image(X, "X")
    H, W = X.shape[-2:]
    return dct_matrix(H, X.dtype, X.device).mT @ X @ dct_matrix(W, X.dtype, X.device)


def blur_eigenvalues(H, W, dtype=torch.float64, device=None):
    """lambda_kl = (pi k/H)^2 + (pi l/W)^2 as [H, W] (minus the Neumann Laplacian's eigenvalues)."""
    for name, n in (("H", H), ("W", W)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}: expected a positive int, got {n!r}")
    k = torch.arange(H, dtype=torch.float64, device=device) * (math.pi / H)
    l = torch.arange(W, dtype=torch.float64, device=device) * (math.pi / W)
    return (k[:, None] ** 2 + l[None, :] ** 2).to(dtype)


def _per_sample(b, x, name):
    """A float, a 0-d tensor, or a per-sample [B] tensor -> something broadcastable against x."""
    if isinstance(b, torch.Tensor):
        if b.ndim == 0:
            return b.to(x.dtype)
        if b.ndim != 1 or x.ndim < 3 or b.shape[0] != x.shape[0]:
            raise ValueError(f"{name}: expected a float or a per-sample tensor of shape [{x.shape[0]}], "
                             f"got shape {tuple(b.shape)} for x of shape {tuple(x.shape)}")
        return b.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    b = float(b)
    if not math.isfinite(b) or b < 0:
        raise ValueError(f"{name}: expected a finite value >= 0, got {b}")
    return b


def dct_blur(x, b):
    """Gaussian blur of std b pixels with reflective borders: D^T diag(exp(-lambda b^2/2)) D x.
    b is a float or a per-sample [B] tensor; differentiable in x and in b."""
    _check_image(x, "x")
    b = _per_sample(b, x, "b")
    lam = blur_eigenvalues(x.shape[-2], x.shape[-1], x.dtype, x.device)
    return idct2(torch.exp(-0.5 * lam * b**2) * dct2(x))


def coefficients(lam, s, b_s, sigma, blur):
    """The blur + noise process at level s (blur std b_s) from the observation (sigma, blur), per DCT frequency
    lam [H, W] (blur_eigenvalues) and per-sample s, b_s [B] (in lam's dtype): (r, q2, rho, a), each
    broadcastable to [B, 1, H, W]. r = Lambda_s / Lambda_n <= 1 by construction (edm.blur_excess, never dividing
    by Lambda_n); q2 = s^2 - r^2 sigma^2, the injected variance; rho = (sigma/s)^2 (not sigma^2/s^2: s^2 may
    underflow where sigma/s does not); a = Lambda_n (1 - rho r^2), the adjusted prediction's x0_hat coefficient."""
    s, b_s = s.reshape(-1, 1, 1, 1), b_s.reshape(-1, 1, 1, 1)
    r = torch.exp(-0.5 * lam * blur_excess(b_s, blur))
    rho = (sigma / s) ** 2
    return r, added_variance(s, r, sigma), rho, torch.exp(-0.5 * lam * blur**2) * (1 - rho * r**2)


def _coefficients(x, s, b_s, sigma, blur):
    lam = blur_eigenvalues(*x.shape[-2:], x.dtype, x.device)
    return coefficients(lam, s.to(x.dtype), b_s.to(x.dtype), sigma, blur)


def dct_inject(y, eps, s, b_s, sigma, blur):
    """X_s = D^T (r D y + sqrt(s^2 - r^2 sigma^2) D eps): the process at level s (blur std b_s [B]) from y."""
    r, q2, _, _ = _coefficients(y, s, b_s, sigma, blur)
    return idct2(r * dct2(y) + q2.sqrt() * dct2(eps))


def dct_adjusted_prediction(x0_hat, x_t, s, b_s, sigma, blur):
    """y_hat = D^T (rho r D x_t + Lambda_n (1 - rho r^2) D x0_hat) (coefficients)."""
    r, _, rho, a = _coefficients(x_t, s, b_s, sigma, blur)
    return idct2(rho * r * dct2(x_t) + a * dct2(x0_hat))
