// fsq_philox.h: Philox4x32-10, the counter-based generator of the fused dither (docs/dither.md).
//
// The same numbers as fsq_kernels/philox.py, Triton's tl.randint4x / tl.rand and Random123's
// philox4x32_10 (tests check all of them bit for bit):
//   key (64 bits)     -> k0 = low 32 bits, k1 = high 32 bits
//   counter (64 bits) -> c0 = low 32 bits, c1 = high 32 bits, c2 = c3 = 0
//   uint32 -> float in [0, 1): read as int32, ~x where negative, then float(x) * 4.6566127342e-10f
//   (int -> float rounds to nearest, then one float multiply: no FMA can form).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FSQ_PHILOX_HD __host__ __device__ __forceinline__
#else
#define FSQ_PHILOX_HD inline
#endif

namespace fsq {
namespace philox {

struct Words {
  uint32_t w[4];
};

FSQ_PHILOX_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds of Philox4x32 on counter (c0, c1, c2, c3) under key (k0, k1).
FSQ_PHILOX_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mulhi(kRoundB, c2), lo_b = kRoundB * c2;
    const uint32_t hi_a = mulhi(kRoundA, c0), lo_a = kRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return Words{{c0, c1, c2, c3}};
}

// Triton's tl.randint4x(key, counter).
FSQ_PHILOX_HD Words randint4x(uint64_t key, uint64_t counter) {
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                       static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
}

// Triton's uint_to_uniform_float for a uint32 word: a float in [0, 1).
FSQ_PHILOX_HD float uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

}  // namespace philox
}  // namespace fsq
