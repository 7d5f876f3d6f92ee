// Host entry points of the `qlora` op family (csrc/qlora.cu), registered as torch ops in csrc/ops.cpp.
// A 4-bit weight W [N, K] is bitsandbytes' layout (fastpeft/ops/quant_4bit.py): packed uint8 [ceil(N*K/2)],
// element e = n*K + k in the high (e even) or low nibble of byte e/2; absmax fp32 [blocks] (or uint8 [blocks]
// decoded as code2[q] * absmax2[b / nested_blocksize] + offset when absmax2 is given); code fp32 [16].
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastpeft {

// y = x @ dequant(W).T + bias (+ scaling * xa @ lora_b.T). x: [M, K] fp16/bf16/fp32; w_dtype: the dtype W
// dequantizes to (values rounded to it, then to x's dtype); xa: fp32 [M, R], or lora_a: [R, K] of x's dtype (xa =
// x @ lora_a.T computed here: inside the GEMV's launch on sm_90 for decode rows, else by a launch before it);
// lora_b: [N, R] of x's dtype.
at::Tensor matmul_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            const at::Tensor& code, const std::optional<at::Tensor>& absmax2,
                            const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                            int64_t blocksize, int64_t nested_blocksize, int64_t n, at::ScalarType w_dtype,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& xa,
                            const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                            double scaling);

// dx = dy @ dequant(W) (+ scaling * dyb @ lora_a). dy: [M, N]; dyb: fp32 [M, R]; lora_a: [R, k] of dy's dtype.
at::Tensor matmul_4bit_t_cuda(const at::Tensor& dy, const at::Tensor& packed, const at::Tensor& absmax,
                              const at::Tensor& code, const std::optional<at::Tensor>& absmax2,
                              const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                              int64_t blocksize, int64_t nested_blocksize, int64_t k, at::ScalarType w_dtype,
                              const std::optional<at::Tensor>& dyb, const std::optional<at::Tensor>& lora_a,
                              double scaling);

// out [n, k] (unit column stride, any row stride >= k: a view of a wider buffer) = W in out's dtype: every weight
// rounded to w_dtype (bitsandbytes' value), then to out's dtype. One pass.
void dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                          const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                          const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize,
                          int64_t n, int64_t k, at::ScalarType w_dtype, const at::Tensor& out);

}  // namespace fastpeft
