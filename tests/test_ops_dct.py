"""dsd_fast.ops.dct: the Triton DCT kernels (interpreted on CPU) against the float64 reference, outputs and
gradients; the custom ops' registrations (opcheck, torch.compile fullgraph); GPU runs at full size."""

import os

import pytest
import torch

from dsd_fast.corruption import BlurNoiseCorruption
from dsd_fast.ops import dct as ops
from dsd_fast.ops.noise import signed_seed
from dsd_fast.reference import dct as ref
from dsd_fast.reference import philox
from dsd_fast.reference.losses import ambient_loss as noise_ambient_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton = pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _threads():
    # Tiny matmuls: a second BLAS thread only adds sync cost (40 ms per call on a loaded 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernels(monkeypatch):
    """Force the Triton kernels: on CUDA, or interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET)."""
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("DSD_FAST_BACKEND", "triton")


def err(got, want):
    """Max-abs error relative to the max-abs truth (DCT coefficients go through zero: no elementwise rtol);
    absolute where the truth is exactly zero (d/db at b = 0)."""
    scale = want.double().abs().max().clamp(min=torch.finfo(torch.float64).tiny)
    return ((got.double() - want.double()).abs().max() / scale).item()


def close(got, want, tol=1e-5):
    assert got.shape == want.shape
    assert err(got, want) <= tol, f"relative error {err(got, want):.3g} > {tol}"


# (B, C, H, W): every B in {1, 3, 7}, C in {1, 3}, square 8/28/32/64, non-square, odd and tiny sizes.
SHAPES = [(1, 3, 8, 8), (3, 1, 28, 28), (7, 1, 32, 32), (1, 1, 64, 64), (3, 3, 28, 32), (1, 3, 5, 7)]


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# dct2 / idct2 / dct_blur.

@pytest.mark.parametrize("shape", SHAPES)
def test_dct2_idct2_match_reference(kernels, shape):
    x = randn(*shape).requires_grad_()
    g = randn(*shape)
    xd = x.detach().double().requires_grad_()
    for op, fr in ((ops.dct2, ref.dct2), (ops.idct2, ref.idct2)):
        out = op(x)
        want = fr(xd)
        close(out, want)
        (gx,) = torch.autograd.grad(out, x, g)
        (gw,) = torch.autograd.grad(want, xd, g.double())
        close(gx, gw)
    close(ops.idct2(ops.dct2(x)), xd)


@pytest.mark.parametrize("shape", [(3, 3, 28, 32), (7, 1, 8, 8), (1, 1, 64, 64)])
def test_dct_blur_matches_reference(kernels, shape):
    x = randn(*shape).requires_grad_()
    b = (2 * torch.rand(shape[0], device=DEVICE)).requires_grad_()
    b.data[0] = 0  # b = 0 is the identity
    g = randn(*shape)
    xd, bd = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    out, want = ops.dct_blur(x, b), ref.dct_blur(xd, bd)
    close(out, want)
    close(out[0], x[0].detach())
    grads = torch.autograd.grad(out, (x, b), g)
    wants = torch.autograd.grad(want, (xd, bd), g.double())
    for got, w in zip(grads, wants, strict=True):
        close(got, w)


def test_dct_blur_closed_form(kernels):
    """A single DCT basis image is an eigenvector: blurred, it is scaled by exp(-lambda_kl b^2/2)."""
    H, W, k, l = 28, 32, 3, 5
    basis = torch.outer(ref.dct_matrix(H, torch.float32)[k], ref.dct_matrix(W, torch.float32)[l]).to(DEVICE)
    b = torch.tensor([0.7, 1.9], device=DEVICE)
    out = ops.dct_blur(basis.expand(2, 1, H, W), b)
    lam = ref.blur_eigenvalues(H, W, torch.float64)[k, l].item()
    want = torch.exp(-0.5 * lam * b.double() ** 2).reshape(2, 1, 1, 1) * basis.double()
    close(out, want)


def test_non_contiguous_inputs(kernels):
    base = randn(3, 32, 3, 28)
    x = base.permute(0, 2, 3, 1)  # [3, 3, 28, 32] with a stride-3 last dim
    assert not x.is_contiguous()
    xd = x.double()
    close(ops.dct2(x), ref.dct2(xd))
    close(ops.idct2(x[:, :, ::2]), ref.idct2(xd[:, :, ::2]))
    b = torch.rand(6, device=DEVICE)[::2]
    close(ops.dct_blur(x, b), ref.dct_blur(xd, b.double()))


# ----------------------------------------------------------------------------------------------------
# The blur + noise process: dct_inject (tensor eps and in-kernel Philox eps) and dct_ambient_loss.

