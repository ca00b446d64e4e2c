"""dsd_fast.ops.losses: the fused loss kernels (interpreted on CPU, compiled on CUDA) and the ops' reference
path against the float64 reference under autograd, outputs and every gradient (including where the
reference has none); multi-chunk reductions, strided inputs, opcheck, torch.compile(fullgraph=True), the
dispatch in dsd_fast.functional; GPU runs at training size."""

import os

import pytest
import torch

import dsd_fast.functional as F
from dsd_fast.ops import losses as ops
from dsd_fast.reference import edm
from dsd_fast.reference import losses as ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SIGMA = 0.2
ALPHA = 1.2


# GPU-only cases: the root conftest skips @pytest.mark.gpu without CUDA, and seeds torch freshly per test.
gpu = pytest.mark.gpu


@pytest.fixture(params=["triton", "reference"])
def backend(request, monkeypatch):
    """Each op's two implementations: the Triton kernels (interpreted on CPU) and its reference path."""
    if request.param == "triton" and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("DSD_FAST_BACKEND", request.param)
    return request.param


def _precond_ref(F_x, x_t, y, sigma_t, sigma, weight):
    s = sigma_t.to(F_x.dtype).reshape(-1, 1, 1, 1)
    return ref.ambient_loss(edm.c_skip(s) * x_t + edm.c_out(s) * F_x, x_t, y, sigma_t, sigma, weight)


# name: (image arguments, per-sample arguments, op, reference); op(args, weight) and reference(args, weight).
SPECS = {
    "ambient_loss": (("x0_hat", "x_t", "y"), ("sigma_t",),
                     lambda a, w: ops.ambient_loss(*a, SIGMA, w), lambda a, w: ref.ambient_loss(*a, SIGMA, w)),
    "ambient_loss_precond": (("F_x", "x_t", "y"), ("sigma_t",),
                             lambda a, w: ops.ambient_loss_precond(*a, SIGMA, w),
                             lambda a, w: _precond_ref(*a, SIGMA, w)),
    "sid_generator_loss": (("f_phi", "f_psi", "x_g"), (),
                           lambda a, w: ops.sid_generator_loss(*a, ALPHA, w),
                           lambda a, w: ref.sid_generator_loss(*a, ALPHA, w)),
    "dmd_loss": (("f_phi", "f_psi", "x_g"), (), lambda a, w: ops.dmd_loss(*a, w), lambda a, w: ref.dmd_loss(*a, w)),
    "sds_loss": (("f_phi", "x_t", "eps", "x_g"), ("sigma_t",),
                 lambda a, w: ops.sds_loss(*a, w), lambda a, w: ref.sds_loss(*a, w)),
}


SURROGATES = ("dmd_loss", "sds_loss")  # losses that exist only for their gradient w.r.t. x_g


def make_inputs(name, shape, dtype, weighted, device=DEVICE, strided=False):
    """(args, weight) for SPECS[name]: random images, sigma_t in (sigma, sigma + 3], weight in [0.1, 1.1).
    strided: every tensor a non-contiguous view (permuted images, every other element of [2B])."""
    images, per_sample, _, _ = SPECS[name]
    B, C, H, W = shape

    def image():
        if strided:
            return torch.randn(B, H, W, 2 * C, device=device)[..., ::2].permute(0, 3, 1, 2).to(dtype)
        return torch.randn(shape, device=device).to(dtype)

    def per_sample_value(lo):
        v = lo + 3 * torch.rand(2 * B if strided else B, device=device)
        return (v[::2] if strided else v).to(dtype)

    args = [image() for _ in images] + [per_sample_value(SIGMA + 0.05) for _ in per_sample]
    weight = per_sample_value(0.1) / 3 if weighted else None
    if strided:
        assert not any(t.is_contiguous() for t in args)
    return args, weight


def evaluate(fn, args, weight, g):
    """fn's per-sample output and its gradient w.r.t. every tensor argument (None where none flows)."""
    leaves = [t.detach().clone().requires_grad_() for t in args]
    w = None if weight is None else weight.detach().clone().requires_grad_()
    out = fn(leaves, w)
    inputs = leaves + ([] if w is None else [w])
    return out.detach(), torch.autograd.grad(out, inputs, g, allow_unused=True)


