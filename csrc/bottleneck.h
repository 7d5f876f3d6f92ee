// Host entry point of the `bottleneck` op family (csrc/bottleneck.cu), registered as a torch op in csrc/ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastpeft {

// y = residual + scaling * (act(LN(x) @ Wd.T + bd) @ Wu.T + bu), per row, for rows [M, d] (unit inner stride).
// down_weight [A, m, d], down_bias [A, m], up_weight_t [A, m, d] (Wu transposed), up_bias [A, d], all of x's
// dtype; ln_weight / ln_bias [A, d] or absent; scale fp32 [A, 1] or [A, d], or absent (then scale_value);
// ids int32 [M] (the adapter of each row, outside [0, A): y = residual) or absent (adapter 0); activation: the
// code of triton_kernels/bottleneck.py's ACTIVATION_CODES; out_residual (rows like x) and out_ln_weight /
// out_ln_bias [d]: y = LN_out(residual + adapter + out_residual), each part optional. Returns y [M, d].
at::Tensor bottleneck_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                   const at::Tensor& down_weight, const at::Tensor& down_bias,
                                   const at::Tensor& up_weight_t, const at::Tensor& up_bias,
                                   const std::optional<at::Tensor>& scale, double scale_value,
                                   const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                                   double ln_eps, const std::optional<at::Tensor>& ids, int64_t activation,
                                   const std::optional<at::Tensor>& out_residual,
                                   const std::optional<at::Tensor>& out_ln_weight,
                                   const std::optional<at::Tensor>& out_ln_bias, double out_ln_eps);

}  // namespace fastpeft
