import copy

import pytest
import torch

from dsd_fast.reference import edm, losses

f64 = dict(dtype=torch.float64)


def _rand(*shape):
    return torch.randn(*shape, **f64)


@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (3, 3, 5, 7), (7, 1, 28, 28)])
def test_ambient_loss_value_and_gradients_closed_form(shape):
    B = shape[0]
    sigma = 0.2
    sigma_t = sigma + torch.rand(B, **f64) * 3 + 1e-3
    x0_hat, x_t, y = (_rand(*shape).requires_grad_() for _ in range(3))
    L = losses.ambient_loss(x0_hat, x_t, y, sigma_t, sigma)
    rho = (sigma**2 / sigma_t**2).view(-1, 1, 1, 1)
    r = (1 - rho) * x0_hat + rho * x_t - y
    w = edm.edm_weight(sigma_t)
    torch.testing.assert_close(L, w * (r**2).sum((1, 2, 3)))
    g = torch.randn(B, **f64)
    gx0, gxt, gy = torch.autograd.grad(L, (x0_hat, x_t, y), g)
    c = (2 * g * w).view(-1, 1, 1, 1) * r
    torch.testing.assert_close(gx0, c * (1 - rho))
    torch.testing.assert_close(gxt, c * rho)
    torch.testing.assert_close(gy, -c)


def test_ambient_loss_noise_case_tweedie_on_gaussian_data():
    """x ~ N(mu, S), y = x + sigma eps, x_t = y + sqrt(s^2 - sigma^2) eps': with the exact E[x|x_t] the
    adjusted prediction equals the exact E[y|x_t], and the loss's expected gradient vanishes there."""
    d, sigma = 6, 0.3
    M = _rand(d, d)
    S = M @ M.T / d + 0.1 * torch.eye(d, **f64)
    mu = _rand(d)
    for s in (0.31, 0.7, 2.0, 10.0):
        x_t = mu + _rand(64, d) * 2
        K = S + s**2 * torch.eye(d, **f64)
        Ex = mu + (x_t - mu) @ torch.linalg.solve(K, S)  # E[x | x_t]
        Ey = mu + (x_t - mu) @ torch.linalg.solve(K, S + sigma**2 * torch.eye(d, **f64))  # E[y | x_t]
        st = torch.full((64,), s, **f64)
        y_hat = losses.ambient_prediction(Ex.view(64, 1, 1, d), x_t.view(64, 1, 1, d), st, sigma)
        torch.testing.assert_close(y_hat.view(64, d), Ey, rtol=1e-10, atol=1e-10)
        # E_y[grad_x0hat L] at x0_hat = E[x|x_t]: the gradient is linear in y, so plug in E[y|x_t].
        x0 = Ex.view(64, 1, 1, d).clone().requires_grad_()
        L = losses.ambient_loss(x0, x_t.view(64, 1, 1, d), Ey.view(64, 1, 1, d), st, sigma)
        (g,) = torch.autograd.grad(L.sum(), x0)
        assert g.abs().max() < 1e-9


def test_denoising_loss():
    x, x0 = _rand(3, 2, 4, 5), _rand(3, 2, 4, 5)
    s = torch.rand(3, **f64) + 0.1
    torch.testing.assert_close(losses.denoising_loss(x, x0, s), edm.edm_weight(s) * ((x - x0) ** 2).sum((1, 2, 3)))


def _tiny_nets(C=2):
    G = torch.nn.Sequential(torch.nn.Conv2d(C, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, C, 1)).double()
    f = torch.nn.Sequential(torch.nn.Conv2d(C, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, C, 1)).double()
    return G, f


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_zero_gradient_when_fake_equals_teacher(alpha):
    G, f_teacher = _tiny_nets()
    f_fake = copy.deepcopy(f_teacher)
    z = _rand(5, 2, 6, 7)
    x_g = G(z)
    sigma_t = torch.rand(5, 1, 1, 1, **f64) + 0.1
    x_t = x_g + sigma_t * torch.randn_like(x_g)
    L = losses.sid_generator_loss(f_teacher(x_t), f_fake(x_t), x_g, alpha=alpha)
    grads = torch.autograd.grad(L.sum(), list(G.parameters()))
    assert all((g == 0).all() for g in grads)
    # ... and the gradient is NOT zero once the fake score differs (the test can fail).
    with torch.no_grad():
        f_fake[0].bias.add_(0.1)
    x_g = G(z)
    x_t = x_g + sigma_t * torch.randn_like(x_g)
    L = losses.sid_generator_loss(f_teacher(x_t), f_fake(x_t), x_g, alpha=alpha)
    grads = torch.autograd.grad(L.sum(), list(G.parameters()))
    assert sum(g.abs().sum() for g in grads) > 1e-6


