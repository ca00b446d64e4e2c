"""Samplers against closed forms on Gaussian data, x0 ~ N(0, Sigma), whose exact denoiser is linear:
D(x, s) = Sigma (Sigma + s^2 I)^-1 x. In Sigma's eigenbasis every sampler is then a scalar recursion per
eigenvalue e, and the exact PF-ODE flow from level sigma_max to 0 is the gain sqrt(e / (e + sigma_max^2))."""

import math
import random

import pytest
import torch

from dsd_fast.corruption import BlurNoiseCorruption, NoiseCorruption
from dsd_fast.reference.dct import dct2, dct_matrix, idct2
from dsd_fast.sampling import AmbientInfo, ambient_sample, dct_ode_sample, edm_heun, karras_sigmas, one_step


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: intra-op threads only add contention (measured 2-5x slower on a loaded
    2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(random.getrandbits(63))


def random_spectrum(d, gen, lo=0.05, hi=2.0):
    """A random orthonormal Q and eigenvalues e in [lo, hi] (both ends included)."""
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    e = lo + (hi - lo) * torch.rand(d, generator=gen, dtype=torch.float64)
    e[0], e[-1] = lo, hi
    return Q, e


class GaussianDenoiser:
    """Exact E[x0 | x0 + s eps] for x0 ~ N(0, Q diag(e) Q^T) over the flattened C*H*W; records its sigmas."""

    def __init__(self, Q, e):
        self.Q, self.e, self.calls = Q, e, []

    def __call__(self, x, sigma):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        self.calls.append(sigma.clone())
        Q, e = self.Q.to(x.dtype), self.e.to(x.dtype)
        y = (x.flatten(1) @ Q) * (e / (e + sigma[:, None] ** 2))
        return (y @ Q.T).view_as(x)


def in_basis(Q, gain, x):
    """Q diag(gain) Q^T applied to each flattened sample of x."""
    return ((x.flatten(1) @ Q) * gain @ Q.T).view_as(x)


def heun_gain(t_steps, a):
    """EDM Heun on the scalar linear ODE dx/ds = a(s) x, per entry of the tensor a(s): the gain x_0/x_T."""
    g = torch.ones_like(a(t_steps[0]))
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:], strict=True):
        h = t_next - t_cur
        g_euler = g * (1 + h * a(t_cur))
        g = g + h * (0.5 * a(t_cur) * g + 0.5 * a(t_next) * g_euler) if t_next > 0 else g_euler
    return g


def ambient_gain(t_steps, e, stop=None):
    """Algorithm 3 in the eigenbasis: Euler gains through step `stop`, then the denoiser's gain there."""
    g = torch.ones_like(e)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        shrink = e / (e + t_cur**2)
        if i == stop:
            return g * shrink
        g = g * (1 - (t_cur - t_next) / t_cur * (1 - shrink))
    return g


@pytest.mark.parametrize("num_steps", [1, 2, 18, 40])
def test_karras_sigmas(num_steps, gen):
    sigma_min, sigma_max, rho = 0.002, 80.0, 7.0
    if num_steps == 2:  # also off-default grids
        u = torch.rand(3, generator=gen, dtype=torch.float64).tolist()
        sigma_min, sigma_max, rho = 0.01 + u[0], 2.0 + 100 * u[1], 1.0 + 9 * u[2]
    t = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    assert t.dtype == torch.float64 and t.shape == (num_steps + 1,)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    expect = [(a + i / max(num_steps - 1, 1) * (b - a)) ** rho for i in range(num_steps)] + [0.0]
    torch.testing.assert_close(t, torch.tensor(expect, dtype=torch.float64), rtol=1e-13, atol=0)
    assert t[0].item() == pytest.approx(sigma_max, rel=1e-14)
    if num_steps > 1:
        assert t[-2].item() == pytest.approx(sigma_min, rel=1e-12)
    assert bool((t[1:] < t[:-1]).all())


