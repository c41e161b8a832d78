// fsq_math.h: per-element math of Finite Scalar Quantization, shared by the CPU (.cpp) and
// CUDA (.cu) kernels. Normative contract: docs/design.md.
//
// Forward: no tanh. The level index k of one channel counts the comparison boundaries below z:
//     paper/atanh: k = k0 + #{ t in bounds : z > t }     symmetric: k = #{ t in bounds : z >= t }
// where k0 counts the boundaries at -inf (paper variant with L >= 1002) and `bounds` holds the
// finite ones, ascending, already rounded to the math type in the direction of the comparison
// (fsq_kernels/ops/tables.py; nothing here derives a constant). A NaN z exceeds nothing; the
// kernels test it separately (NaN code, index -1).
//
// Code value: code = (num_mul * k - num_sub) / den, i.e. (k - hw) / hw for paper/atanh and
// (2k - (L-1)) / (L-1) for symmetric; the numerator is an exact small integer, so the only
// rounding is the one of the division.
//
// Backward (straight-through estimator across the round only):
//     paper/atanh: dcode/dz = (half_l / hw) * sech^2(z + shift)
//     symmetric:   dcode/dz = sech^2(z)
//     ifsq:        dcode/dz = (0.8 half_l / hw) * sech^2(0.8 z)   (in_scale = 0.8, shift 0)
//     hard_clamp:  (half_l / hw) * [-1 < z + shift < 1]   resp.   [-1 < z < 1]
// sech^2(u) = 4e / (1 + e)^2 with e = exp(-2|u|): no overflow, full relative accuracy for
// large |u| (1 - tanh^2 cancels there).
//
// Every per-level-set number comes from the table argument of the op (parsed in fsq_common.h);
// nothing here allocates on the device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__CUDACC__)
#define FSQ_HD __host__ __device__ __forceinline__
#else
#define FSQ_HD inline
#endif

namespace fsq {

// Channels per codebook the kernels accept (the paper uses d <= 8; 16 leaves room).
constexpr int kMaxChannels = 16;

enum Variant : int32_t { kPaper = 0, kAtanh = 1, kSymmetric = 2, kIfsq = 3 };

// ---------------------------------------------------------------------------------------------
// Element math (host + device)
// ---------------------------------------------------------------------------------------------

FSQ_HD float bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
#endif
}

// exp(x) for x <= 0 (x = NaN gives garbage: callers select NaN themselves). Cephes-style range
// reduction + degree-6 polynomial, ~1 ulp on [-87, 0], 0 below. Pure arithmetic so the CPU
// compiler vectorizes loops calling it (std::exp is not vectorized without -ffast-math).
FSQ_HD float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
#if defined(__CUDA_ARCH__)
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
#else
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
#endif
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n as float bits; n in [-126, 0]
  const float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  // below -87 (clamped above): 0, as a multiply so loops over it stay branch-free
  return p * scale * static_cast<float>(x > -87.0f);
}

