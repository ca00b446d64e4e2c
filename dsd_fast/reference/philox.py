"""Philox4x32-10 counter-based RNG, bit-identical to Triton's tl.randint4x and matching tl.rand / tl.randn.

Every draw is a pure function of (seed, offset): the corruption noise of image i is the same on every
device and backend and for every batch composition and world size. Torch has no uint32 multiply-high, so
words are uint32 values held in int64 tensors and products are split into 16-bit halves (exact, no
overflow). Runs on CPU and CUDA tensors of any shape.
"""

import operator

import torch

from .. import checks

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9  # Weyl key increments (golden ratio, sqrt(3) - 1), as Random123 and Triton
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53  # round multipliers
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # Triton's scale: (2^31 - 1) * scale rounds below 1.0 in float32
TWO_PI = 6.283185307179586
U1_MIN = 1.0e-7  # Box-Muller clamp of u1 (log(0) guard), as Triton


def _check_seed(seed):
    try:
        s = operator.index(seed)
    except TypeError:
        s = None
    if s is None or isinstance(seed, bool) or not 0 <= s < 2**64:
        raise ValueError(f"seed must be an int in [0, 2^64), got {seed!r}")
    return s


def _check_offset(offset):
    if not isinstance(offset, torch.Tensor) or offset.dtype != torch.int64:
        got = offset.dtype if isinstance(offset, torch.Tensor) else type(offset).__name__
        raise ValueError(f"offset must be an int64 tensor, got {got}")


def _mulhilo(a, M):
    """(hi, lo) 32-bit words of the 64-bit product a * M; a holds uint32 values, M is a uint32 constant.
    With M split into 16-bit halves every partial product stays below 2^48, so int64 never overflows."""
    p_lo = a * (M & 0xFFFF)
    p_hi = a * (M >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1, n_rounds=N_ROUNDS):
    """Philox4x32 of counter (c0, c1, c2, c3) under key (k0, k1): four int64 tensors of uint32 values.

    Counters are int64 tensors (broadcast together), keys ints or int64 tensors; all are taken mod 2^32,
    as a cast to uint32 would."""
    c = (c0, c1, c2, c3)
    for name, x in zip(("c0", "c1", "c2", "c3"), c, strict=True):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
            raise ValueError(f"{name} must be an int64 tensor")
    k = (k0, k1)
    for name, x in zip(("k0", "k1"), k, strict=True):
        is_int = isinstance(x, int) and not isinstance(x, bool)
        if not (is_int or (isinstance(x, torch.Tensor) and x.dtype == torch.int64)):
            raise ValueError(f"{name} must be an int or an int64 tensor")
    if isinstance(n_rounds, bool) or not isinstance(n_rounds, int) or n_rounds < 0:
        raise ValueError(f"n_rounds must be a non-negative int, got {n_rounds!r}")
    c0, c1, c2, c3 = (x & MASK32 for x in torch.broadcast_tensors(*c))
    k0, k1 = (x & MASK32 for x in k)
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def randint4x(seed, offset):
    """tl.randint4x(seed, offset) for int64 offsets: counter (offset_lo, offset_hi, 0, 0), key (seed_lo,
    seed_hi). Negative offsets count as their uint64 bit pattern, as in Triton."""
    seed = _check_seed(seed)
    _check_offset(offset)
    zero = torch.zeros_like(offset)
    return philox4x32(offset & MASK32, (offset >> 32) & MASK32, zero, zero, seed & MASK32, seed >> 32)


def uint_to_uniform(x):
    """Triton's uint_to_uniform_float for 32-bit words: float32 in [0, 1). The word is read as int32 and
    folded (x < 0 -> -x - 1), so each of 2^31 values is hit by two words."""
    if not isinstance(x, torch.Tensor) or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError("x must be an integer tensor of 32-bit words")
    w = x.to(torch.int64) & MASK32
    v = torch.where(w >= 2**31, MASK32 - w, w)
    # Triton converts to float32 first (round to nearest), then multiplies by the float32 scale.
    return v.to(torch.float32) * UNIFORM_SCALE


def pair_uniform_to_normal(u1, u2):
    """Box-Muller in float32, as Triton: (r cos(2 pi u2), r sin(2 pi u2)), r = sqrt(-2 ln max(u1, 1e-7))."""
    th = TWO_PI * u2
    r = (-2.0 * u1.clamp(min=U1_MIN).log()).sqrt()
    return r * th.cos(), r * th.sin()


def rand(seed, offset):
    """tl.rand(seed, offset): float32 U[0, 1) from word 0."""
    return uint_to_uniform(randint4x(seed, offset)[0])


def randn(seed, offset):
    """tl.randn(seed, offset): float32 N(0, 1), the cos branch of Box-Muller on words 0 and 1."""
    i1, i2, _, _ = randint4x(seed, offset)
    return pair_uniform_to_normal(uint_to_uniform(i1), uint_to_uniform(i2))[0]


def randn4x(seed, offset):
    """tl.randn4x(seed, offset): four float32 N(0, 1), Box-Muller on words (0, 1) and (2, 3)."""
    u1, u2, u3, u4 = (uint_to_uniform(i) for i in randint4x(seed, offset))
    return (*pair_uniform_to_normal(u1, u2), *pair_uniform_to_normal(u3, u4))


def _check_dtype(dtype):
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def stream_normal(seed, offset, shape, dtype=torch.float32, device=None):
    """randn(seed, offset + arange(numel)).view(shape), drawn in float32 and cast to dtype."""
    _check_dtype(dtype)
    try:
        shape = torch.Size([shape] if isinstance(shape, int) else shape)
    except TypeError:
        shape = None
    if shape is None or any(n < 0 for n in shape):
        raise ValueError("shape must be an int or a sequence of non-negative ints")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= 2**63 - shape.numel():
        raise ValueError(f"offset must be an int in [0, 2^63 - numel], got {offset!r}")
    counter = offset + torch.arange(shape.numel(), dtype=torch.int64, device=device)
    return randn(seed, counter).view(shape).to(dtype)


def corrupt_noise(seed, index, chw, dtype=torch.float32, device=None):
    """Per-image noise eps[b] = randn(seed, index[b] * C*H*W + arange(C*H*W)).view(C, H, W) -> [B, C, H, W].

    A pure function of (seed, index[b]): independent of batch order and composition."""
    _check_dtype(dtype)
    if (not isinstance(index, torch.Tensor) or index.ndim != 1 or index.dtype.is_floating_point
            or index.dtype.is_complex or index.dtype == torch.bool):
        raise ValueError("index must be a 1-D integer tensor of image indices")
    try:
        C, H, W = (operator.index(n) for n in chw)
    except (TypeError, ValueError):
        C = H = W = 0
    if min(C, H, W) <= 0:
        raise ValueError(f"chw must be three positive ints (C, H, W), got {chw!r}")
    n = C * H * W
    index = index.to(device=device if device is not None else index.device, dtype=torch.int64)
    if index.numel() and checks.reads_values(index) and (int(index.min()) < 0 or int(index.max()) > 2**63 // n - 1):
        raise ValueError(f"index must lie in [0, 2^63 // (C*H*W) - 1] (int64 offsets), got range "
                         f"[{int(index.min())}, {int(index.max())}]")
    counter = index[:, None] * n + torch.arange(n, dtype=torch.int64, device=index.device)
    return randn(seed, counter).view(-1, C, H, W).to(dtype)
