"""Per-sample losses of DSD (DSD Eq. 1, 3, 8-10). Each returns [B] = SUM over C, H, W, so
`loss.mean()` equals EDM/SiD's `loss.sum() / batch`; autograd of each gives the paper's gradient."""

import torch

from .edm import edm_weight


def _per_sample(v, x):
    """A scalar or [B] tensor as [B, 1, ..., 1] against x."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _sum_chw(v):
    return v.flatten(1).sum(1)


def denoising_loss(D_x, x0, sigma_t, weight=None):
    """Eq. 1: w(sigma_t) ||D(x_t; sigma_t) - x0||^2 (standard EDM loss; x0 is the clean or noisy target)."""
    w = edm_weight(torch.as_tensor(sigma_t, dtype=D_x.dtype, device=D_x.device)) if weight is None else weight
    return _per_sample(w, D_x).flatten() * _sum_chw((D_x - x0) ** 2)


def ambient_prediction(x0_hat, x_t, sigma_t, sigma):
    """Adjusted prediction of E[y | x_t] (ambient Tweedie): (1 - sigma^2/sigma_t^2) x0_hat + sigma^2/sigma_t^2 x_t."""
    rho = _per_sample(sigma**2 / torch.as_tensor(sigma_t, dtype=x_t.dtype, device=x_t.device) ** 2, x_t)
    return (1 - rho) * x0_hat + rho * x_t


def ambient_loss(x0_hat, x_t, y, sigma_t, sigma, weight=None):
    """Eq. 3 (noise case): w(sigma_t) ||y_hat - y||^2 with y_hat = ambient_prediction(...); sigma_t > sigma."""
    sigma_t = torch.as_tensor(sigma_t, dtype=x_t.dtype, device=x_t.device)
    w = edm_weight(sigma_t) if weight is None else weight
    y_hat = ambient_prediction(x0_hat, x_t, sigma_t, sigma)
    return _per_sample(w, x_t).flatten() * _sum_chw((y_hat - y) ** 2)


def sid_weight(x_g, f_phi, eps=1e-5):
    """SiD's data-dependent weight w_g = 1 / mean_CHW |x_g - f_phi| (no grad; clipped at 1e-5 as SiD)."""
    return 1 / (x_g - f_phi).detach().abs().flatten(1).mean(1).clamp(min=eps)


def sid_generator_loss(f_phi, f_psi, x_g, alpha=1.2, weight=None):
    """Eq. 10: w_g [(1 - alpha) ||f_phi - f_psi||^2 + (f_phi - f_psi)^T (f_psi - x_g)].
    Gradients flow into all three inputs (x_g directly, f_phi / f_psi through x_t of the frozen nets)."""
    w = sid_weight(x_g, f_phi) if weight is None else weight
    d = f_phi - f_psi
    return _per_sample(w, x_g).flatten() * _sum_chw((1 - alpha) * d**2 + d * (f_psi - x_g))


def dmd_loss(f_phi, f_psi, x_g, weight=None):
    """Eq. 9 as a surrogate: grad_x_g = w (f_psi - f_phi) = w sigma_t^2 (s_psi - s_phi), scores held fixed.
    Default w = 1 / mean|x_g - f_phi| (DMD's normalisation)."""
    w = sid_weight(x_g, f_phi) if weight is None else weight
    g = (_per_sample(w, x_g) * (f_psi - f_phi)).detach()
    return _sum_chw(g * x_g)


def sds_loss(f_phi, x_t, eps, x_g, sigma_t, weight=None):
    """Eq. 8 as a surrogate: grad_x_g = w (eps_phi - eps), eps_phi = (x_t - f_phi) / sigma_t (Eq. 7).
    Default w = sigma_t / mean|x_g - f_phi|, giving the DMD/SiD gradient scale."""
    sigma_t = _per_sample(sigma_t, x_t)
    w = sigma_t.flatten() * sid_weight(x_g, f_phi) if weight is None else weight
    eps_phi = (x_t - f_phi) / sigma_t
    g = (_per_sample(w, x_g) * (eps_phi - eps)).detach()
    return _sum_chw(g * x_g)
