// The `bottleneck` op family on CUDA: a bottleneck adapter's forward for a few rows per block (decode).
//
//   bottleneck_rows_kernel  rows of x staged in shared memory (fp32), the LayerNorm applied there, a warp per
//                           bottleneck unit for z = act(h . Wd[j] + bd[j]) (z kept in shared memory), then a
//                           thread per feature for y = residual + s * (z . Wu^T[:, k] + bu[k]), Wu read
//                           transposed so that a warp's reads are coalesced; optionally the add + LayerNorm
//                           after (out_residual, out_ln_*), on the row kept in shared memory
//
// Every block re-reads the adapter's weights (from L2): the right trade for decode, where rows are few. Prefill
// runs the Triton tile kernel (fastpeft/ops/bottleneck.py prefers it above 64 rows).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "bottleneck.h"
#include "cuda_utils.cuh"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kSharedBudget = 40 * 1024;  // under the 48 KiB a block gets without opting in

__device__ __forceinline__ float activate(float v, int code) {
  switch (code) {
    case 0: return fmaxf(v, 0.f);
    case 1: return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
    case 2: return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case 3: return v / (1.f + expf(-v));
    case 4: return tanhf(v);
    case 5: return v > 0.f ? v : 0.01f * v;
    default: return 1.f / (1.f + expf(-v));
  }
}

struct Params {
  int64_t rows, d, m, adapters;
  int64_t x_stride, res_stride, out_res_stride;
  int scale_kind;  // 0: scale_value, 1: one per adapter, 2: one per feature and adapter
  float scale_value, ln_eps, out_ln_eps;
  int activation;
};

// Sum of v over the block's threads, in every thread. ``scratch`` holds kWarps floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();  // everyone has read scratch before it is reused
  return total;
}

// A LayerNorm's mean and 1 / sqrt(var + eps) of the row ``h`` [d] in shared memory, in every thread.
__device__ __forceinline__ void row_stats(const float* h, int64_t d, float eps, float* scratch, float& mean,
                                          float& rstd) {
  float sum = 0.f, sq = 0.f;
  for (int64_t k = threadIdx.x; k < d; k += kThreads) {
    sum += h[k];
    sq += h[k] * h[k];
  }
  mean = block_sum(sum, scratch) / d;
  rstd = rsqrtf(fmaxf(block_sum(sq, scratch) / d - mean * mean, 0.f) + eps);
}

