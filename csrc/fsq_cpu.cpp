// fsq_cpu.cpp: CPU kernels of the quantize ops: forward (fsq::quantize, and fsq::quantize_train
// with the fused dither and usage histogram), backward (with the dither's gradient mask) and
// decode. Tiles, cores and determinism: fsq_cpu.h; residual FSQ: fsq_cpu_residual.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>

#include "fsq_cpu.h"
#include "fsq_train_args.h"
#include "fsq_usage.h"

namespace fsq {
namespace {

template <typename T>
struct Cores {
  void (*fwd)(const T*, int64_t, const T*, int32_t, int32_t, bool, T, T, T, int64_t, T*, int64_t*,
              uint8_t*);
  void (*bwd)(const T*, const T*, int64_t, T, T, bool, T*);
  void (*dither)(T*, const T*, int64_t, const int64_t*, int64_t, uint64_t, uint64_t, int32_t, float,
                 float, const int32_t*);
  void (*peer_mask)(T*, const T*, int64_t, const int64_t*, int64_t, uint64_t, uint64_t, float);
};

template <typename T>
Cores<T> pick_cores() {
#ifdef FSQ_HAVE_AVX2_CORES
  if (use_avx2_cores())
    return {&cores_avx2::fwd_channel, &cores_avx2::bwd_channel, &cores_avx2::dither_channel,
            &cores_avx2::peer_mask_channel};
#endif
  return {&cores_base::fwd_channel, &cores_base::bwd_channel, &cores_base::dither_channel,
          &cores_base::peer_mask_channel};
}

// The dither of a call as the CPU kernels read it: fields, key and offset (host tensor).
struct CpuDither {
  dither::Params a{};
  uint64_t key = 0, offset = 0;
  explicit CpuDither(const DitherArgs& da) : a(da.params) {
    if (a.mode == dither::kNone) return;
    const int64_t* ko = da.key_offset.const_data_ptr<int64_t>();
    key = static_cast<uint64_t>(ko[0]);
    offset = static_cast<uint64_t>(ko[1]);
  }
  bool on() const { return a.mode != dither::kNone; }
};

// Per tile: each token's first element (channel c adds c * S) and its batch element's taae branch.
struct DitherTile {
  alignas(64) int64_t elem[kTile];
  alignas(64) int32_t branch[kTile];
  void fill(const CpuDither& dt, int64_t tok0, int64_t n) {
    for (int64_t t = 0; t < n; ++t) elem[t] = dither::token_element(tok0 + t, dt.a);
    if (dt.a.mode != dither::kTaae) return;
    int64_t last = -1;
    int32_t br = dither::kNoisy;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t b = (tok0 + t) / dt.a.batch_tokens;
      if (b != last) br = dither::taae_branch(dt.key, dt.offset, tok0 + t, dt.a);
      last = b;
      branch[t] = br;
    }
  }
};

// The code as the output dtype holds it (the dither adds its noise to that value).
template <typename scalar_t, typename T>
inline void round_to_output(T* code, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, T>)
    for (int64_t t = 0; t < n; ++t) code[t] = static_cast<T>(static_cast<scalar_t>(code[t]));
}