def _process(schedule, B):
    cor = BlurNoiseCorruption(1.5, 0.2, schedule)
    s = cor.sigma + 0.01 + 3 * torch.rand(B, device=DEVICE)
    return cor, s, cor.b(s).reshape(-1)


@pytest.mark.parametrize("schedule", ["fixed", "linear"])
@pytest.mark.parametrize("shape", [(3, 3, 28, 32), (7, 1, 8, 8)])
def test_dct_inject_matches_corruption(kernels, schedule, shape):
    cor, s, b_s = _process(schedule, shape[0])
    y, eps = randn(*shape).requires_grad_(), randn(*shape).requires_grad_()
    yd, epsd = y.detach().double().requires_grad_(), eps.detach().double().requires_grad_()
    out = ops.dct_inject(y, eps, s, b_s, cor.sigma, cor.blur)
    want = cor.inject(yd, s.double(), epsd)
    close(out, want)
    g = randn(*shape)
    grads, wants = torch.autograd.grad(out, (y, eps), g), torch.autograd.grad(want, (yd, epsd), g.double())
    for got, w in zip(grads, wants, strict=True):
        close(got, w)


@pytest.mark.parametrize("seed,offset", [(1234, 0), (2**64 - 3, 2**33 + 5)])
def test_dct_inject_seeded_is_the_add_noise_stream(kernels, seed, offset):
    """eps[i, j] = randn(seed, offset + i*C*H*W + j), drawn in-kernel, bit-compatible with reference Philox;
    seeds past 2^63 travel as int64 two's complement (and offsets past 2^32 work)."""
    shape = (3, 3, 28, 32)
    cor, s, b_s = _process("linear", shape[0])
    y = randn(*shape).requires_grad_()
    eps = philox.stream_normal(seed, offset, shape, device=DEVICE)
    out = ops.dct_inject_seeded(y, s, b_s, cor.sigma, cor.blur, signed_seed(seed), offset)
    yd = y.detach().double().requires_grad_()
    want = cor.inject(yd, s.double(), eps.double())
    close(out, want)
    g = randn(*shape)
    close(torch.autograd.grad(out, y, g)[0], torch.autograd.grad(want, yd, g.double())[0])


@pytest.mark.parametrize("schedule", ["fixed", "linear"])
@pytest.mark.parametrize("shape", [(3, 3, 28, 32), (7, 1, 8, 8), (1, 3, 64, 64)])
def test_dct_ambient_loss_matches_corruption(kernels, schedule, shape):
    cor, s, b_s = _process(schedule, shape[0])
    x0_hat = randn(*shape).requires_grad_()
    x_t, y = randn(*shape), randn(*shape)
    weight = torch.rand(shape[0], device=DEVICE)
    x0d = x0_hat.detach().double().requires_grad_()
    loss = ops.dct_ambient_loss(x0_hat, x_t, y, s, b_s, weight, cor.sigma, cor.blur)
    want = cor.ambient_loss(x0d, x_t.double(), y.double(), s.double(), weight.double())
    close(loss, want)
    g = torch.rand(shape[0], device=DEVICE)
    close(torch.autograd.grad(loss, x0_hat, g)[0], torch.autograd.grad(want, x0d, g.double())[0])
    with torch.no_grad():  # no gradient asked for: the kernel skips it, the loss is unchanged
        close(ops.dct_ambient_loss(x0_hat, x_t, y, s, b_s, weight, cor.sigma, cor.blur), want)


def test_dct_ambient_loss_without_blur_is_the_noise_loss(kernels):
    """Lambda = 1, Psi = s: the DCT ambient loss is exactly DSD's noise-only ambient loss (Eq. 3)."""
    B, sigma = 3, 0.3
    s = sigma + 2 * torch.rand(B, device=DEVICE)
    x0_hat, x_t, y = randn(B, 3, 28, 32), randn(B, 3, 28, 32), randn(B, 3, 28, 32)
    weight = torch.rand(B, device=DEVICE)
    loss = ops.dct_ambient_loss(x0_hat, x_t, y, s, torch.zeros_like(s), weight, sigma, 0.0)
    want = noise_ambient_loss(x0_hat.double(), x_t.double(), y.double(), s.double(), sigma, weight.double())
    close(loss, want)


