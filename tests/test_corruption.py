"""Observation models and their diffusion processes against dense linear-Gaussian closed forms.

The dense reference builds every operator as a d x d matrix from kron(D_H, D_W) and its own schedule
formulas (not the module's), so the module is checked against the paper's math, not against itself."""

import math

import pytest
import torch

from dsd_fast.corruption import BlurNoiseCorruption, NoiseCorruption
from dsd_fast.reference.dct import dct2, dct_blur, dct_matrix
from dsd_fast.reference.edm import edm_weight
from dsd_fast.reference.philox import corrupt_noise

F64 = torch.float64
SCHEDULES = ["fixed", "linear"]


def _uniform(lo, hi, n=()):
    return lo + (hi - lo) * torch.rand(n, dtype=F64)


def _corruptions(sigma, blur):
    """The three models: noise only, and blur + noise under each schedule."""
    return [NoiseCorruption(sigma)] + [BlurNoiseCorruption(blur, sigma, sch) for sch in SCHEDULES]


# ----- dense reference --------------------------------------------------------------------------------

def _b(c, s):
    """The blur schedule b(s), written from the spec (0 for noise only)."""
    if isinstance(c, NoiseCorruption):
        return 0.0
    return c.blur * (min(s / c.sigma, 1.0) if c.schedule == "fixed" else s / c.sigma)


def _lam(H, W):
    k = torch.arange(H, dtype=F64)[:, None] * math.pi / H
    l = torch.arange(W, dtype=F64)[None, :] * math.pi / W
    return (k**2 + l**2).flatten()


def _dense(c, s, H, W):
    """Dense d x d (C = 1) operators at level s > sigma: A, A_s, and inject's x_t = R y + Q eps."""
    V = torch.kron(dct_matrix(H), dct_matrix(W))  # row-major vec: vec(D_H X D_W^T) = V vec(X)
    lam = _lam(H, W)
    Lambda_n = torch.exp(-lam * _b(c, c.sigma) ** 2 / 2)
    Lambda_s = torch.exp(-lam * _b(c, s) ** 2 / 2)
    r = Lambda_s / Lambda_n  # fine here: small H, W and moderate blur keep Lambda_n far from underflow
    q = (s**2 - r**2 * c.sigma**2).sqrt()
    op = lambda diag: V.T @ torch.diag(diag) @ V
    M = op(Lambda_n * (1 - (c.sigma / s) ** 2 * r**2))  # d y_hat / d x0_hat
    return dict(A=op(Lambda_n), A_s=op(Lambda_s), R=op(r), Q=op(q), M=M)


def _gaussian_posteriors(c, s, mu, S, H, W):
    """x0 ~ N(mu, S), y = A x0 + sigma eps, x_t = R y + Q eps': the linear maps giving E[x0|x_t],
    E[y|x_t] (as mean + K (x_t - m_t)) and Cov[y|x_t]."""
    m = _dense(c, s, H, W)
    A, R, Q = m["A"], m["R"], m["Q"]
    d = mu.numel()
    Cov_y = A @ S @ A.T + c.sigma**2 * torch.eye(d, dtype=F64)
    Cov_t = R @ Cov_y @ R.T + Q @ Q.T
    K_x = torch.linalg.solve(Cov_t, R @ A @ S).T  # S A^T R^T Cov_t^{-1}
    K_y = torch.linalg.solve(Cov_t, R @ Cov_y).T
    m_t = R @ A @ mu
    E_x0 = lambda x_t: mu + K_x @ (x_t - m_t)
    E_y = lambda x_t: A @ mu + K_y @ (x_t - m_t)
    Cov_y_t = Cov_y - K_y @ R @ Cov_y
    return E_x0, E_y, Cov_y_t, m


def _random_gaussian(d):
    L = torch.randn(d, d, dtype=F64) / math.sqrt(d)
    return 0.3 * torch.randn(d, dtype=F64), 0.25 * (L @ L.T) + 0.05 * torch.eye(d, dtype=F64)


def _img(v, H, W):
    return v.reshape(1, 1, H, W)


# ----- validation -------------------------------------------------------------------------------------

