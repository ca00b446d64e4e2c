"""Philox4x32-10 reference: published known-answer vectors, bit-identity with Triton's tl.randint4x
(and tl.rand / tl.randn / tl.randn4x within float32 rounding), statistics, per-image noise consistency
and argument checks."""

import functools
import os
import random

import pytest
import torch

from dsd_fast.reference import philox

CUDA = torch.cuda.is_available()
if not CUDA:
    # The Triton cross-check runs in the interpreter on CPU. Triton's own jit functions (tl.randint4x) are
    # callable from an interpreted kernel only if this is set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

M32 = 0xFFFFFFFF

# Random123 kat_vectors, philox4x32 10: counter (4 words), key (2 words) -> output (4 words).
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# Offsets where the 64-bit counter split can go wrong: int32 sign bit, the 2^32 carry, the int64 extremes.
EDGE_OFFSETS = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 12345, 2**63 - 1, -1, -(2**32), -(2**63)]


def _rand_int(bits=64):
    return random.getrandbits(bits)


def _offsets(n, device="cpu"):
    """Edge offsets followed by random int64 offsets over the whole range."""
    rand = torch.randint(-(2**63), 2**63 - 1, (n - len(EDGE_OFFSETS),), dtype=torch.int64)
    return torch.cat([torch.tensor(EDGE_OFFSETS, dtype=torch.int64), rand]).to(device)


# ------------------------------------------------------------------------------------------------------------
# Philox itself


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answer_vectors(counter, key, expected):
    shape = (2, 3)  # any shape: every element carries the same counter
    c = [torch.full(shape, w, dtype=torch.int64) for w in counter]
    out = philox.philox4x32(*c, *key)
    for word, want in zip(out, expected, strict=True):
        assert word.dtype == torch.int64 and word.shape == shape
        assert (word == want).all(), f"{[hex(int(w.flatten()[0])) for w in out]} != {[hex(w) for w in expected]}"


def test_known_answer_vectors_batched_keys():
    """The three vectors in one call: counters and keys as int64 tensors, element-wise."""
    c = [torch.tensor([v[0][j] for v in KAT], dtype=torch.int64) for j in range(4)]
    k = [torch.tensor([v[1][j] for v in KAT], dtype=torch.int64) for j in range(2)]
    out = philox.philox4x32(*c, *k)
    for j in range(4):
        assert out[j].tolist() == [v[2][j] for v in KAT]


def test_mulhilo_exact():
    a = torch.cat([torch.tensor([0, 1, 2**16 - 1, 2**16, 2**31, M32]), torch.randint(0, 2**32, (1000,))])
    for M in (philox.PHILOX_ROUND_A, philox.PHILOX_ROUND_B, M32):
        hi, lo = philox._mulhilo(a, M)
        want = [x * M for x in a.tolist()]
        assert hi.tolist() == [p >> 32 for p in want]
        assert lo.tolist() == [p & M32 for p in want]


def test_randint4x_counter_and_key_split():
    """Counter (offset_lo, offset_hi, 0, 0), key (seed_lo, seed_hi), split with python ints."""
    seed = _rand_int() | (1 << 40)  # > 2^32: both key words matter
    offset = _offsets(64)
    got = philox.randint4x(seed, offset)
    for i, o in enumerate(offset.tolist()):
        u = o % 2**64
        c = [torch.tensor(w, dtype=torch.int64) for w in (u & M32, u >> 32, 0, 0)]
        want = philox.philox4x32(*c, seed & M32, seed >> 32)
        assert [int(g[i]) for g in got] == [int(w) for w in want], f"seed={seed} offset={o}"


def test_uint_to_uniform_closed_form():
    s = torch.tensor(philox.UNIFORM_SCALE, dtype=torch.float32)
    w = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 2, M32], dtype=torch.int64)
    # int32 view: 0, 1, 2^31-1, -2^31, -2, -1, folded by x < 0 -> -x - 1.
    want = torch.tensor([0, 1, 2**31 - 1, 2**31 - 1, 1, 0], dtype=torch.float32) * s
    u = philox.uint_to_uniform(w)
    assert u.dtype == torch.float32
    assert torch.equal(u, want)
    assert u.max() < 1.0
    # int32 words (as Triton would store them) give the same floats as their uint32 values.
    assert torch.equal(philox.uint_to_uniform(w.to(torch.int32)), u)


