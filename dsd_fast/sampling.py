"""Samplers: EDM Heun (teacher), Ambient-Full / Ambient-Truncated (DSD Algorithm 3), Heun on the
probability-flow ODE of a DCT-diagonal blur+noise process (paper 004, Prop. 2.3), and the one-step student.

Every denoiser is called as D(x, sigma) -> x0_hat with sigma a per-sample [B] tensor. Each sampler is a
deterministic per-sample map of its latents z ~ N(0, I) (no stochastic churn), so an image depends only on
its own latents, never on how a batch is split. The state is kept in the latents' dtype (pass float64
latents for EDM's float64 integration).
"""

import dataclasses
from itertools import pairwise

import torch

from dsd_fast import checks
from dsd_fast.reference.dct import dct2, idct2


def _check_grid(num_steps, sigma_min, sigma_max, rho):
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")
    sigma_min = checks.number("sigma_min", sigma_min, strict=True)
    sigma_max = checks.number("sigma_max", sigma_max, sigma_min, strict=True)
    return sigma_min, sigma_max, checks.number("rho", rho, strict=True)


def _check_latents(latents, min_ndim=2, name="latents"):
    if not (isinstance(latents, torch.Tensor) and latents.is_floating_point() and latents.ndim >= min_ndim):
        got = (f"{latents.dtype} tensor of shape {tuple(latents.shape)}" if isinstance(latents, torch.Tensor)
               else type(latents).__name__)
        want = "[B, C, H, W]" if min_ndim == 4 else "[B, ...]"
        raise ValueError(f"{name}: expected a floating-point tensor {want}, got {got}")


def _denoise(D, x, sigma_t, name="D"):
    """x0_hat = D(x, sigma) with sigma = sigma_t for every sample, as a [B] tensor."""
    sigma = torch.full((x.shape[0],), sigma_t, dtype=x.dtype, device=x.device)
    x0_hat = D(x, sigma)
    if not isinstance(x0_hat, torch.Tensor) or x0_hat.shape != x.shape:
        got = tuple(x0_hat.shape) if isinstance(x0_hat, torch.Tensor) else type(x0_hat).__name__
        raise ValueError(f"{name}: expected an output of shape {tuple(x.shape)}, got {got}")
    return x0_hat.to(x.dtype)


def karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None):
    """EDM's steps sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0..N-1, then a trailing 0: float64 [N+1]. N = 1 gives [sigma_max, 0]."""
    sigma_min, sigma_max, rho = _check_grid(num_steps, sigma_min, sigma_max, rho)
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / max(num_steps - 1, 1)
    sigmas = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _heun(f, y, t_steps, f_end=None):
    """EDM's deterministic 2nd-order Heun for dy/dt = f(y, t) over t_steps (a list ending in 0).
    The last step is Euler: f is evaluated at t > 0 only. f_end (default f) evaluates the field at a step's
    end point, for fields that are only piecewise smooth in t."""
    f_end = f if f_end is None else f_end
    for t_cur, t_next in pairwise(t_steps):
        d_cur = f(y, t_cur)
        y_next = y + (t_next - t_cur) * d_cur
        if t_next > 0:
            y_next = y + (t_next - t_cur) * (0.5 * d_cur + 0.5 * f_end(y_next, t_next))
        y = y_next
    return y


