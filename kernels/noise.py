"""Philox noise generated in-kernel: corruption y = x + sigma eps and noise injection x_t = y + q eps.

The normals are tl.randn(seed, counter) with int64 counters, the same numbers as dsd_fast.reference.philox
for the same (seed, counter): corrupt draws eps[b, j] at index[b] * CHW + j (the image's fixed noise),
add_noise at offset + b * CHW + j (one flat stream). Tensors are contiguous [B, CHW]; program (b, c)
handles elements [c * BLOCK, (c + 1) * BLOCK) of sample b. Arithmetic is float32 whatever the storage
dtype. Row bases and counters are int64, so tensors and counters past 2^31 elements do not wrap.
"""

import triton
import triton.language as tl


@triton.jit
def _columns(CHW, BLOCK: tl.constexpr):
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return j, j < CHW


# seed and offset change every call: not specialising on their values avoids a recompile per call.
@triton.jit(do_not_specialize=["seed"])
def corrupt_kernel(x_ptr, index_ptr, y_ptr, sigma, seed, CHW, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j, mask = _columns(CHW, BLOCK)
    row = b.to(tl.int64) * CHW
    eps = tl.randn(seed, tl.load(index_ptr + b) * CHW + j)  # index is int64
    x = tl.load(x_ptr + row + j, mask=mask).to(tl.float32)
    tl.store(y_ptr + row + j, (x + sigma * eps).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _noise_scale(sigma_t_ptr, b, sigma):
    """q = sqrt(sigma_t^2 - sigma^2): the std of the noise that takes level sigma to sigma_t, as
    reference.edm.added_variance: (s - sigma)(s + sigma) (no cancellation near sigma) floored at 0."""
    s = tl.load(sigma_t_ptr + b).to(tl.float32)
    return tl.sqrt_rn(tl.maximum((s - sigma) * (s + sigma), 0.0))


@triton.jit(do_not_specialize=["seed", "offset"])
def add_noise_kernel(y_ptr, sigma_t_ptr, x_t_ptr, sigma, seed, offset, CHW, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j, mask = _columns(CHW, BLOCK)
    row = b.to(tl.int64) * CHW
    eps = tl.randn(seed, offset + row + j)  # row is int64: no int32 wrap
    y = tl.load(y_ptr + row + j, mask=mask).to(tl.float32)
    x_t = y + _noise_scale(sigma_t_ptr, b, sigma) * eps
    tl.store(x_t_ptr + row + j, x_t.to(x_t_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def add_noise_dot_kernel(grad_ptr, partial_ptr, seed, offset, CHW, NC, BLOCK: tl.constexpr):
    """partial[b, c] = sum over the block of grad * eps (for the gradient w.r.t. sigma_t)."""
    b = tl.program_id(0)
    j, mask = _columns(CHW, BLOCK)
    row = b.to(tl.int64) * CHW
    eps = tl.randn(seed, offset + row + j)  # row is int64: no int32 wrap
    g = tl.load(grad_ptr + row + j, mask=mask, other=0.0).to(tl.float32)
    tl.store(partial_ptr + b * NC + tl.program_id(1), tl.sum(g * eps))
