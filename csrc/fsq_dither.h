// fsq_dither.h: per-element math of the fused dither, shared by the CPU (fsq_dither.cpp) and
// CUDA (fsq_dither_cuda.cu) kernels. Contract: docs/dither.md; reference: fsq_kernels/dither.py.
//
// Element i (row-major position in z's logical shape) draws Philox4x32-10 words at counter
// offset + i: u0 - 1/2 is its noise, u1 < p its "peer" mask; its batch element b = i / per_batch
// draws at offset + b * per_batch, u2 < p (unquantized) and u3 < p (kept) its "taae" masks.
// Noise and masks are float32; sums run in acc_t (double for double input, float otherwise).
#pragma once

#include <cmath>
#include <cstdint>

#include "fsq_math.h"
#include "fsq_philox.h"

namespace fsq {
namespace dither {

constexpr int kPeer = 0, kTaae = 1;
constexpr int kMaxSteps = 64;

struct Args {
  int64_t per_batch;  // elements per batch element (index along dim 0)
  int64_t inner;      // elements between two channels of the channel axis
  int64_t channels;   // size of the channel axis
  int d;              // channels per codebook (entries of step)
  int mode;
  float p;
  float step[kMaxSteps];  // 2/(L-1) in float32, per channel of a codebook
};

struct Uniforms {
  float noise, element_mask, unquantized, kept;
};

FSQ_PHILOX_HD Uniforms draw(uint64_t key, uint64_t offset, int64_t i, const Args& a) {
  const philox::Words own = philox::randint4x(key, offset + static_cast<uint64_t>(i));
  Uniforms u{philox::uniform(own.w[0]) - 0.5f, philox::uniform(own.w[1]), 1.0f, 1.0f};
  if (a.mode == kTaae) {
    const uint64_t first = static_cast<uint64_t>((i / a.per_batch) * a.per_batch);
    const philox::Words batch = philox::randint4x(key, offset + first);
    u.unquantized = philox::uniform(batch.w[2]);
    u.kept = philox::uniform(batch.w[3]);
  }
  return u;
}

FSQ_PHILOX_HD float step_of(int64_t i, const Args& a) {
  return a.step[((i / a.inner) % a.channels) % a.d];
}

template <typename acc_t>
FSQ_PHILOX_HD acc_t forward(uint64_t key, uint64_t offset, int64_t i, acc_t code, acc_t z, const Args& a) {
  const Uniforms u = draw(key, offset, i, a);
  if (a.mode == kPeer) {
    acc_t x = code + static_cast<acc_t>(u.noise);
    x = x < acc_t(-1) ? acc_t(-1) : (x > acc_t(1) ? acc_t(1) : x);  // NaN stays NaN (torch.clamp)
    return u.element_mask < a.p ? x : code;
  }
  const acc_t t = tanh(z);
  if (u.kept < a.p) return u.unquantized < a.p ? t : code;
  const float scaled = ::fsq::mul_rn(u.noise, step_of(i, a));  // one float32 multiply, as the reference
  return t + static_cast<acc_t>(scaled);
}

// (dout/dcode, dout/dz) of element i, times grad.
template <typename acc_t>
FSQ_PHILOX_HD void backward(uint64_t key, uint64_t offset, int64_t i, acc_t grad, acc_t code, acc_t z, const Args& a,
                            acc_t* grad_code, acc_t* grad_z) {
  const Uniforms u = draw(key, offset, i, a);
  if (a.mode == kPeer) {
    const acc_t x = code + static_cast<acc_t>(u.noise);
    const bool inside = x >= acc_t(-1) && x <= acc_t(1);
    *grad_code = (u.element_mask >= a.p || inside) ? grad : acc_t(0);
    *grad_z = acc_t(0);
    return;
  }
  const bool quantized = u.kept < a.p && !(u.unquantized < a.p);
  *grad_code = quantized ? grad : acc_t(0);
  *grad_z = quantized ? acc_t(0) : grad * ::fsq::sech2<acc_t>(z);
}

}  // namespace dither
}  // namespace fsq