def test_bad_arguments():
    for bad in (-0.1, float("nan"), float("inf"), "0.2", True):
        with pytest.raises(ValueError, match="^sigma:"):
            NoiseCorruption(bad)
        with pytest.raises(ValueError, match="^blur:"):
            BlurNoiseCorruption(bad, 0.2)
    with pytest.raises(ValueError, match="^schedule:"):
        BlurNoiseCorruption(1.0, 0.2, "cosine")
    with pytest.raises(ValueError, match="^sigma:"):
        BlurNoiseCorruption(1.0, 0.0, "linear")
    B = 3
    x = torch.randn(B, 2, 5, 7, dtype=F64)
    s = torch.full((B,), 0.5, dtype=F64)
    for c in _corruptions(0.2, 1.0):
        with pytest.raises(ValueError, match="^x:"):
            c.A(x[0])
        with pytest.raises(ValueError, match="^eps:"):
            c.forward(x, s, x[:, :1])
        with pytest.raises(ValueError, match="^eps:"):
            c.inject(x, s, x.float())
        with pytest.raises(ValueError, match="^s:"):
            c.inject(x, s[:2], x)
        with pytest.raises(ValueError, match="^y:"):
            c.ambient_loss(x, x, x[:2], s)
        with pytest.raises(ValueError, match="^index:"):
            c.corrupt(x, 0, torch.arange(B + 1))
        # Noise can only be added: s <= sigma anywhere in the batch is an error, s = sigma included.
        for bad_s in (0.2, 0.1):
            s_bad = s.clone()
            s_bad[int(torch.randint(B, ()))] = bad_s
            with pytest.raises(ValueError, match="^s:"):
                c.inject(x, s_bad, x)
            with pytest.raises(ValueError, match="^s:"):
                c.inject(x, bad_s, x)


# ----- noise case = DESIGN's formulas; blur = 0 reduces to it -----------------------------------------

@pytest.mark.parametrize("B", [1, 3, 7])
def test_noise_case_is_design_formula(B):
    sigma = _uniform(0.05, 1.0).item()
    c = NoiseCorruption(sigma)
    x0, eps, y, x0_hat = torch.randn(4, B, 3, 5, 7, dtype=F64)
    s = sigma * _uniform(1.01, 20.0, B)
    S = s.view(-1, 1, 1, 1)
    x_t = y + (S**2 - sigma**2).sqrt() * eps
    # inject takes sqrt((s - sigma)(s + sigma)) (reference.edm.added_variance, never negative), DESIGN writes
    # sqrt(s^2 - sigma^2): equal up to a few fp64 roundings of x_t, whose size grows with s (|x_t| up to ~60 here,
    # where 1e-14 absolute is 1.5 ulp: seed 222 of the suite found one such element).
    torch.testing.assert_close(c.inject(y, s, eps), x_t, rtol=4 * torch.finfo(F64).eps, atol=1e-14)
    y_hat = (1 - sigma**2 / S**2) * x0_hat + sigma**2 / S**2 * x_t
    torch.testing.assert_close(c.adjusted_prediction(x0_hat, x_t, s), y_hat, rtol=0, atol=1e-14)
    loss = edm_weight(s) * ((y_hat - y) ** 2).sum((1, 2, 3))
    torch.testing.assert_close(c.ambient_loss(x0_hat, x_t, y, s), loss, rtol=1e-13, atol=0)
    w = torch.rand(B, dtype=F64)
    torch.testing.assert_close(c.ambient_loss(x0_hat, x_t, y, s, weight=w), w * ((y_hat - y) ** 2).sum((1, 2, 3)),
                               rtol=1e-13, atol=0)
    torch.testing.assert_close(c.forward(x0, s, eps), x0 + S * eps, rtol=0, atol=1e-14)
    assert torch.equal(c.A(x0), x0)
    assert torch.equal(c.Lambda(s, 5, 7), torch.ones(B, 1, 1, 1, dtype=F64))
    assert torch.equal(c.Psi(s), S) and torch.equal(c.Sigma(s, 5, 7), S)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_blur_zero_equals_noise(schedule):
    B, C, H, W = 3, 2, 5, 7
    sigma = _uniform(0.05, 1.0).item()
    n, c = NoiseCorruption(sigma), BlurNoiseCorruption(0.0, sigma, schedule)
    x0, eps, y, x0_hat = torch.randn(4, B, C, H, W, dtype=F64)
    s = sigma * _uniform(1.01, 20.0, B)
    s_any = sigma * _uniform(0.0, 20.0, B)  # forward is defined at every level
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    close(c.A(x0), n.A(x0))
    close(c.forward(x0, s_any, eps), n.forward(x0, s_any, eps))
    x_t = c.inject(y, s, eps)
    close(x_t, n.inject(y, s, eps))
    close(c.adjusted_prediction(x0_hat, x_t, s), n.adjusted_prediction(x0_hat, x_t, s))
    torch.testing.assert_close(c.ambient_loss(x0_hat, x_t, y, s), n.ambient_loss(x0_hat, x_t, y, s),
                               rtol=1e-12, atol=0)
    close(c.Lambda(s_any, H, W), n.Lambda(s_any, H, W).expand(B, 1, H, W))
    close(c.Sigma(s_any, H, W), n.Sigma(s_any, H, W).expand(B, 1, H, W))
    seed, index = int(torch.randint(2**62, ())), torch.randint(0, 10**9, (B,))
    close(c.corrupt(x0, seed, index), n.corrupt(x0, seed, index))