FSQ_HD double exp_nonpos(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// sech^2(u) = 1 - tanh(u)^2, NaN for NaN.
template <typename T>
FSQ_HD T sech2(T u) {
  const T a = u < T(0) ? -u : u;
  const T e = exp_nonpos(T(-2) * a);
  const T d = T(1) + e;
  const T s = (T(4) * e) / (d * d);
  return u == u ? s : u;
}

// One comparison of the level index: z > t, or z >= t where ties round up (symmetric).
template <bool TiesUp, typename T>
FSQ_HD int32_t exceeds(T z, T t) {
  return TiesUp ? static_cast<int32_t>(z >= t) : static_cast<int32_t>(z > t);
}

// Level index of one channel from its boundaries (small L: linear count; the CPU kernels run the
// same comparison vectorized across tokens).
template <typename T>
FSQ_HD int32_t level_index_linear(T z, const T* bounds, int32_t nb, int32_t k0, bool ties_up) {
  int32_t k = k0;
  if (ties_up) {
    for (int32_t b = 0; b < nb; ++b) k += exceeds<true, T>(z, bounds[b]);
  } else {
    for (int32_t b = 0; b < nb; ++b) k += exceeds<false, T>(z, bounds[b]);
  }
  return k;
}

// Same result by binary search over the ascending bounds (NaN: k0).
template <typename T>
FSQ_HD int32_t level_index_bsearch(T z, const T* bounds, int32_t nb, int32_t k0, bool ties_up) {
  int32_t lo = 0, n = nb;
  while (n > 0) {
    const int32_t half = n >> 1;
    const bool gt = ties_up ? exceeds<true, T>(z, bounds[lo + half]) : exceeds<false, T>(z, bounds[lo + half]);
    lo = gt ? lo + half + 1 : lo;
    n = gt ? n - half - 1 : half;
  }
  return k0 + lo;
}

template <typename T>
FSQ_HD T code_value(int32_t k, T num_mul, T num_sub, T den) {
  return (static_cast<T>(k) * num_mul - num_sub) / den;
}

// dcode/dz of one channel. hard_clamp: strict interval, 0 at the edges (as autograd of clamp).
template <typename T>
FSQ_HD T grad_factor(T z, T shift, T coef, bool hard_clamp) {
  const T u = z + shift;
  if (hard_clamp) return (u > T(-1) && u < T(1)) ? coef : T(0);
  return coef * sech2(u);
}

// ---------------------------------------------------------------------------------------------
// Residual FSQ element math (host + device). Contract: reference.residual_quantize.
//
// Per token and channel, in the math type T (float32 for fp16/bf16/fp32, float64 for fp64):
//     h = soft_clamp ? tanh(x / c) * c : x;  residual = h;  out = 0
//     for s < active_stages:  y = residual / scale_s            (IEEE division)
//                             k = #{j : y >= t_j}               (symmetric boundaries, ties up)
//                             code = (2k - (L-1)) / (L-1)       (one rounding)
//                             so = code * scale_s               (rounded product, never an FMA)
//                             residual = residual - so;  out = out + so
// so that, with the same k, the residuals and the sum are the reference's float32 numbers bit for
// bit (only the soft clamp's tanh is our own, within a few 1e-8 of torch.tanh). Backward:
//     grad_x = grad_out * (softclamp'(x) * sum_{s < active} bound'(y_s))
// bound'(y) = [-1 < y < 1] (hard clamp) or sech^2(y); softclamp'(x) = sech^2(x / c).
// ---------------------------------------------------------------------------------------------

// Rounded product that the compiler may not contract into the following add/sub (on the host
// the extension is built with -ffp-contract=off; nvcc contracts by default, hence __fmul_rn).
FSQ_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FSQ_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
FSQ_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FSQ_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FSQ_HD double sub_rn(double a, double b) { return a - b; }
FSQ_HD double add_rn(double a, double b) { return a + b; }
FSQ_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FSQ_HD double div_rn(double a, double b) { return a / b; }

// tanh(x), float: Cephes tanhf (odd polynomial below 0.625, 1 - 2/(e^{2|x|} + 1) above, with
// the vectorizable exp_nonpos), both branches computed and selected so loops over it vectorize.
// Within ~2 ulp of tanh; NaN for NaN, +-1 for +-inf. double: the libm tanh.
FSQ_HD float tanh_sel(float x) {
  const float a = x < 0.0f ? -x : x;
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float e = exp_nonpos(-2.0f * a);  // e^{-2|x|} in (0, 0.29] above 0.625
  const float big_abs = (1.0f - e) / (1.0f + e);
  const float big = x < 0.0f ? -big_abs : big_abs;
  const float r = a > 0.625f ? big : small;
  return x == x ? r : x;
}
FSQ_HD double tanh_sel(double x) {
#if defined(__CUDA_ARCH__)
  return ::tanh(x);
#else
  return std::tanh(x);
#endif
}

// Soft clamp h = tanh(x / c) * c (its derivative, sech^2(x / c), is computed by the callers).
template <typename T>
FSQ_HD T soft_clamp_value(T x, T c) {
  return mul_rn(tanh_sel(div_rn(x, c)), c);
}

// Stage output code * scale, code = (2k - (L-1)) / (L-1) with one rounding, the product rounded.
template <typename T>
FSQ_HD T residual_stage_output(int32_t k, T lm1, T scale) {
  return mul_rn(div_rn(static_cast<T>(2 * k) - lm1, lm1), scale);
}

// One symmetric residual stage of one channel: returns k, writes the stage output.
template <typename T>
FSQ_HD int32_t residual_stage(T residual, T scale, const T* bounds, int32_t nb, T lm1, bool linear,
                              T& y, T& stage_out) {
  y = div_rn(residual, scale);
  const int32_t k = linear ? level_index_linear<T>(y, bounds, nb, 0, true)
                           : level_index_bsearch<T>(y, bounds, nb, 0, true);
  stage_out = residual_stage_output<T>(k, lm1, scale);
  return k;
}

// bound'(y) of one stage: [-1 < y < 1] or sech^2(y) (NaN for NaN).
template <typename T>
FSQ_HD T residual_bound_grad(T y, bool hard_clamp) {
  if (hard_clamp) return (y > T(-1) && y < T(1)) ? T(1) : T(0);
  return sech2(y);
}

// ---------------------------------------------------------------------------------------------
// Per-call constants in kernel form (filled from the op's table by fsq_common.h)
// ---------------------------------------------------------------------------------------------

// Kernel-side per-channel constants, in the math type T (float or double).
template <typename T>
struct ChannelParams {
  int32_t d;                          // channels per codebook
  int32_t num_codebooks;
  int32_t hard_clamp;
  int32_t ties_up;                    // symmetric: z >= t
  int32_t index64;                    // indices are int64 (else int32)
  int32_t L[kMaxChannels];
  int32_t k0[kMaxChannels];           // boundaries at -inf
  int32_t nb[kMaxChannels];           // finite boundaries
  int32_t boff[kMaxChannels];         // offset of channel i's boundaries in the boundary array
  int64_t basis[kMaxChannels];        // cumprod([1, L_0, ..., L_{d-2}])
  T num_mul[kMaxChannels], num_sub[kMaxChannels], den[kMaxChannels];
  T shift[kMaxChannels], coef[kMaxChannels];
  T in_scale[kMaxChannels];           // dcode/dz = coef * sech^2(in_scale * z + shift): 0.8 for ifsq
};

inline int32_t parse_variant(const std::string& v) {
  if (v == "paper") return kPaper;
  if (v == "atanh") return kAtanh;
  if (v == "symmetric") return kSymmetric;
  if (v == "ifsq") return kIfsq;
  return -1;
}

}  // namespace fsq
