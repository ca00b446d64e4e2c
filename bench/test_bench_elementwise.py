"""Elementwise and per-sample-reduction ops: reference (eager torch), compiled (torch.compile of the
reference), triton (the fused dsd_fast op) and, for corrupt and add_noise, cuda_ext (the same op on the
CUDA extension's kernels, where it was built); modes forward, backward, full (forward + backward).

Minimal bytes per case (BYTES): every input read once, every output written once, with N = B*C*H*W
image elements and B per-sample scalars, e bytes each (int64 index: 8 bytes). Backward reads grad_out and
the inputs the gradient needs, writes the gradients training takes: d x0_hat (ambient), d F_x (precond),
d f_phi, d f_psi, d x_g (SiD: x_g directly and both nets' inputs), d x_g (DMD, SDS).
"""

import math

import pytest
import torch
from common import CUDA, DEVICE, provider_function, record, run

from dsd_fast.ops import losses as ops_losses
from dsd_fast.ops import noise as ops_noise
from dsd_fast.reference import edm, philox
from dsd_fast.reference import losses as ref

SIGMA = 0.2
SEED = 2**63 + 12345
OFFSET = 2**33


def _corrupt_ref(x, index):
    """x + sigma eps(seed, index): philox.corrupt_noise's math without its range check (a host sync that
    would break the compiled graph)."""
    n = x[0].numel()
    counter = index[:, None] * n + torch.arange(n, device=x.device)
    return x + SIGMA * philox.randn(SEED, counter).view(x.shape).to(x.dtype)


def _precond_ref(F_x, x_t, y, sigma_t):
    s = sigma_t.reshape(-1, 1, 1, 1)
    return ref.ambient_loss(edm.c_skip(s) * x_t + edm.c_out(s) * F_x, x_t, y, sigma_t, SIGMA)


# op: (image inputs, per-sample inputs, inputs that take gradients, reference, fused op)
OPS = {
    "corrupt": (("x",), ("index",), (), _corrupt_ref, lambda x, index: ops_noise.corrupt(x, SIGMA, SEED, index)),
    "add_noise": (
        ("y",), ("sigma_t",), (),
        lambda y, sigma_t: y + (sigma_t**2 - SIGMA**2).sqrt().reshape(-1, 1, 1, 1)
        * philox.stream_normal(SEED, OFFSET, y.shape, y.dtype, y.device),
        lambda y, sigma_t: ops_noise.add_noise(y, sigma_t, SIGMA, SEED, OFFSET)),
    "ambient_loss": (
        ("x0_hat", "x_t", "y"), ("sigma_t",), ("x0_hat",),
        lambda x0_hat, x_t, y, sigma_t: ref.ambient_loss(x0_hat, x_t, y, sigma_t, SIGMA),
        lambda x0_hat, x_t, y, sigma_t: ops_losses.ambient_loss(x0_hat, x_t, y, sigma_t, SIGMA)),
    "ambient_loss_precond": (
        ("F_x", "x_t", "y"), ("sigma_t",), ("F_x",), _precond_ref,
        lambda F_x, x_t, y, sigma_t: ops_losses.ambient_loss_precond(F_x, x_t, y, sigma_t, SIGMA)),
    "sid_generator_loss": (
        ("f_phi", "f_psi", "x_g"), (), ("f_phi", "f_psi", "x_g"), ref.sid_generator_loss,
        ops_losses.sid_generator_loss),
    "dmd_loss": (("f_phi", "f_psi", "x_g"), (), ("x_g",), ref.dmd_loss, ops_losses.dmd_loss),
    "sds_loss": (("f_phi", "x_t", "eps", "x_g"), ("sigma_t",), ("x_g",), ref.sds_loss, ops_losses.sds_loss),
}

