// fsq_train_args.h: host-side checks and kernel fields of the training extras of the quantize
// ops, shared by CPU (fsq_cpu.cpp) and CUDA (fsq_cuda.cu): the fused dither (fsq::quantize_train
// and fsq::quantize_backward's dither_* arguments; math in fsq_dither.h) and the fused usage
// histogram (quantize_train's return_usage).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

#include "fsq_common.h"
#include "fsq_dither.h"

namespace fsq {

// The most bins (num_codebooks * prod(levels)) a fused usage histogram may have: 2 GiB of int64.
constexpr int64_t kMaxUsageBins = int64_t{1} << 28;

struct DitherArgs {
  dither::Params params{};
  at::Tensor key_offset;  // contiguous int64 [key, offset] on z's device; undefined for kNone
};

// Checks the dither arguments of `op` and derives the kernels' fields from z's logical shape.
inline DitherArgs make_dither_args(const char* op, const at::Tensor& z, const Setup& s,
                                   bool channel_first, const std::optional<at::Tensor>& key_offset,
                                   int64_t mode, double p, c10::ArrayRef<double> steps) {
  TORCH_CHECK_VALUE(mode == dither::kNone || mode == dither::kPeer || mode == dither::kTaae, op,
                    ": dither_mode must be 0 (none), 1 (peer) or 2 (taae), got ", mode);
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, op, ": dither_p must be a float in [0, 1], got ", p);
  const int64_t nsteps = static_cast<int64_t>(steps.size());
  if (mode == dither::kTaae) {
    TORCH_CHECK_VALUE(nsteps == s.d, op, ": dither_steps must hold len(levels) = ", s.d,
                      " values (2/(L-1) per channel) for dither_mode 2 (taae), got ", nsteps);
  } else {
    TORCH_CHECK_VALUE(nsteps == 0 || nsteps == s.d, op, ": dither_steps must be empty or hold ",
                      "len(levels) = ", s.d, " values, got ", nsteps);
  }
  DitherArgs out;
  dither::Params& a = out.params;
  a.mode = static_cast<int32_t>(mode);
  a.p = static_cast<float>(p);
  for (int64_t j = 0; j < nsteps; ++j) a.step[j] = static_cast<float>(steps[j]);
  if (mode == dither::kNone) return out;
  TORCH_CHECK_VALUE(key_offset.has_value(), op, ": key_offset must be an int64 tensor of shape (2,) ",
                    "on the device of z when dither_mode != 0, got None");
  const at::Tensor& ko = *key_offset;
  TORCH_CHECK_TYPE(ko.scalar_type() == at::kLong, op, ": key_offset must be an int64 tensor, got dtype ",
                   ko.scalar_type());
  TORCH_CHECK_VALUE(ko.dim() == 1 && ko.size(0) == 2, op, ": key_offset must have shape (2,), got ",
                    ko.sizes());
  TORCH_CHECK_VALUE(ko.device() == z.device(), op, ": key_offset must be on the device of z (",
                    z.device(), "), got ", ko.device());
  out.key_offset = ko.contiguous();
  const int64_t cd = channel_dim(z.dim(), channel_first);
  a.channels = std::max<int64_t>(1, z.size(cd));
  a.spatial = 1;
  for (int64_t k = cd + 1; k < z.dim(); ++k) a.spatial *= z.size(k);
  a.spatial = std::max<int64_t>(1, a.spatial);
  const int64_t batch = z.dim() >= 2 ? z.size(0) : 1;  // 1-D z is one batch element
  const int64_t tokens = z.numel() / a.channels;
  a.batch_tokens = batch > 0 ? std::max<int64_t>(1, tokens / batch) : 1;
  return out;
}

// The usage output: zeros (num_codebooks, prod(levels)) int64, or an empty (0,) tensor.
inline at::Tensor make_usage(const char* op, const Setup& s, bool return_usage, const at::Tensor& z) {
  const at::TensorOptions opts = z.options().dtype(at::kLong);
  if (!return_usage) return at::empty({0}, opts);
  TORCH_CHECK_VALUE(s.prod <= kMaxUsageBins / s.num_codebooks, op, ": return_usage=True needs ",
                    "num_codebooks * prod(levels) <= 2^28 bins, got ", s.num_codebooks, " * ", s.prod,
                    " (levels=", repr_levels(s.levels), ")");
  return at::zeros({s.num_codebooks, s.prod}, opts);
}

}  // namespace fsq
