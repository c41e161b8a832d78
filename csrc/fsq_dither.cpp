// fsq_dither.cpp: schemas of fsq::dither / fsq::dither_backward and their CPU kernels
// (docs/dither.md; the CUDA kernels are in fsq_dither_cuda.cu, fakes and autograd in
// fsq_kernels/ops/dither_ops.py). Elements are taken in row-major order of z's logical shape:
// the ops make their inputs contiguous (a no-op for quantize's outputs and contiguous z).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "fsq_dither.h"
#include "fsq_dither_args.h"

namespace {

using fsq::dither::Args;

template <typename scalar_t>
void forward_cpu(const at::Tensor& codes, const at::Tensor& z, at::Tensor& out, uint64_t key, uint64_t offset,
                 const Args& a) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* c = codes.const_data_ptr<scalar_t>();
  const scalar_t* x = z.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, out.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      o[i] = static_cast<scalar_t>(fsq::dither::forward<acc_t>(key, offset, i, static_cast<acc_t>(c[i]),
                                                                 static_cast<acc_t>(x[i]), a));
    }
  });
}

template <typename scalar_t>
void backward_cpu(const at::Tensor& grad, const at::Tensor& codes, const at::Tensor& z, at::Tensor& grad_codes,
                  at::Tensor& grad_z, uint64_t key, uint64_t offset, const Args& a) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* c = codes.const_data_ptr<scalar_t>();
  const scalar_t* x = z.const_data_ptr<scalar_t>();
  scalar_t* gc = grad_codes.mutable_data_ptr<scalar_t>();
  scalar_t* gz = a.mode == fsq::dither::kTaae ? grad_z.mutable_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, grad_codes.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t d_code, d_z;
      fsq::dither::backward<acc_t>(key, offset, i, static_cast<acc_t>(g[i]), static_cast<acc_t>(c[i]),
                                   static_cast<acc_t>(x[i]), a, &d_code, &d_z);
      gc[i] = static_cast<scalar_t>(d_code);
      if (gz != nullptr) gz[i] = static_cast<scalar_t>(d_z);
    }
  });
}

std::pair<uint64_t, uint64_t> key_offset_values(const at::Tensor& key_offset) {
  const int64_t* v = key_offset.const_data_ptr<int64_t>();
  return {static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1])};
}

at::Tensor dither_cpu(const at::Tensor& codes_in, const at::Tensor& z_in, const at::Tensor& key_offset,
                      at::ArrayRef<double> steps, int64_t mode, double p, bool channel_first) {
  const Args a = fsq::dither::make_args(z_in, key_offset, steps, mode, p, channel_first, codes_in);
  const at::Tensor codes = codes_in.contiguous(), z = z_in.contiguous();
  at::Tensor out = at::empty_like(codes, at::MemoryFormat::Contiguous);
  const auto [key, offset] = key_offset_values(key_offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codes.scalar_type(), "fsq_dither_cpu",
                                  [&] { forward_cpu<scalar_t>(codes, z, out, key, offset, a); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dither_backward_cpu(const at::Tensor& grad_in, const at::Tensor& codes_in,
                                                       const at::Tensor& z_in, const at::Tensor& key_offset,
                                                       at::ArrayRef<double> steps, int64_t mode, double p,
                                                       bool channel_first) {
  const Args a = fsq::dither::make_args(z_in, key_offset, steps, mode, p, channel_first, codes_in);
  fsq::dither::check_like(grad_in, codes_in, "grad_out");
  const at::Tensor grad = grad_in.contiguous(), codes = codes_in.contiguous(), z = z_in.contiguous();
  at::Tensor grad_codes = at::empty_like(codes, at::MemoryFormat::Contiguous);
  at::Tensor grad_z = a.mode == fsq::dither::kTaae ? at::empty_like(z, at::MemoryFormat::Contiguous) : z.new_empty({0});
  const auto [key, offset] = key_offset_values(key_offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codes.scalar_type(), "fsq_dither_backward_cpu",
                                  [&] { backward_cpu<scalar_t>(grad, codes, z, grad_codes, grad_z, key, offset, a); });
  return {grad_codes, grad_z};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fsq, m) {
  // key_offset: int64 [key, offset] on z's device; steps: float32 2/(L-1) per channel of a
  // codebook; mode 0 "peer", 1 "taae". Outputs contiguous; grad_z empty for "peer".
  m.def(
      "dither(Tensor codes, Tensor z, Tensor key_offset, float[] steps, int mode, float p, "
      "bool channel_first) -> Tensor");
  m.def(
      "dither_backward(Tensor grad_out, Tensor codes, Tensor z, Tensor key_offset, float[] steps, "
      "int mode, float p, bool channel_first) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fsq, CPU, m) {
  m.impl("dither", &dither_cpu);
  m.impl("dither_backward", &dither_backward_cpu);
}
