// fsq_usage.h: argument checks of fsq::accumulate_usage (CPU: fsq_usage.cpp, CUDA:
// fsq_usage_cuda.inc).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace fsq {
namespace usage {

inline void check_args(const at::Tensor& indices, const at::Tensor& counts) {
  TORCH_CHECK_VALUE(counts.scalar_type() == at::kLong && counts.dim() == 2 && counts.is_contiguous(),
                    "fsq::accumulate_usage: counts must be a contiguous int64 tensor (G, K); got ",
                    counts.scalar_type(), " of shape ", counts.sizes());
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
                    "fsq::accumulate_usage: indices must be int32 or int64; got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.device() == counts.device(), "fsq::accumulate_usage: counts must be on ",
                    indices.device(), "; got ", counts.device());
  const int64_t G = counts.size(0);
  TORCH_CHECK_VALUE(G == 1 || (indices.dim() >= 1 && indices.size(-1) == G),
                    "fsq::accumulate_usage: indices' last dim must be counts.size(0) = ", G, "; got shape ",
                    indices.sizes());
}

}  // namespace usage
}  // namespace fsq
