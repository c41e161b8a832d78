// fsq_cuda.cu: CUDA kernels of the fsq:: ops (forward, backward, decode, residual FSQ).
//
// One thread per (token, codebook), grid-stride loops. A thread reads the d <= 16 channels of
// its codebook through strides (channel-first: adjacent threads read adjacent addresses) or, when
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

// ----------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fsq_forward_kernel(const __grid_constant__ CudaArgs a, const scalar_t* __restrict__ z,
                       scalar_t* __restrict__ codes, void* __restrict__ indices) {
  const int d = a.p.d;
  const int ncb = a.p.num_codebooks;
  const float* bnd = a.ext_bounds ? a.ext_bounds : a.bounds;
  for (int64_t w = work_begin(); w < a.nwork; w += work_step()) {
    const int64_t tok = ncb == 1 ? w : w / ncb;
    const int64_t j = w - tok * ncb;
    const int64_t zo = a.g.offset(0, tok) + j * d * a.g.cstride[0];
    const int64_t co = a.g.offset(1, tok) + j * d * a.g.cstride[1];
    float v[kMaxChannels];
    load_channels<scalar_t>(z + zo, a.g.cstride[0], d, a.vec, v);
    int64_t acc = 0;
    bool nan = false;
#pragma unroll
    for (int i = 0; i < kMaxChannels; ++i) {
      if (i < d) {
        const float x = v[i];
        const int32_t nb = a.p.nb[i];
        const float* b = bnd + a.p.boff[i];
        const bool up = a.p.ties_up != 0;
        const int32_t k = nb <= kLinearMaxCuda ? level_index_linear<float>(x, b, nb, a.p.k0[i], up)
                                               : level_index_bsearch<float>(x, b, nb, a.p.k0[i], up);
        const bool isn = x != x;
        nan |= isn;
        v[i] = isn ? x : code_value<float>(k, a.p.num_mul[i], a.p.num_sub[i], a.p.den[i]);
        acc += static_cast<int64_t>(k) * a.p.basis[i];
      }
    }
    store_channels<scalar_t>(codes + co, a.g.cstride[1], d, a.vec, v);
    if (indices != nullptr) {
      const int64_t out = nan ? int64_t{-1} : acc;
      if (a.p.index64)
        static_cast<int64_t*>(indices)[w] = out;
      else
        static_cast<int32_t*>(indices)[w] = static_cast<int32_t>(out);
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
  for (int64_t w = work_begin(); w < a.nwork; w += work_step()) {
    const int64_t tok = ncb == 1 ? w : w / ncb;
    const int64_t j = w - tok * ncb;
    float v[kMaxChannels], g[kMaxChannels];
    load_channels<scalar_t>(z + a.g.offset(0, tok) + j * d * a.g.cstride[0], a.g.cstride[0], d,
                            a.vec, v);
    load_channels<scalar_t>(grad_codes + a.g.offset(1, tok) + j * d * a.g.cstride[1],
                            a.g.cstride[1], d, a.vec, g);
#pragma unroll
    for (int i = 0; i < kMaxChannels; ++i)
      if (i < d) v[i] = g[i] * grad_factor<float>(mul_rn(v[i], a.p.in_scale[i]), a.p.shift[i], a.p.coef[i], hard);
    store_channels<scalar_t>(grad_z + a.g.offset(2, tok) + j * d * a.g.cstride[2],
                             a.g.cstride[2], d, a.vec, v);
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
// residual FSQ: one thread per token, every stage in registers (fsq_math.h residual_stage);
// x read once, the sum written once, each stage's index written once. Stage scales and level
// boundaries travel in the kernel arguments (or in device memory for large level sets).
// ----------------------------------------------------------------------------------------------
constexpr int kResInline = 640;  // floats: num_stages * d scales, then the boundaries

struct ResidualCudaArgs {
  TokenGeom<3> g;             // operands: x, out (grad_out), indices (grad_x)
  const void* active;         // 0-d int32/int64 device tensor, or nullptr: every stage
  int32_t active64;           // *active is int64
  int32_t d, num_stages, hard_clamp, soft, index64, vec, bounds_off;  // vec: as CudaArgs
  int32_t nb[kMaxChannels], boff[kMaxChannels];
  int64_t basis[kMaxChannels];
  float lm1[kMaxChannels], soft_c[kMaxChannels];
  const float* ext;           // device copy of the table when it does not fit inline
  float tab[kResInline];
};
static_assert(sizeof(ResidualCudaArgs) <= 4096, "kernel parameters must stay within 4 KiB");

// Active stages, clamped to [0, num_stages] (values outside are not checked on CUDA: no sync).
__device__ __forceinline__ int32_t active_stages_of(const ResidualCudaArgs& a) {
  if (a.active == nullptr) return a.num_stages;
  const int64_t v = a.active64 ? *static_cast<const int64_t*>(a.active)
                               : static_cast<int64_t>(*static_cast<const int32_t*>(a.active));
  return static_cast<int32_t>(v < 0 ? 0 : (v > a.num_stages ? a.num_stages : v));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fsq_residual_forward_kernel(const __grid_constant__ ResidualCudaArgs a,
                                const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                void* __restrict__ indices) {
  const int d = a.d;
  const float* tab = a.ext ? a.ext : a.tab;
  const float* bnd = tab + a.bounds_off;
  const int32_t active = active_stages_of(a);
  for (int64_t tok = work_begin(); tok < a.g.ntok; tok += work_step()) {
    float r[kMaxChannels], o[kMaxChannels];
    load_channels<scalar_t, false>(x + a.g.offset(0, tok), a.g.cstride[0], d, a.vec, r);
    bool nan = false;
#pragma unroll
    for (int i = 0; i < kMaxChannels; ++i) {
      if (i < d) {
        if (a.soft) r[i] = soft_clamp_value<float>(r[i], a.soft_c[i]);
        nan |= r[i] != r[i];
        o[i] = 0.0f;
      }
    }
    const int64_t io = a.g.offset(2, tok);
    for (int s = 0; s < a.num_stages; ++s) {
      int64_t acc = 0;
      if (s < active) {
        const float* scale = tab + s * d;
#pragma unroll
        for (int i = 0; i < kMaxChannels; ++i) {
          if (i < d) {
            float y, so;
            const int32_t k = residual_stage<float>(r[i], scale[i], bnd + a.boff[i], a.nb[i],
                                                    a.lm1[i], a.nb[i] <= kLinearMaxCuda, y, so);
            r[i] = sub_rn(r[i], so);
            o[i] = add_rn(o[i], so);
            acc += static_cast<int64_t>(k) * a.basis[i];
          }
        }
      }
      const int64_t v = (s >= active || nan) ? int64_t{-1} : acc;
      const int64_t at = io + static_cast<int64_t>(s) * a.g.cstride[2];
      if (a.index64)
        static_cast<int64_t*>(indices)[at] = v;
      else
        static_cast<int32_t*>(indices)[at] = static_cast<int32_t>(v);
    }
    if (active > 0) {  // a NaN channel stays NaN in the residual: its output is NaN
#pragma unroll
      for (int i = 0; i < kMaxChannels; ++i)
        if (i < d) o[i] = r[i] != r[i] ? r[i] : o[i];
    }
    store_channels<scalar_t, false>(out + a.g.offset(1, tok), a.g.cstride[1], d, a.vec, o);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fsq_residual_backward_kernel(const __grid_constant__ ResidualCudaArgs a,
                                 const scalar_t* __restrict__ x,
                                 const scalar_t* __restrict__ grad_out,
                                 scalar_t* __restrict__ grad_x) {
  const int d = a.d;
  const bool hard = a.hard_clamp != 0;
  const float* tab = a.ext ? a.ext : a.tab;
  const float* bnd = tab + a.bounds_off;
  const int32_t active = active_stages_of(a);
  for (int64_t tok = work_begin(); tok < a.g.ntok; tok += work_step()) {
    // stages outer, channels inner (as the forward): r and gs are the only live arrays; the
    // soft clamp's derivative is recomputed from a second read of x (an L1 hit) at the end
    float r[kMaxChannels], gs[kMaxChannels];
    load_channels<scalar_t, false>(x + a.g.offset(0, tok), a.g.cstride[0], d, a.vec, r);
#pragma unroll
    for (int i = 0; i < kMaxChannels; ++i) {
      if (i < d) {
        if (a.soft) r[i] = soft_clamp_value<float>(r[i], a.soft_c[i]);
        gs[i] = 0.0f;
      }
    }
    for (int s = 0; s < active; ++s) {
      const float* scale = tab + s * d;
#pragma unroll
      for (int i = 0; i < kMaxChannels; ++i) {
        if (i < d) {
          float y, so;
          (void)residual_stage<float>(r[i], scale[i], bnd + a.boff[i], a.nb[i], a.lm1[i],
                                      a.nb[i] <= kLinearMaxCuda, y, so);
          gs[i] += residual_bound_grad<float>(y, hard);
          r[i] = sub_rn(r[i], so);
        }
      }
    }
    float v[kMaxChannels];
    if (a.soft) {
      load_channels<scalar_t, false>(x + a.g.offset(0, tok), a.g.cstride[0], d, a.vec, v);
#pragma unroll
      for (int i = 0; i < kMaxChannels; ++i)
        if (i < d) gs[i] = sech2<float>(div_rn(v[i], a.soft_c[i])) * gs[i];
    }
    load_channels<scalar_t, false>(grad_out + a.g.offset(1, tok), a.g.cstride[1], d, a.vec, v);
#pragma unroll
    for (int i = 0; i < kMaxChannels; ++i)
      if (i < d) v[i] = active > 0 ? v[i] * gs[i] : 0.0f;
    store_channels<scalar_t, false>(grad_x + a.g.offset(2, tok), a.g.cstride[2], d, a.vec, v);
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

int64_t grid_for(int64_t nwork) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = (nwork + kThreads - 1) / kThreads;
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
    fsq_forward_kernel<scalar_t><<<grid_for(a.nwork), kThreads, 0, stream>>>(
        a, z.const_data_ptr<scalar_t>(), codes.mutable_data_ptr<scalar_t>(),
        return_indices ? idx.mutable_data_ptr() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {codes, idx};
}

at::Tensor quantize_backward_cuda(const at::Tensor& grad_codes, const at::Tensor& z,
                                  c10::IntArrayRef levels, c10::string_view variant,
                                  bool hard_clamp, bool channel_first, int64_t num_codebooks,
                                  c10::ArrayRef<double> table) {
  const char* op = "fsq.quantize_backward";
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
    fsq_backward_kernel<scalar_t><<<grid_for(a.nwork), kThreads, 0, stream>>>(
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

// ----------------------------------------------------------------------------------------------
// residual FSQ (host)
// ----------------------------------------------------------------------------------------------
void fill_residual_args(ResidualCudaArgs& a, const char* op, const ResidualSetup& r,
                        c10::ArrayRef<double> table, const std::optional<at::Tensor>& active,
                        const at::Device& device) {
  std::memset(&a, 0, sizeof(a));
  const Table<float> t = parse_table<float>(op, table, r.s, 1, r.num_stages * r.s.d);
  a.d = static_cast<int32_t>(r.s.d);
  a.num_stages = static_cast<int32_t>(r.num_stages);
  a.active = active.has_value() ? active->const_data_ptr() : nullptr;
  a.active64 = active.has_value() && active->scalar_type() == at::kLong ? 1 : 0;
  a.hard_clamp = r.s.hard_clamp ? 1 : 0;
  a.soft = r.soft ? 1 : 0;
  a.index64 = r.s.index64 ? 1 : 0;
  for (int64_t i = 0; i < r.s.d; ++i) {
    a.nb[i] = t.p.nb[i];  // symmetric: no infinite boundaries
    a.boff[i] = t.p.boff[i];
    a.basis[i] = t.p.basis[i];
    a.lm1[i] = static_cast<float>(r.s.levels[i] - 1);
    a.soft_c[i] = r.soft ? static_cast<float>(r.soft_clamp[i]) : 1.0f;
  }
  std::vector<float> tab(t.extra);  // scales first, then the boundaries
  a.bounds_off = static_cast<int32_t>(tab.size());
  tab.insert(tab.end(), t.bounds.begin(), t.bounds.end());
  a.ext = nullptr;
  if (tab.size() <= static_cast<size_t>(kResInline))
    std::copy(tab.begin(), tab.end(), a.tab);
  else
    a.ext = cached_device_table(tab, device);
}

// The kernels read active_stages as int32 or int64.
at::Tensor active_stages_for_kernel(const std::optional<at::Tensor>& active) {
  if (!active.has_value()) return at::Tensor();
  const at::ScalarType t = active->scalar_type();
  return (t == at::kLong || t == at::kInt) ? *active : active->to(at::kLong);
}

std::tuple<at::Tensor, at::Tensor> residual_quantize_cuda(
    const at::Tensor& x, c10::IntArrayRef levels, int64_t num_stages, bool hard_clamp,
    std::optional<c10::ArrayRef<double>> soft_clamp, bool channel_first,
    const std::optional<at::Tensor>& active_stages, c10::ArrayRef<double> table) {
  const char* op = "fsq.residual_quantize";
  const ResidualSetup r = make_residual_setup(op, levels, num_stages, hard_clamp, soft_clamp);
  check_active_stages(op, active_stages, x);
  check_float_input(op, "x", x);
  check_cuda_dtype(op, "x", x.scalar_type());
  check_z_shape(op, "x", x, r.s, channel_first);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  at::Tensor idx = at::empty(residual_index_shape(x.sizes(), channel_first, num_stages),
                             x.options().dtype(index_dtype(r.s)));
  if (x.numel() == 0) return {out, idx};
  ResidualCudaArgs a;
  const at::Tensor active = active_stages_for_kernel(active_stages);
  fill_residual_args(a, op, r, table,
                     active.defined() ? std::optional<at::Tensor>(active) : std::nullopt,
                     x.device());
  const c10::IntArrayRef strides[3] = {x.strides(), out.strides(), idx.strides()};
  a.g = make_geom<3>(x.sizes(), strides, channel_dim(x.dim(), channel_first));
  const void* ptrs[2] = {x.const_data_ptr(), out.const_data_ptr()};
  // x and out vectorized; the indices (third operand) keep their strided access
  a.vec = vector_width<3>(a.g, ptrs, 2, r.s.d, x.element_size(), /*allow8=*/false);
  auto stream = at::cuda::getCurrentCUDAStream();
  FSQ_DISPATCH_CUDA_FLOATS(x.scalar_type(), op, [&] {
    fsq_residual_forward_kernel<scalar_t><<<grid_for(a.g.ntok), kThreads, 0, stream>>>(
        a, x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, idx};
}

at::Tensor residual_quantize_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                           c10::IntArrayRef levels, int64_t num_stages,
                                           bool hard_clamp,
                                           std::optional<c10::ArrayRef<double>> soft_clamp,
                                           bool channel_first,
                                           const std::optional<at::Tensor>& active_stages,
                                           c10::ArrayRef<double> table) {
  const char* op = "fsq.residual_quantize_backward";
  const ResidualSetup r = make_residual_setup(op, levels, num_stages, hard_clamp, soft_clamp);
  check_active_stages(op, active_stages, x);
  check_float_input(op, "x", x);
  check_cuda_dtype(op, "x", x.scalar_type());
  check_z_shape(op, "x", x, r.s, channel_first);
  check_like(op, "grad_out", grad_out, "x", x);
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), op,
                    ": grad_out must be on the device of x (", x.device(), "), got ",
                    grad_out.device());
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor gx = at::empty_like(x);
  if (x.numel() == 0) return gx;
  ResidualCudaArgs a;
  const at::Tensor active = active_stages_for_kernel(active_stages);
  fill_residual_args(a, op, r, table,
                     active.defined() ? std::optional<at::Tensor>(active) : std::nullopt,
                     x.device());
  const c10::IntArrayRef strides[3] = {x.strides(), grad_out.strides(), gx.strides()};
  a.g = make_geom<3>(x.sizes(), strides, channel_dim(x.dim(), channel_first));
  const void* ptrs[3] = {x.const_data_ptr(), grad_out.const_data_ptr(), gx.const_data_ptr()};
  a.vec = vector_width<3>(a.g, ptrs, 3, r.s.d, x.element_size(), /*allow8=*/false);
  auto stream = at::cuda::getCurrentCUDAStream();
  FSQ_DISPATCH_CUDA_FLOATS(x.scalar_type(), op, [&] {
    fsq_residual_backward_kernel<scalar_t><<<grid_for(a.g.ntok), kThreads, 0, stream>>>(
        a, x.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(),
        gx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fsq, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("quantize_backward", &quantize_backward_cuda);
  m.impl("indices_to_codes", &indices_to_codes_cuda);
  m.impl("residual_quantize", &residual_quantize_cuda);
  m.impl("residual_quantize_backward", &residual_quantize_backward_cuda);
}

}  // namespace fsq

#include "fsq_dither_cuda.inc"  // the fused dither (issue 16)
#include "fsq_usage_cuda.inc"   // the fused codebook-usage histogram (issue 16)
