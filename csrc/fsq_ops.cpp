// fsq_ops.cpp: schemas of the fsq:: ops and the Python module `fsq_kernels._C`, whose import
// registers them (the CPU and CUDA implementations register themselves in fsq_cpu.cpp,
// fsq_cpu_residual.cpp and fsq_cuda.cu). Fake (meta) implementations and autograd live in fsq_kernels/ops/native.py.
#include <Python.h>
#include <torch/library.h>

#ifndef FSQ_WITH_CUDA
#define FSQ_WITH_CUDA 0
#endif

TORCH_LIBRARY(fsq, m) {
  // `table`: the level-set table of fsq_kernels/ops/tables.py for the math dtype of the input
  // (every boundary, shift, gradient coefficient, code scale and residual scale the kernels use).
  // indices: an empty int tensor when return_indices is False
  m.def(
      "quantize(Tensor z, int[] levels, str variant, bool hard_clamp, bool channel_first, "
      "int num_codebooks, bool return_indices, float[] table) -> (Tensor, Tensor)");
  // training forward: codes with the dither fused in (dither_mode 0 none, 1 "peer", 2 "taae";
  // key_offset the int64 [key, offset] on z's device, read by the kernel; dither_steps 2/(L-1)
  // per channel of a codebook, docs/dither.md), the noiseless indices, and the usage histogram
  // (num_codebooks, prod(levels)) int64 of this call's indices (an empty (0,) tensor when
  // return_usage is False)
  m.def(
      "quantize_train(Tensor z, int[] levels, str variant, bool hard_clamp, bool channel_first, "
      "int num_codebooks, float[] table, Tensor? key_offset, int dither_mode, float dither_p, "
      "float[] dither_steps, bool return_usage) -> (Tensor codes, Tensor indices, Tensor usage)");
  // the backward of quantize (dither_mode 0) and of quantize_train (the same dither arguments)
  m.def(
      "quantize_backward(Tensor grad_codes, Tensor z, int[] levels, str variant, bool hard_clamp, "
      "bool channel_first, int num_codebooks, float[] table, Tensor? key_offset=None, "
      "int dither_mode=0, float dither_p=0.0, float[] dither_steps=[]) -> Tensor");
  m.def(
      "indices_to_codes(Tensor indices, int[] levels, str variant, bool channel_first, "
      "int num_codebooks, ScalarType dtype, float[] table) -> Tensor");
  // residual FSQ (symmetric stages, scales L^-s): (sum of the active stages, indices with the
  // stage axis where x has its channel axis; -1 for dropped stages and NaN tokens).
  // active_stages: None (every stage) or a 0-d integer tensor on x's device, read by the kernel.
  m.def(
      "residual_quantize(Tensor x, int[] levels, int num_stages, bool hard_clamp, "
      "float[]? soft_clamp, bool channel_first, Tensor? active_stages, float[] table) "
      "-> (Tensor, Tensor)");
  m.def(
      "residual_quantize_backward(Tensor grad_out, Tensor x, int[] levels, int num_stages, "
      "bool hard_clamp, float[]? soft_clamp, bool channel_first, Tensor? active_stages, "
      "float[] table) -> Tensor");
  // tests: what the kernels read from a table (num_stages 0: a quantize table)
  m.def(
      "parsed_table(int[] levels, str variant, bool hard_clamp, int num_stages, float[] table, "
      "ScalarType dtype) -> Tensor");
}

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {
      PyModuleDef_HEAD_INIT, "_C",
      "fsq_kernels native extension: importing it registers the fsq:: torch ops.", -1, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod == nullptr) return nullptr;
  if (PyModule_AddIntConstant(mod, "WITH_CUDA", FSQ_WITH_CUDA) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
}
