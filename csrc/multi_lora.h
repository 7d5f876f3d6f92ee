// Host entry points of the `multi_lora` op family (csrc/multi_lora.cu), registered as torch ops in csrc/ops.cpp.
// The pool layout is fastpeft/ops/adapter_pool.py's: adapter i owns rows a_offsets[i]:a_offsets[i + 1] of
// lora_a; slice s of adapter i has rank ranks[s, i], its columns of v start at v_starts[s, i], its B transposed
// lies row-major [rank, width_s] at element b_starts[s, i] of the flat lora_b.
#pragma once

#include <ATen/ATen.h>

namespace fastpeft {

// v[t, :R] = x[t] @ lora_a[rows of id[t]].T in fp32, zero elsewhere. x: [M, K]; lora_a: [P, K] of x's dtype;
// a_offsets: int32 [n + 1]; adapter_ids: int32/int64 [M] (-1 or any id outside the pool: a zero row).
// Returns fp32 [M, v_width].
at::Tensor multi_lora_shrink_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& a_offsets,
                                  const at::Tensor& adapter_ids, int64_t v_width);

// y[t, slice s] = base[t, slice s] + scalings[s, id] * v[t, cols of s] @ B[s, id].T, in fp32, rounded once.
// base: [M, N]; v: fp32 [M, v_width]; lora_b: flat, base's dtype; ranks, v_starts: int32 [S, n]; b_starts:
// int64 [S, n]; scalings: fp32 [S, n]; out_starts: int32 [S + 1]; max_width: the widest slice.
at::Tensor multi_lora_expand_cuda(const at::Tensor& base, const at::Tensor& v, const at::Tensor& lora_b,
                                  const at::Tensor& adapter_ids, const at::Tensor& ranks, const at::Tensor& v_starts,
                                  const at::Tensor& b_starts, const at::Tensor& scalings,
                                  const at::Tensor& out_starts, int64_t max_width);

}  // namespace fastpeft
