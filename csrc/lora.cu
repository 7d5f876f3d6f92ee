// The `lora` op family on CUDA: y = x @ W.T + bias + scaling * (x @ A.T) @ B.T.
//
// Decode (few rows) is memory-bound: the time is reading W once. Two kernels keep every byte read once:
//   lora_shrink_kernel       xa[m, r] = x[m, :] . A[r, :]        fp32, one block per (r, chunk of rows)
//   lora_gemv_expand_kernel  y[m, n]  = x[m, :] . W[n, :] + scaling * xa[m, :] . B[n, :] + bias[n]
//                            one warp per output feature n, 16-byte loads of W, fp32 accumulation
// Large M is compute-bound: the base GEMM with the bias goes to cuBLAS through ATen, and the rank-r terms run
// on one small tiled kernel, `C (+)= alpha * P @ Q.T` with fp32 math (small_gemm_nt_kernel):
//   shrink (M > kShrinkMaxRows)  xa[m, r] = x[m, :] . A[r, :]               written in fp32
//   expand                        y[m, n] += scaling * xa[m, :] . B[n, :]    xa read in fp32
// so xa never round-trips through the input dtype (fp16 would overflow where fp32 does not).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "cuda_utils.cuh"
#include "lora.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRowsPerPass = 8;      // rows of x one block handles, accumulators held in registers
constexpr int64_t kGemvMaxRows = 8;  // above this, W would be re-read per pass: cuBLAS instead
constexpr int64_t kShrinkMaxRows = 64;

// Dot products of one row `w` (length K) with up to kRowsPerPass rows of x, split over the threads
// [first, first + stride) of the caller; each thread returns its partial sums in acc.
template <typename T, bool kVector>
__device__ __forceinline__ void partial_dots(const T* __restrict__ w, const T* __restrict__ x, int64_t x_stride,
                                             int rows, int K, int first, int stride, float (&acc)[kRowsPerPass]) {
  if constexpr (kVector) {
    constexpr int V = vec_width<T>();
#pragma unroll 2
    for (int k = first * V; k < K; k += stride * V) {
      float wv[V];
      load_vec(w + k, wv);
#pragma unroll
      for (int i = 0; i < kRowsPerPass; ++i) {
        if (i < rows) {
          float xv[V];
          load_vec(x + i * x_stride + k, xv);
#pragma unroll
          for (int j = 0; j < V; ++j) acc[i] = fmaf(wv[j], xv[j], acc[i]);
        }
      }
    }
  } else {
    for (int k = first; k < K; k += stride) {
      const float wk = static_cast<float>(w[k]);
#pragma unroll
      for (int i = 0; i < kRowsPerPass; ++i) {
        if (i < rows) acc[i] = fmaf(wk, static_cast<float>(x[i * x_stride + k]), acc[i]);
      }
    }
  }
}

// grid (R, ceil(M / kRowsPerPass)), block kThreads. x: [M, K] rows x_stride apart; a: [R, K] contiguous.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) lora_shrink_kernel(const T* __restrict__ x, const T* __restrict__ a,
                                                               float* __restrict__ xa, int M, int K, int R,
                                                               int64_t x_stride) {
  const int r = blockIdx.x;
  const int m0 = blockIdx.y * kRowsPerPass;
  const int rows = min(kRowsPerPass, M - m0);
  float acc[kRowsPerPass] = {};
  partial_dots<T, kVector>(a + static_cast<int64_t>(r) * K, x + m0 * x_stride, x_stride, rows, K, threadIdx.x,
                           kThreads, acc);

  __shared__ float partial[kRowsPerPass][kWarps];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int i = 0; i < kRowsPerPass; ++i) {
    const float s = warp_sum(acc[i]);
    if (lane == 0) partial[i][warp] = s;
  }
  __syncthreads();
  if (threadIdx.x < rows) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += partial[threadIdx.x][w];
    xa[static_cast<int64_t>(m0 + threadIdx.x) * R + r] = s;
  }
}

