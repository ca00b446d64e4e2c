// Philox4x32-10 and the uint32 -> normal transform, bit-identical to Triton's tl.randint4x and
// numerically equal (to float32 libm rounding) to tl.randn(seed, offset): same rounds, constants,
// counter layout (offset_lo, offset_hi, 0, 0), key (seed_lo, seed_hi), uint->float and Box-Muller.
#pragma once
#include <cstdint>

namespace dsd_fast {

__device__ __forceinline__ void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                              uint32_t k0, uint32_t k1) {
  constexpr uint32_t KEY_A = 0x9E3779B9u, KEY_B = 0xBB67AE85u;
  constexpr uint32_t ROUND_A = 0xD2511F53u, ROUND_B = 0xCD9E8D57u;
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = __umulhi(ROUND_B, p2) ^ c1 ^ k0;
    c2 = __umulhi(ROUND_A, p0) ^ c3 ^ k1;
    c1 = ROUND_B * p2;
    c3 = ROUND_A * p0;
    k0 += KEY_A;
    k1 += KEY_B;
  }
}

__device__ __forceinline__ float uint_to_uniform(uint32_t x) {
  int32_t i = static_cast<int32_t>(x);
  i = i < 0 ? ~i : i;  // Triton's -x - 1 for negatives (two's complement)
  return static_cast<float>(i) * 4.6566127342e-10f;
}

// tl.randn(seed, offset): the cosine branch of Box-Muller on words 0 and 1.
__device__ __forceinline__ float philox_randn(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float u1 = fmaxf(1.0e-7f, uint_to_uniform(c0));
  const float u2 = uint_to_uniform(c1);
  const float th = 6.283185307179586f * u2;
  return sqrtf(-2.0f * logf(u1)) * cosf(th);
}

}  // namespace dsd_fast