@pytest.mark.parametrize("op", ["dct_inject", "dct_inject_seeded", "dct_ambient_loss"])
def test_backward_formulas_gradcheck(monkeypatch, op):
    """Every explicit backward formula (s, b_s, weight, x_t, y too) against finite differences, float64."""
    monkeypatch.setenv("DSD_FAST_BACKEND", "reference")
    B, shape = 2, (2, 2, 4, 5)
    dt = dict(dtype=torch.float64, device=DEVICE)
    s = (0.4 + torch.rand(B, **dt)).requires_grad_()
    b_s = (1.2 + torch.rand(B, **dt)).requires_grad_()  # >= blur: r <= 1
    y, eps, x_t = (torch.randn(shape, **dt).requires_grad_() for _ in range(3))
    x0_hat, weight = torch.randn(shape, **dt).requires_grad_(), torch.rand(B, **dt).requires_grad_()
    if op == "dct_inject":
        f, args = lambda *a: ops.dct_inject(*a, 0.2, 1.1), (y, eps, s, b_s)
    elif op == "dct_inject_seeded":
        f, args = lambda *a: ops.dct_inject_seeded(*a, 0.2, 1.1, 7, 3), (y, s, b_s)
    else:
        f, args = lambda *a: ops.dct_ambient_loss(*a, 0.2, 1.1), (x0_hat, x_t, y, s, b_s, weight)
    assert torch.autograd.gradcheck(f, args, fast_mode=True)


# ----------------------------------------------------------------------------------------------------
# bfloat16: no worse than twice the reference's own bfloat16 error (both against float64).

def _bf16_pair(monkeypatch, f, *xs):
    """(kernel error, reference error) of f on bfloat16 copies of xs, both against f in float64."""
    lo = [x.bfloat16() for x in xs]
    got = f(*lo)
    monkeypatch.setenv("DSD_FAST_BACKEND", "reference")
    want, ref_lo = f(*(x.double() for x in xs)), f(*lo)
    monkeypatch.setenv("DSD_FAST_BACKEND", "triton")
    return err(got, want), err(ref_lo, want)


def test_bfloat16_within_twice_reference_error(kernels, monkeypatch):
    shape = (3, 3, 28, 32)
    x, eps, x_t = randn(*shape), randn(*shape), randn(*shape)
    cor, s, b_s = _process("linear", shape[0])
    weight = torch.rand(shape[0], device=DEVICE)
    cases = {
        "dct2": (ops.dct2, x),
        "idct2": (ops.idct2, x),
        "dct_blur": (lambda z, b: ops.dct_blur(z, b.to(z.dtype)), x, 2 * torch.rand(shape[0], device=DEVICE)),
        "dct_inject": (lambda y, e: ops.dct_inject(y, e, s, b_s, cor.sigma, cor.blur), x, eps),
        "dct_ambient_loss": (
            lambda a, b, c: ops.dct_ambient_loss(a, b, c, s, b_s, weight, cor.sigma, cor.blur), x, x_t, eps),
    }
    for name, (f, *xs) in cases.items():
        got, reference = _bf16_pair(monkeypatch, f, *xs)
        assert got <= 2 * reference, f"{name}: bfloat16 error {got:.3g} > 2 x reference's {reference:.3g}"


# ----------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile fullgraph, backend errors.

def _op_samples():
    B, shape = 3, (3, 2, 8, 12)
    s = 0.3 + torch.rand(B, device=DEVICE)
    b_s = 1.0 + torch.rand(B, device=DEVICE)
    x, y, z = (randn(*shape).requires_grad_() for _ in range(3))
    yd, zd = y.detach(), z.detach()
    w = torch.rand(B, device=DEVICE)
    return [
        (torch.ops.dsd_fast.dct2, (x,)),
        (torch.ops.dsd_fast.idct2, (x,)),
        (torch.ops.dsd_fast.dct_blur, (x, torch.rand(B, device=DEVICE).requires_grad_())),
        (torch.ops.dsd_fast.dct_inject, (x, y, s, b_s, 0.2, 1.0)),
        (torch.ops.dsd_fast.dct_inject_seeded, (x, s, b_s, 0.2, 1.0, 5, 11)),
        (torch.ops.dsd_fast.dct_ambient_loss, (x, yd, zd, s, b_s, w, 0.2, 1.0, True)),
        (torch.ops.dsd_fast.dct_ambient_loss, (x.detach(), yd, zd, s, b_s, w, 0.2, 1.0, False)),
    ]


# Schema, autograd registration and AOT tracing do not depend on the backend: checked with the reference
# (AOT over the kernels costs 20 s interpreted; test_compile_fullgraph runs them compiled). The kernels'
# outputs must match the fake implementation's metadata.
OPCHECK_UTILS = {
    "reference": ("test_schema", "test_autograd_registration", "test_faketensor",
                  "test_aot_dispatch_dynamic"),
    "triton": ("test_faketensor",),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(monkeypatch, backend):
    if backend == "triton" and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("DSD_FAST_BACKEND", backend)
    for op, args in _op_samples():
        torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS[backend])


def test_compile_fullgraph(kernels, monkeypatch):
    """Every op under torch.compile(fullgraph=True) (a graph break fails), outputs and gradients."""
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"  # on CPU the check is about graph breaks
    _compiled_vs_reference(monkeypatch, (3, 3, 28, 32), torch.float32, backend)


