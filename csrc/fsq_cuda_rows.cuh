// fsq_cuda_rows.cuh: row access of the CUDA kernels (fsq_cuda.cu, fsq_residual_cuda.inc): the d
// channels of a (token, codebook) row through strides or with 64/128-bit vector loads and stores,
// and the work-item loops (grid-stride, several items per thread).
#pragma once

#include <cstdint>

#include "fsq_common.h"

namespace fsq {
namespace {

// Vector access of a channel-contiguous row: Raw = uint4 (16 bytes) or uint2 (8 bytes).
template <typename scalar_t, typename Raw>
__device__ __forceinline__ void load_vec(const scalar_t* __restrict__ p, int d,
                                         float (&v)[kMaxChannels]) {
  constexpr int kPer = sizeof(Raw) / sizeof(scalar_t);
#pragma unroll
  for (int c = 0; c < kMaxChannels; c += kPer) {
    if (c < d) {
      const Raw raw = __ldg(reinterpret_cast<const Raw*>(p + c));
      const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
      for (int u = 0; u < kPer; ++u)
        if (c + u < kMaxChannels) v[c + u] = static_cast<float>(e[u]);
    }
  }
}

template <typename scalar_t, typename Raw>
__device__ __forceinline__ void store_vec(scalar_t* __restrict__ p, int d,
                                          const float (&v)[kMaxChannels]) {
  constexpr int kPer = sizeof(Raw) / sizeof(scalar_t);
#pragma unroll
  for (int c = 0; c < kMaxChannels; c += kPer) {
    if (c < d) {
      Raw raw;
      scalar_t* e = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
      for (int u = 0; u < kPer; ++u)
        e[u] = static_cast<scalar_t>(c + u < kMaxChannels ? v[c + u] : 0.0f);
      *reinterpret_cast<Raw*>(p + c) = raw;
    }
  }
}

// The d channels of one row: `vec` is the vector width in bytes (16, 8) or 0 (strided access).
// kVec8 = false leaves the 8-byte path out (the residual kernels: one path less keeps their
// register allocation free of spills).
template <typename scalar_t, bool kVec8 = true>
__device__ __forceinline__ void load_channels(const scalar_t* __restrict__ p, int64_t cs, int d,
                                              int vec, float (&v)[kMaxChannels]) {
  if (vec == 16) {
    load_vec<scalar_t, uint4>(p, d, v);
  } else if (kVec8 && vec == 8) {
    load_vec<scalar_t, uint2>(p, d, v);
  } else {
#pragma unroll
    for (int c = 0; c < kMaxChannels; ++c)
      if (c < d) v[c] = static_cast<float>(p[c * cs]);
  }
}

template <typename scalar_t, bool kVec8 = true>
__device__ __forceinline__ void store_channels(scalar_t* __restrict__ p, int64_t cs, int d,
                                               int vec, const float (&v)[kMaxChannels]) {
  if (vec == 16) {
    store_vec<scalar_t, uint4>(p, d, v);
  } else if (kVec8 && vec == 8) {
    store_vec<scalar_t, uint2>(p, d, v);
  } else {
#pragma unroll
    for (int c = 0; c < kMaxChannels; ++c)
      if (c < d) p[c * cs] = static_cast<scalar_t>(v[c]);
  }
}

__device__ __forceinline__ int64_t work_begin() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t work_step() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Several work items (token, codebook) per thread in the forward and backward: a thread first
// loads the rows of all its items of a round, then quantizes and stores them, so that several
// loads per thread are in flight (an 8-byte bf16 [8,5,5,5] row alone keeps little memory traffic
// in flight). Item u of a round is round + u * blockDim.x: each of the round's loads is still
// coalesced across the warp. The backward holds two arrays per item, hence fewer items.
constexpr int kForwardItems = 4;
constexpr int kBackwardItems = 2;

template <int kItems>
__device__ __forceinline__ int64_t round_begin() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x * kItems + threadIdx.x;
}
template <int kItems>
__device__ __forceinline__ int64_t round_step() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x * kItems;
}

// Element offset of the row of work item w (token w / ncb, codebook w % ncb) in operand `op`.
template <int NOPS>
__device__ __forceinline__ int64_t row_offset(const TokenGeom<NOPS>& g, int op, int64_t w, int d,
                                              int ncb) {
  const int64_t tok = ncb == 1 ? w : w / ncb;
  return g.offset(op, tok) + (w - tok * ncb) * d * g.cstride[op];
}

}  // namespace
}  // namespace fsq
