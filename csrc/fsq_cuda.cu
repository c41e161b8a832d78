// fsq_cuda.cu: CUDA kernels of the quantize ops (forward: fsq::quantize and fsq::quantize_train
// with the fused dither and usage histogram; backward with the dither's mask); decode, residual
// FSQ and the held-out usage histogram are .inc files included at the end (one translation unit:
// each extra one costs build minutes), launch helpers in fsq_cuda_launch.cuh.
//
// Grid-stride loops over work items (token, codebook): several per thread in the forward and
// backward (kForwardItems, kBackwardItems), one where the dither draws its noise (the Philox
// rounds of every element in registers, fsq_dither.h), one in the decode, one token in the
// residual ops. A thread reads the d <= 16 channels of its codebook through strides
// (channel-first: adjacent threads read adjacent addresses) or, when every operand is
// channel-contiguous and aligned, with vector loads and stores: 128-bit when d * sizeof(dtype) is
// a multiple of 16 (e.g. [8,5,5,5] in float32, 8 channels in bf16), 64-bit when it is a multiple
// of 8 (e.g. [8,5,5,5] in bfloat16/float16). Math in float32 (float64 is CPU-only). The forward
// compares against the level boundaries (no tanh); the backward uses sech^2 from exp (fsq_math.h).
//
// Per-call constants come from the op's table argument (fsq_kernels/ops/tables.py, parsed by
// fsq_common.h) and travel by value in a __grid_constant__ struct (<= 4 KiB), boundaries included
// up to kInlineBounds; larger level sets read a device copy of their boundaries, made once per
// (device, contents) and cached (no per-call copy, so CUDA graphs can capture the launches).
// The dither's [key, offset] and the residual ops' active_stages are read by the kernels from
// device memory. No host synchronisation anywhere: in particular indices_to_codes does not check
// the index range on CUDA; an index outside [0, prod(levels)) (e.g. the -1 of a NaN token)
// decodes to NaN codes.
//
// Only the dtype is a template parameter (3 instantiations per kernel); variant, hard_clamp,
// layout, index dtype, dither mode and the usage histogram are runtime arguments, to keep the
// build time down. The usage histogram counts in a shared-memory table per block while
// num_codebooks * prod(levels) <= kUsageSharedBins (fsq_usage.h), in global memory beyond.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fsq_common.h"
#include "fsq_cuda_launch.cuh"
#include "fsq_cuda_rows.cuh"
#include "fsq_dither.h"
#include "fsq_train_args.h"
#include "fsq_usage.h"

