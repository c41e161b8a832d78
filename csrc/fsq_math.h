// fsq_math.h: per-element math of Finite Scalar Quantization, shared by the CPU (.cpp) and
// CUDA (.cu) kernels. Normative contract: DESIGN.md section 1.
//
// Forward: no tanh. The level index k of one channel is the number of float-cast level
// boundaries that z exceeds (DESIGN "The forward needs no tanh"):
//     k = k0 + #{ b in bounds : z > b }
// where k0 counts the boundaries that are -inf (paper variant with L >= 1002) and `bounds` holds
// the finite ones, ascending. `symmetric` rounds ties up (k = #{z >= t}); on the host its
// boundaries are stored as nextafter(t, -inf) so the same strict comparison implements >=.
// A NaN z exceeds nothing; the kernels test it separately (NaN code, index -1).
//
// Code value: code = (num_mul * k - num_sub) / den, i.e. (k - hw) / hw for paper/atanh and
// (2k - (L-1)) / (L-1) for symmetric; the numerator is an exact small integer, so the only
// rounding is the one of the division.
//
// Backward (straight-through estimator across the round only):
//     paper/atanh: dcode/dz = (half_l / hw) * sech^2(z + shift)
//     symmetric:   dcode/dz = sech^2(z)
//     hard_clamp:  (half_l / hw) * [-1 < z + shift < 1]   resp.   [-1 < z < 1]
// sech^2(u) = 4e / (1 + e)^2 with e = exp(-2|u|): no overflow, full relative accuracy for
// large |u| (1 - tanh^2 cancels there).
//
// Everything per call (levels, variant) is computed on the host in double and passed to the
// kernels in small structs; nothing here allocates on the device.
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

constexpr double kEps = 1e-3;
// Channels per codebook the kernels accept (the paper uses d <= 8; 16 leaves room).
constexpr int kMaxChannels = 16;

enum Variant : int32_t { kPaper = 0, kAtanh = 1, kSymmetric = 2 };

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

// Level index of one channel from its boundaries (small L: linear count, the loop the CPU
// kernels vectorize across tokens; the device kernels use it too).
template <typename T>
FSQ_HD int32_t level_index_linear(T z, const T* bounds, int32_t nb, int32_t k0) {
  int32_t k = k0;
  for (int32_t b = 0; b < nb; ++b) k += (z > bounds[b]) ? 1 : 0;
  return k;
}