// grid (ceil(M / rows_per_block)), block kThreads, dynamic shared memory rows_per_block * (d + m) floats.
template <typename T, bool kLayerNorm>
__global__ void __launch_bounds__(kThreads)
    bottleneck_rows_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ wd,
                           const T* __restrict__ bd, const T* __restrict__ wu_t, const T* __restrict__ bu,
                           const float* __restrict__ scale, const T* __restrict__ ln_w, const T* __restrict__ ln_b,
                           const int* __restrict__ ids, const T* __restrict__ out_res,
                           const T* __restrict__ out_ln_w, const T* __restrict__ out_ln_b, T* __restrict__ y,
                           Params p, int rows_per_block) {
  extern __shared__ float shared[];
  float* h = shared;                            // [rows_per_block, d]
  float* z = shared + rows_per_block * p.d;     // [rows_per_block, m]
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  for (int r = 0; r < rows_per_block; ++r) {
    const int64_t row = first + r;
    if (row >= p.rows) break;
    const int a = ids == nullptr ? 0 : ids[row];
    const bool active = a >= 0 && a < p.adapters;
    const int64_t aa = active ? a : 0;
    float* hr = h + r * p.d;
    for (int64_t k = threadIdx.x; k < p.d; k += kThreads) hr[k] = static_cast<float>(x[row * p.x_stride + k]);
    __syncthreads();
    __shared__ float scratch[kWarps];
    if constexpr (kLayerNorm) {
      float mean, rstd;
      row_stats(hr, p.d, p.ln_eps, scratch, mean, rstd);
      for (int64_t k = threadIdx.x; k < p.d; k += kThreads) {
        hr[k] = (hr[k] - mean) * rstd * static_cast<float>(ln_w[aa * p.d + k]) +
                static_cast<float>(ln_b[aa * p.d + k]);
      }
      __syncthreads();
    }
    float* zr = z + r * p.m;
    for (int64_t j = warp; j < p.m; j += kWarps) {
      const T* wrow = wd + (aa * p.m + j) * p.d;
      float acc = 0.f;
      for (int64_t k = lane; k < p.d; k += kWarpSize) acc = fmaf(hr[k], static_cast<float>(wrow[k]), acc);
      acc = warp_sum(acc);
      if (lane == 0) {
        // the activations round to x's dtype before the up-projection, as the unfused module's do
        zr[j] = static_cast<float>(static_cast<T>(activate(acc + static_cast<float>(bd[aa * p.m + j]), p.activation)));
      }
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < p.d; k += kThreads) {
      const float residual = static_cast<float>(res[row * p.res_stride + k]);
      float out = residual;
      if (active) {
        float acc = static_cast<float>(bu[aa * p.d + k]);
        for (int64_t j = 0; j < p.m; ++j) acc = fmaf(zr[j], static_cast<float>(wu_t[(aa * p.m + j) * p.d + k]), acc);
        const float s = p.scale_kind == 0 ? p.scale_value
                                          : scale[p.scale_kind == 1 ? aa : aa * p.d + k];
        out = residual + s * acc;
      }
      if (out_res != nullptr) out += static_cast<float>(out_res[row * p.out_res_stride + k]);
      if (out_ln_w == nullptr) {
        y[row * p.d + k] = static_cast<T>(out);
      } else {
        hr[k] = static_cast<float>(static_cast<T>(out));  // the rounded sum, normalised below
      }
    }
    if (out_ln_w != nullptr) {
      __syncthreads();
      float mean, rstd;
      row_stats(hr, p.d, p.out_ln_eps, scratch, mean, rstd);
      for (int64_t k = threadIdx.x; k < p.d; k += kThreads) {
        y[row * p.d + k] = static_cast<T>((hr[k] - mean) * rstd * static_cast<float>(out_ln_w[k]) +
                                          static_cast<float>(out_ln_b[k]));
      }
    }
    __syncthreads();  // the next row reuses the shared rows
  }
}

void check_param(const char* name, const at::Tensor& t, const at::Tensor& x, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device() && t.is_contiguous(),
              "bottleneck_forward_cuda: ", name, " must be contiguous, of x's dtype and device");
  TORCH_CHECK(t.sizes().vec() == std::vector<int64_t>(shape), "bottleneck_forward_cuda: ", name, " must be ",
              at::IntArrayRef(shape), ", got ", t.sizes());
}

}  // namespace

