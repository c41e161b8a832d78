// fsq_usage.h: argument checks of fsq::accumulate_usage (CPU: fsq_usage.cpp, CUDA:
// fsq_usage_cuda.inc) and the CPU histogram it shares with the fused forward (fsq_cpu.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <vector>

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

#if defined(__CUDACC__)
// Device side of the CUDA histograms (accumulate_usage_kernel in fsq_usage_cuda.inc, the fused
// forward in fsq_cuda.cu): while G*K <= kUsageSharedBins a block counts into a shared-memory
// int32 table, then adds each non-zero bin to counts with one 64-bit atomic; larger histograms
// count in global memory directly.
constexpr int64_t kUsageSharedBins = 8192;  // 32 KiB of int32 per block

__device__ __forceinline__ void usage_table_zero(unsigned int* table, int64_t bins) {
  for (int64_t b = threadIdx.x; b < bins; b += blockDim.x) table[b] = 0u;
}
__device__ __forceinline__ void usage_count(unsigned int* table, unsigned long long* counts,
                                            bool shared, int64_t bin) {
  if (shared) atomicAdd(&table[bin], 1u);
  else atomicAdd(&counts[bin], 1ull);
}
__device__ __forceinline__ void usage_table_flush(const unsigned int* table,
                                                  unsigned long long* counts, int64_t bins) {
  for (int64_t b = threadIdx.x; b < bins; b += blockDim.x)
    if (table[b] != 0u) atomicAdd(&counts[b], static_cast<unsigned long long>(table[b]));
}
#else
// A histogram counted by the threads of at::parallel_for: per-thread tables, merged into counts
// by merge(), while bins <= kMaxLocalBins; beyond, relaxed atomic increments on counts itself.
class CpuHistogram {
 public:
  static constexpr int64_t kMaxLocalBins = int64_t{1} << 16;  // 512 KiB of int64 per thread

  CpuHistogram(int64_t* counts, int64_t bins)
      : counts_(counts), bins_(bins), local_(bins <= kMaxLocalBins) {
    if (local_) tables_.resize(static_cast<size_t>(at::get_num_threads()));
  }
  // The calling thread's table (inside the parallel region), or nullptr: count with add_atomic.
  int64_t* thread_table() {
    if (!local_) return nullptr;
    std::vector<int64_t>& t = tables_[static_cast<size_t>(at::get_thread_num())];
    if (t.empty()) t.assign(static_cast<size_t>(bins_), 0);
    return t.data();
  }
  void add_atomic(int64_t bin) {
    std::atomic_ref<int64_t>(counts_[bin]).fetch_add(1, std::memory_order_relaxed);
  }
  // counts += every thread's table (after the parallel region)
  void merge() {
    for (const std::vector<int64_t>& t : tables_)
      for (int64_t b = 0; b < static_cast<int64_t>(t.size()); ++b) counts_[b] += t[b];
  }

 private:
  int64_t* counts_;
  int64_t bins_;
  bool local_;
  std::vector<std::vector<int64_t>> tables_;
};
#endif

}  // namespace usage
}  // namespace fsq
