// fsq_common.h: host-side argument validation, output shapes and strided token geometry, shared
// by the CPU (fsq_cpu.cpp) and CUDA (fsq_cuda.cu) implementations of the fsq:: ops.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "fsq_math.h"

namespace fsq {

// ---------------------------------------------------------------------------------------------
// Validation (ValueError for values, TypeError for dtypes, naming the argument,
// the expected and the actual value).
// ---------------------------------------------------------------------------------------------

inline std::string repr_levels(c10::IntArrayRef levels) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < levels.size(); ++i) os << (i ? ", " : "") << levels[i];
  os << "]";
  return os.str();
}

struct Setup {
  std::vector<int64_t> levels;
  int32_t variant = kPaper;
  bool hard_clamp = false;
  int64_t d = 0;
  int64_t num_codebooks = 1;
  int64_t channels = 0;   // d * num_codebooks
  int64_t prod = 1;       // prod(levels): the codebook size
  bool index64 = false;   // prod > 2^31 - 1
};

inline Setup make_setup(const char* op, c10::IntArrayRef levels, c10::string_view variant,
                        bool hard_clamp, int64_t num_codebooks) {
  Setup s;
  TORCH_CHECK_VALUE(!levels.empty(), op, ": levels must be a non-empty list of ints >= 2, got []");
  TORCH_CHECK_VALUE(static_cast<int64_t>(levels.size()) <= kMaxChannels, op,
                    ": levels must have at most ", kMaxChannels,
                    " entries (channels per codebook) for the native kernels, got ",
                    levels.size(), " (levels=", repr_levels(levels), ")");
  const std::string v(variant.data(), variant.size());
  s.variant = parse_variant(v);
  TORCH_CHECK_VALUE(s.variant >= 0, op,
                    ": variant must be one of 'paper', 'atanh', 'symmetric', 'ifsq', got '", v, "'");
  TORCH_CHECK_VALUE(!(hard_clamp && (s.variant == kPaper || s.variant == kIfsq)), op,
                    ": hard_clamp=True requires variant 'atanh' or 'symmetric', got variant '", v, "'");
  TORCH_CHECK_VALUE(num_codebooks >= 1, op, ": num_codebooks must be an int >= 1, got ",
                    num_codebooks);
  s.hard_clamp = hard_clamp;
  s.d = static_cast<int64_t>(levels.size());
  s.num_codebooks = num_codebooks;
  s.channels = s.d * num_codebooks;
  for (int64_t L : levels) {
    TORCH_CHECK_VALUE(L >= 2 && L <= (int64_t{1} << 24), op,
                      ": every level must be an int in [2, 2^24], got levels=", repr_levels(levels));
    TORCH_CHECK_VALUE(s.prod <= std::numeric_limits<int64_t>::max() / L, op,
                      ": prod(levels) must fit in int64, got levels=", repr_levels(levels));
    s.prod *= L;
    s.levels.push_back(L);
  }
  s.index64 = s.prod > int64_t{2147483647};
  return s;
}

// ---------------------------------------------------------------------------------------------
// The table argument (fsq_kernels/ops/tables.py is its only author): per channel kTableFields
// values (k0, nb, shift, grad_coef, code_mul, code_sub, code_den, half_l, offset, input_scale), then every
// channel's nb finite comparison boundaries, then `extra` values (residual: the stage scales).
// Parsing converts to the math type T; the float32 table holds float32 values, so this is exact.
// ---------------------------------------------------------------------------------------------

constexpr int kTableFields = 10;

template <typename T>
struct Table {
  ChannelParams<T> p;
  std::vector<T> bounds;  // boundaries, channel i from p.boff[i], each padded to `pad` with NaN
  std::vector<T> extra;
};