at::Tensor bottleneck_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                   const at::Tensor& down_weight, const at::Tensor& down_bias,
                                   const at::Tensor& up_weight_t, const at::Tensor& up_bias,
                                   const std::optional<at::Tensor>& scale, double scale_value,
                                   const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                                   double ln_eps, const std::optional<at::Tensor>& ids, int64_t activation,
                                   const std::optional<at::Tensor>& out_residual,
                                   const std::optional<at::Tensor>& out_ln_weight,
                                   const std::optional<at::Tensor>& out_ln_bias, double out_ln_eps) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "bottleneck_forward_cuda: x must be CUDA rows [M, d]");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), d = x.size(1);
  TORCH_CHECK(down_weight.dim() == 3, "bottleneck_forward_cuda: down_weight must be [A, m, d]");
  const int64_t A = down_weight.size(0), m = down_weight.size(1);
  check_param("down_weight", down_weight, x, {A, m, d});
  check_param("down_bias", down_bias, x, {A, m});
  check_param("up_weight_t", up_weight_t, x, {A, m, d});
  check_param("up_bias", up_bias, x, {A, d});
  TORCH_CHECK(ln_weight.has_value() == ln_bias.has_value(), "bottleneck_forward_cuda: ln_weight and ln_bias together");
  if (ln_weight.has_value()) {
    check_param("ln_weight", *ln_weight, x, {A, d});
    check_param("ln_bias", *ln_bias, x, {A, d});
  }
  int scale_kind = 0;
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->dim() == 2 &&
                    scale->size(0) == A && (scale->size(1) == 1 || scale->size(1) == d),
                "bottleneck_forward_cuda: scale must be contiguous fp32 [A, 1] or [A, d]");
    scale_kind = scale->size(1) == 1 ? 1 : 2;
  }
  if (ids.has_value()) {
    TORCH_CHECK(ids->scalar_type() == at::kInt && ids->is_contiguous() && ids->numel() == M &&
                    ids->device() == x.device(),
                "bottleneck_forward_cuda: ids must be contiguous int32 [M]");
  }
  const at::Tensor res = residual.has_value() ? *residual : x;
  TORCH_CHECK(res.sizes() == x.sizes() && res.stride(1) == 1 && res.scalar_type() == x.scalar_type(),
              "bottleneck_forward_cuda: residual must be rows like x");
  TORCH_CHECK(!out_residual.has_value() || (out_residual->sizes() == x.sizes() && out_residual->stride(1) == 1 &&
                                             out_residual->scalar_type() == x.scalar_type()),
              "bottleneck_forward_cuda: out_residual must be rows like x");
  TORCH_CHECK(out_ln_weight.has_value() == out_ln_bias.has_value(),
              "bottleneck_forward_cuda: out_ln_weight and out_ln_bias together");
  if (out_ln_weight.has_value()) {
    check_param("out_ln_weight", *out_ln_weight, x, {d});
    check_param("out_ln_bias", *out_ln_bias, x, {d});
  }
  auto y = at::empty({M, d}, x.options());
  if (M == 0) return y;
  const int64_t per_row = (d + m) * static_cast<int64_t>(sizeof(float));
  TORCH_CHECK(per_row <= kSharedBudget, "bottleneck_forward_cuda: d + m = ", d + m, " exceeds the kernel's shared memory");
  const int rows_per_block = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(8, kSharedBudget / per_row)));
  Params p{M, d, m, A, x.stride(0), res.stride(0), out_residual.has_value() ? out_residual->stride(0) : 0,
           scale_kind, static_cast<float>(scale_value), static_cast<float>(ln_eps), static_cast<float>(out_ln_eps),
           static_cast<int>(activation)};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((M + rows_per_block - 1) / rows_per_block);
  const size_t shared = static_cast<size_t>(rows_per_block) * per_row;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bottleneck_forward_cuda", [&] {
    const bool ln = ln_weight.has_value();
    auto kernel = ln ? bottleneck_rows_kernel<scalar_t, true> : bottleneck_rows_kernel<scalar_t, false>;
    kernel<<<blocks, kThreads, shared, stream>>>(
        x.data_ptr<scalar_t>(), res.data_ptr<scalar_t>(), down_weight.data_ptr<scalar_t>(),
        down_bias.data_ptr<scalar_t>(), up_weight_t.data_ptr<scalar_t>(), up_bias.data_ptr<scalar_t>(),
        scale.has_value() ? scale->data_ptr<float>() : nullptr, ln ? ln_weight->data_ptr<scalar_t>() : nullptr,
        ln ? ln_bias->data_ptr<scalar_t>() : nullptr, ids.has_value() ? ids->data_ptr<int>() : nullptr,
        out_residual.has_value() ? out_residual->data_ptr<scalar_t>() : nullptr,
        out_ln_weight.has_value() ? out_ln_weight->data_ptr<scalar_t>() : nullptr,
        out_ln_bias.has_value() ? out_ln_bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), p,
        rows_per_block);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace fastpeft
