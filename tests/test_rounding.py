"""Rounding near sigma_t = sigma cannot produce a NaN (issue 11): r = Lambda_s/Lambda_n <= 1 and the injected
noise variance s^2 - r^2 sigma^2 >= 0 by construction, in every dtype, blur, sigma and schedule, at levels exactly
at and one ulp above sigma (and at the levels the clamp and truncated samplers actually draw), through the
reference math, the public ops and the fused DCT kernels (interpreted on CPU)."""

import math
import os

import pytest
import torch

from dsd_fast import functional
from dsd_fast.corruption import BlurNoiseCorruption, NoiseCorruption
from dsd_fast.ops import dct as ops_dct
from dsd_fast.reference.edm import above, added_variance, blur_excess, sigma_clamp, sigma_truncated_lognormal

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
BLURS = [0.0, 0.3, 0.7, 1.0, 1.18, 1.4, 2.0, 3.0]
SIGMAS = [0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0]
H, W = 8, 6


def _processes():
    for blur in BLURS:
        for sigma in SIGMAS:
            for schedule in ("fixed", "linear"):
                if schedule == "linear" and sigma == 0:
                    continue  # rejected by design: b(s) = blur s/sigma
                yield BlurNoiseCorruption(blur, sigma, schedule)


def _levels_above(sigma, dtype, n=64):
    """One ulp above sigma in dtype, then what the clamp and truncated samplers draw (their floor included), from
    uniforms that include 0 and 1 (Philox's U[0, 1) draws 0; a uniform cast to bf16 can round to 1). At sigma = 0
    the ulp level is a subnormal where EDM's weight (s^2 + sigma_d^2)/(s sigma_d)^2 itself is infinite: skipped."""
    u = torch.cat([torch.tensor([0.0, 1.0]), torch.rand(n, dtype=torch.float64)]).to(dtype)
    ulp = above(torch.zeros(1 if sigma > 0 else 0, dtype=dtype), sigma)
    return torch.cat([ulp, above(sigma_clamp(u, sigma), sigma), sigma_truncated_lognormal(u, sigma)])


def _finite(name, x):
    bad = (~torch.isfinite(x.double())).sum().item()
    assert bad == 0, f"{name}: {bad} of {x.numel()} values non-finite"


def test_the_reported_case_is_finite():
    """The issue's reproduction: BlurNoiseCorruption(1.4, 0.4), 4096 clamped levels in float32 gave 2393
    non-finite x_t (r = 1.000001 at the next float above sigma)."""
    c = BlurNoiseCorruption(1.4, 0.4)
    s = above(sigma_clamp(torch.rand(4096), 0.4), 0.4)
    y = torch.randn(4096, 1, H, W)
    r = c._r(s, H, W)
    assert r.max().item() <= 1
    _finite("x_t", c.inject(y, s, torch.randn_like(y)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blur_process_coefficients_at_and_above_sigma(dtype):
    for c in _processes():
        for s in (torch.full((1,), c.sigma, dtype=dtype), _levels_above(c.sigma, dtype)):
            if c.sigma == 0 and s.max() == 0:
                continue  # s = 0 is no diffusion level
            r = c._r(s, H, W)
            q2 = added_variance(s.reshape(-1, 1, 1, 1), r, c.sigma)
            _finite(f"{c} r", r)
            assert r.max().item() <= 1, f"{c}: r = {r.max().item()} > 1 at s = {s.max().item()} ({dtype})"
            assert q2.min().item() >= 0, f"{c}: injected variance {q2.min().item()} < 0 ({dtype})"
            assert blur_excess(c.b(s), c.blur).min().item() >= 0
            Lam = c.Lambda(s, H, W)
            assert 0 <= Lam.min().item() and Lam.max().item() <= 1
            assert not c.Sigma(s, H, W).isnan().any()  # it may overflow to inf (Lambda_s underflows), never NaN
            x0 = torch.randn(s.shape[0], 2, H, W, dtype=dtype)
            _finite(f"{c} forward", c.forward(x0, s, torch.randn_like(x0)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blur_inject_and_loss_finite_one_ulp_above_sigma(dtype):
    for c in _processes():
        s = _levels_above(c.sigma, dtype, n=8)
        y = torch.randn(s.shape[0], 2, H, W, dtype=dtype)
        x_t = c.inject(y, s, torch.randn_like(y))
        _finite(f"{c} inject", x_t)
        x0_hat = torch.randn_like(y)
        _finite(f"{c} adjusted_prediction", c.adjusted_prediction(x0_hat, x_t, s))
        _finite(f"{c} ambient_loss", c.ambient_loss(x0_hat, x_t, y, s))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noise_process_and_add_noise_finite_one_ulp_above_sigma(dtype):
    for sigma in SIGMAS:
        c = NoiseCorruption(sigma)
        s = _levels_above(sigma, dtype, n=8)
        assert added_variance(s, 1.0, sigma).min().item() > 0  # strictly: d/ds of the std is 1/q
        y = torch.randn(s.shape[0], 2, H, W, dtype=dtype)
        _finite(f"{c} inject", c.inject(y, s, torch.randn_like(y)))
        sigma_t = s.clone().requires_grad_()
        x_t = functional.add_noise(y, sigma_t, sigma, seed=7)
        _finite(f"add_noise sigma={sigma}", x_t)
        (g,) = torch.autograd.grad(x_t.sum(), sigma_t)
        _finite(f"add_noise d/dsigma_t sigma={sigma}", g)


@pytest.fixture
def kernels(monkeypatch):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("DSD_FAST_BACKEND", "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_dct_kernels_finite_one_ulp_above_sigma(kernels, dtype):
    """The fused inject and loss kernels get b_s and blur separately: they floor b_s^2 - blur^2 and q^2 at 0 too
    (a b_s one rounding below blur in bf16 gave r > 1 there as well)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for blur in (0.7, 1.4, 3.0):
        for sigma in (0.05, 0.4, 1.0):
            # Level one ulp above sigma, and b_s one rounding below blur: the worst case for r and q^2.
            s = above(torch.zeros(2, dtype=dtype, device=device), sigma)
            b_s = torch.full((2,), blur, dtype=dtype, device=device)
            b_s[1] = torch.tensor(blur, dtype=dtype).nextafter(torch.tensor(0.0, dtype=dtype))
            y = torch.randn(2, 3, H, W, dtype=dtype, device=device)
            x_t = ops_dct.dct_inject(y, torch.randn_like(y), s, b_s, sigma, blur)
            _finite(f"dct_inject blur={blur} sigma={sigma}", x_t)
            w = torch.ones(2, dtype=dtype, device=device)
            loss = ops_dct.dct_ambient_loss(torch.randn_like(y), x_t, y, s, b_s, w, sigma, blur)
            _finite(f"dct_ambient_loss blur={blur} sigma={sigma}", loss)


def test_rounded_b_below_blur_is_floored():
    """blur_excess: b_s below blur only by rounding gives excess 0 (r = 1), never a negative one."""
    blur = 1.4
    b = torch.tensor(blur, dtype=torch.float32)
    below = b.nextafter(torch.tensor(0.0))
    assert blur_excess(below, blur).item() == 0
    assert blur_excess(b.nextafter(torch.tensor(math.inf)), blur).item() > 0
