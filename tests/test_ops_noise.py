"""dsd_fast.ops.noise: corruption and noise injection with in-kernel Philox (interpreted on CPU, compiled on
CUDA) against dsd_fast.reference.philox: the same normals for the same (seed, counter), counters past 2^31
and 2^32, seeds past 2^63, outputs and gradients, strided inputs, opcheck, torch.compile(fullgraph=True),
the dispatch in dsd_fast.functional; GPU runs at training size."""

import os
import random

import pytest
import torch

import dsd_fast.functional as F
from dsd_fast.ops import noise as ops
from dsd_fast.reference import philox

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# Measured max |tl.randn - reference| (test_philox.py): 7.2e-7 in the interpreter (numpy's log/cos),
# 4.8e-7 compiled on an H100: a few float32 ulps of the Box-Muller transcendentals.
RANDN_ATOL = 1e-6


# GPU-only cases: the root conftest skips @pytest.mark.gpu without CUDA, and seeds torch freshly per test.
gpu = pytest.mark.gpu


def _kernels_available():
    return DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(params=["triton", "reference"])
def backend(request, monkeypatch):
    if request.param == "triton" and not _kernels_available():
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("DSD_FAST_BACKEND", request.param)
    return request.param


def _seed64():
    """A random 64-bit seed with the top bit set: both key words in play, int64 view negative."""
    return random.getrandbits(64) | (1 << 63)


SEEDS = [0, 2**64 - 1, "random"]


def _resolve(seed):
    return _seed64() if seed == "random" else seed


def rel_err(got, want):
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


def assert_accuracy(got, want, base):
    """float32 within 1e-5 relative of the float64 truth; 16-bit no worse than twice the reference run in
    that dtype (`base`), or half a bf16 ulp (both round their outputs)."""
    e = rel_err(got, want)
    if got.dtype == torch.float32:
        assert e <= 1e-5, f"relative error {e:.3g}"
    else:
        assert e <= max(2 * rel_err(base, want), 2.0**-8), f"{e:.3g} vs reference {rel_err(base, want):.3g}"


# ----------------------------------------------------------------------------------------------------
# The noise itself: with x = 0, sigma = 1 the output is eps (0 + 1 * eps is exact).

