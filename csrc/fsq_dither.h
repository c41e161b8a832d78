// fsq_dither.h: per-element math of the dither fused into the quantize kernels
// (fsq::quantize_train / fsq::quantize_backward; CPU fsq_cpu.cpp, CUDA fsq_cuda.cu), host and
// device. Contract: docs/dither.md; reference: fsq_kernels/dither.py.
//
// Element i (row-major position in z's logical shape) draws Philox4x32-10 words at counter
// offset + i: u0 - 1/2 is its noise, u1 < p its "peer" mask; its batch element b = i / per_batch
// draws at offset + b * per_batch, u2 < p (unquantized) and u3 < p (kept) its "taae" masks.
// Noise and masks are float32; sums run in the math type T (double for double input, float
// otherwise). The kernels walk (token, channel), so i comes from the token through
// token_element(): i = (tok / S) * C * S + tok % S + c * S, S the product of z's dims after the
// channel axis (1 channel-last), C the channel count.
#pragma once

#include <cstdint>

#include "fsq_math.h"
#include "fsq_philox.h"

namespace fsq {
namespace dither {

// dither_mode of the ops
constexpr int32_t kNone = 0, kPeer = 1, kTaae = 2;
// What a "taae" batch element outputs (its masks)
constexpr int32_t kNoisy = 0, kUnquantized = 1, kQuantized = 2;

// The kernels' runtime dither fields (filled by fsq_train_args.h).
struct Params {
  int32_t mode;
  float p;
  int64_t spatial;       // S: elements between two channels of one token
  int64_t channels;      // C
  int64_t batch_tokens;  // tokens per batch element (taae)
  float step[kMaxChannels];  // 2/(L-1) in float32, per channel of one codebook (taae)
};

// Row-major position of channel 0 of token `tok` in z's logical shape (channel c adds c * S).
FSQ_HD int64_t token_element(int64_t tok, const Params& a) {
  if (a.spatial == 1) return tok * a.channels;
  const int64_t outer = tok / a.spatial;
  return outer * a.channels * a.spatial + (tok - outer * a.spatial);
}

FSQ_HD philox::Words words(uint64_t key, uint64_t offset, int64_t element) {
  return philox::randint4x(key, offset + static_cast<uint64_t>(element));
}

// The "taae" branch of the batch element of token `tok` (words at its first element's counter).
FSQ_HD int32_t taae_branch(uint64_t key, uint64_t offset, int64_t tok, const Params& a) {
  const int64_t first = (tok / a.batch_tokens) * a.batch_tokens * a.channels;
  const philox::Words w = words(key, offset, first);
  if (!(philox::uniform(w.w[3]) < a.p)) return kNoisy;
  return philox::uniform(w.w[2]) < a.p ? kUnquantized : kQuantized;
}

// u0 - 1/2, a rounded subtraction (nvcc would otherwise fuse uniform()'s multiply into an FMA)
FSQ_HD float noise_of(uint32_t w0) { return sub_rn(philox::uniform(w0), 0.5f); }

// "peer": clamp(code + noise, -1, 1) where u1 < p, else code (code already in the output dtype).
template <typename T>
FSQ_HD T peer_value(T code, const philox::Words& w, float p) {
  T x = code + static_cast<T>(noise_of(w.w[0]));
  x = x < T(-1) ? T(-1) : (x > T(1) ? T(1) : x);  // NaN stays NaN (torch.clamp)
  return philox::uniform(w.w[1]) < p ? x : code;
}

// "peer" backward: the clamp passes the gradient unless the element was noised and code + noise
// left [-1, 1] (torch.clamp's backward is inclusive; NaN passes nothing).
template <typename T>
FSQ_HD bool peer_passes(T code, const philox::Words& w, float p) {
  const T x = code + static_cast<T>(noise_of(w.w[0]));
  return !(philox::uniform(w.w[1]) < p) || (x >= T(-1) && x <= T(1));
}

// "taae": tanh(z) + noise * step, tanh(z) or the code, by the batch element's branch.
template <typename T>
FSQ_HD T taae_value(int32_t branch, T code, T z, uint32_t w0, float step) {
  if (branch == kQuantized) return code;
  const T t = tanh_sel(z);
  if (branch == kUnquantized) return t;
  return t + static_cast<T>(mul_rn(noise_of(w0), step));  // one float32 multiply, as the reference
}

}  // namespace dither
}  // namespace fsq