def rel_err(got, want, scale=None):
    """||got - want|| / ||want||, or over `scale` where the error is relative to another magnitude."""
    want = want.double()
    scale = want.norm() if scale is None else scale
    return ((got.double() - want).norm() / scale.clamp(min=1e-300)).item()


def check(name, shape, dtype, weighted, device=DEVICE, strided=False, compiled=False):
    """The op (compiled: under torch.compile(fullgraph=True)) against the float64 reference on the same
    inputs: float32 within 1e-5 relative; 16-bit no worse than twice the reference run in that dtype (or
    half a bf16 ulp: both round their outputs)."""
    _, _, op, reference = SPECS[name]
    if compiled:
        op = torch.compile(op, fullgraph=True)
    args, weight = make_inputs(name, shape, dtype, weighted, device, strided)
    g = torch.randn(shape[0], device=device).to(dtype)
    got = evaluate(op, args, weight, g)
    to64 = lambda t: None if t is None else t.double()
    want = evaluate(reference, [to64(t) for t in args], to64(weight), g.double())
    base = evaluate(reference, args, weight, g) if dtype != torch.float32 else None
    labels = ["loss"] + [f"grad {i}" for i in range(len(got[1]))]
    for k, (o, w) in enumerate(zip([got[0], *got[1]], [want[0], *want[1]], strict=True)):
        if w is None:
            assert o is None, f"{name} {labels[k]}: the reference has no gradient here, the op gave one"
            continue
        assert o is not None and o.shape == w.shape and o.dtype == args[0].dtype, f"{name} {labels[k]}"
        scale = None
        if k == 0 and name in SURROGATES:
            # The DMD / SDS surrogates' value is sum_CHW(g x_g) with g their (detached) gradient w.r.t. x_g: a
            # dot product of random-sign terms that can cancel to ~0, and any float sum's rounding is relative
            # to sum|g x_g|. Measured against that scale (g from the float64 reference at unit output gradient).
            i = SPECS[name][0].index("x_g")
            ones = torch.ones(shape[0], dtype=torch.float64, device=device)
            g_x = evaluate(reference, [to64(t) for t in args], to64(weight), ones)[1][i]
            scale = (g_x * args[i].double()).abs().flatten(1).sum(1).norm()
        e = rel_err(o, w, scale)
        if dtype == torch.float32:
            assert e <= 1e-5, f"{name} {labels[k]}: relative error {e:.3g} > 1e-5"
        else:
            b = rel_err([base[0], *base[1]][k], w, scale)
            assert e <= max(2 * b, 2.0**-8), f"{name} {labels[k]}: {e:.3g} vs reference {b:.3g}"