@pytest.mark.parametrize("seed", SEEDS)
def test_corrupt_noise_is_reference_philox(backend, seed):
    seed = _resolve(seed)
    C, H, W = 3, 28, 28
    # index * CHW past 2^31 and 2^32, index 0, and a counter whose low word wraps inside the image.
    index = torch.tensor([2**31 // (C * H * W) + 17, 0, 2**40, (2**32 - 1000) // (C * H * W)], device=DEVICE)
    x = torch.zeros(index.numel(), C, H, W, device=DEVICE)
    eps = ops.corrupt(x, 1.0, seed, index)
    want = philox.corrupt_noise(seed, index, (C, H, W), device=DEVICE)
    torch.testing.assert_close(eps, want, atol=RANDN_ATOL, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_add_noise_stream_is_reference_philox(backend, seed):
    seed = _resolve(seed)
    shape = (3, 3, 32, 32)
    # offset past 2^32, and offset + b * CHW crossing 2^31 inside sample 1 (CHW = 3072).
    for offset in (2**32 + 12345, 2**31 - 3072 - 100):
        eps = ops.add_noise(torch.zeros(shape, device=DEVICE), torch.ones(3, device=DEVICE), 0.0, seed, offset)
        want = philox.stream_normal(seed, offset, shape, device=DEVICE)
        torch.testing.assert_close(eps, want, atol=RANDN_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Values and gradients against float64.

SHAPES = [(1, 3, 8, 8), (3, 1, 28, 28), (7, 3, 32, 32), (1, 1, 64, 64), (3, 3, 5, 7)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_corrupt_matches_reference(backend, shape, dtype):
    seed, sigma = _seed64(), 0.1 + torch.rand(()).item()
    index = torch.randint(0, 2**40, (shape[0],), device=DEVICE)
    x = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    y = ops.corrupt(x, sigma, seed, index)
    eps = philox.corrupt_noise(seed, index, shape[1:], device=DEVICE)
    want = x.detach().double() + sigma * eps.double()
    base = x.detach() + sigma * eps.to(dtype)  # the reference in dtype (as dsd_fast.functional computes it)
    assert y.dtype == dtype and y.shape == x.shape
    assert_accuracy(y.detach(), want, base)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_noise_matches_reference(backend, shape, dtype):
    seed, sigma = _seed64(), 0.1 + 0.5 * torch.rand(()).item()
    offset = int(torch.randint(0, 2**62, ()).item())
    B = shape[0]
    y = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    sigma_t = (sigma + 0.01 + 3 * torch.rand(B, device=DEVICE)).to(dtype).requires_grad_()
    x_t = ops.add_noise(y, sigma_t, sigma, seed, offset)
    g = torch.randn_like(x_t)
    gy, gs = torch.autograd.grad(x_t, (y, sigma_t), g)

    def reference(y, sigma_t, g):
        eps = philox.stream_normal(seed, offset, shape, device=DEVICE).to(y.dtype)
        q = (sigma_t**2 - sigma**2).sqrt()
        return y + q.reshape(-1, 1, 1, 1) * eps, (g * eps).flatten(1).sum(1) * sigma_t / q

    want, want_gs = reference(y.detach().double(), sigma_t.detach().double(), g.double())
    base, base_gs = reference(y.detach(), sigma_t.detach(), g)
    assert x_t.dtype == dtype and gs.dtype == dtype
    assert_accuracy(x_t.detach(), want, base)
    assert_accuracy(gs, want_gs, base_gs)
    assert torch.equal(gy, g)


def test_corrupt_is_per_image(backend):
    """The noise of an image depends on (seed, index) only: not on its batch or position in it."""
    seed = _seed64()
    x = torch.randn(5, 1, 8, 8, device=DEVICE)
    index = torch.randperm(1000, device=DEVICE)[:5]
    y = ops.corrupt(x, 0.3, seed, index)
    perm = torch.randperm(5, device=DEVICE)
    assert torch.equal(ops.corrupt(x[perm], 0.3, seed, index[perm]), y[perm])
    assert torch.equal(ops.corrupt(x[3:4], 0.3, seed, index[3:4]), y[3:4])


def test_strided_inputs(backend):
    seed = _seed64()
    x = torch.randn(3, 8, 8, 6, device=DEVICE)[..., ::2].permute(0, 3, 1, 2)
    sigma_t = (0.5 + torch.rand(6, device=DEVICE))[::2]
    index = torch.arange(6, device=DEVICE)[::2]
    assert not (x.is_contiguous() or sigma_t.is_contiguous() or index.is_contiguous())
    eps = philox.corrupt_noise(seed, index, (3, 8, 8), device=DEVICE)
    torch.testing.assert_close(ops.corrupt(x, 0.2, seed, index), x + 0.2 * eps)
    eps = philox.stream_normal(seed, 99, (3, 3, 8, 8), device=DEVICE)
    q = (sigma_t**2 - 0.2**2).sqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ops.add_noise(x, sigma_t, 0.2, seed, 99), x + q * eps)


def test_counter_range(backend):
    """Counters are int64: the last offset whose stream fits is taken, one past it is refused."""
    y = torch.randn(2, 1, 4, 4, device=DEVICE)
    s = torch.ones(2, device=DEVICE)
    last = 2**63 - y.numel()
    want = y + (1 - 0.8**2) ** 0.5 * philox.stream_normal(5, last, y.shape, device=DEVICE)
    torch.testing.assert_close(ops.add_noise(y, s, 0.8, 5, last), want, atol=RANDN_ATOL, rtol=1e-6)
    with pytest.raises(ValueError, match="offset"):
        ops.add_noise(y, s, 0.8, 5, last + 1)


def test_float64_is_reference_math_or_refused(monkeypatch):
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, device=DEVICE)
    index = torch.tensor([3, 4], device=DEVICE)
    monkeypatch.setenv("DSD_FAST_BACKEND", "auto")
    eps = philox.corrupt_noise(9, index, (1, 4, 4), dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(ops.corrupt(x, 0.5, 9, index), x + 0.5 * eps)
    if _kernels_available():
        monkeypatch.setenv("DSD_FAST_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="DSD_FAST_BACKEND=triton cannot run corrupt"):
            ops.corrupt(x, 0.5, 9, index)


# ----------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile(fullgraph=True).

def test_opcheck(backend):
    d = torch.ops.dsd_fast
    x = torch.randn(2, 2, 4, 4, device=DEVICE, requires_grad=True)
    s = (0.5 + torch.rand(2, device=DEVICE)).requires_grad_()
    index = torch.tensor([5, 2**35], device=DEVICE)
    for op, args in [(d.corrupt.default, (x, 0.3, ops.signed_seed(_seed64()), index)),
                     (d.add_noise.default, (x, s, 0.3, ops.signed_seed(_seed64()), 2**33 + 1)),
                     (d.add_noise_backward.default, (x.detach(), s.detach(), 0.3, 7, 11))]:
        torch.library.opcheck(op, args)


def _noise_chain(x, sigma_t, index, seed):
    y = ops.corrupt(x, 0.2, seed, index)
    return ops.add_noise(y, sigma_t, 0.2, seed, 1000)


def test_compile_fullgraph(backend):
    """corrupt then add_noise in one compiled graph (no break), eager's values and gradients. CPU: the
    aot_eager backend (the same fake-tensor tracing and AOT autograd as inductor)."""
    compiled = torch.compile(_noise_chain, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    x = torch.randn(3, 2, 8, 8, device=DEVICE)
    sigma_t = 0.5 + torch.rand(3, device=DEVICE)
    index = torch.tensor([1, 2**33, 7], device=DEVICE)
    seed = _seed64()
    results = []
    for f in (_noise_chain, compiled):
        leaves = [x.clone().requires_grad_(), sigma_t.clone().requires_grad_()]
        out = f(*leaves, index, seed)
        out.square().sum().backward()
        results.append([out, *(t.grad for t in leaves)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a)


# ----------------------------------------------------------------------------------------------------
# dsd_fast.functional dispatch: the ops when a kernel backend is chosen, the plain reference otherwise.

def test_functional_dispatch(monkeypatch):
    x = torch.randn(3, 1, 8, 8, device=DEVICE)
    sigma_t = 0.5 + torch.rand(3, device=DEVICE)
    index = torch.tensor([4, 0, 2**36], device=DEVICE)
    seed = _seed64()
    if _kernels_available():
        monkeypatch.setenv("DSD_FAST_BACKEND", "triton")
        assert torch.equal(F.corrupt(x, 0.2, seed=seed, index=index), ops.corrupt(x, 0.2, seed, index))
        assert torch.equal(F.add_noise(x, sigma_t, 0.2, seed=seed, offset=2**40),
                           ops.add_noise(x, sigma_t, 0.2, seed, 2**40))
    # The reference path keeps full autograd: d/dsigma_t of x_t is differentiable again.
    monkeypatch.setenv("DSD_FAST_BACKEND", "reference")
    s = sigma_t.double().requires_grad_()
    x_t = F.add_noise(x.double(), s, 0.2, seed=seed, offset=3)
    (g,) = torch.autograd.grad(x_t.sum(), s, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), s)
    eps_sum = philox.stream_normal(seed, 3, x.shape, torch.float64, DEVICE).flatten(1).sum(1)
    torch.testing.assert_close(gg, -(0.2**2) * eps_sum / (s.detach() ** 2 - 0.2**2) ** 1.5)


# ----------------------------------------------------------------------------------------------------
# GPU: compiled Triton at training size against the reference (run on an H100 by the lead).

@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(512, 3, 32, 32), (512, 1, 28, 28), (64, 3, 64, 64)], ids=str)
def test_gpu_matches_reference(monkeypatch, shape, dtype):
    monkeypatch.setenv("DSD_FAST_BACKEND", "triton")
    seed, sigma = _seed64(), 0.2
    index = torch.randint(0, 2**40, (shape[0],), device="cuda")
    x = torch.randn(shape, device="cuda").to(dtype)
    sigma_t = (0.3 + 3 * torch.rand(shape[0], device="cuda")).to(dtype)
    eps_y = philox.corrupt_noise(seed, index, shape[1:], device="cuda")
    eps_t = philox.stream_normal(seed, 1000, shape, device="cuda")

    def reference(x, sigma_t):
        q = (sigma_t**2 - sigma**2).sqrt().reshape(-1, 1, 1, 1)
        return x + sigma * eps_y.to(x.dtype) + q * eps_t.to(x.dtype)

    want, base = reference(x.double(), sigma_t.double()), reference(x, sigma_t)
    for f in (_noise_chain, torch.compile(_noise_chain, fullgraph=True)):
        assert_accuracy(f(x, sigma_t, index, seed), want, base)
