// fsq_cuda.cu: CUDA kernels of the fsq:: ops (forward, backward, decode, residual FSQ).
//
// Grid-stride loops over work items (token, codebook): several per thread in the forward and
// backward (kForwardItems, kBackwardItems), one in the decode, one token in the residual ops.
// A thread reads the d <= 16 channels of its codebook through strides (channel-first: adjacent threads read adjacent addresses) or, when
// every operand is channel-contiguous and aligned, with vector loads and stores: 128-bit when
// d * sizeof(dtype) is a multiple of 16 (e.g. [8,5,5,5] in float32, 8 channels in bf16), 64-bit
// when it is a multiple of 8 (e.g. [8,5,5,5] in bfloat16/float16). Math in
// float32 (float64 is CPU-only). The forward compares against the level boundaries (no tanh);
// the backward uses sech^2 from exp (fsq_math.h).
//
// Per-call constants come from the op's table argument (fsq_kernels/ops/tables.py, parsed by
// fsq_common.h) and travel by value in a __grid_constant__ struct (<= 4 KiB), boundaries included
// up to kInlineBounds; larger level sets read a device copy of their boundaries, made once per
// (device, contents) and cached (no per-call copy, so CUDA graphs can capture the launches).
// active_stages of the residual ops is read by the kernel from device memory.
// No host synchronisation anywhere: in particular
// indices_to_codes does not check the index range on CUDA; an index outside [0, prod(levels))
// (e.g. the -1 of a NaN token) decodes to NaN codes.
//
// Only the dtype is a template parameter (3 instantiations per kernel); variant, hard_clamp,
// layout and index dtype are runtime arguments, to keep the build time down.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <map>
#include <mutex>

#include "fsq_common.h"
#include "fsq_cuda_rows.cuh"