// Same result by binary search: number of ascending bounds strictly below z (NaN: 0).
template <typename T>
FSQ_HD int32_t level_index_bsearch(T z, const T* bounds, int32_t nb, int32_t k0) {
  int32_t lo = 0, n = nb;
  while (n > 0) {
    const int32_t half = n >> 1;
    const bool gt = z > bounds[lo + half];
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
  const int32_t k = linear ? level_index_linear<T>(y, bounds, nb, 0)
                           : level_index_bsearch<T>(y, bounds, nb, 0);
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
// Per-call constants (host only, double precision)
// ---------------------------------------------------------------------------------------------

// Kernel-side per-channel constants, in the math type T (float or double).
template <typename T>
struct ChannelParams {
  int32_t d;                          // channels per codebook
  int32_t num_codebooks;
  int32_t hard_clamp;
  int32_t index64;                    // indices are int64 (else int32)
  int32_t L[kMaxChannels];
  int32_t k0[kMaxChannels];           // boundaries at -inf
  int32_t nb[kMaxChannels];           // finite boundaries
  int32_t boff[kMaxChannels];         // offset of channel i's boundaries in the boundary array
  int64_t basis[kMaxChannels];        // cumprod([1, L_0, ..., L_{d-2}])
  T num_mul[kMaxChannels], num_sub[kMaxChannels], den[kMaxChannels];
  T shift[kMaxChannels], coef[kMaxChannels];
};

// Host functions (never called from device code; nvcc parses them in both passes).

inline int32_t parse_variant(const std::string& v) {
  if (v == "paper") return kPaper;
  if (v == "atanh") return kAtanh;
  if (v == "symmetric") return kSymmetric;
  return -1;
}

struct HostChannel {
  int64_t L, hw;
  double half_l, offset, shift, coef;
  std::vector<double> bounds;  // all L-1 boundaries in double, ascending, possibly +-inf
  bool ties_up;                // symmetric: z >= t
  int32_t num_mul, num_sub, den;
};

// DESIGN section 1, in double.
inline HostChannel host_channel(int64_t L, int32_t variant, bool hard_clamp) {
  HostChannel c;
  c.L = L;
  c.hw = L / 2;
  const double inf = std::numeric_limits<double>::infinity();
  if (variant == kSymmetric) {
    c.half_l = 0.0;
    c.offset = 0.0;
    c.shift = 0.0;
    c.coef = 1.0;
    c.ties_up = true;
    c.num_mul = 2;
    c.num_sub = static_cast<int32_t>(L - 1);
    c.den = static_cast<int32_t>(L - 1);
    for (int64_t j = 0; j <= L - 2; ++j) {
      const double x = static_cast<double>(2 * j + 1) / static_cast<double>(L - 1) - 1.0;
      c.bounds.push_back(hard_clamp ? x : std::atanh(x));
    }
    return c;
  }
  const double h = variant == kPaper ? (L - 1) * (1.0 - kEps) / 2.0 : (L - 1) * (1.0 + kEps) / 2.0;
  const double o = (L % 2 == 0) ? 0.5 : 0.0;
  c.half_l = h;
  c.offset = o;
  if (variant == kPaper) {
    c.shift = std::tan(o / h);
  } else {
    c.shift = hard_clamp ? o / h : std::atanh(o / h);
  }
  c.coef = h / static_cast<double>(c.hw);
  c.ties_up = false;
  c.num_mul = 1;
  c.num_sub = static_cast<int32_t>(c.hw);
  c.den = static_cast<int32_t>(c.hw);
  for (int64_t q = -c.hw; q <= L - 2 - c.hw; ++q) {
    if (hard_clamp) {
      c.bounds.push_back((static_cast<double>(q) + 0.5) / h);
      continue;
    }
    const double x = (static_cast<double>(q) + 0.5 + o) / h;
    if (x <= -1.0) {
      c.bounds.push_back(-inf);
    } else if (x >= 1.0) {
      c.bounds.push_back(inf);
    } else {
      c.bounds.push_back(std::atanh(x) - c.shift);
    }
  }
  return c;
}

// Boundaries in the math type T: finite ones only, ascending, ties-up variants shifted down by
// one ulp so that `z > b` means `z >= t`. Padded with +inf to a multiple of `pad` per channel
// (+inf is never exceeded, not even by +inf). Fills k0/nb/boff of `p`.
template <typename T>
inline std::vector<T> make_kernel_bounds(const std::vector<HostChannel>& ch, ChannelParams<T>& p,
                                         int32_t pad) {
  std::vector<T> out;
  const T tinf = std::numeric_limits<T>::infinity();
  for (size_t i = 0; i < ch.size(); ++i) {
    int32_t k0 = 0;
    const size_t start = out.size();
    for (double t : ch[i].bounds) {
      if (std::isinf(t)) {
        if (t < 0) ++k0;
        continue;  // +inf: never exceeded
      }
      T tb = static_cast<T>(t);
      if (ch[i].ties_up) tb = std::nextafter(tb, -tinf);
      out.push_back(tb);
    }
    const int32_t nb = static_cast<int32_t>(out.size() - start);
    while ((out.size() - start) % pad) out.push_back(tinf);
    p.k0[i] = k0;
    p.nb[i] = nb;
    p.boff[i] = static_cast<int32_t>(start);
  }
  return out;
}

template <typename T>
inline void fill_channel_params(const std::vector<HostChannel>& ch, int32_t num_codebooks,
                                bool hard_clamp, bool index64, ChannelParams<T>& p) {
  p.d = static_cast<int32_t>(ch.size());
  p.num_codebooks = num_codebooks;
  p.hard_clamp = hard_clamp ? 1 : 0;
  p.index64 = index64 ? 1 : 0;
  int64_t basis = 1;
  for (size_t i = 0; i < ch.size(); ++i) {
    p.L[i] = static_cast<int32_t>(ch[i].L);
    p.basis[i] = basis;
    basis *= ch[i].L;
    p.num_mul[i] = static_cast<T>(ch[i].num_mul);
    p.num_sub[i] = static_cast<T>(ch[i].num_sub);
    p.den[i] = static_cast<T>(ch[i].den);
    p.shift[i] = static_cast<T>(ch[i].shift);
    p.coef[i] = static_cast<T>(ch[i].coef);
  }
}

// Residual stage scales: the float32 numbers L^-s of reference.residual_scales (torch's float32
// pow, which equals the double pow rounded to float for every level and stage count in use).
inline std::vector<float> residual_scales_f32(const std::vector<int64_t>& levels, int64_t num_stages) {
  std::vector<float> out;
  out.reserve(static_cast<size_t>(num_stages) * levels.size());
  for (int64_t s = 0; s < num_stages; ++s)
    for (int64_t L : levels)
      out.push_back(static_cast<float>(std::pow(static_cast<double>(L), -static_cast<double>(s))));
  return out;
}

}  // namespace fsq