def test_forced_triton_on_unsupported_input_raises(kernels):
    with pytest.raises(RuntimeError, match="float32/bfloat16/float16"):
        ops.dct2(randn(2, 8, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="H, W <= 128"):
        ops.dct2(randn(1, 8, 130))


def test_kernel_that_does_not_fit_falls_back(kernels, monkeypatch):
    """A kernel whose compiled form exceeds shared memory (Triton's OutOfResources, raised before the launch)
    is remembered and the op computes the same result unfused; the remembered verdict skips the retry."""
    from triton.runtime.errors import OutOfResources

    calls = []

    class TooBig:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                calls.append(grid)
                raise OutOfResources(262144, 232448, "shared memory")
            return launch

    kernels_module = ops._kernels()
    monkeypatch.setattr(ops, "_UNFIT", set())
    monkeypatch.setattr(kernels_module, "dct_ambient_loss_kernel", TooBig())
    monkeypatch.setattr(kernels_module, "dct_blur_kernel", TooBig())
    cor, s, b_s = _process("linear", 3)
    x0_hat, x_t, y = (randn(3, 3, 28, 32) for _ in range(3))
    weight = torch.rand(3, device=DEVICE)
    want = cor.ambient_loss(x0_hat.double(), x_t.double(), y.double(), s.double(), weight.double())
    for _ in range(2):
        close(ops.dct_ambient_loss(x0_hat, x_t, y, s, b_s, weight, cor.sigma, cor.blur), want)
    b = torch.rand(3, device=DEVICE)
    close(ops.dct_blur(x0_hat, b), ref.dct_blur(x0_hat.double(), b.double()))
    assert len(calls) == 2 and len(ops._UNFIT) == 2


def test_ambient_loss_need_grad_false_refuses_backward(monkeypatch):
    monkeypatch.setenv("DSD_FAST_BACKEND", "reference")
    B = 2
    x0_hat = randn(B, 1, 8, 8).requires_grad_()
    s, b_s, w = torch.ones(B, device=DEVICE), torch.ones(B, device=DEVICE), torch.ones(B, device=DEVICE)
    loss, _ = torch.ops.dsd_fast.dct_ambient_loss(x0_hat, randn(B, 1, 8, 8), randn(B, 1, 8, 8), s, b_s, w,
                                                  0.2, 1.0, False)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        loss.sum().backward()


# ----------------------------------------------------------------------------------------------------
# GPU: compiled Triton against the reference at training size.

def _compiled_vs_reference(monkeypatch, shape, dtype, compile_backend):
    """Every op's outputs and input gradients: compiled Triton and the eager reference in `dtype`, each
    against the float64 reference. float32 within 1e-5; 16-bit no worse than twice the reference's error."""
    cor, s, b_s = _process("linear", shape[0])
    b, weight = 2 * torch.rand(shape[0], device=DEVICE), torch.rand(shape[0], device=DEVICE)
    inputs = [randn(*shape) for _ in range(3)]
    grads_out = [randn(*shape) for _ in range(5)] + [torch.rand(shape[0], device=DEVICE)]

    def f(x, eps, x_t):
        return (ops.dct2(x), ops.idct2(x), ops.dct_blur(x, b.to(x.dtype)),
                ops.dct_inject(x, eps, s, b_s, cor.sigma, cor.blur),
                ops.dct_inject_seeded(x_t, s, b_s, cor.sigma, cor.blur, signed_seed(2**64 - 5), 2**40),
                ops.dct_ambient_loss(x, x_t, eps, s, b_s, weight, cor.sigma, cor.blur))

    def outputs_and_grads(backend, dt, fn):
        monkeypatch.setenv("DSD_FAST_BACKEND", backend)
        xs = [v.to(dt).requires_grad_() for v in inputs]
        outs = fn(*xs)
        grads = torch.autograd.grad(outs, xs, [g.to(o.dtype) for g, o in zip(grads_out, outs, strict=True)])
        return [*outs, *grads]

    got = outputs_and_grads("triton", dtype, torch.compile(f, fullgraph=True, backend=compile_backend))
    want = outputs_and_grads("reference", torch.float64, f)
    ref_lo = outputs_and_grads("reference", dtype, f)
    names = ["dct2", "idct2", "dct_blur", "dct_inject", "dct_inject_seeded", "loss", "d x", "d eps", "d x_t"]
    for name, g, w, r in zip(names, got, want, ref_lo, strict=True):
        bound = 1e-5 if dtype == torch.float32 else 2 * err(r, w)
        assert err(g, w) <= bound, f"{name}: {err(g, w):.3g} > {bound:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compiled_triton_matches_reference(monkeypatch, dtype):
    _compiled_vs_reference(monkeypatch, (512, 3, 64, 64), dtype, "inductor")
