// fsq_usage.cpp: schema of fsq::accumulate_usage and its CPU kernel (CUDA: fsq_usage_cuda.inc).
//
// counts (G, K) int64 += the histogram of `indices`, whose element e belongs to codebook
// slot e % G (indices contiguous with G = its last dim, or G = 1). Indices outside [0, K) (the -1
// of NaN tokens, dropped stages) are skipped. CPU: fsq::usage::CpuHistogram (per-thread tables
// merged at the end while G*K <= 2^16; beyond, relaxed atomic increments on counts itself).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fsq_usage.h"

namespace {

template <typename index_t>
void accumulate(const index_t* idx, int64_t n, int64_t G, int64_t K, int64_t* counts) {
  fsq::usage::CpuHistogram hist(counts, G * K);
  const uint64_t size = static_cast<uint64_t>(K);
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    int64_t* t = hist.thread_table();
    for (int64_t e = begin, slot = begin % G; e < end; ++e, slot = slot + 1 == G ? 0 : slot + 1) {
      const uint64_t v = static_cast<uint64_t>(static_cast<int64_t>(idx[e]));  // -1 wraps: skipped
      if (v >= size) continue;
      const int64_t bin = slot * K + static_cast<int64_t>(v);
      if (t != nullptr) ++t[bin];
      else hist.add_atomic(bin);
    }
  });
  hist.merge();
}

void accumulate_usage_cpu(const at::Tensor& indices_in, const at::Tensor& counts) {
  fsq::usage::check_args(indices_in, counts);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t G = counts.size(0), K = counts.size(1);
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "fsq_accumulate_usage_cpu", [&] {
    accumulate<index_t>(indices.const_data_ptr<index_t>(), indices.numel(), G, K, counts.mutable_data_ptr<int64_t>());
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fsq, m) {
  m.def("accumulate_usage(Tensor indices, Tensor(a!) counts) -> ()");
}

TORCH_LIBRARY_IMPL(fsq, CPU, m) { m.impl("accumulate_usage", &accumulate_usage_cpu); }
