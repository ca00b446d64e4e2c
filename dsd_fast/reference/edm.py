"""EDM preconditioning, loss weight and sigma_t samplers (Karras et al. 2022; DSD App. D)."""

import math

import torch

SIGMA_DATA = 0.5
P_MEAN = -1.2
P_STD = 1.2


def c_skip(sigma):
    return SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)


def c_out(sigma):
    return sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt()


def c_in(sigma):
    return 1 / (sigma**2 + SIGMA_DATA**2).sqrt()


def c_noise(sigma):
    return sigma.log() / 4


def edm_weight(sigma_t):
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2: unit loss scale at every sigma."""
    return (sigma_t**2 + SIGMA_DATA**2) / (sigma_t * SIGMA_DATA) ** 2


def precond(F, x, sigma):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), sigma per sample [B]."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return c_skip(s) * x + c_out(s) * F(c_in(s) * x, c_noise(sigma))


def _normal_icdf(v):
    """Phi^-1(v) in float64, v kept inside the open interval (0, 1): a uniform of exactly 0 (Philox's U[0, 1)
    can draw it) or one rounded to 1 (u in bf16) would give -inf/+inf, hence sigma_t = 0 or inf and a NaN loss."""
    v = v.double().clamp(2.0**-53, 1 - 2.0**-53)  # 2v - 1 stays off -1 and 1 in float64
    return math.sqrt(2.0) * torch.erfinv(2 * v - 1)


def sigma_lognormal(u, P_mean=P_MEAN, P_std=P_STD):
    """ln sigma_t ~ N(P_mean, P_std^2), from uniforms u in [0, 1] (inverse CDF: one draw per sample,
    so the sample is a pure function of the counter that produced u), in u's dtype."""
    u = torch.as_tensor(u)
    return (P_mean + P_std * _normal_icdf(u)).exp().to(u.dtype if u.is_floating_point() else torch.get_default_dtype())


def sigma_truncated_lognormal(u, sigma, P_mean=P_MEAN, P_std=P_STD):
    """Log-normal truncated to sigma_t > sigma by inverse CDF: u in (0, 1) is mapped into the CDF
    interval (F(ln sigma), 1). Unlike clamping, no sample carries a zero ambient loss."""
    u = torch.as_tensor(u)
    lo = 0.5 * (1 + math.erf((math.log(sigma) - P_mean) / (P_std * math.sqrt(2.0)))) if sigma > 0 else 0.0
    # Float64 for the interval arithmetic: at large sigma lo is close to 1 and fp32 would round u to 1.
    s = (P_mean + P_std * _normal_icdf(lo + (1 - lo) * u.double())).exp()
    s = s.to(u.dtype if u.is_floating_point() else torch.get_default_dtype())
    # Rounding at the boundary may land exactly on sigma; nudge to the next float above it.
    return above(s, sigma)


def above(s, sigma):
    """s raised to at least the next float above sigma in s's own dtype (sigma_t > sigma, as inject needs)."""
    return torch.maximum(s, torch.full_like(s, sigma).nextafter(torch.full_like(s, math.inf)))


def blur_excess(b_s, blur):
    """b_s^2 - blur^2 >= 0, the blur a level s adds to the observation's, as (b_s - blur)(b_s + blur) floored
    at 0: b_s below blur happens only by rounding (b_s in a 16/32-bit dtype, blur a float64 scalar), and there
    it would make r = Lambda_s/Lambda_n > 1 and the injected noise variance s^2 - r^2 sigma^2 negative."""
    return (b_s - blur).clamp(min=0) * (b_s + blur)


def added_variance(s, r, sigma):
    """s^2 - r^2 sigma^2 >= 0, the noise variance injection adds to r y: as (s - r sigma)(s + r sigma), which
    does not cancel for s just above sigma, floored at 0 against rounding (s > sigma and r <= 1 make it > 0
    in exact arithmetic)."""
    return ((s - r * sigma) * (s + r * sigma)).clamp(min=0)


def sigma_clamp(u, sigma, P_mean=P_MEAN, P_std=P_STD):
    """Reference-code parity: sigma_t = max(sigma, lognormal). Samples at sigma_t = sigma get zero loss."""
    return sigma_lognormal(u, P_mean, P_std).clamp(min=sigma)


KARRAS_SIGMA_MAX = 80.0


def karras_sigma(t, sigma_min=0.002, sigma_max=KARRAS_SIGMA_MAX, rho=7.0):
    """SiD's schedule sigma(t) = (sigma_max^(1/rho) + (1 - t)(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho:
    t = 0 gives sigma_min, t = 1 gives sigma_max (t_max = 800 caps sigma near 24.4)."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + (1 - t) * (b - a)) ** rho


def karras_t(u, t_max=800):
    """SiD's generator-step time: t ~ U(0, t_max/1000) from uniforms u."""
    return u * (t_max / 1000)
