// fsq_cpu.cpp: CPU kernels of the fsq:: ops (forward, backward, decode, residual FSQ).
//
// Work unit: a tile of up to kTile consecutive tokens along the innermost coalesced token dim
// (fsq_common.h), so every operand is read and written with one constant stride per channel
// inside a tile (stride 1 for channel-first, stride C for channel-last), through its own strides:
// no permute, no contiguous copy. Per channel, a tile is gathered into a small float/double
// buffer (the dtype conversion), run through the vectorized cores (fsq_cpu_cores.inc), and
// scattered back. Tiles are fixed by token position, never by thread count, and each output
// element is computed by one thread: results are bitwise identical for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "fsq_common.h"

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

template <typename T>
struct Cores {
  void (*fwd)(const T*, int64_t, const T*, int32_t, int32_t, bool, T, T, T, int64_t, T*, int64_t*,
              uint8_t*);
  void (*bwd)(const T*, const T*, int64_t, T, T, bool, T*);
};

template <typename T>
Cores<T> pick_cores() {
#ifdef FSQ_HAVE_AVX2_CORES
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return {&cores_avx2::fwd_channel, &cores_avx2::bwd_channel};
#endif
  return {&cores_base::fwd_channel, &cores_base::bwd_channel};
}

template <typename T>
struct ResidualCores {
  void (*soft)(T*, int64_t, T, T*);
  void (*stage)(T*, T*, int64_t, T, const T*, int32_t, T, int32_t, int64_t, int32_t*, int64_t*, T*,
                bool);
};

template <typename T>
ResidualCores<T> pick_residual_cores() {
#ifdef FSQ_HAVE_AVX2_CORES
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return {&cores_avx2::soft_clamp_channel, &cores_avx2::residual_stage_channel};
#endif
  return {&cores_base::soft_clamp_channel, &cores_base::residual_stage_channel};
}

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

