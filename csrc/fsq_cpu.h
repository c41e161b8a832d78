// fsq_cpu.h: what the CPU kernels share (fsq_cpu.cpp: quantize, backward, decode, the fused
// dither and usage histogram; fsq_cpu_residual.cpp: residual FSQ).
//
// Work unit: a tile of up to kTile consecutive tokens along the innermost coalesced token dim
// (fsq_common.h), so every operand is read and written with one constant stride per channel
// inside a tile (stride 1 for channel-first, stride C for channel-last), through its own strides:
// no permute, no contiguous copy. Per channel, a tile is gathered into a small float/double
// buffer (the dtype conversion), run through the vectorized cores (fsq_cpu_cores.inc), and
// scattered back. Tiles are fixed by token position, never by thread count, and each output
// element is computed by one thread: results are bitwise identical for any number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "fsq_common.h"
#include "fsq_dither.h"

namespace fsq {
namespace {

constexpr int64_t kTile = 256;
// Above this many finite boundaries per channel the forward uses a binary search per element.
constexpr int32_t kLinearMax = 64;
// Boundary rows are padded with NaN (never exceeded) to a multiple of this.
constexpr int32_t kBoundPad = 4;

namespace cores_base {
#include "fsq_cpu_cores.inc"
}  // namespace cores_base

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__AVX2__)
#define FSQ_HAVE_AVX2_CORES 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace cores_avx2 {
#include "fsq_cpu_cores.inc"
}  // namespace cores_avx2
#pragma GCC pop_options
#endif

inline bool use_avx2_cores() {
#ifdef FSQ_HAVE_AVX2_CORES
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2;
#else
  return false;
#endif
}

template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t, typename T>
inline void gather(T* __restrict dst, const scalar_t* __restrict src, int64_t n, int64_t stride) {
  if (stride == 1) {
    for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<T>(src[t]);
  } else {
    for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<T>(src[t * stride]);
  }
}

template <typename scalar_t, typename T>
inline void scatter(scalar_t* __restrict dst, const T* __restrict src, int64_t n, int64_t stride) {
  if (stride == 1) {
    for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<scalar_t>(src[t]);
  } else {
    for (int64_t t = 0; t < n; ++t) dst[t * stride] = static_cast<scalar_t>(src[t]);
  }
}

// Tiles: rows of the outer token dims x chunks of kTile along the innermost one.
template <int NOPS>
struct Tiling {
  const TokenGeom<NOPS>& g;
  int64_t inner, per_row, count;
  explicit Tiling(const TokenGeom<NOPS>& geom) : g(geom) {
    inner = g.inner();
    per_row = (inner + kTile - 1) / kTile;
    count = inner ? (g.ntok / inner) * per_row : 0;
  }
  // first token (row-major id), its length, and per-operand element offsets
  inline void tile(int64_t i, int64_t& tok0, int64_t& n, int64_t* off) const {
    const int64_t row = i / per_row;
    const int64_t s0 = (i - row * per_row) * kTile;
    n = std::min(kTile, inner - s0);
    tok0 = row * inner + s0;
    for (int op = 0; op < NOPS; ++op) off[op] = g.offset(op, tok0);
  }
};

// Fresh multi-megabyte outputs are mostly page faults on first touch (glibc serves them with
// mmap, 4 KiB pages). Where transparent huge pages are in `madvise` mode, ask for 2 MiB pages
// on the output's interior before the kernel writes it: ~500x fewer faults. A hint only.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t nbytes = t.storage().nbytes();
  if (nbytes < 4 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (p + nbytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

inline int64_t grain_for(int64_t channels) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / (kTile * std::max<int64_t>(1, channels)));
}

}  // namespace
}  // namespace fsq