template <typename T>
inline Table<T> parse_table(const char* op, c10::ArrayRef<double> table, const Setup& s,
                            int32_t pad, int64_t extra) {
  Table<T> t;
  std::memset(&t.p, 0, sizeof(t.p));
  ChannelParams<T>& p = t.p;
  const int64_t d = s.d;
  p.d = static_cast<int32_t>(d);
  p.num_codebooks = static_cast<int32_t>(s.num_codebooks);
  p.hard_clamp = s.hard_clamp ? 1 : 0;
  p.ties_up = s.variant == kSymmetric ? 1 : 0;
  p.index64 = s.index64 ? 1 : 0;
  const int64_t n = static_cast<int64_t>(table.size());
  TORCH_CHECK_VALUE(n >= kTableFields * d, op, ": table must hold ", kTableFields,
                    " values per channel and the boundaries (fsq_kernels.ops.tables), got ", n,
                    " values for levels=", repr_levels(s.levels));
  int64_t at = kTableFields * d, basis = 1;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int64_t i = 0; i < d; ++i) {
    const double* f = table.data() + i * kTableFields;
    const int64_t L = s.levels[i];
    const int64_t k0 = static_cast<int64_t>(f[0]), nb = static_cast<int64_t>(f[1]);
    TORCH_CHECK_VALUE(f[0] == k0 && f[1] == nb && k0 >= 0 && nb >= 0 && k0 + nb <= L - 1 &&
                          at + nb <= n,
                      op, ": table does not match levels=", repr_levels(s.levels), " (channel ",
                      i, ": k0=", f[0], ", nb=", f[1], ")");
    p.L[i] = static_cast<int32_t>(L);
    p.basis[i] = basis;
    basis *= L;
    p.k0[i] = static_cast<int32_t>(k0);
    p.nb[i] = static_cast<int32_t>(nb);
    p.shift[i] = static_cast<T>(f[2]);
    p.coef[i] = static_cast<T>(f[3]);
    p.in_scale[i] = static_cast<T>(f[9]);
    p.num_mul[i] = static_cast<T>(f[4]);
    p.num_sub[i] = static_cast<T>(f[5]);
    p.den[i] = static_cast<T>(f[6]);
    p.boff[i] = static_cast<int32_t>(t.bounds.size());
    for (int64_t b = 0; b < nb; ++b) t.bounds.push_back(static_cast<T>(table[at + b]));
    while ((t.bounds.size() - p.boff[i]) % pad) t.bounds.push_back(nan);  // never exceeded
    at += nb;
  }
  TORCH_CHECK_VALUE(n - at == extra, op, ": table must end with ", extra, " values after the ",
                    "boundaries for levels=", repr_levels(s.levels), ", got ", n - at);
  for (int64_t e = at; e < n; ++e) t.extra.push_back(static_cast<T>(table[e]));
  return t;
}

inline int64_t channel_dim(int64_t ndim, bool channel_first) {
  return channel_first ? 1 : ndim - 1;
}

inline void check_float_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating tensor (float16, bfloat16, float32, float64), got dtype ",
                   t.scalar_type());
}

// A gradient must have the shape and dtype of the tensor it is the gradient of.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name,
                    " ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_z_shape(const char* op, const char* name, const at::Tensor& z, const Setup& s,
                          bool channel_first) {
  const int64_t need = channel_first ? 2 : 1;
  TORCH_CHECK_VALUE(z.dim() >= need, op, ": ", name, " must have at least ", need,
                    " dims for channel_first=", channel_first ? "True" : "False", ", got shape ",
                    z.sizes());
  const int64_t cd = channel_dim(z.dim(), channel_first);
  TORCH_CHECK_VALUE(z.size(cd) == s.channels, op, ": ", name, " must have len(levels) * "
                    "num_codebooks = ", s.d, " * ", s.num_codebooks, " = ", s.channels,
                    " channels in dim ", cd, ", got shape ", z.sizes());
}

inline at::ScalarType index_dtype(const Setup& s) { return s.index64 ? at::kLong : at::kInt; }

// Indices: z's shape without the channel axis, plus a trailing num_codebooks axis when > 1.
inline std::vector<int64_t> index_shape(c10::IntArrayRef zshape, bool channel_first,
                                        int64_t num_codebooks) {
  std::vector<int64_t> out;
  const int64_t cd = channel_dim(static_cast<int64_t>(zshape.size()), channel_first);
  for (int64_t i = 0; i < static_cast<int64_t>(zshape.size()); ++i)
    if (i != cd) out.push_back(zshape[i]);
  if (num_codebooks > 1) out.push_back(num_codebooks);
  return out;
}