// ----------------------------------------------------------------------------------------------
// forward
// ----------------------------------------------------------------------------------------------
template <typename scalar_t, typename T>
void forward_kernel(const at::Tensor& z, at::Tensor& codes, at::Tensor* idx, const Setup& s,
                    bool channel_first, c10::ArrayRef<double> table) {
  const Table<T> kc = parse_table<T>("fsq.quantize", table, s, kBoundPad, 0);
  const Cores<T> cores = pick_cores<T>();
  const c10::IntArrayRef strides[2] = {z.strides(), codes.strides()};
  const TokenGeom<2> g = make_geom<2>(z.sizes(), strides, channel_dim(z.dim(), channel_first));
  const Tiling<2> tiling(g);
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  scalar_t* cp = codes.mutable_data_ptr<scalar_t>();
  int32_t* ip32 = (idx && !s.index64) ? idx->mutable_data_ptr<int32_t>() : nullptr;
  int64_t* ip64 = (idx && s.index64) ? idx->mutable_data_ptr<int64_t>() : nullptr;
  const int64_t d = s.d, ncb = s.num_codebooks;
  const int64_t zis = g.inner_stride(0), cis = g.inner_stride(1);
  const int64_t zcs = g.cstride[0], ccs = g.cstride[1];
  const ChannelParams<T>& p = kc.p;
  const T* bnd = kc.bounds.data();

  at::parallel_for(0, tiling.count, grain_for(s.channels), [&](int64_t begin, int64_t end) {
    alignas(64) T zt[kTile];
    alignas(64) T code[kTile];
    alignas(64) int64_t acc[kTile];
    alignas(64) uint8_t nanf[kTile];
    for (int64_t ti = begin; ti < end; ++ti) {
      int64_t tok0, n, off[2];
      tiling.tile(ti, tok0, n, off);
      for (int64_t j = 0; j < ncb; ++j) {
        std::fill(acc, acc + n, int64_t{0});
        std::fill(nanf, nanf + n, uint8_t{0});
        for (int64_t i = 0; i < d; ++i) {
          const int64_t c = j * d + i;
          gather<scalar_t, T>(zt, zp + off[0] + c * zcs, n, zis);
          cores.fwd(zt, n, bnd + p.boff[i], p.nb[i], p.k0[i], p.ties_up != 0, p.num_mul[i],
                    p.num_sub[i], p.den[i], p.basis[i], code, acc, nanf);
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
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------
// backward: grad_z = grad_codes * dcode/dz
// ----------------------------------------------------------------------------------------------
template <typename scalar_t, typename T>
void backward_kernel(const at::Tensor& gc, const at::Tensor& z, at::Tensor& gz, const Setup& s,
                     bool channel_first, c10::ArrayRef<double> table) {
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
  const bool hard = s.hard_clamp;

  at::parallel_for(0, tiling.count, grain_for(C), [&](int64_t begin, int64_t end) {
    alignas(64) T zt[kTile];
    alignas(64) T gt[kTile];
    alignas(64) T out[kTile];
    for (int64_t ti = begin; ti < end; ++ti) {
      int64_t tok0, n, off[3];
      tiling.tile(ti, tok0, n, off);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = c % d;
        gather<scalar_t, T>(zt, zp + off[0] + c * g.cstride[0], n, g.inner_stride(0));
        gather<scalar_t, T>(gt, gp + off[1] + c * g.cstride[1], n, g.inner_stride(1));
        if (p.in_scale[i] != T(1))  // ifsq: sech^2(0.8 z)
          for (int64_t t = 0; t < n; ++t) zt[t] = ::fsq::mul_rn(zt[t], p.in_scale[i]);
        cores.bwd(zt, gt, n, p.shift[i], p.coef[i], hard, out);
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
// residual FSQ: every stage of a tile of tokens in small per-channel buffers (L1-resident); x is
// read once, the output sum written once, each stage's index written once.
// ----------------------------------------------------------------------------------------------
template <typename T>
struct ResidualConsts {
  Table<T> tab;                      // symmetric boundaries (NaN-padded), scales: num_stages x d
  std::vector<T> lm1, soft;
};

template <typename T>
ResidualConsts<T> residual_consts(const char* op, const ResidualSetup& r,
                                  c10::ArrayRef<double> table) {
  ResidualConsts<T> rc;
  rc.tab = parse_table<T>(op, table, r.s, kBoundPad, r.num_stages * r.s.d);
  for (int64_t i = 0; i < r.s.d; ++i) {
    rc.lm1.push_back(static_cast<T>(r.s.levels[i] - 1));
    rc.soft.push_back(r.soft ? static_cast<T>(r.soft_clamp[i]) : T(1));
  }
  return rc;
}

constexpr int64_t kResMaxBuf = kTile * kMaxChannels;

template <typename scalar_t, typename T>
void residual_forward_kernel(const at::Tensor& x, at::Tensor& out, at::Tensor& idx,
                             const ResidualSetup& r, bool channel_first, int64_t active,
                             c10::ArrayRef<double> table) {
  const ResidualConsts<T> rc = residual_consts<T>("fsq.residual_quantize", r, table);
  const ChannelParams<T>& rp = rc.tab.p;
  const ResidualCores<T> cores = pick_residual_cores<T>();
  const c10::IntArrayRef strides[3] = {x.strides(), out.strides(), idx.strides()};
  const TokenGeom<3> g = make_geom<3>(x.sizes(), strides, channel_dim(x.dim(), channel_first));
  const Tiling<3> tiling(g);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const bool i64 = r.s.index64;
  int32_t* ip32 = i64 ? nullptr : idx.mutable_data_ptr<int32_t>();
  int64_t* ip64 = i64 ? idx.mutable_data_ptr<int64_t>() : nullptr;
  const int64_t d = r.s.d, q = r.num_stages;
  const int64_t xis = g.inner_stride(0), ois = g.inner_stride(1), iis = g.inner_stride(2);
  const int64_t xcs = g.cstride[0], ocs = g.cstride[1], ics = g.cstride[2];
  const bool soft = r.soft;

  at::parallel_for(0, tiling.count, grain_for(d * q), [&](int64_t begin, int64_t end) {
    alignas(64) T res[kResMaxBuf];
    alignas(64) T acc_out[kResMaxBuf];
    alignas(64) int32_t acc32[kTile];
    alignas(64) int64_t acc64[kTile];
    alignas(64) uint8_t nanf[kTile];
    for (int64_t ti = begin; ti < end; ++ti) {
      int64_t tok0, n, off[3];
      tiling.tile(ti, tok0, n, off);
      std::fill(nanf, nanf + n, uint8_t{0});
      for (int64_t i = 0; i < d; ++i) {
        T* h = res + i * kTile;
        gather<scalar_t, T>(h, xp + off[0] + i * xcs, n, xis);
        if (soft) cores.soft(h, n, rc.soft[i], nullptr);
        for (int64_t t = 0; t < n; ++t) nanf[t] |= static_cast<uint8_t>(h[t] != h[t]);
        std::fill(acc_out + i * kTile, acc_out + i * kTile + n, T(0));
      }
      for (int64_t st = 0; st < q; ++st) {
        if (st < active) {
          if (i64) std::fill(acc64, acc64 + n, int64_t{0});
          else std::fill(acc32, acc32 + n, int32_t{0});
          for (int64_t i = 0; i < d; ++i)
            cores.stage(res + i * kTile, acc_out + i * kTile, n, rc.tab.extra[st * d + i],
                        rc.tab.bounds.data() + rp.boff[i], rp.nb[i], rc.lm1[i],
                        static_cast<int32_t>(rp.basis[i]), rp.basis[i], i64 ? nullptr : acc32,
                        i64 ? acc64 : nullptr, nullptr, false);
        }
        if (i64) {
          int64_t* o = ip64 + off[2] + st * ics;
          for (int64_t t = 0; t < n; ++t)
            o[t * iis] = (st >= active || nanf[t]) ? int64_t{-1} : acc64[t];
        } else {
          int32_t* o = ip32 + off[2] + st * ics;
          for (int64_t t = 0; t < n; ++t)
            o[t * iis] = (st >= active || nanf[t]) ? int32_t{-1} : acc32[t];
        }
      }
      for (int64_t i = 0; i < d; ++i) {
        T* o = acc_out + i * kTile;
        if (active > 0) {  // a NaN channel stays NaN in the residual: its output is NaN
          const T* h = res + i * kTile;
          for (int64_t t = 0; t < n; ++t) o[t] = h[t] != h[t] ? h[t] : o[t];
        }
        scatter<scalar_t, T>(op + off[1] + i * ocs, o, n, ois);
      }
    }
  });
}

template <typename scalar_t, typename T>
void residual_backward_kernel(const at::Tensor& gout, const at::Tensor& x, at::Tensor& gx,
                              const ResidualSetup& r, bool channel_first, int64_t active,
                              c10::ArrayRef<double> table) {
  const ResidualConsts<T> rc = residual_consts<T>("fsq.residual_quantize_backward", r, table);
  const ChannelParams<T>& rp = rc.tab.p;
  const ResidualCores<T> cores = pick_residual_cores<T>();
  const c10::IntArrayRef strides[3] = {x.strides(), gout.strides(), gx.strides()};
  const TokenGeom<3> g = make_geom<3>(x.sizes(), strides, channel_dim(x.dim(), channel_first));
  const Tiling<3> tiling(g);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = gout.const_data_ptr<scalar_t>();
  scalar_t* op = gx.mutable_data_ptr<scalar_t>();
  const int64_t d = r.s.d;
  const bool soft = r.soft, hard = r.s.hard_clamp;

  at::parallel_for(0, tiling.count, grain_for(d * r.num_stages), [&](int64_t begin, int64_t end) {
    alignas(64) T res[kTile];
    alignas(64) T dh[kTile];
    alignas(64) T gsum[kTile];
    alignas(64) T gt[kTile];
    for (int64_t ti = begin; ti < end; ++ti) {
      int64_t tok0, n, off[3];
      tiling.tile(ti, tok0, n, off);
      // channels are independent in the backward: one channel of the tile at a time
      for (int64_t i = 0; i < d; ++i) {
        gather<scalar_t, T>(res, xp + off[0] + i * g.cstride[0], n, g.inner_stride(0));
        if (soft) cores.soft(res, n, rc.soft[i], dh);
        std::fill(gsum, gsum + n, T(0));
        for (int64_t st = 0; st < active; ++st)
          cores.stage(res, nullptr, n, rc.tab.extra[st * d + i], rc.tab.bounds.data() + rp.boff[i],
                      rp.nb[i], rc.lm1[i], 0, 0, nullptr, nullptr, gsum, hard);
        gather<scalar_t, T>(gt, gp + off[1] + i * g.cstride[1], n, g.inner_stride(1));
        if (active == 0) {
          std::fill(gt, gt + n, T(0));
        } else if (soft) {
          for (int64_t t = 0; t < n; ++t) gt[t] = gt[t] * (dh[t] * gsum[t]);
        } else {
          for (int64_t t = 0; t < n; ++t) gt[t] = gt[t] * gsum[t];
        }
        scatter<scalar_t, T>(op + off[2] + i * g.cstride[2], gt, n, g.inner_stride(2));
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------
// op implementations (CPU)
// ----------------------------------------------------------------------------------------------
template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

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
  if (z.numel() == 0) return {codes, idx};
  advise_huge_pages(codes);
  advise_huge_pages(idx);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fsq_quantize_cpu",
                                  [&] {
                                    forward_kernel<scalar_t, math_t<scalar_t>>(
                                        z, codes, return_indices ? &idx : nullptr, s,
                                        channel_first, table);
                                  });
  return {codes, idx};
}

at::Tensor quantize_backward_cpu(const at::Tensor& grad_codes, const at::Tensor& z,
                                 c10::IntArrayRef levels, c10::string_view variant,
                                 bool hard_clamp, bool channel_first, int64_t num_codebooks,
                                 c10::ArrayRef<double> table) {
  const char* op = "fsq.quantize_backward";
  const Setup s = make_setup(op, levels, variant, hard_clamp, num_codebooks);
  check_float_input(op, "z", z);
  check_z_shape(op, "z", z, s, channel_first);
  check_like(op, "grad_codes", grad_codes, "z", z);
  at::Tensor gz = at::empty_like(z);
  if (z.numel() == 0) return gz;
  advise_huge_pages(gz);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(),
                                  "fsq_quantize_backward_cpu", [&] {
                                    backward_kernel<scalar_t, math_t<scalar_t>>(
                                        grad_codes, z, gz, s, channel_first, table);
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

std::tuple<at::Tensor, at::Tensor> residual_quantize_cpu(
    const at::Tensor& x, c10::IntArrayRef levels, int64_t num_stages, bool hard_clamp,
    std::optional<c10::ArrayRef<double>> soft_clamp, bool channel_first,
    const std::optional<at::Tensor>& active_stages, c10::ArrayRef<double> table) {
  const char* op = "fsq.residual_quantize";
  const ResidualSetup r = make_residual_setup(op, levels, num_stages, hard_clamp, soft_clamp);
  check_float_input(op, "x", x);
  check_z_shape(op, "x", x, r.s, channel_first);
  check_active_stages(op, active_stages, x);
  const int64_t active = cpu_active_stages(op, active_stages, num_stages);
  at::Tensor out = at::empty_like(x);
  at::Tensor idx = at::empty(residual_index_shape(x.sizes(), channel_first, num_stages),
                             x.options().dtype(index_dtype(r.s)));
  if (x.numel() == 0) return {out, idx};
  advise_huge_pages(out);
  advise_huge_pages(idx);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fsq_residual_quantize_cpu", [&] {
                                    residual_forward_kernel<scalar_t, math_t<scalar_t>>(
                                        x, out, idx, r, channel_first, active, table);
                                  });
  return {out, idx};
}

at::Tensor residual_quantize_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                          c10::IntArrayRef levels, int64_t num_stages,
                                          bool hard_clamp,
                                          std::optional<c10::ArrayRef<double>> soft_clamp,
                                          bool channel_first,
                                          const std::optional<at::Tensor>& active_stages,
                                          c10::ArrayRef<double> table) {
  const char* op = "fsq.residual_quantize_backward";
  const ResidualSetup r = make_residual_setup(op, levels, num_stages, hard_clamp, soft_clamp);
  check_float_input(op, "x", x);
  check_z_shape(op, "x", x, r.s, channel_first);
  check_active_stages(op, active_stages, x);
  const int64_t active = cpu_active_stages(op, active_stages, num_stages);
  check_like(op, "grad_out", grad_out, "x", x);
  at::Tensor gx = at::empty_like(x);
  if (x.numel() == 0) return gx;
  advise_huge_pages(gx);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fsq_residual_quantize_backward_cpu", [&] {
                                    residual_backward_kernel<scalar_t, math_t<scalar_t>>(
                                        grad_out, x, gx, r, channel_first, active, table);
                                  });
  return gx;
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
  m.impl("quantize_backward", &quantize_backward_cpu);
  m.impl("indices_to_codes", &indices_to_codes_cpu);
  m.impl("residual_quantize", &residual_quantize_cpu);
  m.impl("residual_quantize_backward", &residual_quantize_backward_cpu);
}

}  // namespace fsq