@pytest.mark.parametrize("B, shape", [(1, (1, 4, 4)), (3, (3, 5, 7)), (7, (1, 8, 8))])
def test_edm_heun_closed_form(B, shape, gen):
    d = math.prod(shape)
    Q, e = random_spectrum(d, gen)
    z = torch.randn(B, *shape, generator=gen, dtype=torch.float64)
    t_steps = karras_sigmas(18).tolist()
    D = GaussianDenoiser(Q, e)
    x = edm_heun(D, z, num_steps=18)
    # 18 steps: 1 Euler + 17 Heun steps = 35 denoiser calls, none at sigma = 0.
    assert [c[0].item() for c in D.calls] == sorted(t_steps[:-1] + t_steps[1:-1], reverse=True)
    # The Gaussian's PF-ODE in its eigenbasis: dx/ds = (x - e/(e + s^2) x)/s = s/(e + s^2) x.
    gain = heun_gain(t_steps, lambda s: s / (e + s * s))
    torch.testing.assert_close(x, in_basis(Q, gain, 80 * z), rtol=1e-10, atol=1e-10)
    # fp32 state, same map.
    x32 = edm_heun(GaussianDenoiser(Q, e), z.float(), num_steps=18)
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32.double(), x, rtol=1e-4, atol=1e-4)
    # Converges to the exact PF-ODE flow sqrt(e / (e + sigma_max^2)) (2nd order: 4e-4 at 200 steps).
    x_fine = edm_heun(GaussianDenoiser(Q, e), z, num_steps=200)
    torch.testing.assert_close(x_fine, in_basis(Q, (e / (e + 80.0**2)).sqrt(), 80 * z), rtol=1e-3, atol=1e-3)


def test_edm_heun_reproduces_covariance(gen):
    """40 Heun steps from 2^15 latents give Sigma to ~2.5 % (sampling error ~2 %, discretisation ~1.5 %);
    Euler (no correction) is off by ~12 %, 18 Heun steps by ~10 % on this spectrum."""
    Q, e = random_spectrum(16, gen)
    Sigma = Q @ torch.diag(e) @ Q.T
    z = torch.randn(2**15, 1, 4, 4, generator=gen)
    x = edm_heun(GaussianDenoiser(Q, e), z, num_steps=40).double().flatten(1)
    err = torch.linalg.matrix_norm(x.T @ x / x.shape[0] - Sigma) / torch.linalg.matrix_norm(Sigma)
    assert err < 0.05, f"relative Frobenius error of the sample covariance {err:.4f}"


def _first_below(t_steps, sigma):
    return next((i for i in range(len(t_steps) - 1) if t_steps[i + 1] < sigma), None)