# (op, mode): minimal bytes from (N, B, e).
BYTES = {
    ("corrupt", "forward"): lambda N, B, e: 2 * N * e + 8 * B,  # x, index -> y
    ("add_noise", "forward"): lambda N, B, e: 2 * N * e + B * e,  # y, sigma_t -> x_t
    ("ambient_loss", "forward"): lambda N, B, e: 3 * N * e + 2 * B * e,  # x0_hat, x_t, y, sigma_t -> loss
    ("ambient_loss", "backward"): lambda N, B, e: 4 * N * e + 2 * B * e,  # grad, sigma_t, 3 images -> d x0_hat
    ("ambient_loss", "full"): lambda N, B, e: 4 * N * e + 3 * B * e,  # 3 images, sigma_t, grad -> loss, d x0_hat
    ("sid_generator_loss", "forward"): lambda N, B, e: 3 * N * e + B * e,  # f_phi, f_psi, x_g -> loss
    ("sid_generator_loss", "backward"): lambda N, B, e: 6 * N * e + B * e,  # grad, 3 images -> 3 gradients
    ("sid_generator_loss", "full"): lambda N, B, e: 6 * N * e + 2 * B * e,  # 3 images, grad -> loss, 3 grads
    ("dmd_loss", "forward"): lambda N, B, e: 3 * N * e + B * e,  # f_phi, f_psi, x_g -> loss
    ("dmd_loss", "backward"): lambda N, B, e: 3 * N * e + B * e,  # grad, f_phi, f_psi -> d x_g
    ("dmd_loss", "full"): lambda N, B, e: 4 * N * e + 2 * B * e,  # 3 images, grad -> loss, d x_g
    ("sds_loss", "forward"): lambda N, B, e: 4 * N * e + 2 * B * e,  # f_phi, x_t, eps, x_g, sigma_t -> loss
    ("sds_loss", "backward"): lambda N, B, e: 4 * N * e + 2 * B * e,  # grad, sigma_t, f_phi, x_t, eps -> d x_g
    ("sds_loss", "full"): lambda N, B, e: 5 * N * e + 3 * B * e,  # 4 images, sigma_t, grad -> loss, d x_g
}
for _mode in ("forward", "backward", "full"):
    BYTES["ambient_loss_precond", _mode] = BYTES["ambient_loss", _mode]

MODES = {op: [m for (o, m) in BYTES if o == op] for op in OPS}
PROVIDERS = ["reference", "compiled", "triton"]
if CUDA:
    SHAPES = [(512, 3, 32, 32), (512, 3, 64, 64), (512, 1, 32, 32), (512, 1, 64, 64)]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    SHAPES = [(4, 3, 8, 8)]  # a check that every case runs (Triton interpreted), not a measurement
    DTYPES = [torch.float32]

CUDA_EXT_OPS = ("corrupt", "add_noise")  # the ops with CUDA-extension kernels (csrc/), where it was built
CASES = [(op, mode, provider) for op in OPS for mode in MODES[op]
         for provider in PROVIDERS + ["cuda_ext"] * (op in CUDA_EXT_OPS)]


def _make_set(op, shape, dtype):
    images, per_sample, grads, _, _ = OPS[op]
    B = shape[0]

    def make():
        inputs = {k: torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(k in grads) for k in images}
        for k in per_sample:
            if k == "index":
                inputs[k] = torch.randint(0, 2**40, (B,), device=DEVICE)
            else:
                inputs[k] = (SIGMA + 0.05 + 3 * torch.rand(B, device=DEVICE)).to(dtype)
        grad_out = torch.randn(B, device=DEVICE, dtype=dtype) if grads else None
        return inputs, grad_out
    return make



@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op, mode, provider", CASES)
def test_elementwise(benchmark, monkeypatch, op, mode, provider, shape, dtype):
    fn = provider_function(op, provider, *OPS[op][3:], monkeypatch)
    benchmark.group = f"{op} {mode} {'x'.join(map(str, shape))} {dtype}"
    run(benchmark, _make_set(op, shape, dtype), fn, mode, OPS[op][2])
    N, e = math.prod(shape), torch.finfo(dtype).bits // 8
    record(benchmark, BYTES[op, mode](N, shape[0], e), op=op, provider=provider, mode=mode, shape=list(shape),
           dtype=str(dtype).removeprefix("torch."))