# ----- schedules: Proposition 2.3 ---------------------------------------------------------------------

def _nondecreasing(Sigma):
    """Sigma: [n_s, 1, H, W] on an increasing grid of s (inf allowed: Lambda underflows at large s)."""
    return bool((Sigma[1:] >= Sigma[:-1]).all())


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_Sigma_nondecreasing(schedule):
    sigma, blur, H, W = _uniform(0.05, 1.0).item(), _uniform(0.3, 3.0).item(), 32, 28
    c = BlurNoiseCorruption(blur, sigma, schedule)
    s = torch.cat([torch.zeros(1, dtype=F64), torch.logspace(-3, math.log10(80), 400, dtype=F64),
                   sigma * torch.linspace(0.9, 1.1, 41, dtype=F64)]).sort().values
    Sigma = c.Sigma(s, H, W)
    assert Sigma.shape == (s.numel(), 1, H, W)
    assert _nondecreasing(Sigma)
    # Lambda_0 = I (the clean data), Lambda at sigma is the observation's blur, Psi = s.
    Lambda = c.Lambda(s, H, W)
    assert torch.equal(Lambda[0], torch.ones(1, H, W, dtype=F64))
    Lambda_n = torch.exp(-_lam(H, W) * blur**2 / 2).view(1, H, W)
    # rtol: b = sigma (blur/sigma) is blur to an ulp, which exp(-lambda b^2/2) scales by lambda b^2 <= 180.
    torch.testing.assert_close(c.Lambda(torch.tensor([sigma], dtype=F64), H, W)[0], Lambda_n, rtol=1e-12, atol=0)
    assert torch.equal(c.Psi(s), s.view(-1, 1, 1, 1))
    # The check can fail: a blur that shrinks as noise grows, b(s) = 2 - s/40 pixels, breaks Proposition 2.3
    # (d/ds log Sigma = 1/s - lambda b/40 < 0 at the top frequency once s > ~1).
    shrinking = BlurNoiseCorruption(blur, sigma, schedule)
    shrinking.b = lambda s: (2 - s / 40).reshape(-1, 1, 1, 1)
    assert not _nondecreasing(shrinking.Sigma(s, H, W))


# ----- forward and inject against the dense process ---------------------------------------------------

@pytest.mark.parametrize("B", [1, 3])
def test_forward_inject_dense(B):
    H, W = 3, 5
    sigma, blur = _uniform(0.05, 1.0).item(), _uniform(0.3, 2.0).item()
    for c in _corruptions(sigma, blur):
        x0, eps, y = torch.randn(3, B, 1, H, W, dtype=F64)
        s_any = sigma * _uniform(0.0, 4.0, B)
        s = sigma * _uniform(1.001, 4.0, B)
        X_s, x_t = c.forward(x0, s_any, eps), c.inject(y, s, eps)
        for i in range(B):
            m_any, m = _dense(c, s_any[i], H, W), _dense(c, s[i], H, W)
            ref = m_any["A_s"] @ x0[i].flatten() + s_any[i] * eps[i].flatten()
            torch.testing.assert_close(X_s[i].flatten(), ref, rtol=0, atol=1e-13)
            ref = m["R"] @ y[i].flatten() + m["Q"] @ eps[i].flatten()
            torch.testing.assert_close(x_t[i].flatten(), ref, rtol=0, atol=1e-13)
        torch.testing.assert_close(c.A(x0).flatten(1), x0.flatten(1) @ _dense(c, sigma, H, W)["A"].T,
                                   rtol=0, atol=1e-13)


