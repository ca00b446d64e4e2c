"""The CUDA extension's Philox (csrc/philox.cuh) against the reference, on the CPU: the header is compiled as
host C++ (a shim maps __device__ / __forceinline__ / __umulhi to host code), so its words, uniforms and
normals are checked wherever a C++ compiler is, long before a GPU runs them. On a GPU,
tests/test_cuda_ext.py checks the kernels themselves."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dsd_fast.reference import philox

ROOT = Path(__file__).resolve().parent.parent
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

HARNESS = r"""
#include <cmath>
#include <cstdint>
#include <cstdio>
#define __device__
#define __forceinline__ inline
static inline uint32_t __umulhi(uint32_t a, uint32_t b) { return (uint32_t)(((uint64_t)a * b) >> 32); }
#include "philox.cuh"

// stdin: "seed offset" per line (uint64); stdout: the four words, the uniforms of words 0 and 1, randn.
int main() {
  unsigned long long seed, offset;
  while (std::scanf("%llu %llu", &seed, &offset) == 2) {
    uint32_t c0 = (uint32_t)offset, c1 = (uint32_t)(offset >> 32), c2 = 0, c3 = 0;
    dsd_fast::philox4x32_10(c0, c1, c2, c3, (uint32_t)seed, (uint32_t)(seed >> 32));
    std::printf("%u %u %u %u %.9e %.9e %.9e\n", c0, c1, c2, c3, dsd_fast::uint_to_uniform(c0),
                dsd_fast::uint_to_uniform(c1), dsd_fast::philox_randn(seed, offset));
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) on PATH")
    tmp = tmp_path_factory.mktemp("csrc")
    (tmp / "harness.cpp").write_text(HARNESS)
    exe = tmp / "harness"
    # No -ffast-math: like the extension's nvcc flags, logf/cosf must be the accurate ones.
    subprocess.run([CXX, "-O2", "-std=c++17", f"-I{ROOT / 'csrc'}", str(tmp / "harness.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe


def test_csrc_philox_matches_reference(harness):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    seeds = [0, 1, 2**32 - 1, 2**32, 2**63 + 5, 2**64 - 1] + torch.randint(0, 2**62, (10,), generator=g).tolist()
    offsets = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 7, 2**40 + 3, 2**63 - 1]
    offsets += torch.randint(0, 2**62, (10,), generator=g).tolist()
    pairs = [(s, o) for s in seeds for o in offsets]
    out = subprocess.run([str(harness)], input="".join(f"{s} {o}\n" for s, o in pairs), capture_output=True,
                         text=True, check=True).stdout.split("\n")
    rows = [line.split() for line in out if line]
    assert len(rows) == len(pairs)
    got_words = torch.tensor([[int(v) for v in r[:4]] for r in rows], dtype=torch.int64)
    got_u = torch.tensor([[float(v) for v in r[4:6]] for r in rows], dtype=torch.float32)
    got_n = torch.tensor([float(r[6]) for r in rows], dtype=torch.float32)
    for k, (seed, offset) in enumerate(pairs):
        o = torch.tensor([offset], dtype=torch.int64)
        words = torch.cat(philox.randint4x(seed, o))
        assert torch.equal(got_words[k], words), (seed, offset)
        want_u = philox.uint_to_uniform(words[:2])
        assert torch.equal(got_u[k], want_u), (seed, offset)  # uint -> float: exact
        want_n = philox.randn(seed, o)[0]
        # Box-Muller through host libm vs torch: float32 rounding of log/cos, a few ulp.
        torch.testing.assert_close(got_n[k], want_n, rtol=2e-6, atol=2e-6)