namespace fsq {
namespace {

constexpr int kThreads = 256;
constexpr int kInlineBounds = 512;
constexpr int kLinearMaxCuda = 16;

struct CudaArgs {
  ChannelParams<float> p;
  TokenGeom<3> g;
  int64_t nwork;              // tokens * num_codebooks
  const float* ext_bounds;    // device boundaries when they do not fit inline, else nullptr
  int32_t vec;                // vector width of every operand's rows in bytes (16, 8) or 0
  float bounds[kInlineBounds];
};
static_assert(sizeof(CudaArgs) <= 4096, "kernel parameters must stay within 4 KiB");

// ----------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fsq_forward_kernel(const __grid_constant__ CudaArgs a, const scalar_t* __restrict__ z,
                       scalar_t* __restrict__ codes, void* __restrict__ indices) {
  const int d = a.p.d;
  const int ncb = a.p.num_codebooks;
  const float* bnd = a.ext_bounds ? a.ext_bounds : a.bounds;
  for (int64_t round = round_begin<kForwardItems>(); round < a.nwork;
       round += round_step<kForwardItems>()) {
    float v[kForwardItems][kMaxChannels];
#pragma unroll
    for (int u = 0; u < kForwardItems; ++u) {
      const int64_t w = round + static_cast<int64_t>(u) * blockDim.x;
      if (w < a.nwork)
        load_channels<scalar_t>(z + row_offset(a.g, 0, w, d, ncb), a.g.cstride[0], d, a.vec, v[u]);
    }
#pragma unroll
    for (int u = 0; u < kForwardItems; ++u) {
      const int64_t w = round + static_cast<int64_t>(u) * blockDim.x;
      if (w >= a.nwork) break;
      int64_t acc = 0;
      bool nan = false;
#pragma unroll
      for (int i = 0; i < kMaxChannels; ++i) {
        if (i < d) {
          const float x = v[u][i];
          const int32_t nb = a.p.nb[i];
          const float* b = bnd + a.p.boff[i];
          const bool up = a.p.ties_up != 0;
          const int32_t k = nb <= kLinearMaxCuda
                                ? level_index_linear<float>(x, b, nb, a.p.k0[i], up)
                                : level_index_bsearch<float>(x, b, nb, a.p.k0[i], up);
          const bool isn = x != x;
          nan |= isn;
          v[u][i] = isn ? x : code_value<float>(k, a.p.num_mul[i], a.p.num_sub[i], a.p.den[i]);
          acc += static_cast<int64_t>(k) * a.p.basis[i];
        }
      }
      store_channels<scalar_t>(codes + row_offset(a.g, 1, w, d, ncb), a.g.cstride[1], d, a.vec,
                               v[u]);
      if (indices != nullptr) {
        const int64_t out = nan ? int64_t{-1} : acc;
        if (a.p.index64)
          static_cast<int64_t*>(indices)[w] = out;
        else
          static_cast<int32_t*>(indices)[w] = static_cast<int32_t>(out);
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fsq_backward_kernel(const __grid_constant__ CudaArgs a, const scalar_t* __restrict__ z,
                        const scalar_t* __restrict__ grad_codes, scalar_t* __restrict__ grad_z) {
  const int d = a.p.d;
  const int ncb = a.p.num_codebooks;
  const bool hard = a.p.hard_clamp != 0;
  for (int64_t round = round_begin<kBackwardItems>(); round < a.nwork;
       round += round_step<kBackwardItems>()) {
    float v[kBackwardItems][kMaxChannels], g[kBackwardItems][kMaxChannels];
#pragma unroll
    for (int u = 0; u < kBackwardItems; ++u) {
      const int64_t w = round + static_cast<int64_t>(u) * blockDim.x;
      if (w < a.nwork) {
        load_channels<scalar_t>(z + row_offset(a.g, 0, w, d, ncb), a.g.cstride[0], d, a.vec, v[u]);
        load_channels<scalar_t>(grad_codes + row_offset(a.g, 1, w, d, ncb), a.g.cstride[1], d,
                                a.vec, g[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kBackwardItems; ++u) {
      const int64_t w = round + static_cast<int64_t>(u) * blockDim.x;
      if (w >= a.nwork) break;
#pragma unroll
      for (int i = 0; i < kMaxChannels; ++i)
        if (i < d)
          v[u][i] = g[u][i] * grad_factor<float>(mul_rn(v[u][i], a.p.in_scale[i]), a.p.shift[i],
                                                 a.p.coef[i], hard);
      store_channels<scalar_t>(grad_z + row_offset(a.g, 2, w, d, ncb), a.g.cstride[2], d, a.vec,
                               v[u]);
    }
  }
}

// ----------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fsq_decode_kernel(const __grid_constant__ CudaArgs a, const void* __restrict__ indices,
                      int32_t indices64, int64_t prod, scalar_t* __restrict__ out) {
  const int d = a.p.d;
  const int ncb = a.p.num_codebooks;
  for (int64_t w = work_begin(); w < a.nwork; w += work_step()) {
    const int64_t tok = ncb == 1 ? w : w / ncb;
    const int64_t j = w - tok * ncb;
    const int64_t x = indices64 ? static_cast<const int64_t*>(indices)[w]
                                : static_cast<int64_t>(static_cast<const int32_t*>(indices)[w]);
    const bool bad = x < 0 || x >= prod;
    float v[kMaxChannels];
    if (prod <= int64_t{2147483647}) {  // 32-bit division
      const uint32_t u = bad ? 0u : static_cast<uint32_t>(x);
#pragma unroll
      for (int i = 0; i < kMaxChannels; ++i) {
        if (i < d) {
          const int32_t k = static_cast<int32_t>(
              (u / static_cast<uint32_t>(a.p.basis[i])) % static_cast<uint32_t>(a.p.L[i]));
          v[i] = code_value<float>(k, a.p.num_mul[i], a.p.num_sub[i], a.p.den[i]);
        }
      }
    } else {
      const int64_t u = bad ? 0 : x;
#pragma unroll
      for (int i = 0; i < kMaxChannels; ++i) {
        if (i < d) {
          const int32_t k = static_cast<int32_t>((u / a.p.basis[i]) % a.p.L[i]);
          v[i] = code_value<float>(k, a.p.num_mul[i], a.p.num_sub[i], a.p.den[i]);
        }
      }
    }
    if (bad) {
#pragma unroll
      for (int i = 0; i < kMaxChannels; ++i) v[i] = __int_as_float(0x7fc00000);
    }
    store_channels<scalar_t>(out + a.g.offset(0, tok) + j * d * a.g.cstride[0], a.g.cstride[0],
                             d, a.vec, v);
  }
}

// ----------------------------------------------------------------------------------------------
// host side
// ----------------------------------------------------------------------------------------------

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

// Fills the per-call constants from the table (boundaries only when `with_bounds`).
void fill_args(CudaArgs& a, const char* op, const Setup& s, c10::ArrayRef<double> table,
               bool with_bounds, const at::Device& device) {
  std::memset(&a, 0, sizeof(a));
  const Table<float> t = parse_table<float>(op, table, s, 1, 0);
  a.p = t.p;
  a.ext_bounds = nullptr;
  if (!with_bounds) return;
  if (t.bounds.size() <= static_cast<size_t>(kInlineBounds))
    std::copy(t.bounds.begin(), t.bounds.end(), a.bounds);
  else
    a.ext_bounds = cached_device_table(t.bounds, device);
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

std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& z, c10::IntArrayRef levels,
                                                 c10::string_view variant, bool hard_clamp,
                                                 bool channel_first, int64_t num_codebooks,
                                                 bool return_indices, c10::ArrayRef<double> table) {
  const char* op = "fsq.quantize";
  const Setup s = make_setup(op, levels, variant, hard_clamp, num_codebooks);
  check_float_input(op, "z", z);
  check_cuda_dtype(op, "z", z.scalar_type());
  check_z_shape(op, "z", z, s, channel_first);
  const c10::cuda::OptionalCUDAGuard guard(z.device());
  at::Tensor codes = at::empty_like(z);
  at::Tensor idx = return_indices
                       ? at::empty(index_shape(z.sizes(), channel_first, num_codebooks),
                                   z.options().dtype(index_dtype(s)))
                       : at::empty({0}, z.options().dtype(index_dtype(s)));
  if (z.numel() == 0) return {codes, idx};
  CudaArgs a;
  fill_args(a, op, s, table, true, z.device());
  const c10::IntArrayRef strides[2] = {z.strides(), codes.strides()};
  const TokenGeom<2> g = make_geom<2>(z.sizes(), strides, channel_dim(z.dim(), channel_first));
  copy_geom(a.g, g);
  a.nwork = g.ntok * s.num_codebooks;
  const void* ptrs[2] = {z.const_data_ptr(), codes.const_data_ptr()};
  a.vec = vector_width<2>(g, ptrs, 2, s.d, z.element_size());
  auto stream = at::cuda::getCurrentCUDAStream();
  FSQ_DISPATCH_CUDA_FLOATS(z.scalar_type(), op, [&] {
    fsq_forward_kernel<scalar_t><<<grid_for(a.nwork, kForwardItems), kThreads, 0, stream>>>(
        a, z.const_data_ptr<scalar_t>(), codes.mutable_data_ptr<scalar_t>(),
        return_indices ? idx.mutable_data_ptr() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {codes, idx};
}

at::Tensor quantize_backward_cuda(const at::Tensor& grad_codes, const at::Tensor& z,
                                  c10::IntArrayRef levels, c10::string_view variant,
                                  bool hard_clamp, bool channel_first, int64_t num_codebooks,
                                  c10::ArrayRef<double> table,
                                  const std::optional<at::Tensor>& key_offset, int64_t dither_mode,
                                  double dither_p, c10::ArrayRef<double> dither_steps) {
  const char* op = "fsq.quantize_backward";
  (void)key_offset;
  (void)dither_p;
  (void)dither_steps;
  TORCH_CHECK_VALUE(dither_mode == 0, op, ": dither_mode must be 0 on CUDA (fused dither: to come), got ",
                    dither_mode);
  const Setup s = make_setup(op, levels, variant, hard_clamp, num_codebooks);
  check_float_input(op, "z", z);
  check_cuda_dtype(op, "z", z.scalar_type());
  check_z_shape(op, "z", z, s, channel_first);
  check_like(op, "grad_codes", grad_codes, "z", z);
  TORCH_CHECK_VALUE(grad_codes.device() == z.device(), op,
                    ": grad_codes must be on the device of z (", z.device(), "), got ",
                    grad_codes.device());
  const c10::cuda::OptionalCUDAGuard guard(z.device());
  at::Tensor gz = at::empty_like(z);
  if (z.numel() == 0) return gz;
  CudaArgs a;
  fill_args(a, op, s, table, false, z.device());
  const c10::IntArrayRef strides[3] = {z.strides(), grad_codes.strides(), gz.strides()};
  const TokenGeom<3> g = make_geom<3>(z.sizes(), strides, channel_dim(z.dim(), channel_first));
  a.g = g;
  a.nwork = g.ntok * s.num_codebooks;
  const void* ptrs[3] = {z.const_data_ptr(), grad_codes.const_data_ptr(), gz.const_data_ptr()};
  a.vec = vector_width<3>(g, ptrs, 3, s.d, z.element_size());
  auto stream = at::cuda::getCurrentCUDAStream();
  FSQ_DISPATCH_CUDA_FLOATS(z.scalar_type(), op, [&] {
    fsq_backward_kernel<scalar_t><<<grid_for(a.nwork, kBackwardItems), kThreads, 0, stream>>>(
        a, z.const_data_ptr<scalar_t>(), grad_codes.const_data_ptr<scalar_t>(),
        gz.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gz;
}

at::Tensor indices_to_codes_cuda(const at::Tensor& indices, c10::IntArrayRef levels,
                                 c10::string_view variant, bool channel_first,
                                 int64_t num_codebooks, at::ScalarType dtype,
                                 c10::ArrayRef<double> table) {
  const char* op = "fsq.indices_to_codes";
  const Setup s = make_setup(op, levels, variant, false, num_codebooks);
  TORCH_CHECK_TYPE(at::isIntegralType(indices.scalar_type(), /*includeBool=*/false), op,
                   ": indices must be an integer tensor, got dtype ", indices.scalar_type());
  check_cuda_dtype(op, "dtype", dtype);
  const c10::cuda::OptionalCUDAGuard guard(indices.device());
  at::Tensor out = at::empty(decode_shape(op, indices.sizes(), channel_first, s),
                             indices.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor idx = dense_indices(indices, /*widen=*/true);
  CudaArgs a;
  fill_args(a, op, s, table, false, indices.device());
  const c10::IntArrayRef strides[1] = {out.strides()};
  const TokenGeom<1> g = make_geom<1>(out.sizes(), strides, channel_dim(out.dim(), channel_first));
  copy_geom(a.g, g);
  a.nwork = g.ntok * s.num_codebooks;
  const void* ptrs[1] = {out.const_data_ptr()};
  a.vec = vector_width<1>(g, ptrs, 1, s.d, out.element_size());
  auto stream = at::cuda::getCurrentCUDAStream();
  FSQ_DISPATCH_CUDA_FLOATS(dtype, op, [&] {
    fsq_decode_kernel<scalar_t><<<grid_for(a.nwork), kThreads, 0, stream>>>(
        a, idx.const_data_ptr(), idx.scalar_type() == at::kLong ? 1 : 0, s.prod,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fsq, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("quantize_backward", &quantize_backward_cuda);
  m.impl("indices_to_codes", &indices_to_codes_cuda);
}

}  // namespace fsq

#include "fsq_residual_cuda.inc"  // residual FSQ
#include "fsq_dither_cuda.inc"  // the fused dither (issue 16)
#include "fsq_usage_cuda.inc"   // the fused codebook-usage histogram (issue 16)
