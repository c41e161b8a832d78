// fsq_cpu_residual.cpp: CPU kernels of residual FSQ (fsq::residual_quantize and its backward;
// contract in csrc/README.md). Tiles and cores as the other CPU kernels (fsq_cpu.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fsq_cpu.h"

namespace fsq {
namespace {

template <typename T>
struct ResidualCores {
  void (*soft)(T*, int64_t, T, T*);
  void (*stage)(T*, T*, int64_t, T, const T*, int32_t, T, int32_t, int64_t, int32_t*, int64_t*, T*,
                bool);
};

template <typename T>
ResidualCores<T> pick_residual_cores() {
#ifdef FSQ_HAVE_AVX2_CORES
  if (use_avx2_cores()) return {&cores_avx2::soft_clamp_channel, &cores_avx2::residual_stage_channel};
#endif
  return {&cores_base::soft_clamp_channel, &cores_base::residual_stage_channel};
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

}  // namespace

TORCH_LIBRARY_IMPL(fsq, CPU, m) {
  m.impl("residual_quantize", &residual_quantize_cpu);
  m.impl("residual_quantize_backward", &residual_quantize_backward_cpu);
}

}  // namespace fsq
