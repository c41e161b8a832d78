// fsq_dither_args.h: host-side checks and the launch arguments of the dither ops (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "fsq_dither.h"

namespace fsq {
namespace dither {

inline void check_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes(), "fsq::dither: ", name, " must have shape ", like.sizes(), "; got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fsq::dither: ", name, " must have dtype ",
              like.scalar_type(), "; got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "fsq::dither: ", name, " must be on ", like.device(), "; got ",
              t.device());
}

inline Args make_args(const at::Tensor& z, const at::Tensor& key_offset, at::ArrayRef<double> steps, int64_t mode,
                      double p, bool channel_first, const at::Tensor& codes) {
  check_like(codes, z, "codes");
  TORCH_CHECK(key_offset.scalar_type() == at::kLong && key_offset.numel() == 2 && key_offset.is_contiguous(),
              "fsq::dither: key_offset must be a contiguous int64 tensor of 2 elements; got ",
              key_offset.scalar_type(), " of shape ", key_offset.sizes());
  TORCH_CHECK(key_offset.device() == z.device(), "fsq::dither: key_offset must be on ", z.device(), "; got ",
              key_offset.device());
  TORCH_CHECK(mode == 0 || mode == 1, "fsq::dither: mode must be 0 (peer) or 1 (taae); got ", mode);
  const int64_t d = static_cast<int64_t>(steps.size());
  TORCH_CHECK(d >= 1 && d <= kMaxSteps, "fsq::dither: steps must hold 1 to ", kMaxSteps, " values; got ", d);
  TORCH_CHECK(z.dim() >= (channel_first ? 2 : 1), "fsq::dither: z must have a channel axis; got shape ", z.sizes());
  Args a{};
  const int64_t numel = z.numel();
  const int64_t batch = z.dim() >= 2 ? z.size(0) : 1;
  a.channels = z.size(channel_first ? 1 : -1);
  TORCH_CHECK(a.channels % d == 0, "fsq::dither: the channel axis (", a.channels, ") must be a multiple of ",
              "len(steps) = ", d);
  a.per_batch = batch > 0 ? numel / batch : 1;
  a.inner = channel_first && batch * a.channels > 0 ? numel / (batch * a.channels) : 1;
  a.per_batch = a.per_batch > 0 ? a.per_batch : 1;
  a.inner = a.inner > 0 ? a.inner : 1;
  a.channels = a.channels > 0 ? a.channels : 1;
  a.d = static_cast<int>(d);
  a.mode = static_cast<int>(mode) + 1;  // the op's 0 (peer) / 1 (taae) are kPeer / kTaae
  a.p = static_cast<float>(p);
  for (int64_t j = 0; j < d; ++j) a.step[j] = static_cast<float>(steps[j]);
  return a;
}

}  // namespace dither
}  // namespace fsq