// Codes from indices: the inverse of index_shape.
inline std::vector<int64_t> decode_shape(const char* op, c10::IntArrayRef ishape,
                                         bool channel_first, const Setup& s) {
  std::vector<int64_t> tok(ishape.begin(), ishape.end());
  if (s.num_codebooks > 1) {
    TORCH_CHECK_VALUE(!tok.empty() && tok.back() == s.num_codebooks, op,
                      ": indices must have a trailing axis of size num_codebooks = ",
                      s.num_codebooks, ", got shape ", ishape);
    tok.pop_back();
  }
  std::vector<int64_t> out;
  if (channel_first) {
    TORCH_CHECK_VALUE(!tok.empty(), op, ": channel_first=True needs indices with a batch axis, "
                      "got shape ", ishape);
    out.push_back(tok[0]);
    out.push_back(s.channels);
    out.insert(out.end(), tok.begin() + 1, tok.end());
  } else {
    out = tok;
    out.push_back(s.channels);
  }
  return out;
}

// The index operand of indices_to_codes as the kernels read it: contiguous (they index it by
// token), and int32/int64 when `widen` (the CUDA kernel reads only those; the CPU kernel reads
// every integer dtype). `.to(dtype)` alone would keep a permuted tensor's strides.
inline at::Tensor dense_indices(const at::Tensor& indices, bool widen) {
  const at::ScalarType t = indices.scalar_type();
  if (!widen || t == at::kInt || t == at::kLong) return indices.contiguous();
  return indices.to(at::kLong, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous)
      .contiguous();
}

// ---------------------------------------------------------------------------------------------
// Token geometry: tokens are all positions of a tensor except its channel axis, in row-major
// order (the order of the index tensor). Each operand has its own token strides and channel
// stride (elements). Size-1 dims are dropped and adjacent dims merged when every operand allows
// it, so the common layouts become one (channel-last, or channel-first with B == 1) or two
// (channel-first) token dims; the innermost coalesced dim is last.
// ---------------------------------------------------------------------------------------------

constexpr int kMaxTokDims = 12;

template <int NOPS>
struct TokenGeom {
  int32_t ndim;
  int64_t ntok;
  int64_t size[kMaxTokDims];
  int64_t stride[NOPS][kMaxTokDims];
  int64_t cstride[NOPS];

  // Offset (elements) of token position `tok` for operand `op`.
  FSQ_HD int64_t offset(int op, int64_t tok) const {
    if (ndim <= 1) return ndim ? tok * stride[op][0] : 0;
    int64_t off = 0;
    for (int k = ndim - 1; k >= 0; --k) {
      const int64_t sz = size[k];
      const int64_t q = k == 0 ? 0 : tok / sz;
      off += (tok - q * sz) * stride[op][k];
      tok = q;
    }
    return off;
  }
  FSQ_HD int64_t inner() const { return ndim ? size[ndim - 1] : 1; }
  FSQ_HD int64_t inner_stride(int op) const { return ndim ? stride[op][ndim - 1] : 0; }
};