@pytest.mark.parametrize("c", _corruptions(0.3, 1.0), ids=["noise", "fixed", "linear"])
def test_inject_monte_carlo(c):
    """From an observation y = A x0 + sigma eps of one fixed x0, X_s = inject(y, s, eps') must follow the
    process: D X_s ~ N(Lambda_s D x0, s^2 I) (per frequency, independent). N = 20000 draws; tolerances are
    6 standard errors: mean s/sqrt(N), variance s^2 sqrt(2/N) (~6 % relative), correlation 1/sqrt(N).
    For "linear", dropping the r^2 in sqrt(s^2 - r^2 sigma^2) is off by sigma^2/s^2 = 44 % at s = 1.5 sigma
    at high frequency (r ~ 1e-3 there)."""
    N, H, W = 20000, 4, 5
    x0 = torch.randn(1, 1, H, W, dtype=F64).expand(N, 1, H, W)
    for ratio in (1.5, 3.0):
        s = torch.full((N,), ratio * c.sigma, dtype=F64)
        y = c.A(x0) + c.sigma * torch.randn_like(x0)
        Z = (dct2(c.inject(y, s, torch.randn_like(x0))) - c.Lambda(s, H, W) * dct2(x0)).flatten(1) / s[0]
        assert Z.mean(0).abs().max() < 6 / math.sqrt(N)
        corr = Z.T @ Z / N
        assert (corr.diagonal() - 1).abs().max() < 6 * math.sqrt(2 / N)
        assert (corr - torch.diag(corr.diagonal())).abs().max() < 6 / math.sqrt(N)


# ----- generalised Tweedie ----------------------------------------------------------------------------

@pytest.mark.parametrize("c", _corruptions(0.2, 0.8) + [NoiseCorruption(0.7), BlurNoiseCorruption(1.5, 0.5)],
                         ids=["noise", "fixed", "linear", "noise_big", "fixed_big"])
def test_tweedie_exact(c):
    """x0 ~ N(mu, S) (full covariance, d = 15): adjusted_prediction(E[x0|x_t], x_t, s) = E[y|x_t] exactly,
    and the ambient loss's gradient in x0_hat, averaged over y | x_t, vanishes at x0_hat = E[x0|x_t]."""
    H, W = 3, 5
    mu, S = _random_gaussian(H * W)
    s_grid = torch.cat([torch.tensor([1.001]), _uniform(1.05, 6.0, 3)]) * c.sigma
    for s in s_grid:
        E_x0, E_y, _, m = _gaussian_posteriors(c, s, mu, S, H, W)
        sv = s.view(1)
        x_t = torch.randn(H * W, dtype=F64) * (1 + s)
        x0_hat = _img(E_x0(x_t), H, W).requires_grad_()
        y_hat = c.adjusted_prediction(x0_hat, _img(x_t, H, W), sv)
        torch.testing.assert_close(y_hat.flatten(), E_y(x_t), rtol=0, atol=1e-10)
        # The gradient is affine in y, so its mean over y | x_t is the gradient at y = E[y | x_t].
        (g_mean,) = torch.autograd.grad(c.ambient_loss(x0_hat, _img(x_t, H, W), _img(E_y(x_t), H, W), sv).sum(),
                                        x0_hat)
        y = torch.randn(H * W, dtype=F64)
        (g,) = torch.autograd.grad(c.ambient_loss(x0_hat, _img(x_t, H, W), _img(y, H, W), sv).sum(), x0_hat)
        # Closed form of the gradient at any y: 2 w M^T (y_hat - y), M = d y_hat / d x0_hat.
        g_ref = 2 * edm_weight(s) * m["M"].T @ (y_hat.detach().flatten() - y)
        torch.testing.assert_close(g.flatten(), g_ref, rtol=1e-10, atol=1e-12)
        assert g_mean.norm() <= 1e-9 * g.norm()


@pytest.mark.parametrize("c", _corruptions(0.2, 0.8), ids=["noise", "fixed", "linear"])
def test_tweedie_monte_carlo(c):
    """Monte-Carlo version: y ~ p(y | x_t) (N = 4000), mean gradient of the ambient loss at E[x0|x_t] is 0
    within 6 standard errors per pixel; a denoiser off by a constant 0.5 in x0_hat fails that test."""
    H, W, N = 3, 5, 4000
    mu, S = _random_gaussian(H * W)
    s = _uniform(1.5, 4.0) * c.sigma
    E_x0, E_y, Cov_y_t, m = _gaussian_posteriors(c, s, mu, S, H, W)
    x_t = torch.randn(H * W, dtype=F64) * (1 + s)
    L = torch.linalg.cholesky(Cov_y_t + 1e-12 * torch.eye(H * W, dtype=F64))
    y = E_y(x_t) + torch.randn(N, H * W, dtype=F64) @ L.T
    # Per-pixel std of one sample's gradient 2 w M^T (y_hat - y): 2 w sqrt(diag(M^T Cov M)).
    w = edm_weight(s)
    se = 2 * w * (m["M"].T @ Cov_y_t @ m["M"]).diagonal().sqrt() / math.sqrt(N)
    x_ts, ys, sv = _img(x_t, H, W).expand(N, 1, H, W), y.view(N, 1, H, W), s.expand(N)

    def mean_grad(x0_hat):
        x0_hat = _img(x0_hat, H, W).expand(N, 1, H, W).clone().requires_grad_()
        (g,) = torch.autograd.grad(c.ambient_loss(x0_hat, x_ts, ys, sv).sum(), x0_hat)
        return g.mean(0).flatten()

    assert (mean_grad(E_x0(x_t)).abs() <= 6 * se).all()
    assert not (mean_grad(E_x0(x_t) + 0.5).abs() <= 6 * se).all()