// grid (ceil(N / kWarps), ceil(M / kRowsPerPass)), block kThreads: warp w computes output feature
// n = blockIdx.x * kWarps + w for the block's rows. w: [N, K] rows w_stride apart; b: [N, R] rows
// b_stride apart; xa: [M, R] fp32 contiguous; y: [M, N] contiguous; bias: [N] or nullptr.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    lora_gemv_expand_kernel(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ xa,
                            const T* __restrict__ b, const T* __restrict__ bias, T* __restrict__ y, int M, int N,
                            int K, int R, int64_t x_stride, int64_t w_stride, int64_t b_stride, float scaling) {
  const int lane = threadIdx.x % kWarpSize;
  const int n = blockIdx.x * kWarps + threadIdx.x / kWarpSize;
  if (n >= N) return;  // whole warps leave; the kernel has no block-wide barrier
  const int m0 = blockIdx.y * kRowsPerPass;
  const int rows = min(kRowsPerPass, M - m0);

  float acc[kRowsPerPass] = {};
  partial_dots<T, kVector>(w + n * w_stride, x + m0 * x_stride, x_stride, rows, K, lane, kWarpSize, acc);

  const T* b_row = b + n * b_stride;
  const float bias_n = bias != nullptr ? static_cast<float>(bias[n]) : 0.f;
#pragma unroll
  for (int i = 0; i < kRowsPerPass; ++i) {
    if (i < rows) {
      const float* xa_row = xa + static_cast<int64_t>(m0 + i) * R;
      float lora = 0.f;
      for (int r = lane; r < R; r += kWarpSize) lora = fmaf(xa_row[r], static_cast<float>(b_row[r]), lora);
      const float base = warp_sum(acc[i]);
      lora = warp_sum(lora);
      if (lane == 0) y[static_cast<int64_t>(m0 + i) * N + n] = static_cast<T>(base + scaling * lora + bias_n);
    }
  }
}

// C[m, n] = (kAccumulate ? C[m, n] : 0) + alpha * sum_k P[m, k] * Q[n, k], in fp32, rounded once into C.
// grid (ceil(N / kTileN), ceil(M / kTileM)), block kThreads. Thread t owns column t % kTileN of the tile and
// kTileM / (kThreads / kTileN) consecutive rows; tiles of P and Q are staged in shared memory kTileK at a time.
// One kernel serves the large-M shrink (N = r is small) and the expand epilogue (K = r is small).
constexpr int kTileM = 64;
constexpr int kTileN = 32;
constexpr int kTileK = 32;
constexpr int kRowsPerThread = kTileM / (kThreads / kTileN);

template <typename TP, typename TQ, typename TC, bool kAccumulate>
__global__ void __launch_bounds__(kThreads)
    small_gemm_nt_kernel(const TP* __restrict__ p, int64_t p_stride_m, int64_t p_stride_k, const TQ* __restrict__ q,
                         int64_t q_stride_n, int64_t q_stride_k, TC* __restrict__ c, int64_t c_stride_m,
                         int64_t c_stride_n, int M, int N, int K, float alpha) {
  __shared__ float p_tile[kTileM][kTileK + 1];  // +1: threads of a warp read one k of different rows/columns
  __shared__ float q_tile[kTileN][kTileK + 1];
  const int m0 = blockIdx.y * kTileM;
  const int n0 = blockIdx.x * kTileN;
  const int col = threadIdx.x % kTileN;
  const int row0 = (threadIdx.x / kTileN) * kRowsPerThread;
  float acc[kRowsPerThread] = {};

  for (int k0 = 0; k0 < K; k0 += kTileK) {
    for (int i = threadIdx.x; i < kTileM * kTileK; i += kThreads) {
      const int m = m0 + i / kTileK, k = k0 + i % kTileK;
      p_tile[i / kTileK][i % kTileK] = (m < M && k < K) ? static_cast<float>(p[m * p_stride_m + k * p_stride_k]) : 0.f;
    }
    for (int i = threadIdx.x; i < kTileN * kTileK; i += kThreads) {
      const int n = n0 + i / kTileK, k = k0 + i % kTileK;
      q_tile[i / kTileK][i % kTileK] = (n < N && k < K) ? static_cast<float>(q[n * q_stride_n + k * q_stride_k]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kTileK; ++k) {
      const float qv = q_tile[col][k];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) acc[i] = fmaf(p_tile[row0 + i][k], qv, acc[i]);
    }
    __syncthreads();  // the next chunk overwrites the tiles
  }

  const int n = n0 + col;
  if (n >= N) return;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int m = m0 + row0 + i;
    if (m < M) {
      TC* out = c + m * c_stride_m + n * c_stride_n;
      const float prior = kAccumulate ? static_cast<float>(*out) : 0.f;
      *out = static_cast<TC>(prior + alpha * acc[i]);
    }
  }
}

