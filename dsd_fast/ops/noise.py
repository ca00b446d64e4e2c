"""Corruption and noise injection as torch.library custom ops, with the Philox noise drawn in-kernel.

dsd_fast::corrupt(x, sigma, seed, index) = x + sigma eps, eps[b, j] = randn(seed, index[b] * CHW + j);
dsd_fast::add_noise(y, sigma_t, sigma, seed, offset) = y + sqrt(sigma_t^2 - sigma^2) eps,
eps[b, j] = randn(seed, offset + b * CHW + j) (j the flat C, H, W index). Seeds are uint64; the ops take
their int64 two's-complement view (`signed_seed`), which Philox reads as the same 64 bits.

Backends, first eligible wins (dsd_fast.ops.backend): the CUDA extension dsd_fast._C (csrc/, when it was
built) and the Triton kernels (dsd_fast.kernels.noise) for float32/bfloat16/float16 tensors on CUDA (Triton
also under TRITON_INTERPRET=1 when DSD_FAST_BACKEND=triton); otherwise the reference math of
dsd_fast.reference.philox. All draw the same normals; the kernels add them in float32 and round once.
"""

import functools
import warnings

import torch
from torch import Tensor

from dsd_fast.ops import backend
from dsd_fast.ops.backend import NUM_WARPS, cdiv, elementwise_block, out_buffer
from dsd_fast.reference import edm as _edm
from dsd_fast.reference import philox as _philox

SUPPORTED = ("triton", "reference")  # the fused losses (dsd_fast.ops.losses) have Triton kernels only
NOISE_SUPPORTED = ("cuda_ext", "triton", "reference")  # corrupt / add_noise also have CUDA kernels (csrc/)
# ----------------------------------------------------------------------------------------------------
# The CUDA extension's self-check (backend.pick's self_check for corrupt / add_noise).

@functools.cache
def cuda_ext_check(ext, op, device):
    """None when the extension's `op` kernel reproduces the reference Philox noise on `device`, else why not.
    Run once per process, extension, op and device on a small input whose seed and counters pass 2^32: a
    stale or miscompiled build must not change the dataset's noise silently (auto then skips it, with a
    warning)."""
    x = torch.linspace(-1.0, 1.0, 2 * 3 * 8 * 8, device=device).view(2, 3, 8, 8)
    seed, sigma = 2**64 - 59, 0.5
    if op == "corrupt":
        index = torch.tensor([3, 2**33], device=device)
        got = ext.corrupt(x, sigma, seed, index)
        want = x + sigma * _philox.corrupt_noise(seed, index, (3, 8, 8), dtype=torch.float32, device=device)
    elif op == "add_noise":
        sigma_t, offset = torch.tensor([0.7, 2.0], device=device), 2**32 + 7
        got = ext.add_noise(x, sigma_t, sigma, seed, offset)
        want = x + _edm.added_variance(sigma_t, 1.0, sigma).sqrt().view(-1, 1, 1, 1) * _philox.stream_normal(
            seed, offset, tuple(x.shape), torch.float32, device)
    else:
        raise ValueError(f"op: expected corrupt or add_noise, got {op!r}")
    err = (got.float() - want).abs().max().item() if got.shape == want.shape else float("inf")
    if err <= 1e-4:  # float32 libm rounding is ~1e-6 here; a wrong stream is off by O(1)
        return None
    reason = (f"the CUDA extension's {op} kernel does not reproduce the reference Philox noise (max error "
              f"{err:.3g} on {device}); rebuild it (DSD_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .)")
    warnings.warn(f"dsd_fast: not using the CUDA extension: {reason}", RuntimeWarning, stacklevel=3)
    return reason


@functools.cache
def _kernels():
    from dsd_fast.kernels import noise  # imported late: triton is optional, the reference path needs none

    return noise


def signed_seed(seed):
    """The int64 view of a uint64 seed (custom-op ints are int64)."""
    return seed - 2**64 if seed >= 2**63 else seed


def _rows(x):
    """x as contiguous [B, CHW] (the interpreter silently misreads strided tensors) and CHW."""
    B = x.shape[0]
    chw = x.numel() // B if B else 0
    return x.contiguous().view(B, chw), chw


def _eps_stream(y, seed, offset):
    return _philox.stream_normal(seed % 2**64, offset, tuple(y.shape), torch.float32, y.device)


def _check_offset(offset, n):
    if not 0 <= offset <= 2**63 - n:
        raise ValueError(f"offset: expected an int in [0, 2^63 - numel] (int64 Philox counters), got {offset}")


# ----------------------------------------------------------------------------------------------------
# corrupt: y = x + sigma eps, eps fixed by (seed, index[b]).

