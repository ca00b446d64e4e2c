import math

import pytest
import torch

from dsd_fast.reference import edm


def test_precond_identity_at_small_sigma():
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    F = lambda x_in, c_noise: torch.randn_like(x_in)  # any bounded network output
    s = torch.full((5,), 1e-9, dtype=torch.float64)
    torch.testing.assert_close(edm.precond(F, x, s), x, atol=1e-8, rtol=0)


def test_precond_coefficients_closed_form():
    s = torch.rand(100, dtype=torch.float64) * 80 + 1e-3
    sd = edm.SIGMA_DATA
    torch.testing.assert_close(edm.c_skip(s), sd**2 / (s**2 + sd**2))
    torch.testing.assert_close(edm.c_out(s), s * sd / torch.sqrt(s**2 + sd**2))
    torch.testing.assert_close(edm.c_in(s), 1 / torch.sqrt(s**2 + sd**2))
    torch.testing.assert_close(edm.c_noise(s), torch.log(s) / 4)
    # EDM's design: unit-variance training target, so c_skip^2 sd^2 + c_out^2 ... ; and w = 1 / c_out^2.
    torch.testing.assert_close(edm.edm_weight(s), 1 / edm.c_out(s) ** 2)


def test_lognormal_moments():
    u = torch.rand(200_000, dtype=torch.float64)
    ln = edm.sigma_lognormal(u).log()
    assert abs(ln.mean().item() - edm.P_MEAN) < 0.02
    assert abs(ln.std().item() - edm.P_STD) < 0.02


@pytest.mark.parametrize("sigma", [0.05, 0.2, 0.5, 1.0])
def test_truncated_lognormal_is_conditional_lognormal(sigma):
    u = torch.rand(100_000, dtype=torch.float64)
    s = edm.sigma_truncated_lognormal(u, sigma)
    assert (s > sigma).all()
    # Compare with rejection sampling of the untruncated law: quantiles agree.
    r = edm.sigma_lognormal(torch.rand(400_000, dtype=torch.float64))
    r = r[r > sigma][: s.numel()]
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    torch.testing.assert_close(s.quantile(q), r.quantile(q), rtol=0.03, atol=0)


def test_truncated_lognormal_fp32_extremes():
    u = torch.tensor([0.0, 1e-12, 0.5, 1 - 1e-7, 1.0], dtype=torch.float32)
    s = edm.sigma_truncated_lognormal(u, 0.2)
    assert s.dtype == torch.float32 and torch.isfinite(s).all() and (s > 0.2).all()


def test_clamp_fraction_matches_design():
    # DESIGN: clamping zeroes the loss of 36.6% of each batch at sigma = 0.2.
    u = torch.rand(400_000, dtype=torch.float64)
    frac = (edm.sigma_clamp(u, 0.2) == 0.2).double().mean().item()
    expected = 0.5 * (1 + math.erf((math.log(0.2) - edm.P_MEAN) / (edm.P_STD * math.sqrt(2))))
    assert abs(expected - 0.366) < 1e-3
    assert abs(frac - expected) < 0.005


def test_karras_schedule_endpoints_and_monotone():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = edm.karras_sigma(t)
    torch.testing.assert_close(s[0], torch.tensor(0.002, dtype=torch.float64))
    torch.testing.assert_close(s[-1], torch.tensor(80.0, dtype=torch.float64))
    assert (s.diff() > 0).all()
    u = torch.rand(10_000, dtype=torch.float64)
    t = edm.karras_t(u, t_max=800)
    assert t.max() <= 0.8
    assert edm.karras_sigma(t).max() <= edm.karras_sigma(torch.tensor(0.8)) + 1e-9