// ----------------------------------------------------------------------------------------------
// forward (+ dither, + usage histogram)
// ----------------------------------------------------------------------------------------------
template <typename scalar_t, typename T>
void forward_kernel(const at::Tensor& z, at::Tensor& codes, at::Tensor* idx, const Setup& s,
                    bool channel_first, c10::ArrayRef<double> table, const CpuDither& dt,
                    at::Tensor* usage) {
  const Table<T> kc = parse_table<T>("fsq.quantize", table, s, kBoundPad, 0);
  const Cores<T> cores = pick_cores<T>();
  const c10::IntArrayRef strides[2] = {z.strides(), codes.strides()};
  const TokenGeom<2> g = make_geom<2>(z.sizes(), strides, channel_dim(z.dim(), channel_first));
  const Tiling<2> tiling(g);
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  scalar_t* cp = codes.mutable_data_ptr<scalar_t>();
  int32_t* ip32 = (idx && !s.index64) ? idx->mutable_data_ptr<int32_t>() : nullptr;
  int64_t* ip64 = (idx && s.index64) ? idx->mutable_data_ptr<int64_t>() : nullptr;
  const int64_t d = s.d, ncb = s.num_codebooks, K = s.prod;
  const int64_t zis = g.inner_stride(0), cis = g.inner_stride(1);
  const int64_t zcs = g.cstride[0], ccs = g.cstride[1];
  const ChannelParams<T>& p = kc.p;
  const T* bnd = kc.bounds.data();
  std::optional<usage::CpuHistogram> hist;
  if (usage != nullptr) hist.emplace(usage->mutable_data_ptr<int64_t>(), ncb * K);

  at::parallel_for(0, tiling.count, grain_for(s.channels), [&](int64_t begin, int64_t end) {
    alignas(64) T zt[kTile];
    alignas(64) T code[kTile];
    alignas(64) int64_t acc[kTile];
    alignas(64) uint8_t nanf[kTile];
    DitherTile dtile;
    int64_t* counts = hist ? hist->thread_table() : nullptr;
    for (int64_t ti = begin; ti < end; ++ti) {
      int64_t tok0, n, off[2];
      tiling.tile(ti, tok0, n, off);
      if (dt.on()) dtile.fill(dt, tok0, n);
      for (int64_t j = 0; j < ncb; ++j) {
        std::fill(acc, acc + n, int64_t{0});
        std::fill(nanf, nanf + n, uint8_t{0});
        for (int64_t i = 0; i < d; ++i) {
          const int64_t c = j * d + i;
          gather<scalar_t, T>(zt, zp + off[0] + c * zcs, n, zis);
          cores.fwd(zt, n, bnd + p.boff[i], p.nb[i], p.k0[i], p.ties_up != 0, p.num_mul[i],
                    p.num_sub[i], p.den[i], p.basis[i], code, acc, nanf);
          if (dt.on()) {
            round_to_output<scalar_t, T>(code, n);
            cores.dither(code, zt, n, dtile.elem, c * dt.a.spatial, dt.key, dt.offset, dt.a.mode,
                         dt.a.p, dt.a.step[i], dtile.branch);
          }
          scatter<scalar_t, T>(cp + off[1] + c * ccs, code, n, cis);
        }
        if (ip32) {
          int32_t* o = ip32 + tok0 * ncb + j;
          for (int64_t t = 0; t < n; ++t)
            o[t * ncb] = nanf[t] ? int32_t{-1} : static_cast<int32_t>(acc[t]);
        } else if (ip64) {
          int64_t* o = ip64 + tok0 * ncb + j;
          for (int64_t t = 0; t < n; ++t) o[t * ncb] = nanf[t] ? int64_t{-1} : acc[t];
        }
        if (counts != nullptr) {
          int64_t* row = counts + j * K;
          for (int64_t t = 0; t < n; ++t) row[acc[t]] += nanf[t] ? 0 : 1;
        } else if (hist) {
          for (int64_t t = 0; t < n; ++t)
            if (!nanf[t]) hist->add_atomic(j * K + acc[t]);
        }
      }
    }
  });
  if (hist) hist->merge();
}