namespace fsq {
namespace {

constexpr int kInlineBounds = 512;
constexpr int kLinearMaxCuda = 16;

struct CudaArgs {
  ChannelParams<float> p;
  TokenGeom<3> g;
  int64_t nwork;              // tokens * num_codebooks
  const float* ext_bounds;    // device boundaries when they do not fit inline, else nullptr
  int32_t vec;                // vector width of every operand's rows in bytes (16, 8) or 0
  int32_t usage_shared;       // count usage in a shared-memory table first (fsq_usage.h)
  dither::Params dither_params;  // mode kNone: no dither (forward and backward)
  const int64_t* key_offset;  // device [key, offset] of the dither
  unsigned long long* usage;  // the (num_codebooks, prod(levels)) histogram, or nullptr
  int64_t usage_k;            // prod(levels): bins per codebook
  float bounds[kInlineBounds];
};
static_assert(sizeof(CudaArgs) <= 4096, "kernel parameters must stay within 4 KiB");

// The Philox words of one element, as a call: the dithered loops run over 16 unrolled channels,
// whose inlined Philox rounds the compiler would interleave into more registers than the
// several-items loops of the same kernel leave free.
__device__ __noinline__ philox::Words element_words(uint64_t key, uint64_t offset, int64_t element) {
  return dither::words(key, offset, element);
}

// Quantizes the row v of one (token, codebook) item in place (z in, codes out); returns its index
// (-1 for a NaN channel). dither(i, z, code) -> the code stored for channel i.
template <typename Dither>
__device__ __forceinline__ int64_t quantize_row(const CudaArgs& a, const float* bnd,
                                                float (&v)[kMaxChannels], Dither dither) {
  int64_t acc = 0;
  bool nan = false;
#pragma unroll
  for (int i = 0; i < kMaxChannels; ++i) {
    if (i < a.p.d) {
      const float x = v[i];
      const int32_t nb = a.p.nb[i];
      const float* b = bnd + a.p.boff[i];
      const bool up = a.p.ties_up != 0;
      const int32_t k = nb <= kLinearMaxCuda ? level_index_linear<float>(x, b, nb, a.p.k0[i], up)
                                             : level_index_bsearch<float>(x, b, nb, a.p.k0[i], up);
      const bool isn = x != x;
      nan |= isn;
      v[i] = dither(i, x, isn ? x : code_value<float>(k, a.p.num_mul[i], a.p.num_sub[i], a.p.den[i]));
      acc += static_cast<int64_t>(k) * a.p.basis[i];
    }
  }
  return nan ? int64_t{-1} : acc;
}

// Writes item w's index and counts it in the usage histogram.
__device__ __forceinline__ void finish_item(const CudaArgs& a, void* indices, unsigned int* table,
                                            int64_t w, int64_t index) {
  if (indices != nullptr) {
    if (a.p.index64) static_cast<int64_t*>(indices)[w] = index;
    else static_cast<int32_t*>(indices)[w] = static_cast<int32_t>(index);
  }
  if (a.usage != nullptr && index >= 0) {
    const int64_t ncb = a.p.num_codebooks;
    const int64_t j = ncb == 1 ? 0 : w - (w / ncb) * ncb;
    usage::usage_count(table, a.usage, a.usage_shared != 0, j * a.usage_k + index);
  }
}

// ----------------------------------------------------------------------------------------------
// forward: without dither several items per thread (kForwardItems); with the dither one, its
// noise drawn per element from the counter (fsq_dither.h); the usage histogram either way.
// ----------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fsq_forward_kernel(const __grid_constant__ CudaArgs a, const scalar_t* __restrict__ z,
                       scalar_t* __restrict__ codes, void* __restrict__ indices) {
  extern __shared__ unsigned int usage_table[];  // when a.usage_shared
  const int d = a.p.d;
  const int ncb = a.p.num_codebooks;
  const float* bnd = a.ext_bounds ? a.ext_bounds : a.bounds;
  if (a.usage_shared) {
    usage::usage_table_zero(usage_table, ncb * a.usage_k);
    __syncthreads();
  }
  if (a.dither_params.mode == dither::kNone) {
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
        const int64_t index = quantize_row(a, bnd, v[u], [](int, float, float code) { return code; });
        store_channels<scalar_t>(codes + row_offset(a.g, 1, w, d, ncb), a.g.cstride[1], d, a.vec,
                                 v[u]);
        finish_item(a, indices, usage_table, w, index);
      }
    }
  } else {
    const uint64_t key = static_cast<uint64_t>(a.key_offset[0]);
    const uint64_t offset = static_cast<uint64_t>(a.key_offset[1]);
    const dither::Params& dp = a.dither_params;
    for (int64_t w = work_begin(); w < a.nwork; w += work_step()) {
      const int64_t tok = ncb == 1 ? w : w / ncb;
      const int64_t elem = dither::token_element(tok, dp) + (w - tok * ncb) * d * dp.spatial;
      const int32_t branch = dp.mode == dither::kTaae ? dither::taae_branch(key, offset, tok, dp) : 0;
      float v[kMaxChannels];
      load_channels<scalar_t>(z + row_offset(a.g, 0, w, d, ncb), a.g.cstride[0], d, a.vec, v);
      const int64_t index = quantize_row(a, bnd, v, [&](int i, float x, float code) {
        code = static_cast<float>(static_cast<scalar_t>(code));  // the noise adds to the stored code
        const philox::Words words = element_words(key, offset, elem + i * dp.spatial);
        return dp.mode == dither::kPeer ? dither::peer_value<float>(code, words, dp.p)
                                        : dither::taae_value<float>(branch, code, x, words.w[0], dp.step[i]);
      });
      store_channels<scalar_t>(codes + row_offset(a.g, 1, w, d, ncb), a.g.cstride[1], d, a.vec, v);
      finish_item(a, indices, usage_table, w, index);
    }
  }
  if (a.usage_shared) {
    __syncthreads();
    usage::usage_table_flush(usage_table, a.usage, ncb * a.usage_k);
  }
}