@pytest.mark.parametrize("c", _corruptions(0.3, 0.9), ids=["noise", "fixed", "linear"])
def test_ambient_loss_gradcheck(c):
    B, H, W = 2, 3, 4
    x0_hat, x_t, y = (torch.randn(B, 2, H, W, dtype=F64, requires_grad=True) for _ in range(3))
    s = _uniform(0.35, 2.0, B)
    assert torch.autograd.gradcheck(lambda a, b, z: c.ambient_loss(a, b, z, s), (x0_hat, x_t, y))


# ----- seeded corruption ------------------------------------------------------------------------------

@pytest.mark.parametrize("B", [1, 3, 7])
def test_corrupt_seeded_and_batch_independent(B):
    C, H, W = 3, 8, 9
    seed = int(torch.randint(2**62, ()))
    index = torch.randperm(10**6)[:B] + int(torch.randint(0, 2**40, ()))  # offsets past 2^31
    x = torch.rand(B, C, H, W) * 2 - 1
    eps32 = corrupt_noise(seed, index, (C, H, W), torch.float32)
    for c in _corruptions(_uniform(0.05, 1.0).item(), _uniform(0.3, 2.0).item()):
        y = c.corrupt(x, seed, index)
        assert y.dtype == torch.float32
        assert torch.equal(y, c.A(x) + c.sigma * eps32)
        perm = torch.randperm(B)
        torch.testing.assert_close(c.corrupt(x[perm], seed, index[perm]), y[perm], rtol=0, atol=1e-6)
        i = int(torch.randint(B, ()))
        torch.testing.assert_close(c.corrupt(x[i : i + 1], seed, index[i : i + 1]), y[i : i + 1], rtol=0, atol=1e-6)
        # float64: the same float32 Philox draws, cast; A in float64.
        y64 = c.corrupt(x.double(), seed, index)
        assert y64.dtype == F64
        torch.testing.assert_close(y64, c.A(x.double()) + c.sigma * eps32.double(), rtol=0, atol=1e-14)
        # A different seed gives different noise.
        assert not torch.allclose(c.corrupt(x, seed + 1, index), y)


def test_blur_observation_is_dct_blur():
    c = BlurNoiseCorruption(_uniform(0.3, 2.0).item(), 0.1)
    x = torch.randn(3, 2, 28, 28, dtype=F64)
    torch.testing.assert_close(c.A(x), dct_blur(x, c.blur), rtol=0, atol=0)
    s = c.sigma * _uniform(0.0, 3.0, 3)
    b = c.b(s).flatten()
    torch.testing.assert_close(b, c.blur * torch.clamp(s / c.sigma, max=1), rtol=0, atol=1e-15)
    assert c.Lambda(s, 28, 28).shape == (3, 1, 28, 28) and c.Psi(s).shape == (3, 1, 1, 1)


@pytest.mark.parametrize("schedule", ["fixed", "linear"])
def test_blur_process_fused_path_matches_reference(monkeypatch, schedule):
    """BlurNoiseCorruption.inject / ambient_loss through the fused DCT ops (Triton; the interpreter on CPU)
    equal the reference path, values and d/d x0_hat."""
    pytest.importorskip("triton")
    cor = BlurNoiseCorruption(blur=1.3, sigma=0.2, schedule=schedule)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    y, eps, x0 = (torch.randn(3, 2, 8, 8, device=dev) for _ in range(3))
    s = torch.tensor([0.25, 0.9, 4.0], device=dev)
    out = {}
    for name in ("reference", "triton"):
        monkeypatch.setenv("DSD_FAST_BACKEND", name)
        x_t = cor.inject(y, s, eps)
        x0_hat = x0.clone().requires_grad_()
        loss = cor.ambient_loss(x0_hat, x_t, y, s)
        (g,) = torch.autograd.grad(loss.sum(), x0_hat)
        out[name] = (x_t, loss, g)
    for a, b in zip(out["triton"], out["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