def test_sid_gradients_closed_form_and_alpha_one():
    f_phi, f_psi, x_g = (_rand(4, 3, 5, 6).requires_grad_() for _ in range(3))
    alpha = 1.2
    L = losses.sid_generator_loss(f_phi, f_psi, x_g, alpha)
    w = 1 / (x_g - f_phi).abs().mean((1, 2, 3))
    d = f_phi - f_psi
    torch.testing.assert_close(L, w * ((1 - alpha) * d**2 + d * (f_psi - x_g)).sum((1, 2, 3)))
    g = _rand(4)
    gphi, gpsi, gx = torch.autograd.grad(L, (f_phi, f_psi, x_g), g)
    W = (g * w).view(-1, 1, 1, 1)
    torch.testing.assert_close(gphi, W * (2 * (1 - alpha) * d + f_psi - x_g))
    torch.testing.assert_close(gpsi, W * (-2 * (1 - alpha) * d - (f_psi - x_g) + d))
    torch.testing.assert_close(gx, -W * d)  # the weight carries no gradient
    # alpha = 1: only the cross term remains.
    L1 = losses.sid_generator_loss(f_phi, f_psi, x_g, 1.0)
    torch.testing.assert_close(L1, w * (d * (f_psi - x_g)).sum((1, 2, 3)))
    # The default weight is 1 / mean|x_g - f_phi|; an explicit weight replaces it.
    torch.testing.assert_close(losses.sid_weight(x_g, f_phi), w.detach())
    w2 = torch.rand(4, **f64)
    torch.testing.assert_close(losses.sid_generator_loss(f_phi, f_psi, x_g, alpha, w2), L / w * w2)


def test_dmd_and_sds_gradients():
    B = 3
    x_g = _rand(B, 2, 4, 4).requires_grad_()
    f_phi, f_psi = _rand(B, 2, 4, 4), _rand(B, 2, 4, 4)
    sigma_t = torch.rand(B, **f64) + 0.5
    eps = torch.randn_like(x_g)
    x_t = x_g.detach() + sigma_t.view(-1, 1, 1, 1) * eps
    w = 1 / (x_g.detach() - f_phi).abs().mean((1, 2, 3))
    (g,) = torch.autograd.grad(losses.dmd_loss(f_phi, f_psi, x_g).sum(), x_g)
    # Eq. 9: w_t (s_psi - s_phi) with s = -(x_t - f) / sigma_t^2, w_t = sigma_t^2 w.
    s_phi = -(x_t - f_phi) / sigma_t.view(-1, 1, 1, 1) ** 2
    s_psi = -(x_t - f_psi) / sigma_t.view(-1, 1, 1, 1) ** 2
    torch.testing.assert_close(g, (w * sigma_t**2).view(-1, 1, 1, 1) * (s_psi - s_phi))
    (g,) = torch.autograd.grad(losses.sds_loss(f_phi, x_t, eps, x_g, sigma_t).sum(), x_g)
    eps_phi = -sigma_t.view(-1, 1, 1, 1) * s_phi  # Eq. 7
    torch.testing.assert_close(g, (sigma_t * w).view(-1, 1, 1, 1) * (eps_phi - eps))
    # SDS's gradient is (x_g - f_phi) * w, independent of the noise draw.
    torch.testing.assert_close(g, w.view(-1, 1, 1, 1) * (x_g.detach() - f_phi))
