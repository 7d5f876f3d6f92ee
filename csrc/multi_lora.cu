// The `multi_lora` op family on CUDA: per-token (decode) shrink and expand over an adapter pool, punica's BGMV
// shape. Prefill batches run the Triton tile kernels (fastpeft/ops/multi_lora.py prefers them above 64 rows).
//
//   multi_lora_shrink_kernel  v[t, r] = x[t, :] . A[start(id) + r, :]   one block per token, a warp per rank row,
//                             16-byte loads of A and x, fp32 accumulation
//   multi_lora_expand_kernel  y[t, n] = base[t, n] + s * v[t, :r] . B_t[:r, n]   a thread per output column, B's
//                             rows read coalesced, one launch for every output slice (grid z)
//
// An id outside [0, num_adapters) reads nothing: the token's v row is zero and it gets the base output. Grids
// depend on shapes only and nothing is allocated from the ids' values, so both launches are capturable.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "cuda_utils.cuh"
#include "multi_lora.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

__device__ __forceinline__ bool in_pool(int id, int num_adapters) { return id >= 0 && id < num_adapters; }

// grid (M), block kThreads. x: [M, K] rows x_stride apart, unit inner stride; a: [P, K] contiguous.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    multi_lora_shrink_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ a,
                             const int* __restrict__ a_offsets, const int* __restrict__ ids, int num_adapters,
                             float* __restrict__ v, int v_width, int K) {
  const int t = blockIdx.x;
  const int id = ids[t];
  const bool valid = in_pool(id, num_adapters);
  const int start = valid ? a_offsets[id] : 0;
  const int rank = valid ? a_offsets[id + 1] - start : 0;
  const T* x_row = x + t * x_stride;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int r = warp; r < v_width; r += kWarps) {
    float acc = 0.f;
    if (r < rank) {  // uniform across the warp, so the warp sum below sees every lane
      const T* a_row = a + static_cast<int64_t>(start + r) * K;
      if constexpr (kVector) {
        constexpr int V = vec_width<T>();
        for (int k = lane * V; k < K; k += kWarpSize * V) {
          float av[V], xv[V];
          load_vec(a_row + k, av);
          load_vec(x_row + k, xv);
#pragma unroll
          for (int j = 0; j < V; ++j) acc = fmaf(av[j], xv[j], acc);
        }
      } else {
        for (int k = lane; k < K; k += kWarpSize) {
          acc = fmaf(static_cast<float>(a_row[k]), static_cast<float>(x_row[k]), acc);
        }
      }
      acc = warp_sum(acc);
    }
    if (lane == 0) v[static_cast<int64_t>(t) * v_width + r] = acc;
  }
}

// grid (M, ceil(max_width / kThreads), S), block kThreads: thread n of slice s. base, y: [M, N] contiguous;
// v: [M, v_width] fp32 contiguous; tables [S, n] row-major.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    multi_lora_expand_kernel(const T* __restrict__ base, const float* __restrict__ v, int v_width,
                             const T* __restrict__ b, const int* __restrict__ ids, int num_adapters,
                             const int* __restrict__ ranks, const int* __restrict__ v_starts,
                             const int64_t* __restrict__ b_starts, const float* __restrict__ scalings,
                             const int* __restrict__ out_starts, T* __restrict__ y, int N) {
  const int t = blockIdx.x, s = blockIdx.z;
  const int out_start = out_starts[s];
  const int width = out_starts[s + 1] - out_start;
  const int col = blockIdx.y * kThreads + threadIdx.x;
  if (col >= width) return;  // slices narrower than the widest leave threads idle; no barrier follows
  const int id = ids[t];
  float delta = 0.f;
  if (in_pool(id, num_adapters)) {
    const int at = s * num_adapters + id;
    const int rank = ranks[at];
    const float* v_row = v + static_cast<int64_t>(t) * v_width + v_starts[at];
    const T* b_col = b + b_starts[at] + col;
    for (int r = 0; r < rank; ++r) {
      delta = fmaf(v_row[r], static_cast<float>(b_col[static_cast<int64_t>(r) * width]), delta);
    }
    delta *= scalings[at];
  }
  const int64_t at_y = static_cast<int64_t>(t) * N + out_start + col;
  y[at_y] = static_cast<T>(static_cast<float>(base[at_y]) + delta);
}

void check_table(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == dtype && t.device() == x.device() && t.is_contiguous(), op, ": ", name,
              " must be a contiguous ", dtype, " tensor on ", x.device(), ", got ", t.scalar_type(), " on ",
              t.device());
}

// Kernels read ids as int32 (a fixed-size conversion: still capturable).
at::Tensor int32_ids(const char* op, const at::Tensor& ids, const at::Tensor& x, int64_t rows) {
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
              ": adapter_ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == rows && ids.device() == x.device(), op, ": adapter_ids must be [",
              rows, "] on ", x.device(), ", got ", ids.sizes(), " on ", ids.device());
  return ids.to(at::kInt).contiguous();
}

}  // namespace