@torch.no_grad()
def edm_heun(D, latents, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's deterministic sampler (Karras et al. 2022, Alg. 1): x_T = sigma_max z, then Heun on the
    PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma over karras_sigmas."""
    _check_latents(latents)
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    return _heun(lambda x, t: (x - _denoise(D, x, t)) / t, latents * t_steps[0], t_steps)


@dataclasses.dataclass(frozen=True)
class AmbientInfo:
    """Where ambient_sample stopped: step = index into karras_sigmas of the last denoiser call, sigma_t its
    noise level, truncated = whether x0_hat was returned early (Algorithm 3, line 6)."""

    step: int
    sigma_t: float
    truncated: bool


@torch.no_grad()
def ambient_sample(D, latents, sigma, num_steps=18, *, truncate, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                   return_info=False):
    """DSD Algorithm 3 (Ambient sampling) over karras_sigmas: x_T = sigma_T z; per step
    x0_hat = D(x_t, sigma_t); Ambient-Truncated returns x0_hat at the first step with sigma_{t-1} < sigma
    (sigma, the training noise level, compared as a std, not a variance); otherwise the Euler step
    x_{t-1} = x_t - (sigma_t - sigma_{t-1}) / sigma_t (x_t - x0_hat); Ambient-Full returns x_0.
    With return_info, returns (x, AmbientInfo)."""
    _check_latents(latents)
    sigma = checks.number("sigma", sigma)
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    x_t = latents * t_steps[0]
    for i, (sigma_t, sigma_prev) in enumerate(pairwise(t_steps)):
        x0_hat = _denoise(D, x_t, sigma_t)
        if truncate and sigma_prev < sigma:
            return (x0_hat, AmbientInfo(i, sigma_t, True)) if return_info else x0_hat
        x_t = x_t - (sigma_t - sigma_prev) / sigma_t * (x_t - x0_hat)
    return (x_t, AmbientInfo(num_steps - 1, t_steps[-2], False)) if return_info else x_t


@torch.no_grad()
def dct_ode_sample(D, latents, process, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Heun on the PF-ODE of the DCT-diagonal process Y_s = Lambda_s Y_0 + Psi_s eta, Y = dct2(X), run in
    DCT coordinates over karras_sigmas, the EDM level s going from sigma_max to 0; x_T = sigma_max z.

    Prop. 2.3 (paper 004) gives the forward SDE dY = (dlogLambda/ds) Y ds + Lambda g dB with
    g^2 = d(Psi/Lambda)^2/ds (the paper prints the forward drift with a minus sign; E[Y_s] = Lambda_s Y_0 and
    its own reverse SDE both need the plus), and the score is (Lambda Yhat0 - Y) / Psi^2 with Yhat0 = dct2(D(X, s)).
    The PF-ODE (reverse drift with half the score term, no noise), using Lambda^2 g^2 / Psi^2 =
    2 (dlogPsi/ds - dlogLambda/ds), is
        dY/ds = (dlogLambda/ds) Y - (dlogPsi/ds - dlogLambda/ds) (Lambda Yhat0 - Y)
              = (dLambda/ds) Yhat0 + (dPsi/ds / Psi) (Y - Lambda Yhat0),
    i.e. Y_s = Lambda_s Yhat0 + Psi_s eps_hat moved along s with Yhat0 and eps_hat held fixed. The second
    form is what is integrated: nothing divides by Lambda, which underflows at high frequency. dLambda/ds
    and dPsi/ds are forward-mode derivatives of process.Lambda and process.Psi, taken once per grid level
    (the level is shared by the batch). With Lambda = 1 and Psi = s (noise only) this is EDM's
    dx/ds = (x - D(x, s)) / s in an orthonormal basis, i.e. edm_heun.
    A schedule with a kink (process.kinks, e.g. BlurNoiseCorruption "fixed" at s = sigma) would make the
    Heun step straddling it 1st order: each kink joins the grid, and each step takes the derivatives there
    from its own side, so every step integrates a smooth field.
    """
    _check_latents(latents, min_ndim=4)
    H, W = latents.shape[-2:]
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    kinks = [k for k in getattr(process, "kinks", ()) if t_steps[-2] < k < t_steps[0]]
    t_steps = sorted(set(t_steps[:-1]) | set(kinks), reverse=True) + [0.0]

    def coefficients(s, side):
        # side -1: the interval below s (a step starting at s), +1: above s (a step ending at s).
        # Float64, then cast: in bf16/fp16 s (1 +- 1e-6) would round back onto the kink, taking both sides'
        # derivatives from one side.
        s_d = s * (1 + side * 1e-6) if s in kinks else s
        level = lambda v: torch.full((1,), v, dtype=torch.float64, device=latents.device)  # noqa: E731
        ones = level(1.0)
        Lambda = process.Lambda(level(s), H, W)
        _, dLambda = torch.func.jvp(lambda u: process.Lambda(u, H, W), (level(s_d),), (ones,))
        Psi, dPsi = torch.func.jvp(process.Psi, (level(s),), (ones,))
        return tuple(c.to(latents.dtype) for c in (Lambda, dLambda, dPsi / Psi))

    coef = {(s, side): coefficients(s, side) for s in t_steps[:-1] for side in (-1, 1)}

    def step_field(side):
        def f(Y, s):
            Lambda, dLambda, dlogPsi = coef[s, side]
            Y0_hat = dct2(_denoise(D, idct2(Y), s))
            return dLambda * Y0_hat + dlogPsi * (Y - Lambda * Y0_hat)

        return f

    return idct2(_heun(step_field(-1), dct2(latents * t_steps[0]), t_steps, f_end=step_field(1)))


def one_step(G, z, sigma_init=2.5):
    """One-step student sample x_g = G_theta(z) = G(sigma_init z, sigma_init) (SiD/DSD generator: the
    distilled denoiser evaluated once at sigma_init). Differentiable in z and in G's parameters."""
    _check_latents(z, name="z")
    sigma_init = checks.number("sigma_init", sigma_init, strict=True)
    return _denoise(G, sigma_init * z, sigma_init, name="G")