template <typename TP, typename TQ, typename TC, bool kAccumulate>
void launch_small_gemm_nt(const at::Tensor& p, const at::Tensor& q, at::Tensor& c, float alpha) {
  const int64_t M = p.size(0), N = q.size(0), K = p.size(1);
  if (M == 0 || N == 0) return;
  // Row tiles go on grid.y: more than kMaxGridY of them (4M rows) run as several launches.
  constexpr int64_t kChunkRows = kMaxGridY * kTileM;
  for (int64_t m0 = 0; m0 < M; m0 += kChunkRows) {
    const int64_t rows = std::min(kChunkRows, M - m0);
    const dim3 grid(static_cast<unsigned>((N + kTileN - 1) / kTileN), static_cast<unsigned>((rows + kTileM - 1) / kTileM));
    small_gemm_nt_kernel<TP, TQ, TC, kAccumulate><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        p.data_ptr<TP>() + m0 * p.stride(0), p.stride(0), p.stride(1), q.data_ptr<TQ>(), q.stride(0), q.stride(1),
        c.data_ptr<TC>() + m0 * c.stride(0), c.stride(0), c.stride(1), static_cast<int>(rows), static_cast<int>(N),
        static_cast<int>(K), alpha);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// 16-byte loads need rows that start on 16-byte boundaries.
bool can_vectorize(const at::Tensor& rows_tensor, int64_t elems_per_vec) {
  return aligned16(rows_tensor) && rows_tensor.stride(0) % elems_per_vec == 0 && rows_tensor.size(1) % elems_per_vec == 0;
}

// Kernels read rows with unit stride along K; other layouts are copied (small tensors only reach here).
at::Tensor unit_inner_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

void check_inputs(const char* op, const at::Tensor& x, std::initializer_list<std::pair<const char*, at::Tensor>> others) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, op, ": x must be a 2-D CUDA tensor, got ", x.sizes());
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", x on ", x.device());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", x ",
                x.scalar_type());
  }
}

}  // namespace