# (B, C, H, W): B in {1, 3, 7}, C in {1, 3}, H = W in {8, 28, 32, 64}, and an odd 5 x 7.
SHAPES = [(1, 3, 8, 8), (3, 1, 28, 28), (7, 3, 32, 32), (1, 3, 64, 64), (7, 1, 5, 7)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", SPECS)
def test_matches_reference(backend, name, shape, dtype):
    check(name, shape, dtype, weighted=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", SPECS)
def test_matches_reference_weighted(backend, name, dtype):
    check(name, (3, 3, 28, 28), dtype, weighted=True)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", SPECS)
def test_strided_inputs(backend, name, weighted):
    check(name, (3, 3, 8, 8), torch.float32, weighted, strided=True)


# The weight enters the finalize step of the distillation losses only (ambient weights each partial sum).
@pytest.mark.parametrize("name, weighted", [("ambient_loss", False), ("ambient_loss_precond", True),
                                            ("sid_generator_loss", False), ("sid_generator_loss", True),
                                            ("dmd_loss", False), ("sds_loss", True)])
def test_chunked_reductions(monkeypatch, name, weighted):
    """Several chunks per sample (partial sums + finalize_kernel) and several blocks per sample in the
    backward kernels, with ragged last chunk and block: CHW = 105, BLOCK = 16, CHUNK = 48 -> NC = 3."""
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("DSD_FAST_BACKEND", "triton")
    monkeypatch.setattr(ops, "reduce_layout", lambda B, chw, device: (16, 48, ops.cdiv(chw, 48)))
    monkeypatch.setattr(ops, "elementwise_block", lambda chw, device: 16)
    check(name, (3, 3, 5, 7), torch.float32, weighted)


def test_sid_weight_clamp(backend):
    """w_g = 1 / max(mean|x_g - f_phi|, 1e-5): x_g = f_phi hits the clamp (the loss stays finite)."""
    f_phi, f_psi = torch.randn(2, 2, 1, 8, 8, device=DEVICE)
    x_g = f_phi.clone()
    x_g[1] += 1e-3 * torch.randn_like(x_g[1])  # above the clamp
    got = ops.sid_generator_loss(f_phi, f_psi, x_g, ALPHA)
    want = ref.sid_generator_loss(f_phi.double(), f_psi.double(), x_g.double(), ALPHA)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= 1e-5


def test_float64_is_reference_math_or_refused(monkeypatch):
    """The kernels take 16/32-bit floats: float64 runs the reference math, or raises when triton is forced."""
    args, _ = make_inputs("ambient_loss", (2, 1, 8, 8), torch.float64, False)
    monkeypatch.setenv("DSD_FAST_BACKEND", "auto")
    torch.testing.assert_close(ops.ambient_loss(*args, SIGMA), ref.ambient_loss(*args, SIGMA))
    if DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        monkeypatch.setenv("DSD_FAST_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="DSD_FAST_BACKEND=triton cannot run ambient_loss"):
            ops.ambient_loss(*args, SIGMA)


# ----------------------------------------------------------------------------------------------------
# Registration: opcheck (schema, fake tensors, autograd, AOT dispatch) and torch.compile(fullgraph=True).

def _opcheck_cases():
    B, shape = 2, (2, 2, 4, 4)
    img = lambda: torch.randn(shape, device=DEVICE, requires_grad=True)
    s = lambda: (SIGMA + 0.1 + torch.rand(B, device=DEVICE)).requires_grad_()
    w = lambda: torch.rand(B, device=DEVICE, requires_grad=True)
    plain = lambda: torch.randn(shape, device=DEVICE)
    per = lambda: SIGMA + 0.1 + torch.rand(B, device=DEVICE)
    d = torch.ops.dsd_fast
    return [
        (d.ambient_loss.default, (img(), img(), img(), s(), SIGMA, None)),
        (d.ambient_loss.default, (img(), img(), img(), s(), SIGMA, w())),
        (d.ambient_loss_precond.default, (img(), img(), img(), s(), SIGMA, w())),
        (d.ambient_loss_backward.default, (per(), plain(), plain(), plain(), per(), SIGMA, per(), True,
                                           [True, False, True, True, True])),
        (d.sid_generator_loss.default, (img(), img(), img(), ALPHA, None)),
        (d.sid_generator_loss.default, (img(), img(), img(), ALPHA, w())),
        (d.sid_generator_loss_backward.default, (per(), plain(), plain(), plain(), per(), ALPHA,
                                                 [True, True, False, True])),
        (d.dmd_loss.default, (img(), img(), img(), None)),
        (d.dmd_loss_backward.default, (per(), plain(), plain(), per())),
        (d.sds_loss.default, (img(), img(), img(), img(), s(), w())),
        (d.sds_loss_backward.default, (per(), plain(), plain(), plain(), per(), per())),
    ]


def test_opcheck(backend):
    for op, args in _opcheck_cases():
        torch.library.opcheck(op, args)


def _all_losses(u, v, y, e, sigma_t, weight):
    return (ops.ambient_loss(u, v, y, sigma_t, SIGMA) + ops.ambient_loss_precond(u, v, y, sigma_t, SIGMA, weight)
            + ops.sid_generator_loss(u, v, y, ALPHA) + ops.sid_generator_loss(u, v, y, 0.5, weight)
            + ops.dmd_loss(u, v, y) + ops.sds_loss(u, v, e, y, sigma_t, weight))


def test_compile_fullgraph(backend):
    """One compiled graph calls every op (no graph break) and gives eager's values and gradients. On CPU
    the aot_eager backend: it runs the same fake-tensor tracing and AOT autograd as inductor."""
    compiled = torch.compile(_all_losses, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    B, shape = 3, (3, 2, 8, 8)
    tensors = [torch.randn(shape, device=DEVICE) for _ in range(4)]
    tensors += [SIGMA + 0.1 + torch.rand(B, device=DEVICE), torch.rand(B, device=DEVICE)]
    results = []
    for f in (_all_losses, compiled):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = f(*leaves)
        out.sum().backward()
        results.append([out, *(t.grad for t in leaves)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a)


# ----------------------------------------------------------------------------------------------------
# dsd_fast.functional dispatch: the ops when a kernel backend is chosen, the plain reference otherwise.

def test_functional_dispatch(monkeypatch):
    args, weight = make_inputs("ambient_loss", (3, 1, 8, 8), torch.float32, True)
    if DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        monkeypatch.setenv("DSD_FAST_BACKEND", "triton")
        assert torch.equal(F.ambient_loss(*args, SIGMA, weight), ops.ambient_loss(*args, SIGMA, weight))
        sid = make_inputs("sid_generator_loss", (3, 1, 8, 8), torch.float32, False)[0]
        assert torch.equal(F.sid_generator_loss(*sid), ops.sid_generator_loss(*sid))
    # The reference path keeps full autograd: double backward works.
    monkeypatch.setenv("DSD_FAST_BACKEND", "reference")
    x0 = args[0].clone().requires_grad_()
    (g,) = torch.autograd.grad(F.ambient_loss(x0, *args[1:], SIGMA).sum(), x0, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x0)
    rho = SIGMA**2 / args[3].double() ** 2
    closed = (2 * edm.edm_weight(args[3].double()) * (1 - rho) ** 2).reshape(-1, 1, 1, 1).expand_as(x0)
    torch.testing.assert_close(gg, closed.float())


@pytest.mark.parametrize("name", ["ambient_loss_precond", "dmd_loss", "sds_loss"])
def test_functional_new_ops_match_reference(name):
    args, weight = make_inputs(name, (3, 1, 8, 8), torch.float64, True)
    fn = {"ambient_loss_precond": lambda: F.ambient_loss_precond(*args, SIGMA, weight),
          "dmd_loss": lambda: F.dmd_loss(*args, weight), "sds_loss": lambda: F.sds_loss(*args, weight)}[name]
    torch.testing.assert_close(fn(), SPECS[name][3](args, weight))


@pytest.mark.parametrize("call, match", [
    (lambda a: F.ambient_loss_precond(a[0], a[1][:, :, :4], a[2], a[3], SIGMA), r"x_t: expected shape"),
    (lambda a: F.ambient_loss_precond(a[0], a[1], a[2], a[3] * 0 + SIGMA, SIGMA), r"sigma_t: expected every"),
    (lambda a: F.dmd_loss(a[0], a[1], a[2].double()), r"x_g: expected dtype"),
    (lambda a: F.dmd_loss(a[0], a[1], a[2], weight=a[3][:2]), r"weight: expected shape \[3\]"),
    (lambda a: F.sds_loss(a[0], a[1], a[2], a[0][:, :, :4], a[3]), r"x_g: expected shape"),
    (lambda a: F.sds_loss(a[0], a[1], a[2], a[0], a[3] * 0), r"sigma_t: expected every value > 0"),
    (lambda a: F.sds_loss(a[0], a[1], a[2], a[0], -a[3]), r"sigma_t: expected values >= 0"),
])
def test_functional_new_ops_bad_input(call, match):
    args, _ = make_inputs("ambient_loss", (3, 1, 8, 8), torch.float32, False)
    with pytest.raises(ValueError, match=match):
        call(args)


# ----------------------------------------------------------------------------------------------------
# GPU: compiled Triton at training size against the reference (run on an H100 by the lead).

@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(512, 3, 32, 32), (512, 1, 28, 28), (64, 3, 64, 64), (3, 3, 64, 64)], ids=str)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", SPECS)
def test_gpu_matches_reference(monkeypatch, name, weighted, shape, dtype):
    """Eager Triton on CUDA; (3, 3, 64, 64) takes the multi-chunk reduction (few samples per SM)."""
    monkeypatch.setenv("DSD_FAST_BACKEND", "triton")
    check(name, shape, dtype, weighted, device="cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", SPECS)
def test_gpu_compiled_matches_reference(monkeypatch, name, weighted, dtype):
    """torch.compile (inductor, fullgraph) over the Triton ops, outputs and gradients against float64."""
    monkeypatch.setenv("DSD_FAST_BACKEND", "triton")
    check(name, (256, 3, 32, 32), dtype, weighted, device="cuda", compiled=True)