@torch.library.custom_op("dsd_fast::corrupt", mutates_args=())
def _corrupt(x: Tensor, sigma: float, seed: int, index: Tensor) -> Tensor:
    which = backend.pick("corrupt", x, NOISE_SUPPORTED, self_check=cuda_ext_check)
    if which == "cuda_ext":
        return backend.cuda_ext().corrupt(x, sigma, seed % 2**64, index.to(device=x.device, dtype=torch.int64))
    if which != "triton" or x.numel() == 0:
        eps = _philox.corrupt_noise(seed % 2**64, index, tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        return (x + sigma * eps).contiguous()
    x2, chw = _rows(x)
    index = index.to(device=x.device, dtype=torch.int64).contiguous()
    y = out_buffer(x2)
    BLOCK = elementwise_block(chw, x.device)
    _kernels().corrupt_kernel[(x2.shape[0], cdiv(chw, BLOCK))](x2, index, y, sigma, seed % 2**64, chw,
                                                                       BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y.view(x.shape).to(x.dtype)


@_corrupt.register_fake
def _(x, sigma, seed, index):
    return x.new_empty(x.shape)


def _corrupt_backward(ctx, grad):
    return grad, None, None, None


_corrupt.register_autograd(_corrupt_backward)


def corrupt(x, sigma, seed, index):
    """y = x + sigma eps with eps[b] = randn(seed, index[b] * CHW + arange(CHW)); seed in [0, 2^64) and
    0 <= index < 2^63 / CHW (int64 counters; not checked here: a check is a host sync per call)."""
    return _corrupt(x, float(sigma), signed_seed(seed), index)


# ----------------------------------------------------------------------------------------------------
# add_noise: x_t = y + sqrt(sigma_t^2 - sigma^2) eps, eps the flat stream from offset.

@torch.library.custom_op("dsd_fast::add_noise", mutates_args=())
def _add_noise(y: Tensor, sigma_t: Tensor, sigma: float, seed: int, offset: int) -> Tensor:
    _check_offset(offset, y.numel())
    which = backend.pick("add_noise", y, NOISE_SUPPORTED, self_check=cuda_ext_check)
    if which == "cuda_ext":
        return backend.cuda_ext().add_noise(y, sigma_t, sigma, seed % 2**64, offset)
    if which != "triton" or y.numel() == 0:
        q = _edm.added_variance(sigma_t, 1.0, sigma).sqrt().reshape(-1, *([1] * (y.ndim - 1)))
        return (y + q * _eps_stream(y, seed, offset).to(y.dtype)).contiguous()
    y2, chw = _rows(y)
    x_t = out_buffer(y2)
    BLOCK = elementwise_block(chw, y.device)
    _kernels().add_noise_kernel[(y2.shape[0], cdiv(chw, BLOCK))](
        y2, sigma_t.contiguous(), x_t, sigma, seed % 2**64, offset, chw, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return x_t.view(y.shape).to(y.dtype)


@_add_noise.register_fake
def _(y, sigma_t, sigma, seed, offset):
    return y.new_empty(y.shape)


@torch.library.custom_op("dsd_fast::add_noise_backward", mutates_args=())
def _add_noise_backward(grad: Tensor, sigma_t: Tensor, sigma: float, seed: int, offset: int) -> Tensor:
    """d/d sigma_t of sum(grad * x_t) = sigma_t / sqrt(sigma_t^2 - sigma^2) * sum_CHW(grad * eps)."""
    # SUPPORTED: the CUDA extension has no kernel for this.
    if backend.pick("add_noise_backward", grad, SUPPORTED) != "triton" or grad.numel() == 0:
        dot = (grad.float() * _eps_stream(grad, seed, offset)).flatten(1).sum(1)
    else:
        g2, chw = _rows(grad)
        BLOCK = elementwise_block(chw, grad.device)
        NC = cdiv(chw, BLOCK)
        partial = grad.new_empty(g2.shape[0], NC, dtype=torch.float32)
        _kernels().add_noise_dot_kernel[(g2.shape[0], NC)](g2, partial, seed % 2**64, offset, chw, NC,
                                                          BLOCK=BLOCK, num_warps=NUM_WARPS)
        dot = partial.sum(1)
    s = sigma_t.to(dot.dtype)
    return (s / _edm.added_variance(s, 1.0, sigma).sqrt() * dot).to(sigma_t.dtype)


@_add_noise_backward.register_fake
def _(grad, sigma_t, sigma, seed, offset):
    return sigma_t.new_empty(sigma_t.shape)


def _add_noise_setup(ctx, inputs, output):
    _, sigma_t, ctx.sigma, ctx.seed, ctx.offset = inputs
    ctx.save_for_backward(sigma_t)


def _add_noise_grads(ctx, grad):
    (sigma_t,) = ctx.saved_tensors
    grad_y = grad if ctx.needs_input_grad[0] else None
    grad_sigma_t = None
    if ctx.needs_input_grad[1]:
        grad_sigma_t = _add_noise_backward(grad, sigma_t, ctx.sigma, ctx.seed, ctx.offset)
    return grad_y, grad_sigma_t, None, None, None


_add_noise.register_autograd(_add_noise_grads, setup_context=_add_noise_setup)


def add_noise(y, sigma_t, sigma, seed, offset=0):
    """x_t = y + sqrt(sigma_t^2 - sigma^2) eps, eps[b, j] = randn(seed, offset + b * CHW + j); sigma_t [B]."""
    return _add_noise(y, sigma_t, float(sigma), signed_seed(seed), offset)