# ------------------------------------------------------------------------------------------------------------
# Cross-check against Triton


@functools.cache
def _triton_kernel():
    triton = pytest.importorskip("triton")
    tl = triton.language
    interpret = triton.knobs.runtime.interpret
    if interpret and not type(tl.randint4x).__name__ == "InterpretedFunction":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it in conftest.py")
    if not interpret and not CUDA:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")

    @triton.jit
    def philox_kernel(seed, offset_ptr, w_ptr, f_ptr, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        offset = tl.load(offset_ptr + i, mask=m, other=0)
        w0, w1, w2, w3 = tl.randint4x(seed, offset)
        tl.store(w_ptr + i, w0.to(tl.int32, bitcast=True), mask=m)
        tl.store(w_ptr + N + i, w1.to(tl.int32, bitcast=True), mask=m)
        tl.store(w_ptr + 2 * N + i, w2.to(tl.int32, bitcast=True), mask=m)
        tl.store(w_ptr + 3 * N + i, w3.to(tl.int32, bitcast=True), mask=m)
        tl.store(f_ptr + i, tl.rand(seed, offset), mask=m)
        tl.store(f_ptr + N + i, tl.randn(seed, offset), mask=m)
        n1, n2, n3, n4 = tl.randn4x(seed, offset)
        tl.store(f_ptr + 2 * N + i, n1, mask=m)
        tl.store(f_ptr + 3 * N + i, n2, mask=m)
        tl.store(f_ptr + 4 * N + i, n3, mask=m)
        tl.store(f_ptr + 5 * N + i, n4, mask=m)

    return philox_kernel, ("cpu" if interpret else "cuda")


# A seed above 2^63 reaches the kernel as uint64, one in (2^32, 2^63) as int64: both key words in play.
@pytest.mark.parametrize("seed_kind", ["zero", "max", "int64", "uint64"])
def test_matches_triton(seed_kind):
    kernel, device = _triton_kernel()
    seed = {"zero": 0, "max": 2**64 - 1, "int64": _rand_int(63) | (1 << 33),
            "uint64": _rand_int() | (1 << 63)}[seed_kind]
    N = 2000  # one program of BLOCK = 2048: the interpreter's cost is per program instance
    offset = _offsets(N, device)
    w = torch.empty(4, N, dtype=torch.int32, device=device)
    f = torch.empty(6, N, dtype=torch.float32, device=device)
    kernel[(1,)](seed, offset, w, f, N, BLOCK=2048)
    words = philox.randint4x(seed, offset)
    for j in range(4):
        assert torch.equal(w[j].long() & M32, words[j]), f"seed={seed} word {j}"
    # rand is one int->float conversion and one multiply, both correctly rounded: exact.
    assert torch.equal(f[0], philox.rand(seed, offset)), f"seed={seed}"
    # Normals: log/cos/sin differ by a few float32 ulps between libraries. Measured max |diff| vs this
    # reference: 7.2e-7 over 4M draws against numpy (the interpreter), 4.8e-7 over 50M draws against
    # compiled Triton on an H100 (7.2e-7 with the reference on CPU).
    normals = [philox.randn(seed, offset), *philox.randn4x(seed, offset)]
    for j, n in enumerate(normals):
        torch.testing.assert_close(f[1 + j], n, atol=1e-6, rtol=0, msg=lambda m, j=j: f"seed={seed} output {j}: {m}")
    assert torch.equal(normals[0], normals[1])  # randn is the cos branch of words 0, 1


# ------------------------------------------------------------------------------------------------------------
# Statistics


def _ks_normal(x):
    """Kolmogorov-Smirnov distance of the sample x to N(0, 1)."""
    x = x.double().sort().values
    n = x.numel()
    F = torch.special.ndtr(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max(float((i / n - F).max()), float((F - (i - 1) / n).max()))


def test_normal_statistics():
    seed, offset = _rand_int(), _rand_int(40)
    n = 100_000
    x = philox.stream_normal(seed, offset, (n,))
    msg = f"seed={seed} offset={offset}"
    # Standard errors: mean 0.0032, std 0.0022; bounds at ~6 of them.
    assert abs(float(x.mean())) < 0.02, msg
    assert abs(float(x.std()) - 1) < 0.015, msg
    # KS critical value at n = 1e5 and p = 1e-6: sqrt(ln(2e6) / 2n) = 0.0085.
    assert _ks_normal(x) < 0.0085, msg
    # The four normals of randn4x are each N(0, 1), and the cos/sin pair is uncorrelated.
    n4 = philox.randn4x(seed, offset + torch.arange(n // 4, dtype=torch.int64))
    for z in n4:
        assert _ks_normal(z) < 0.017, msg  # p = 1e-6 at n = 25000
    assert abs(float((n4[0] * n4[1]).mean())) < 0.04, msg
    u = philox.rand(seed, offset + torch.arange(n, dtype=torch.int64))
    assert 0 <= float(u.min()) and float(u.max()) < 1, msg
    assert abs(float(u.mean()) - 0.5) < 0.006 and abs(float(u.var()) - 1 / 12) < 0.003, msg


# ------------------------------------------------------------------------------------------------------------
# Streams and per-image noise


def test_stream_normal_is_randn_on_consecutive_offsets():
    seed, offset = _rand_int(), _rand_int(40) | (1 << 33)  # offsets past 2^32
    x = philox.stream_normal(seed, offset, (3, 5, 7))
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    assert torch.equal(x.flatten(), philox.randn(seed, offset + torch.arange(105, dtype=torch.int64)))
    # Splitting a stream into two consecutive streams changes nothing.
    a, b = philox.stream_normal(seed, offset, 40), philox.stream_normal(seed, offset + 40, (65,))
    assert torch.equal(torch.cat([a, b]), x.flatten())
    assert philox.stream_normal(seed, offset, ()).shape == ()
    assert philox.stream_normal(seed, offset, (0, 4)).shape == (0, 4)


@pytest.mark.parametrize("B", [1, 3, 7])
@pytest.mark.parametrize("chw", [(1, 8, 8), (3, 5, 7), (1, 28, 28), (3, 32, 32)])
def test_corrupt_noise_independent_of_batch(B, chw):
    seed = _rand_int()
    n = chw[0] * chw[1] * chw[2]
    # Distinct indices, one of them with offsets past 2^32.
    index = torch.randperm(10_000)[:B] + torch.randint(0, 2**20, ())
    index[0] = 2**32 // n + 5
    eps = philox.corrupt_noise(seed, index, chw)
    assert eps.shape == (B, *chw) and eps.dtype == torch.float32
    for b in range(B):
        assert torch.equal(eps[b], philox.stream_normal(seed, int(index[b]) * n, chw)), f"seed={seed}"
    # Any order and any sub-batch give each image the same noise.
    perm = torch.randperm(B)
    assert torch.equal(philox.corrupt_noise(seed, index[perm], chw), eps[perm])
    assert torch.equal(philox.corrupt_noise(seed, index[-1:], chw), eps[-1:])
    # Repeated index -> identical noise; any integer dtype is accepted.
    twice = philox.corrupt_noise(seed, index[:1].repeat(2).int(), chw)
    assert torch.equal(twice[0], eps[0]) and torch.equal(twice[1], eps[0])
    # Different indices (and different seeds) -> different noise: images differ in (nearly) every value.
    other = philox.corrupt_noise(seed, index + 10_000 + 2**20, chw)
    flat = torch.cat([eps, other]).flatten(1)
    for i in range(len(flat)):
        for j in range(i):
            assert (flat[i] != flat[j]).float().mean() > 0.99, f"seed={seed} rows {i},{j}"
    assert (philox.corrupt_noise(seed ^ 1, index, chw) != eps).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_is_a_cast_of_float32(dtype):
    seed = _rand_int()
    index = torch.randint(0, 2**30, (3,))
    x32 = philox.corrupt_noise(seed, index, (3, 5, 7))
    x = philox.corrupt_noise(seed, index, (3, 5, 7), dtype=dtype, device="cpu")
    assert x.dtype == dtype and torch.equal(x, x32.to(dtype))
    s = philox.stream_normal(seed, 17, (4, 9), dtype=dtype)
    assert s.dtype == dtype and torch.equal(s, philox.stream_normal(seed, 17, (4, 9)).to(dtype))


def test_corrupt_noise_empty_batch():
    eps = philox.corrupt_noise(3, torch.empty(0, dtype=torch.int64), (3, 4, 4))
    assert eps.shape == (0, 3, 4, 4)


# ------------------------------------------------------------------------------------------------------------
# Bad inputs

I64 = torch.zeros(3, dtype=torch.int64)

BAD = [
    ("seed", lambda: philox.randn(-1, I64)),
    ("seed", lambda: philox.randn(2**64, I64)),
    ("seed", lambda: philox.randn(1.5, I64)),
    ("seed", lambda: philox.randn(True, I64)),
    ("seed", lambda: philox.stream_normal("7", 0, (2,))),
    ("offset", lambda: philox.randn(0, I64.int())),
    ("offset", lambda: philox.randn(0, I64.float())),
    ("offset", lambda: philox.randint4x(0, [1, 2])),
    ("offset", lambda: philox.stream_normal(0, -1, (2,))),
    ("offset", lambda: philox.stream_normal(0, 2**63 - 1, (2,))),
    ("offset", lambda: philox.stream_normal(0, 1.0, (2,))),
    ("shape", lambda: philox.stream_normal(0, 0, (2, -1))),
    ("shape", lambda: philox.stream_normal(0, 0, "ab")),
    ("dtype", lambda: philox.stream_normal(0, 0, (2,), dtype=torch.int64)),
    ("dtype", lambda: philox.corrupt_noise(0, I64, (1, 2, 2), dtype=float)),
    ("index", lambda: philox.corrupt_noise(0, torch.tensor([0, -1]), (1, 2, 2))),
    ("index", lambda: philox.corrupt_noise(0, torch.tensor([0.0]), (1, 2, 2))),
    ("index", lambda: philox.corrupt_noise(0, torch.zeros(2, 2, dtype=torch.int64), (1, 2, 2))),
    ("index", lambda: philox.corrupt_noise(0, torch.tensor([2**62]), (1, 2, 2))),
    ("index", lambda: philox.corrupt_noise(0, [0, 1], (1, 2, 2))),
    ("chw", lambda: philox.corrupt_noise(0, I64, (2, 2))),
    ("chw", lambda: philox.corrupt_noise(0, I64, (1, 0, 2))),
    ("chw", lambda: philox.corrupt_noise(0, I64, (1, 2.0, 2))),
    ("c2", lambda: philox.philox4x32(I64, I64, I64.int(), I64, 0, 0)),
    ("k1", lambda: philox.philox4x32(I64, I64, I64, I64, 0, 1.0)),
    ("n_rounds", lambda: philox.philox4x32(I64, I64, I64, I64, 0, 0, n_rounds=-1)),
    ("x", lambda: philox.uint_to_uniform(I64.float())),
]


@pytest.mark.parametrize("name,call", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_inputs_raise(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_largest_index_is_accepted():
    n = 4
    top = 2**63 // n - 1  # last image whose offsets fit in int64
    eps = philox.corrupt_noise(0, torch.tensor([top]), (1, 2, 2))
    assert torch.equal(eps.flatten(), philox.randn(0, top * n + torch.arange(n)))


# ------------------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_matches_cpu():
    seed = _rand_int()
    offset = _offsets(100_000)
    for a, b in zip(philox.randint4x(seed, offset.cuda()), philox.randint4x(seed, offset), strict=True):
        assert torch.equal(a.cpu(), b), f"seed={seed}"
    assert torch.equal(philox.rand(seed, offset.cuda()).cpu(), philox.rand(seed, offset))
    torch.testing.assert_close(philox.randn(seed, offset.cuda()).cpu(), philox.randn(seed, offset),
                               atol=1e-6, rtol=0)
    index = torch.randint(0, 2**24, (7,))
    eps = philox.corrupt_noise(seed, index, (3, 32, 32), device="cuda")
    assert eps.is_cuda
    torch.testing.assert_close(eps.cpu(), philox.corrupt_noise(seed, index, (3, 32, 32)), atol=1e-6, rtol=0)