// ----------------------------------------------------------------------------------------------
// backward: grad_z = grad_codes * dcode/dz; with the dither (one item per thread) masked as the
// dither's own gradient: peer zeroes noised elements whose code + noise left [-1, 1] (the code
// recomputed from z), taae takes grad * sech^2(z) off the quantized branch.
// ----------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fsq_backward_kernel(const __grid_constant__ CudaArgs a, const scalar_t* __restrict__ z,
                        const scalar_t* __restrict__ grad_codes, scalar_t* __restrict__ grad_z) {
  const int d = a.p.d;
  const int ncb = a.p.num_codebooks;
  const bool hard = a.p.hard_clamp != 0;
  if (a.dither_params.mode == dither::kNone) {
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
    return;
  }
  const uint64_t key = static_cast<uint64_t>(a.key_offset[0]);
  const uint64_t offset = static_cast<uint64_t>(a.key_offset[1]);
  const dither::Params& dp = a.dither_params;
  const float* bnd = a.ext_bounds ? a.ext_bounds : a.bounds;
  for (int64_t w = work_begin(); w < a.nwork; w += work_step()) {
    const int64_t tok = ncb == 1 ? w : w / ncb;
    const int64_t elem = dither::token_element(tok, dp) + (w - tok * ncb) * d * dp.spatial;
    const int32_t branch = dp.mode == dither::kTaae ? dither::taae_branch(key, offset, tok, dp) : 0;
    float v[kMaxChannels], g[kMaxChannels];
    load_channels<scalar_t>(z + row_offset(a.g, 0, w, d, ncb), a.g.cstride[0], d, a.vec, v);
    load_channels<scalar_t>(grad_codes + row_offset(a.g, 1, w, d, ncb), a.g.cstride[1], d, a.vec, g);
#pragma unroll
    for (int i = 0; i < kMaxChannels; ++i) {
      if (i < d) {
        const float x = v[i];
        float gi = g[i];
        if (dp.mode == dither::kPeer) {
          const int32_t nb = a.p.nb[i];
          const float* b = bnd + a.p.boff[i];
          const bool up = a.p.ties_up != 0;
          const int32_t k = nb <= kLinearMaxCuda ? level_index_linear<float>(x, b, nb, a.p.k0[i], up)
                                                 : level_index_bsearch<float>(x, b, nb, a.p.k0[i], up);
          const float code = static_cast<float>(static_cast<scalar_t>(
              x != x ? x : code_value<float>(k, a.p.num_mul[i], a.p.num_sub[i], a.p.den[i])));
          gi = dither::peer_passes<float>(code, element_words(key, offset, elem + i * dp.spatial), dp.p)
                   ? gi : 0.0f;
        }
        const float ste = gi * grad_factor<float>(mul_rn(x, a.p.in_scale[i]), a.p.shift[i],
                                                  a.p.coef[i], hard);
        v[i] = dp.mode == dither::kTaae && branch != dither::kQuantized ? g[i] * sech2<float>(x) : ste;
      }
    }
    store_channels<scalar_t>(grad_z + row_offset(a.g, 2, w, d, ncb), a.g.cstride[2], d, a.vec, v);
  }
}

// ----------------------------------------------------------------------------------------------
// host side
// ----------------------------------------------------------------------------------------------

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

// A block of the forward counting usage in shared memory flushes up to G*K bins at its end: the
// grid is then one wave of resident blocks (grid-stride beyond), not 16 per SM.
constexpr int64_t kUsageBlocksPerSm = 4;