// ----------------------------------------------------------------------------------------------
// backward: grad_z = grad_codes * dcode/dz, with the dither's mask (peer: the clamp's gradient,
// from the noiseless code recomputed from z; taae: grad * sech^2(z) off the quantized branch)
// ----------------------------------------------------------------------------------------------
template <typename scalar_t, typename T>
void backward_kernel(const at::Tensor& gc, const at::Tensor& z, at::Tensor& gz, const Setup& s,
                     bool channel_first, c10::ArrayRef<double> table, const CpuDither& dt) {
  const Table<T> kc = parse_table<T>("fsq.quantize_backward", table, s, kBoundPad, 0);
  const Cores<T> cores = pick_cores<T>();
  const c10::IntArrayRef strides[3] = {z.strides(), gc.strides(), gz.strides()};
  const TokenGeom<3> g = make_geom<3>(z.sizes(), strides, channel_dim(z.dim(), channel_first));
  const Tiling<3> tiling(g);
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const scalar_t* gp = gc.const_data_ptr<scalar_t>();
  scalar_t* op = gz.mutable_data_ptr<scalar_t>();
  const int64_t C = s.channels, d = s.d;
  const ChannelParams<T>& p = kc.p;
  const T* bnd = kc.bounds.data();
  const bool hard = s.hard_clamp;
  const bool peer = dt.a.mode == dither::kPeer, taae = dt.a.mode == dither::kTaae;

  at::parallel_for(0, tiling.count, grain_for(C), [&](int64_t begin, int64_t end) {
    alignas(64) T zt[kTile];
    alignas(64) T gt[kTile];
    alignas(64) T out[kTile];
    alignas(64) T code[kTile];  // peer: the noiseless code; taae: grad * sech^2(z)
    alignas(64) int64_t acc[kTile];
    alignas(64) uint8_t nanf[kTile];
    DitherTile dtile;
    for (int64_t ti = begin; ti < end; ++ti) {
      int64_t tok0, n, off[3];
      tiling.tile(ti, tok0, n, off);
      if (dt.on()) dtile.fill(dt, tok0, n);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = c % d;
        gather<scalar_t, T>(zt, zp + off[0] + c * g.cstride[0], n, g.inner_stride(0));
        gather<scalar_t, T>(gt, gp + off[1] + c * g.cstride[1], n, g.inner_stride(1));
        if (peer) {
          std::fill(acc, acc + n, int64_t{0});
          std::fill(nanf, nanf + n, uint8_t{0});
          cores.fwd(zt, n, bnd + p.boff[i], p.nb[i], p.k0[i], p.ties_up != 0, p.num_mul[i],
                    p.num_sub[i], p.den[i], 0, code, acc, nanf);
          round_to_output<scalar_t, T>(code, n);
          cores.peer_mask(gt, code, n, dtile.elem, c * dt.a.spatial, dt.key, dt.offset, dt.a.p);
        } else if (taae) {
          for (int64_t t = 0; t < n; ++t) code[t] = gt[t] * ::fsq::sech2<T>(zt[t]);
        }
        if (p.in_scale[i] != T(1))  // ifsq: sech^2(0.8 z)
          for (int64_t t = 0; t < n; ++t) zt[t] = ::fsq::mul_rn(zt[t], p.in_scale[i]);
        cores.bwd(zt, gt, n, p.shift[i], p.coef[i], hard, out);
        if (taae)
          for (int64_t t = 0; t < n; ++t)
            out[t] = dtile.branch[t] == dither::kQuantized ? out[t] : code[t];
        scatter<scalar_t, T>(op + off[2] + c * g.cstride[2], out, n, g.inner_stride(2));
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------
// decode: indices -> codes. Out-of-range indices (including -1) raise ValueError.
// ----------------------------------------------------------------------------------------------
template <typename index_t, typename scalar_t, typename T>
void decode_kernel(const at::Tensor& idx, at::Tensor& out, const Setup& s, bool channel_first,
                   c10::ArrayRef<double> table) {
  const Table<T> kc = parse_table<T>("fsq.indices_to_codes", table, s, 1, 0);
  const ChannelParams<T>& p = kc.p;
  const c10::IntArrayRef strides[1] = {out.strides()};
  const TokenGeom<1> g = make_geom<1>(out.sizes(), strides, channel_dim(out.dim(), channel_first));
  const Tiling<1> tiling(g);
  const index_t* ip = idx.const_data_ptr<index_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t d = s.d, ncb = s.num_codebooks, prod = s.prod;
  std::atomic<bool> bad{false};
  std::atomic<int64_t> bad_value{0};

  at::parallel_for(0, tiling.count, grain_for(s.channels), [&](int64_t begin, int64_t end) {
    alignas(64) int64_t v[kTile];
    alignas(64) T code[kTile];
    for (int64_t ti = begin; ti < end; ++ti) {
      int64_t tok0, n, off[1];
      tiling.tile(ti, tok0, n, off);
      for (int64_t j = 0; j < ncb; ++j) {
        const index_t* src = ip + tok0 * ncb + j;
        bool tile_bad = false;
        for (int64_t t = 0; t < n; ++t) {
          const int64_t x = static_cast<int64_t>(src[t * ncb]);
          const bool b = x < 0 || x >= prod;
          tile_bad |= b;
          v[t] = b ? 0 : x;
        }
        if (tile_bad) {
          for (int64_t t = 0; t < n; ++t) {
            const int64_t x = static_cast<int64_t>(src[t * ncb]);
            if (x < 0 || x >= prod) {
              bad_value.store(x, std::memory_order_relaxed);
              break;
            }
          }
          bad.store(true, std::memory_order_relaxed);
          return;
        }
        for (int64_t i = 0; i < d; ++i) {
          const int64_t L = p.L[i], basis = p.basis[i];
          for (int64_t t = 0; t < n; ++t) {
            const int32_t k = static_cast<int32_t>((v[t] / basis) % L);
            code[t] = code_value<T>(k, p.num_mul[i], p.num_sub[i], p.den[i]);
          }
          scatter<scalar_t, T>(op + off[0] + (j * d + i) * g.cstride[0], code, n,
                               g.inner_stride(0));
        }
      }
    }
  });
  TORCH_CHECK_VALUE(!bad.load(), "fsq.indices_to_codes: indices must lie in [0, prod(levels)) = [0, ",
                    prod, "), got ", bad_value.load(), " (index -1 marks a NaN input)");
}

// ----------------------------------------------------------------------------------------------
// op implementations (CPU)
// ----------------------------------------------------------------------------------------------

// The forward of quantize and quantize_train: codes, indices (when `idx`), usage (when `usage`).
void run_forward(const at::Tensor& z, at::Tensor& codes, at::Tensor* idx, const Setup& s,
                 bool channel_first, c10::ArrayRef<double> table, const DitherArgs& da,
                 at::Tensor* usage) {
  if (z.numel() == 0) return;
  advise_huge_pages(codes);
  if (idx) advise_huge_pages(*idx);
  const CpuDither dt(da);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fsq_quantize_cpu", [&] {
    forward_kernel<scalar_t, math_t<scalar_t>>(z, codes, idx, s, channel_first, table, dt, usage);
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& z, c10::IntArrayRef levels,
                                                c10::string_view variant, bool hard_clamp,
                                                bool channel_first, int64_t num_codebooks,
                                                bool return_indices, c10::ArrayRef<double> table) {
  const char* op = "fsq.quantize";
  const Setup s = make_setup(op, levels, variant, hard_clamp, num_codebooks);
  check_float_input(op, "z", z);
  check_z_shape(op, "z", z, s, channel_first);
  at::Tensor codes = at::empty_like(z);
  at::Tensor idx = return_indices
                       ? at::empty(index_shape(z.sizes(), channel_first, num_codebooks),
                                   z.options().dtype(index_dtype(s)))
                       : at::empty({0}, z.options().dtype(index_dtype(s)));
  run_forward(z, codes, return_indices ? &idx : nullptr, s, channel_first, table, DitherArgs{},
              nullptr);
  return {codes, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_train_cpu(
    const at::Tensor& z, c10::IntArrayRef levels, c10::string_view variant, bool hard_clamp,
    bool channel_first, int64_t num_codebooks, c10::ArrayRef<double> table,
    const std::optional<at::Tensor>& key_offset, int64_t dither_mode, double dither_p,
    c10::ArrayRef<double> dither_steps, bool return_usage) {
  const char* op = "fsq.quantize_train";
  const Setup s = make_setup(op, levels, variant, hard_clamp, num_codebooks);
  check_float_input(op, "z", z);
  check_z_shape(op, "z", z, s, channel_first);
  const DitherArgs da = make_dither_args(op, z, s, channel_first, key_offset, dither_mode, dither_p,
                                         dither_steps);
  at::Tensor codes = at::empty_like(z);
  at::Tensor idx = at::empty(index_shape(z.sizes(), channel_first, num_codebooks),
                             z.options().dtype(index_dtype(s)));
  at::Tensor usage = make_usage(op, s, return_usage, z);
  run_forward(z, codes, &idx, s, channel_first, table, da, return_usage ? &usage : nullptr);
  return {codes, idx, usage};
}

at::Tensor quantize_backward_cpu(const at::Tensor& grad_codes, const at::Tensor& z,
                                 c10::IntArrayRef levels, c10::string_view variant,
                                 bool hard_clamp, bool channel_first, int64_t num_codebooks,
                                 c10::ArrayRef<double> table,
                                 const std::optional<at::Tensor>& key_offset, int64_t dither_mode,
                                 double dither_p, c10::ArrayRef<double> dither_steps) {
  const char* op = "fsq.quantize_backward";
  const Setup s = make_setup(op, levels, variant, hard_clamp, num_codebooks);
  check_float_input(op, "z", z);
  check_z_shape(op, "z", z, s, channel_first);
  check_like(op, "grad_codes", grad_codes, "z", z);
  const DitherArgs da = make_dither_args(op, z, s, channel_first, key_offset, dither_mode, dither_p,
                                         dither_steps);
  at::Tensor gz = at::empty_like(z);
  if (z.numel() == 0) return gz;
  advise_huge_pages(gz);
  const CpuDither dt(da);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(),
                                  "fsq_quantize_backward_cpu", [&] {
                                    backward_kernel<scalar_t, math_t<scalar_t>>(
                                        grad_codes, z, gz, s, channel_first, table, dt);
                                  });
  return gz;
}

at::Tensor indices_to_codes_cpu(const at::Tensor& indices, c10::IntArrayRef levels,
                                c10::string_view variant, bool channel_first,
                                int64_t num_codebooks, at::ScalarType dtype,
                                c10::ArrayRef<double> table) {
  const char* op = "fsq.indices_to_codes";
  const Setup s = make_setup(op, levels, variant, false, num_codebooks);
  TORCH_CHECK_TYPE(at::isIntegralType(indices.scalar_type(), /*includeBool=*/false), op,
                   ": indices must be an integer tensor, got dtype ", indices.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), op,
                   ": dtype must be a floating dtype (float16, bfloat16, float32, float64), got ",
                   dtype);
  at::Tensor out = at::empty(decode_shape(op, indices.sizes(), channel_first, s),
                             indices.options().dtype(dtype));
  if (out.numel() == 0) return out;
  advise_huge_pages(out);
  const at::Tensor idx = dense_indices(indices, /*widen=*/false);
  AT_DISPATCH_INTEGRAL_TYPES(idx.scalar_type(), "fsq_indices_to_codes_cpu_idx", [&] {
    using index_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fsq_indices_to_codes_cpu",
                                    [&] {
                                      decode_kernel<index_t, scalar_t, math_t<scalar_t>>(
                                          idx, out, s, channel_first, table);
                                    });
  });
  return out;
}

// What the kernels read from a table, back as float64 numbers (tests/test_tables.py compares it
// with fsq_kernels.ops.tables): per channel k0, nb, shift, grad_coef, code_mul, code_sub,
// code_den, input_scale in the math type of `dtype`, then the boundaries, then the extra values.
at::Tensor parsed_table(c10::IntArrayRef levels, c10::string_view variant, bool hard_clamp,
                        int64_t num_stages, c10::ArrayRef<double> table, at::ScalarType dtype) {
  const char* op = "fsq.parsed_table";
  const Setup s = make_setup(op, levels, variant, hard_clamp, 1);
  std::vector<double> out;
  auto dump = [&](auto tag) {
    using T = decltype(tag);
    const Table<T> t = parse_table<T>(op, table, s, 1, num_stages * s.d);
    const ChannelParams<T>& p = t.p;
    for (int64_t i = 0; i < s.d; ++i) {
      for (double v : {double(p.k0[i]), double(p.nb[i]), double(p.shift[i]), double(p.coef[i]),
                       double(p.num_mul[i]), double(p.num_sub[i]), double(p.den[i]), double(p.in_scale[i])})
        out.push_back(v);
    }
    for (T v : t.bounds) out.push_back(static_cast<double>(v));
    for (T v : t.extra) out.push_back(static_cast<double>(v));
  };
  if (dtype == at::kDouble) dump(double{});
  else dump(float{});
  return at::tensor(out, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(fsq, CompositeExplicitAutograd, m) { m.impl("parsed_table", &parsed_table); }

TORCH_LIBRARY_IMPL(fsq, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("quantize_train", &quantize_train_cpu);
  m.impl("quantize_backward", &quantize_backward_cpu);
  m.impl("indices_to_codes", &indices_to_codes_cpu);
}

}  // namespace fsq
