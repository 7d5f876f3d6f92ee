// Host entry point of the `bottleneck` op family (csrc/bottleneck.cu), registered as a torch op in csrc/ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace fastpeft {

// y = residual + scaling * (act(LN(x) @ Wd.T + bd) @ Wu.T + bu), per row, for rows [M, d] (unit inner stride).
// down_weight [A, m, d], down_bias [A, m], up_weight_t [A, m, d] (Wu transposed), up_bias [A, d], all of x's
// dtype; ln_weight / ln_bias [A, d] or absent; scale fp32 [A, 1] or [A, d], or absent (then scale_value);
// ids int32 [M] (the adapter of each row, outside [0, A): y = residual) or absent (adapter 0); activation: the
// code of triton_kernels/bottleneck.py's ACTIVATION_CODES; out_residual (rows like x) and out_ln_weight /
// out_ln_bias [d]: y = LN_out(residual + adapter + out_residual), each part optional. tile_rows and cluster:
// 0 lets the kernel choose (bottleneck_tile_plan_cuda); positive, they force the prefill tile kernel's plan (16,
// 32 or 64 rows per cluster of 1 to 8 blocks). Returns y [M, d].
at::Tensor bottleneck_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                   const at::Tensor& down_weight, const at::Tensor& down_bias,
                                   const at::Tensor& up_weight_t, const at::Tensor& up_bias,
                                   const std::optional<at::Tensor>& scale, double scale_value,
                                   const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                                   double ln_eps, const std::optional<at::Tensor>& ids, int64_t activation,
                                   const std::optional<at::Tensor>& out_residual,
                                   const std::optional<at::Tensor>& out_ln_weight,
                                   const std::optional<at::Tensor>& out_ln_bias, double out_ln_eps, int64_t tile_rows,
                                   int64_t cluster);

// The prefill tile kernel's [rows per tile, blocks per cluster] for rows [*, d] with bottleneck m (16-bit), on a
// device whose blocks may opt in to shared_optin bytes and which runs clusters of up to max_cluster blocks;
// [0, 0] where the kernel does not take the shape. Host arithmetic only: callable without a GPU.
std::vector<int64_t> bottleneck_tile_plan_cuda(int64_t d, int64_t m, int64_t shared_optin, int64_t max_cluster);

}  // namespace fastpeft