@pytest.mark.parametrize("case", ["random", "grid_value", "dsd_default", "above_max", "zero"])
def test_ambient_truncated_stops_at_first_sigma_below(case, gen):
    num_steps = 18
    t_steps = karras_sigmas(num_steps).tolist()
    k_grid = int(torch.randint(1, num_steps - 1, (), generator=gen))
    u = torch.rand((), generator=gen).item()
    sigma = {"random": math.exp(math.log(0.002) + u * math.log(80 / 0.002)),
             "grid_value": t_steps[k_grid],  # sigma_{t-1} == sigma does not truncate
             "dsd_default": 0.2,  # a sigma^2 < sigma comparison would stop earlier (0.36 lies in between)
             "above_max": 100.0, "zero": 0.0}[case]
    k = _first_below(t_steps, sigma)
    if case == "grid_value":
        assert k == k_grid
    if case == "dsd_default":
        assert k != _first_below([t**2 for t in t_steps], sigma)
    Q, e = random_spectrum(16, gen)
    z = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    D = GaussianDenoiser(Q, e)
    out = []
    x, info = ambient_sample(lambda x, s: out.append(D(x, s)) or out[-1], z, sigma, num_steps, truncate=True,
                             return_info=True)
    called = [c[0].item() for c in D.calls]
    if k is None:  # sigma = 0: never truncates, runs the full grid
        assert called == t_steps[:-1] and info == AmbientInfo(num_steps - 1, t_steps[-2], False)
        torch.testing.assert_close(x, in_basis(Q, ambient_gain(t_steps, e), 80 * z), rtol=1e-10, atol=1e-10)
        return
    assert called == t_steps[: k + 1], f"sigma = {sigma}: expected a stop at step {k}"
    assert info == AmbientInfo(k, t_steps[k], True)
    assert torch.equal(x, out[-1])  # returns x0_hat itself
    gain = ambient_gain(t_steps, e, stop=k)
    torch.testing.assert_close(x, in_basis(Q, gain, 80 * z), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("num_steps", [1, 18, 40])
def test_ambient_full_runs_whole_grid(num_steps, gen):
    t_steps = karras_sigmas(num_steps).tolist()
    Q, e = random_spectrum(35, gen)
    z = torch.randn(7, 1, 5, 7, generator=gen, dtype=torch.float64)
    D = GaussianDenoiser(Q, e)
    x, info = ambient_sample(D, z, 0.2, num_steps, truncate=False, return_info=True)
    assert [c[0].item() for c in D.calls] == t_steps[:-1]
    assert info == AmbientInfo(num_steps - 1, t_steps[-2], False)
    torch.testing.assert_close(x, in_basis(Q, ambient_gain(t_steps, e), 80 * z), rtol=1e-10, atol=1e-10)
    assert torch.equal(ambient_sample(D, z, torch.tensor(0.2), num_steps, truncate=False), x)


PROCESSES = {
    "fixed": lambda: BlurNoiseCorruption(0.5, 0.2),
    "linear": lambda: BlurNoiseCorruption(0.3, 0.3, schedule="linear"),
    "fixed_sigma0": lambda: BlurNoiseCorruption(0.5, 0.0),
}


class DiagonalBlurDenoiser:
    """Exact E[x0 | X_s] for x0 ~ N(0, Sigma), Sigma diagonal in DCT space with variances e [C, H, W], and
    X_s = A_s x0 + s eps: per frequency Yhat0 = Lambda e / (Lambda^2 e + s^2) Y."""

    def __init__(self, process, e):
        self.process, self.e = process, e

    def __call__(self, x, sigma):
        Lambda = self.process.Lambda(sigma, *x.shape[-2:])
        e = self.e.to(x.dtype)
        return idct2(Lambda * e / (Lambda**2 * e + sigma.view(-1, 1, 1, 1) ** 2) * dct2(x))


def _Lambda(process, s, shape):
    return process.Lambda(torch.tensor([s], dtype=torch.float64), *shape[-2:])[0]


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("B, shape", [(1, (1, 4, 4)), (3, (3, 5, 7))])
def test_dct_ode_closed_form(name, B, shape, gen):
    """Per frequency, Y_s = Lambda_s Y_0 + s eta with Y_0 ~ N(0, e) has variance v(s) = Lambda_s^2 e + s^2 and
    the PF-ODE dY/ds = a(s) Y, a = (Lambda' Lambda e + s) / v = v'/(2 v), whose flow is Y ∝ sqrt(v).
    Heun on it (Lambda' by central differences, independent of the sampler's forward-mode derivative) must
    match the sampler to rounding; 100 steps must match the exact flow down to sigma_min, then the final
    Euler step (to ~3e-3)."""
    process = PROCESSES[name]()
    e = 0.05 + 1.95 * torch.rand(shape, generator=gen, dtype=torch.float64)
    z = torch.randn(B, *shape, generator=gen, dtype=torch.float64)
    D = DiagonalBlurDenoiser(process, e)

    def a(s):
        Lambda, h = _Lambda(process, s, shape), 1e-6 * s
        dLambda = (_Lambda(process, s + h, shape) - _Lambda(process, s - h, shape)) / (2 * h)
        return (dLambda * Lambda * e + s) / (Lambda**2 * e + s * s)

    if name != "fixed":
        # "fixed" puts its kink s = sigma on the grid with one-sided derivatives: another recursion.
        t_steps = karras_sigmas(18).tolist()
        x = dct_ode_sample(D, z, process, num_steps=18)
        torch.testing.assert_close(dct2(x), heun_gain(t_steps, a) * dct2(80 * z), rtol=1e-7, atol=1e-7)
    v = lambda s: _Lambda(process, s, shape) ** 2 * e + s * s
    # "fixed" changes its blur only below sigma = 0.2, where the Karras grid is coarser relative to the
    # blur's scale: it needs more steps for the same accuracy (still 2nd order: error / 4 per doubling).
    n = 300 if name == "fixed" else 100
    t_steps = karras_sigmas(n).tolist()
    gain = (v(t_steps[-2]) / v(t_steps[0])).sqrt() * (1 - t_steps[-2] * a(t_steps[-2]))
    x_fine = dct_ode_sample(D, z, process, num_steps=n)
    torch.testing.assert_close(dct2(x_fine), gain * dct2(80 * z), rtol=6e-3, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_dct_ode_noise_is_edm_heun(dtype, tol, gen):
    """Lambda = 1, Psi = s: the DCT PF-ODE is EDM's, in an orthonormal basis."""
    Q, e = random_spectrum(105, gen)
    z = torch.randn(3, 3, 5, 7, generator=gen, dtype=dtype)
    for num_steps in (1, 18):
        x_dct = dct_ode_sample(GaussianDenoiser(Q, e), z, NoiseCorruption(0.2), num_steps=num_steps)
        torch.testing.assert_close(x_dct, edm_heun(GaussianDenoiser(Q, e), z, num_steps=num_steps),
                                   rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["linear", "fixed_sigma0", "fixed"])
def test_dct_ode_reproduces_covariance(name, gen):
    """Full (dense) Sigma: the exact denoiser is Sigma A_s^T (A_s Sigma A_s^T + s^2 I)^-1 x with
    A_s = K^T diag(Lambda_s) K, K the 2-D DCT matrix. 40 Heun steps from 2^14 latents give the covariance of
    X_0 = A_0 x0 (A_0 = I unless sigma = 0) to ~3.5 % (Euler: 12-32 %). "fixed" with sigma > 0 has a kink at
    s = sigma: without putting it on the grid (one-sided derivatives) the error was ~20 % at 40 steps."""
    process, H, W = PROCESSES[name](), 4, 4
    Q, e = random_spectrum(H * W, gen)
    Sigma = Q @ torch.diag(e) @ Q.T
    K = torch.kron(dct_matrix(H), dct_matrix(W))
    A = lambda s: K.T @ torch.diag(process.Lambda(s.reshape(1), H, W).flatten()) @ K
    calls = []

    def D(x, sigma):
        calls.append(sigma)
        A_s = A(sigma[0])
        M = Sigma @ A_s.T @ torch.linalg.inv(A_s @ Sigma @ A_s.T + sigma[0] ** 2 * torch.eye(H * W).double())
        return (x.flatten(1) @ M.T).view_as(x)

    z = torch.randn(2**14, 1, H, W, generator=gen, dtype=torch.float64)
    x = dct_ode_sample(D, z, process, num_steps=40).flatten(1)
    assert all(bool((c == c[0]).all()) for c in calls) and len(calls) == 79 + 2 * len(process.kinks)
    A_0 = A(torch.zeros((), dtype=torch.float64))
    target = A_0 @ Sigma @ A_0.T
    err = torch.linalg.matrix_norm(x.T @ x / x.shape[0] - target) / torch.linalg.matrix_norm(target)
    assert err < 0.08, f"relative Frobenius error of the sample covariance {err:.4f}"


def test_batch_split_invariance(gen):
    """Same latents -> same images, whatever the batch split (every sampler is per-sample)."""
    Q, e = random_spectrum(35, gen)
    D = GaussianDenoiser(Q, e)
    z = torch.randn(7, 1, 5, 7, generator=gen, dtype=torch.float64)
    samplers = [lambda z: edm_heun(D, z, num_steps=5),
                lambda z: ambient_sample(D, z, 0.3, 6, truncate=True),
                lambda z: ambient_sample(D, z, 0.3, 6, truncate=False),
                lambda z: one_step(D, z),
                lambda z: dct_ode_sample(D, z, BlurNoiseCorruption(1.0, 0.2), num_steps=5)]
    for sample in samplers:
        whole = sample(z)
        parts = torch.cat([sample(z[:1]), sample(z[1:4]), sample(z[4:])])
        torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_step(dtype, gen):
    """x_g = G(sigma_init z, sigma_init); gradients reach z and G's parameters."""
    B, C, H, W = 3, 2, 5, 7
    M = torch.randn(C * H * W, C * H * W, generator=gen, dtype=dtype, requires_grad=True)
    seen = []

    def G(x, sigma):
        seen.append(sigma)
        return (x.flatten(1) @ M.T).view_as(x)

    z = torch.randn(B, C, H, W, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(B, C, H, W, generator=gen, dtype=dtype)
    for sigma_init in (2.5, 0.7):
        seen.clear()
        x_g = one_step(G, z, sigma_init) if sigma_init != 2.5 else one_step(G, z)
        assert len(seen) == 1 and torch.equal(seen[0], torch.full((B,), sigma_init, dtype=dtype))
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
        torch.testing.assert_close(x_g, sigma_init * (z.flatten(1) @ M.T).view_as(z), **tol)
        gz, gM = torch.autograd.grad((x_g * w).sum(), (z, M))
        torch.testing.assert_close(gz, sigma_init * (w.flatten(1) @ M).view_as(z), **tol)
        torch.testing.assert_close(gM, sigma_init * w.flatten(1).T @ z.detach().flatten(1), **tol)


def test_bad_arguments():
    z = torch.randn(2, 1, 4, 4)
    ident = lambda x, s: x
    cases = [
        (lambda: karras_sigmas(0), "num_steps"),
        (lambda: karras_sigmas(2.0), "num_steps"),
        (lambda: karras_sigmas(True), "num_steps"),
        (lambda: karras_sigmas(4, sigma_min=0.0), "sigma_min"),
        (lambda: karras_sigmas(4, sigma_min=1.0, sigma_max=0.5), "sigma_max"),
        (lambda: karras_sigmas(4, rho=0.0), "rho"),
        (lambda: karras_sigmas(4, sigma_max=float("inf")), "sigma_max"),
        (lambda: edm_heun(ident, z, num_steps=0), "num_steps"),
        (lambda: edm_heun(ident, torch.randn(4)), "latents"),
        (lambda: edm_heun(ident, torch.zeros(2, 1, 4, 4, dtype=torch.int64)), "latents"),
        (lambda: edm_heun(lambda x, s: x[:1], z), "D"),
        (lambda: ambient_sample(ident, z, -0.1, truncate=True), "sigma"),
        (lambda: ambient_sample(ident, z, float("nan"), truncate=True), "sigma"),
        (lambda: ambient_sample(ident, z, torch.tensor([0.1, 0.2]), truncate=True), "sigma"),
        (lambda: ambient_sample(ident, z, "0.2", truncate=True), "sigma"),
        (lambda: ambient_sample(ident, z, 0.2, 0, truncate=False), "num_steps"),
        (lambda: ambient_sample(lambda x, s: x.sum(), z, 0.2, truncate=False), "D"),
        (lambda: dct_ode_sample(ident, torch.randn(2, 4, 4), NoiseCorruption(0.2)), "latents"),
        (lambda: dct_ode_sample(ident, z, NoiseCorruption(0.2), num_steps=0), "num_steps"),
        (lambda: dct_ode_sample(lambda x, s: x[..., :2], z, NoiseCorruption(0.2)), "D"),
        (lambda: one_step(ident, z, sigma_init=0.0), "sigma_init"),
        (lambda: one_step(ident, torch.randn(3)), "z"),
        (lambda: one_step(lambda x, s: x.flatten(1), z), "G"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            fn()
