// Host entry points of the `lora` op family (csrc/lora.cu), registered as torch ops in csrc/ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastpeft {

// xa = x @ lora_a.T in fp32. x: [M, K], lora_a: [R, K], one dtype (fp16/bf16/fp32). Returns [M, R] fp32.
at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& lora_a);

// y = x @ weight.T + bias + scaling * xa @ lora_b.T. x: [M, K], weight: [N, K], xa: [M, R] fp32,
// lora_b: [N, R], bias: [N] or none. Returns [M, N] in x's dtype.
at::Tensor lora_expand_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& xa,
                                   const at::Tensor& lora_b, double scaling, const std::optional<at::Tensor>& bias);

// y = x @ weight.T + bias + scaling * (x @ lora_a.T) @ lora_b.T, shapes as above.
at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scaling, const std::optional<at::Tensor>& bias);

}  // namespace fastpeft
