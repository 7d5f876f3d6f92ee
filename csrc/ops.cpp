// Registers the CUDA kernels of every op family as torch ops in the `fastpeft` namespace, and makes this
// library importable as the Python module fastpeft._C (importing it runs the registrations).
//
// These are backend kernels: the public ops (fastpeft::lora_linear, ...) are defined in Python
// (fastpeft/ops/) with their fake implementations and autograd, and call these when the cuda backend runs.

#include <Python.h>
#include <torch/library.h>

#include "bottleneck.h"
#include "lora.h"
#include "multi_lora.h"
#include "qlora.h"

TORCH_LIBRARY(fastpeft, m) {
  m.def("lora_shrink_cuda(Tensor x, Tensor lora_a) -> Tensor");
  m.def(
      "lora_expand_linear_cuda(Tensor x, Tensor weight, Tensor xa, Tensor lora_b, float scaling, Tensor? bias) "
      "-> Tensor");
  m.def(
      "lora_linear_cuda(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scaling, Tensor? bias) "
      "-> Tensor");
  m.def("multi_lora_shrink_cuda(Tensor x, Tensor lora_a, Tensor a_offsets, Tensor adapter_ids, int v_width) -> Tensor");
  m.def(
      "multi_lora_expand_cuda(Tensor base, Tensor v, Tensor lora_b, Tensor adapter_ids, Tensor ranks, "
      "Tensor v_starts, Tensor b_starts, Tensor scalings, Tensor out_starts, int max_width) -> Tensor");
  m.def(
      "matmul_4bit_cuda(Tensor x, Tensor packed, Tensor absmax, Tensor code, Tensor? absmax2, Tensor? code2, "
      "Tensor? offset, int blocksize, int nested_blocksize, int n, ScalarType w_dtype, Tensor? bias, Tensor? xa, "
      "Tensor? lora_a, Tensor? lora_b, float scaling) -> Tensor");
  m.def(
      "matmul_4bit_t_cuda(Tensor dy, Tensor packed, Tensor absmax, Tensor code, Tensor? absmax2, Tensor? code2, "
      "Tensor? offset, int blocksize, int nested_blocksize, int k, ScalarType w_dtype, Tensor? dyb, "
      "Tensor? lora_a, float scaling) -> Tensor");
  m.def(
      "dequantize_4bit_cuda(Tensor packed, Tensor absmax, Tensor code, Tensor? absmax2, Tensor? code2, "
      "Tensor? offset, int blocksize, int nested_blocksize, int n, int k, ScalarType w_dtype, Tensor(a!) out) "
      "-> ()");
  m.def(
      "bottleneck_forward_cuda(Tensor x, Tensor? residual, Tensor down_weight, Tensor down_bias, Tensor up_weight_t, "
      "Tensor up_bias, Tensor? scale, float scale_value, Tensor? ln_weight, Tensor? ln_bias, float ln_eps, "
      "Tensor? ids, int activation, Tensor? out_residual, Tensor? out_ln_weight, Tensor? out_ln_bias, "
      "float out_ln_eps, int tile_rows=0, int cluster=0) -> Tensor");
  m.def("bottleneck_tile_plan_cuda(int d, int m, int shared_optin, int max_cluster) -> int[]",
        &fastpeft::bottleneck_tile_plan_cuda);
}

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("lora_shrink_cuda", &fastpeft::lora_shrink_cuda);
  m.impl("lora_expand_linear_cuda", &fastpeft::lora_expand_linear_cuda);
  m.impl("lora_linear_cuda", &fastpeft::lora_linear_cuda);
  m.impl("multi_lora_shrink_cuda", &fastpeft::multi_lora_shrink_cuda);
  m.impl("multi_lora_expand_cuda", &fastpeft::multi_lora_expand_cuda);
  m.impl("matmul_4bit_cuda", &fastpeft::matmul_4bit_cuda);
  m.impl("matmul_4bit_t_cuda", &fastpeft::matmul_4bit_t_cuda);
  m.impl("dequantize_4bit_cuda", &fastpeft::dequantize_4bit_cuda);
  m.impl("bottleneck_forward_cuda", &fastpeft::bottleneck_forward_cuda);
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastpeft CUDA kernels (registered as torch ops)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
