"""DCT ops: reference (eager torch: dsd_fast.reference.dct and BlurNoiseCorruption), compiled (torch.compile
of the reference) and triton (the fused dsd_fast op); modes forward, backward, full (forward + backward).

Minimal bytes per case (BYTES): every input read once, every output written once, with N = B*C*H*W image
elements and B per-sample scalars, e bytes each. The DCTs are matmuls, so each case also records TFLOP/s
at 2*H*W*(H+W) flops per image per 2-D transform (D_H X then (.) D_W^T) times the transforms it needs
(TRANSFORMS); the kernels pad H, W to powers of two >= 16 and do more, that is not counted.
"""

import math

import pytest
import torch
from common import CUDA, DEVICE, provider_function, record, run

from dsd_fast.corruption import BlurNoiseCorruption
from dsd_fast.ops import dct as ops_dct
from dsd_fast.reference import dct as ref

COR = BlurNoiseCorruption(blur=1.5, sigma=0.2, schedule="linear")

# op: (image inputs, per-sample inputs, inputs that take gradients, per-sample loss?, reference, fused op)
OPS = {
    "dct2": (("x",), (), ("x",), False, ref.dct2, ops_dct.dct2),
    "idct2": (("x",), (), ("x",), False, lambda x: ref.idct2(x), ops_dct.idct2),
    "dct_blur": (("x",), ("b",), ("x",), False, ref.dct_blur, ops_dct.dct_blur),
    "dct_inject": (
        ("y", "eps"), ("s", "b_s"), (), False,
        lambda y, eps, s, b_s: COR.inject(y, s, eps),
        lambda y, eps, s, b_s: ops_dct.dct_inject(y, eps, s, b_s, COR.sigma, COR.blur)),
    "dct_ambient_loss": (
        ("x0_hat", "x_t", "y"), ("s", "b_s", "weight"), ("x0_hat",), True,
        lambda x0_hat, x_t, y, s, b_s, weight: COR.ambient_loss(x0_hat, x_t, y, s, weight),
        lambda x0_hat, x_t, y, s, b_s, weight: ops_dct.dct_ambient_loss(x0_hat, x_t, y, s, b_s, weight,
                                                                        COR.sigma, COR.blur)),
}

# (op, mode): (minimal bytes from (N, B, e), 2-D transforms per image).
BYTES = {
    ("dct2", "forward"): (lambda N, B, e: 2 * N * e, 1),  # x -> X
    ("dct2", "backward"): (lambda N, B, e: 2 * N * e, 1),  # grad -> d x
    ("dct2", "full"): (lambda N, B, e: 4 * N * e, 2),  # x, grad -> X, d x
    ("dct_blur", "forward"): (lambda N, B, e: 2 * N * e + B * e, 2),  # x, b -> blurred
    ("dct_blur", "backward"): (lambda N, B, e: 2 * N * e + B * e, 2),  # grad, b -> d x
    ("dct_blur", "full"): (lambda N, B, e: 4 * N * e + B * e, 4),  # x, b, grad -> blurred, d x
    ("dct_inject", "forward"): (lambda N, B, e: 3 * N * e + 2 * B * e, 3),  # y, eps, s, b_s -> X_s
    # 3 images, s, b_s, weight -> loss
    ("dct_ambient_loss", "forward"): (lambda N, B, e: 3 * N * e + 4 * B * e, 3),
    # grad, s, b_s, w, 3 images -> d x0_hat (3 forward transforms for the residual, 1 inverse)
    ("dct_ambient_loss", "backward"): (lambda N, B, e: 4 * N * e + 4 * B * e, 4),
    ("dct_ambient_loss", "full"): (lambda N, B, e: 4 * N * e + 5 * B * e, 4),  # + loss out, grad in
}
for _mode in ("forward", "backward", "full"):
    BYTES["idct2", _mode] = BYTES["dct2", _mode]

MODES = {op: [m for (o, m) in BYTES if o == op] for op in OPS}
PROVIDERS = ["reference", "compiled", "triton"]
if CUDA:
    SHAPES = [(512, 3, 32, 32), (512, 3, 64, 64), (512, 1, 32, 32), (512, 1, 64, 64)]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    SHAPES = [(2, 3, 28, 32)]  # a check that every case runs (Triton interpreted), not a measurement
    DTYPES = [torch.float32]

CASES = [(op, mode) for op in OPS for mode in MODES[op]]


def _make_set(op, shape, dtype):
    images, per_sample, grads, per_sample_out, _, _ = OPS[op]
    B = shape[0]

    def make():
        inputs = {k: torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(k in grads)
                  for k in images}
        s = COR.sigma + 0.05 + 3 * torch.rand(B, device=DEVICE)
        scalars = {"b": 2 * torch.rand(B, device=DEVICE), "s": s, "b_s": COR.b(s).reshape(-1),
                   "weight": torch.rand(B, device=DEVICE)}
        inputs.update({k: scalars[k].to(dtype) for k in per_sample})
        grad_out = None
        if grads:
            grad_out = torch.randn((B,) if per_sample_out else shape, device=DEVICE, dtype=dtype)
        return inputs, grad_out
    return make


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op, mode", CASES)
def test_dct(benchmark, monkeypatch, op, mode, provider, shape, dtype):
    fn = provider_function(op, provider, *OPS[op][4:], monkeypatch)
    benchmark.group = f"{op} {mode} {'x'.join(map(str, shape))} {dtype}"
    run(benchmark, _make_set(op, shape, dtype), fn, mode, OPS[op][2])
    B, C, H, W = shape
    nbytes, transforms = BYTES[op, mode]
    record(benchmark, nbytes(math.prod(shape), B, torch.finfo(dtype).bits // 8), op=op, provider=provider,
           mode=mode, shape=list(shape), dtype=str(dtype).removeprefix("torch."))
    flops = transforms * B * C * 2 * H * W * (H + W)
    benchmark.extra_info["flops"] = flops
    if benchmark.stats is not None:
        benchmark.extra_info["TFLOPs"] = flops / benchmark.stats.stats.median / 1e12