at::Tensor multi_lora_shrink_cuda(const at::Tensor& x_in, const at::Tensor& lora_a_in, const at::Tensor& a_offsets,
                                  const at::Tensor& adapter_ids, int64_t v_width) {
  constexpr const char* op = "multi_lora_shrink_cuda";
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 2, op, ": x must be a 2-D CUDA tensor, got ", x_in.sizes());
  TORCH_CHECK(lora_a_in.dim() == 2 && lora_a_in.size(1) == x_in.size(1) &&
                  lora_a_in.scalar_type() == x_in.scalar_type() && lora_a_in.device() == x_in.device(),
              op, ": lora_a must be [P, ", x_in.size(1), "] of x's dtype and device, got ", lora_a_in.sizes());
  check_table(op, "a_offsets", a_offsets, at::kInt, x_in);
  TORCH_CHECK(a_offsets.dim() == 1 && a_offsets.numel() >= 1, op, ": a_offsets must be [num_adapters + 1]");
  TORCH_CHECK(v_width >= 1, op, ": v_width must be positive");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0), K = x_in.size(1);
  const at::Tensor ids = int32_ids(op, adapter_ids, x_in, M);
  auto v = at::empty({M, v_width}, x_in.options().dtype(at::kFloat));
  if (M == 0) return v;
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor a = lora_a_in.contiguous();
  const int num_adapters = static_cast<int>(a_offsets.numel() - 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTPEFT_DISPATCH_FLOATS(x.scalar_type(), op, [&] {
    const int64_t vec = vec_width<scalar_t>();
    const bool vector = aligned16(x) && aligned16(a) && x.stride(0) % vec == 0 && K % vec == 0;
    auto kernel = vector ? multi_lora_shrink_kernel<scalar_t, true> : multi_lora_shrink_kernel<scalar_t, false>;
    kernel<<<static_cast<unsigned>(M), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), a.data_ptr<scalar_t>(), a_offsets.data_ptr<int>(), ids.data_ptr<int>(),
        num_adapters, v.data_ptr<float>(), static_cast<int>(v_width), static_cast<int>(K));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return v;
}

at::Tensor multi_lora_expand_cuda(const at::Tensor& base_in, const at::Tensor& v_in, const at::Tensor& lora_b,
                                  const at::Tensor& adapter_ids, const at::Tensor& ranks, const at::Tensor& v_starts,
                                  const at::Tensor& b_starts, const at::Tensor& scalings,
                                  const at::Tensor& out_starts, int64_t max_width) {
  constexpr const char* op = "multi_lora_expand_cuda";
  TORCH_CHECK(base_in.is_cuda() && base_in.dim() == 2, op, ": base must be a 2-D CUDA tensor, got ", base_in.sizes());
  const int64_t M = base_in.size(0), N = base_in.size(1);
  TORCH_CHECK(v_in.scalar_type() == at::kFloat && v_in.dim() == 2 && v_in.size(0) == M &&
                  v_in.device() == base_in.device(),
              op, ": v must be fp32 [", M, ", v_width] on base's device, got ", v_in.scalar_type(), " ", v_in.sizes());
  TORCH_CHECK(lora_b.scalar_type() == base_in.scalar_type() && lora_b.dim() == 1 && lora_b.is_contiguous() &&
                  lora_b.device() == base_in.device(),
              op, ": lora_b must be a flat contiguous tensor of base's dtype and device");
  check_table(op, "ranks", ranks, at::kInt, base_in);
  check_table(op, "v_starts", v_starts, at::kInt, base_in);
  check_table(op, "b_starts", b_starts, at::kLong, base_in);
  check_table(op, "scalings", scalings, at::kFloat, base_in);
  check_table(op, "out_starts", out_starts, at::kInt, base_in);
  TORCH_CHECK(ranks.dim() == 2 && v_starts.sizes() == ranks.sizes() && b_starts.sizes() == ranks.sizes() &&
                  scalings.sizes() == ranks.sizes() && out_starts.numel() == ranks.size(0) + 1,
              op, ": ranks, v_starts, b_starts, scalings must be [S, n] and out_starts [S + 1]");
  TORCH_CHECK(max_width >= 1 && max_width <= N, op, ": max_width must be in [1, ", N, "], got ", max_width);
  const c10::cuda::CUDAGuard guard(base_in.device());
  const at::Tensor ids = int32_ids(op, adapter_ids, base_in, M);
  const at::Tensor base = base_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  auto y = at::empty({M, N}, base.options());
  if (M == 0 || N == 0) return y;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>((max_width + kThreads - 1) / kThreads),
                  static_cast<unsigned>(ranks.size(0)));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTPEFT_DISPATCH_FLOATS(base.scalar_type(), op, [&] {
    multi_lora_expand_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        base.data_ptr<scalar_t>(), v.data_ptr<float>(), static_cast<int>(v.size(1)), lora_b.data_ptr<scalar_t>(),
        ids.data_ptr<int>(), static_cast<int>(ranks.size(1)), ranks.data_ptr<int>(), v_starts.data_ptr<int>(),
        b_starts.data_ptr<int64_t>(), scalings.data_ptr<float>(), out_starts.data_ptr<int>(), y.data_ptr<scalar_t>(),
        static_cast<int>(N));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace fastpeft
