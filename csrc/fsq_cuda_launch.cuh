// fsq_cuda_launch.cuh: host-side launch helpers of the CUDA kernels (fsq_cuda.cu and the .inc
// files it includes: one translation unit): the device table cache, token geometry copies,
// vector widths, grid sizes, the dtype check and the float dispatch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "fsq_common.h"

namespace fsq {
namespace {

constexpr int kThreads = 256;

// Device copy of a table too large for the kernel arguments, made once per (device, contents).
const float* cached_device_table(const std::vector<float>& values, const at::Device& device) {
  static std::mutex mu;
  static std::map<std::pair<int, std::vector<float>>, at::Tensor> cache;
  const std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_pair(static_cast<int>(device.index()), values);
  auto it = cache.find(key);
  if (it == cache.end()) {
    at::Tensor host = at::empty({static_cast<int64_t>(values.size())}, at::kFloat);
    std::memcpy(host.data_ptr<float>(), values.data(), values.size() * sizeof(float));
    it = cache.emplace(std::move(key), host.to(device)).first;
  }
  return it->second.const_data_ptr<float>();
}

template <int NOPS>
void copy_geom(TokenGeom<3>& dst, const TokenGeom<NOPS>& src) {
  dst.ndim = src.ndim;
  dst.ntok = src.ntok;
  for (int k = 0; k < src.ndim; ++k) {
    dst.size[k] = src.size[k];
    for (int op = 0; op < NOPS; ++op) dst.stride[op][k] = src.stride[op][k];
  }
  for (int op = 0; op < NOPS; ++op) dst.cstride[op] = src.cstride[op];
}

// Vector width (16 or 8 bytes, 0 for none) for the first `nops` operands: every one of them
// channel-contiguous and aligned to the width at every token and codebook. [8,5,5,5] rows are
// 16 bytes in float32 and 8 bytes in bfloat16/float16.
template <int NOPS>
int vector_width(const TokenGeom<NOPS>& g, const void* const* ptrs, int nops, int64_t d,
                 int64_t esize, bool allow8 = true) {
  for (int width : {16, 8}) {
    if (width == 8 && !allow8) break;
    bool ok = (d * esize) % width == 0;
    for (int op = 0; op < nops && ok; ++op) {
      ok = g.cstride[op] == 1 && reinterpret_cast<uintptr_t>(ptrs[op]) % width == 0;
      for (int k = 0; k < g.ndim && ok; ++k) ok = (g.stride[op][k] * esize) % width == 0;
    }
    if (ok) return width;
  }
  return 0;
}

// Blocks for nwork items, `items` per thread (grid-stride beyond 16 blocks per SM).
int64_t grid_for(int64_t nwork, int64_t items = 1) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_block = kThreads * items;
  const int64_t blocks = (nwork + per_block - 1) / per_block;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, sms * 16));
}

void check_cuda_dtype(const char* op, const char* name, at::ScalarType t) {
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": ", name,
                   " on CUDA must be float32, float16 or bfloat16 (float64 runs on the CPU "
                   "backends), got ",
                   t);
}

#define FSQ_DISPATCH_CUDA_FLOATS(TYPE, NAME, ...)                                         \
  switch (TYPE) {                                                                         \
    case at::kFloat: {                                                                    \
      using scalar_t = float;                                                             \
      __VA_ARGS__();                                                                      \
      break;                                                                              \
    }                                                                                     \
    case at::kHalf: {                                                                     \
      using scalar_t = at::Half;                                                          \
      __VA_ARGS__();                                                                      \
      break;                                                                              \
    }                                                                                     \
    case at::kBFloat16: {                                                                 \
      using scalar_t = at::BFloat16;                                                      \
      __VA_ARGS__();                                                                      \
      break;                                                                              \
    }                                                                                     \
    default:                                                                              \
      TORCH_CHECK_TYPE(false, NAME, ": unsupported dtype ", TYPE);                        \
  }

}  // namespace
}  // namespace fsq