// `shape` is the common shape of all operands, `strides[op]` their strides.
template <int NOPS>
inline TokenGeom<NOPS> make_geom(c10::IntArrayRef shape, const c10::IntArrayRef* strides,
                                 int64_t cd) {
  TokenGeom<NOPS> g;
  std::memset(&g, 0, sizeof(g));
  g.ntok = 1;
  for (int op = 0; op < NOPS; ++op) g.cstride[op] = strides[op][cd];
  int64_t sz[64];
  int64_t st[NOPS][64];
  int n = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(shape.size()); ++i) {
    if (i == cd) continue;
    g.ntok *= shape[i];
    if (shape[i] == 1) continue;
    bool merge = n > 0;
    for (int op = 0; op < NOPS && merge; ++op)
      merge = st[op][n - 1] == strides[op][i] * shape[i];
    if (merge) {
      sz[n - 1] *= shape[i];
      for (int op = 0; op < NOPS; ++op) st[op][n - 1] = strides[op][i];
    } else {
      sz[n] = shape[i];
      for (int op = 0; op < NOPS; ++op) st[op][n] = strides[op][i];
      ++n;
    }
  }
  TORCH_CHECK_VALUE(n <= kMaxTokDims, "fsq: tensor has ", n,
                    " token dims that cannot be merged (at most ", kMaxTokDims,
                    " supported); pass a contiguous tensor");
  g.ndim = n;
  for (int k = 0; k < n; ++k) {
    g.size[k] = sz[k];
    for (int op = 0; op < NOPS; ++op) g.stride[op][k] = st[op][k];
  }
  return g;
}

// ---------------------------------------------------------------------------------------------
// Residual FSQ (fsq::residual_quantize): validation and per-call constants shared by CPU and CUDA.
// ---------------------------------------------------------------------------------------------

struct ResidualSetup {
  Setup s;                       // the symmetric level set (one codebook)
  int64_t num_stages = 1;
  bool soft = false;
  std::vector<double> soft_clamp;  // one value per channel when `soft`
};

inline ResidualSetup make_residual_setup(const char* op, c10::IntArrayRef levels,
                                         int64_t num_stages, bool hard_clamp,
                                         std::optional<c10::ArrayRef<double>> soft_clamp) {
  ResidualSetup r;
  r.s = make_setup(op, levels, "symmetric", hard_clamp, 1);
  TORCH_CHECK_VALUE(num_stages >= 1, op, ": num_stages must be an int >= 1, got ", num_stages);
  r.num_stages = num_stages;
  if (soft_clamp.has_value()) {
    const c10::ArrayRef<double> c = *soft_clamp;
    bool ok = static_cast<int64_t>(c.size()) == r.s.d;
    for (double v : c) ok = ok && v > 0.0;
    TORCH_CHECK_VALUE(ok, op, ": soft_clamp must hold ", r.s.d,
                      " positive values (one per channel), got ", c.size(), " values");
    r.soft = true;
    r.soft_clamp.assign(c.begin(), c.end());
  }
  return r;
}

// active_stages (quantize dropout): None = every stage, else a 0-d integer tensor on x's device.
inline void check_active_stages(const char* op, const std::optional<at::Tensor>& active,
                                const at::Tensor& x) {
  if (!active.has_value()) return;
  const at::Tensor& a = *active;
  TORCH_CHECK_TYPE(at::isIntegralType(a.scalar_type(), /*includeBool=*/false), op,
                   ": active_stages must be an integer tensor, got dtype ", a.scalar_type());
  TORCH_CHECK_VALUE(a.numel() == 1, op, ": active_stages must be a 0-d tensor, got shape ",
                    a.sizes());
  TORCH_CHECK_VALUE(a.device() == x.device(), op, ": active_stages must be on the device of x (",
                    x.device(), "), got ", a.device());
}

// The number of active stages of a CPU op (a read of a CPU scalar, no device sync).
inline int64_t cpu_active_stages(const char* op, const std::optional<at::Tensor>& active,
                                 int64_t num_stages) {
  if (!active.has_value()) return num_stages;
  const int64_t v = active->to(at::kLong).item<int64_t>();
  TORCH_CHECK_VALUE(v >= 0 && v <= num_stages, op, ": active_stages must be an int in [0, ",
                    "num_stages=", num_stages, "], got ", v);
  return v;
}

// Indices of residual FSQ: x's shape with the channel axis replaced by the stage axis
// ((..., q) channel-last, (B, q, ...) channel-first), contiguous.
inline std::vector<int64_t> residual_index_shape(c10::IntArrayRef xshape, bool channel_first,
                                                 int64_t num_stages) {
  std::vector<int64_t> out(xshape.begin(), xshape.end());
  out[channel_dim(static_cast<int64_t>(xshape.size()), channel_first)] = num_stages;
  return out;
}

}  // namespace fsq