// The forward of quantize and quantize_train: codes, indices (when `indices`), usage (when `usage`).
void launch_forward(const char* op, const at::Tensor& z, at::Tensor& codes, void* indices,
                    const Setup& s, bool channel_first, c10::ArrayRef<double> table,
                    const DitherArgs& da, at::Tensor* usage) {
  if (z.numel() == 0) return;
  CudaArgs a;
  fill_args(a, op, s, table, true, z.device());
  const c10::IntArrayRef strides[2] = {z.strides(), codes.strides()};
  const TokenGeom<2> g = make_geom<2>(z.sizes(), strides, channel_dim(z.dim(), channel_first));
  copy_geom(a.g, g);
  a.nwork = g.ntok * s.num_codebooks;
  const void* ptrs[2] = {z.const_data_ptr(), codes.const_data_ptr()};
  a.vec = vector_width<2>(g, ptrs, 2, s.d, z.element_size());
  a.dither_params = da.params;
  const bool dithered = da.params.mode != dither::kNone;
  a.key_offset = dithered ? da.key_offset.const_data_ptr<int64_t>() : nullptr;
  int64_t blocks = grid_for(a.nwork, dithered ? 1 : kForwardItems);
  size_t smem = 0;
  if (usage != nullptr) {
    a.usage = reinterpret_cast<unsigned long long*>(usage->mutable_data_ptr<int64_t>());
    a.usage_k = s.prod;
    const int64_t bins = s.num_codebooks * s.prod;
    a.usage_shared = bins <= usage::kUsageSharedBins ? 1 : 0;
    if (a.usage_shared) {
      smem = static_cast<size_t>(bins) * sizeof(unsigned int);
      const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      blocks = std::min<int64_t>(blocks, sms * kUsageBlocksPerSm);
    }
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  FSQ_DISPATCH_CUDA_FLOATS(z.scalar_type(), op, [&] {
    fsq_forward_kernel<scalar_t><<<blocks, kThreads, smem, stream>>>(
        a, z.const_data_ptr<scalar_t>(), codes.mutable_data_ptr<scalar_t>(), indices);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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
  launch_forward(op, z, codes, return_indices ? idx.mutable_data_ptr() : nullptr, s, channel_first,
                 table, DitherArgs{}, nullptr);
  return {codes, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_train_cuda(
    const at::Tensor& z, c10::IntArrayRef levels, c10::string_view variant, bool hard_clamp,
    bool channel_first, int64_t num_codebooks, c10::ArrayRef<double> table,
    const std::optional<at::Tensor>& key_offset, int64_t dither_mode, double dither_p,
    c10::ArrayRef<double> dither_steps, bool return_usage) {
  const char* op = "fsq.quantize_train";
  const Setup s = make_setup(op, levels, variant, hard_clamp, num_codebooks);
  check_float_input(op, "z", z);
  check_cuda_dtype(op, "z", z.scalar_type());
  check_z_shape(op, "z", z, s, channel_first);
  const DitherArgs da = make_dither_args(op, z, s, channel_first, key_offset, dither_mode, dither_p,
                                         dither_steps);
  const c10::cuda::OptionalCUDAGuard guard(z.device());
  at::Tensor codes = at::empty_like(z);
  at::Tensor idx = at::empty(index_shape(z.sizes(), channel_first, num_codebooks),
                             z.options().dtype(index_dtype(s)));
  at::Tensor usage = make_usage(op, s, return_usage, z);
  launch_forward(op, z, codes, idx.mutable_data_ptr(), s, channel_first, table, da,
                 return_usage ? &usage : nullptr);
  return {codes, idx, usage};
}

at::Tensor quantize_backward_cuda(const at::Tensor& grad_codes, const at::Tensor& z,
                                  c10::IntArrayRef levels, c10::string_view variant,
                                  bool hard_clamp, bool channel_first, int64_t num_codebooks,
                                  c10::ArrayRef<double> table,
                                  const std::optional<at::Tensor>& key_offset, int64_t dither_mode,
                                  double dither_p, c10::ArrayRef<double> dither_steps) {
  const char* op = "fsq.quantize_backward";
  const Setup s = make_setup(op, levels, variant, hard_clamp, num_codebooks);
  check_float_input(op, "z", z);
  check_cuda_dtype(op, "z", z.scalar_type());
  check_z_shape(op, "z", z, s, channel_first);
  check_like(op, "grad_codes", grad_codes, "z", z);
  TORCH_CHECK_VALUE(grad_codes.device() == z.device(), op,
                    ": grad_codes must be on the device of z (", z.device(), "), got ",
                    grad_codes.device());
  const DitherArgs da = make_dither_args(op, z, s, channel_first, key_offset, dither_mode, dither_p,
                                         dither_steps);
  const c10::cuda::OptionalCUDAGuard guard(z.device());
  at::Tensor gz = at::empty_like(z);
  if (z.numel() == 0) return gz;
  CudaArgs a;
  const bool dithered = da.params.mode != dither::kNone;
  // the peer mask recomputes the noiseless code: the boundaries travel only then
  fill_args(a, op, s, table, da.params.mode == dither::kPeer, z.device());
  const c10::IntArrayRef strides[3] = {z.strides(), grad_codes.strides(), gz.strides()};
  const TokenGeom<3> g = make_geom<3>(z.sizes(), strides, channel_dim(z.dim(), channel_first));
  a.g = g;
  a.nwork = g.ntok * s.num_codebooks;
  const void* ptrs[3] = {z.const_data_ptr(), grad_codes.const_data_ptr(), gz.const_data_ptr()};
  a.vec = vector_width<3>(g, ptrs, 3, s.d, z.element_size());
  a.dither_params = da.params;
  a.key_offset = dithered ? da.key_offset.const_data_ptr<int64_t>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  FSQ_DISPATCH_CUDA_FLOATS(z.scalar_type(), op, [&] {
    fsq_backward_kernel<scalar_t>
        <<<grid_for(a.nwork, dithered ? 1 : kBackwardItems), kThreads, 0, stream>>>(
            a, z.const_data_ptr<scalar_t>(), grad_codes.const_data_ptr<scalar_t>(),
            gz.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gz;
}

}  // namespace

TORCH_LIBRARY_IMPL(fsq, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("quantize_train", &quantize_train_cuda);
  m.impl("quantize_backward", &quantize_backward_cuda);
}

}  // namespace fsq

#include "fsq_decode_cuda.inc"    // indices_to_codes
#include "fsq_residual_cuda.inc"  // residual FSQ
#include "fsq_usage_cuda.inc"     // fsq::accumulate_usage (held-out evaluation)