at::Tensor lora_shrink_cuda(const at::Tensor& x_in, const at::Tensor& lora_a_in) {
  check_inputs("lora_shrink_cuda", x_in, {{"lora_a", lora_a_in}});
  TORCH_CHECK(lora_a_in.dim() == 2 && lora_a_in.size(1) == x_in.size(1), "lora_shrink_cuda: lora_a must be [r, ",
              x_in.size(1), "], got ", lora_a_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0), K = x_in.size(1), R = lora_a_in.size(0);
  auto xa = at::empty({M, R}, x_in.options().dtype(at::kFloat));
  if (M == 0 || R == 0) return xa;
  if (M > kShrinkMaxRows) {  // many rows: tiles of x reused across the r outputs, strides as given
    FASTPEFT_DISPATCH_FLOATS(x_in.scalar_type(), "lora_shrink_cuda", [&] {
      launch_small_gemm_nt<scalar_t, scalar_t, float, false>(x_in, lora_a_in, xa, 1.f);
    });
    return xa;
  }
  const at::Tensor x = unit_inner_stride(x_in);
  const at::Tensor a = lora_a_in.contiguous();
  const dim3 grid(static_cast<unsigned>(R), static_cast<unsigned>((M + kRowsPerPass - 1) / kRowsPerPass));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTPEFT_DISPATCH_FLOATS(x.scalar_type(), "lora_shrink_cuda", [&] {
    const int64_t v = vec_width<scalar_t>();
    const bool vec = can_vectorize(x, v) && can_vectorize(a, v);
    auto kernel = vec ? lora_shrink_kernel<scalar_t, true> : lora_shrink_kernel<scalar_t, false>;
    kernel<<<grid, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), xa.data_ptr<float>(),
                                          static_cast<int>(M), static_cast<int>(K), static_cast<int>(R),
                                          x.stride(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return xa;
}

at::Tensor lora_expand_linear_cuda(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& xa_in,
                                   const at::Tensor& lora_b, double scaling, const std::optional<at::Tensor>& bias) {
  check_inputs("lora_expand_linear_cuda", x_in, {{"weight", weight}, {"lora_b", lora_b}});
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight.size(0), R = lora_b.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, "lora_expand_linear_cuda: weight must be [N, ", K, "]");
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(0) == N, "lora_expand_linear_cuda: lora_b must be [", N, ", r]");
  TORCH_CHECK(xa_in.scalar_type() == at::kFloat && xa_in.dim() == 2 && xa_in.size(0) == M && xa_in.size(1) == R,
              "lora_expand_linear_cuda: xa must be fp32 [", M, ", ", R, "], got ", xa_in.scalar_type(), " ",
              xa_in.sizes());
  TORCH_CHECK(xa_in.device() == x_in.device(), "lora_expand_linear_cuda: xa is on ", xa_in.device(), ", x on ",
              x_in.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x_in.scalar_type() && bias->numel() == N && bias->device() == x_in.device(),
                "lora_expand_linear_cuda: bias must be [", N, "] of x's dtype and device");
  }
  const c10::cuda::CUDAGuard guard(x_in.device());

  const bool gemv = M <= kGemvMaxRows && weight.stride(1) == 1 && lora_b.stride(1) == 1;
  if (!gemv) {
    at::Tensor y = bias.has_value() ? at::addmm(*bias, x_in, weight.t()) : at::mm(x_in, weight.t());
    FASTPEFT_DISPATCH_FLOATS(x_in.scalar_type(), "lora_expand_linear_cuda", [&] {
      launch_small_gemm_nt<float, scalar_t, scalar_t, true>(xa_in, lora_b, y, static_cast<float>(scaling));
    });
    return y;
  }
  auto y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor x = unit_inner_stride(x_in);
  const at::Tensor xa = xa_in.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps),
                  static_cast<unsigned>((M + kRowsPerPass - 1) / kRowsPerPass));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTPEFT_DISPATCH_FLOATS(x.scalar_type(), "lora_expand_linear_cuda", [&] {
    const int64_t v = vec_width<scalar_t>();
    const bool vec = can_vectorize(x, v) && can_vectorize(weight, v);
    auto kernel = vec ? lora_gemv_expand_kernel<scalar_t, true> : lora_gemv_expand_kernel<scalar_t, false>;
    kernel<<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), xa.data_ptr<float>(), lora_b.data_ptr<scalar_t>(),
        bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), static_cast<int>(M),
        static_cast<int>(N), static_cast<int>(K), static_cast<int>(R), x.stride(0), weight.stride(0),
        lora_b.stride(0), static_cast<float>(scaling));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scaling, const std::optional<at::Tensor>& bias) {
  return lora_expand_linear_cuda(x, weight, lora_shrink_cuda(x, lora_a), lora_b, scaling, bias);
}

}  // namespace fastpeft
