// The `qlora` op family on CUDA: products with a 4-bit (NF4/FP4, bitsandbytes' layout) weight, dequantized on
// chip. Every weight is code[q] * absmax in fp32 (the nested absmax decoded in place), rounded to the weight's
// dtype (bitsandbytes' dequantized value) and then to x's dtype, as bitsandbytes' matmul_4bit computes it.
//
//   gemv_4bit_vector_kernel  decode (M <= 16, K % 32 == 0): every row of x in one pass (W read once), x staged
//                      in shared memory per 1024 columns and read back as 16-byte vectors, a warp per two output
//                      features, 16-byte loads of packed weights (32 per lane), a byte's two code values in one
//                      8-byte read of a byte-pair table, fp32 accumulation, bias and the LoRA expand in the epilogue;
//                      on sm_90 the adapter's shrink x A^T too, shared by a cluster of blocks: one launch per layer
//   gemv_4bit_kernel   decode for any K: a warp per output feature, a weight per lane per step
//   gemm_4bit_kernel   16-bit prefill and the backward's dx: 64x64 output tiles, the weight tile dequantized
//                      into shared memory and fed to the tensor cores (WMMA 16x16x16, fp32 accumulators)
//   simple_4bit_kernel fp32 activations beyond decode: a thread per output, the weight decoded per element
//   dequantize_4bit_kernel  prefill's dequantize-once tier: W written once in x's dtype (a bandwidth pass:
//                      a 128-bit load of 16 packed bytes per thread, 32 weights out as 128-bit stores), after
//                      which the prefill GEMM runs on the dense weight (fastpeft/ops/qlora.py)
//
// The Triton kernels (triton_kernels/qlora.py) cover the same ops; fastpeft/ops/qlora.py picks per shape.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cluster.cuh"
#include "cuda_utils.cuh"
#include "lora.h"
#include "qlora.h"

namespace fastpeft {
namespace {

constexpr int kDecodeMaxM = 16;

// The 4-bit weight as every kernel reads it.
struct Weight4bit {
  const uint8_t* packed;
  const float* absmax;    // fp32 [blocks], when not nested
  const uint8_t* qabsmax; // uint8 [blocks], when nested (else nullptr)
  const float* code;      // [16]
  const float* absmax2;   // nested: fp32 [blocks / nested_blocksize]
  const float* code2;     // nested: fp32 [256]
  const float* offset;    // nested: fp32 [1]
  int64_t K;              // W's columns (in_features)
  int log2_blocksize;
  int log2_nested;
  int w_kind;  // the dtype the values round to: 0 fp32, 1 fp16, 2 bf16
};

// The LoRA epilogue: out[m, j] += scaling * sum_r left[m, r] * right[j, r] (left fp32, right of x's dtype).
template <typename T>
struct LoRAEpilogue {
  const float* left;
  int64_t left_stride;
  const T* right;
  int64_t right_stride_j;
  int64_t right_stride_r;
  int R;
  float scaling;
};

// The adapter's shrink xa = x A^T computed by the GEMV's own launch (gemv_4bit_vector_kernel<..., kShrink>): the
// blocks of a cluster each take 1/cluster of every slab's columns of x (already in shared memory), so A is read
// once per cluster from L2; their partial sums meet through distributed shared memory.
template <typename T>
struct FusedShrink {
  const T* a;  // lora_a [R, K]
  int64_t stride_r;
  int64_t stride_k;
  int R;
  int cluster;
};

// Ranks up to this run the fused shrink (its partial and whole sums, 2 * M * R fp32, beside x's slab).
constexpr int kFusedShrinkMaxR = 32;

__device__ __forceinline__ float block_scale(const Weight4bit& w, int64_t block) {
  if (w.qabsmax != nullptr) {
    // bitsandbytes' order: the product rounded to fp32, then the offset added (no fused multiply-add).
    return __fadd_rn(__fmul_rn(w.code2[w.qabsmax[block]], w.absmax2[block >> w.log2_nested]), *w.offset);
  }
  return w.absmax[block];
}

__device__ __forceinline__ float round_weight(float v, int kind) {
  if (kind == 1) return __half2float(__float2half_rn(v));
  if (kind == 2) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

// One weight as x's dtype T sees it, widened back to fp32.
template <typename T>
__device__ __forceinline__ float decode_weight(const Weight4bit& w, const float* code, int q, float scale) {
  return static_cast<float>(static_cast<T>(round_weight(__fmul_rn(code[q], scale), w.w_kind)));
}

// The kind (Weight4bit::w_kind) of x's dtype T: a weight rounded to it needs no second rounding.
template <typename T>
constexpr int kind_of() {
  return std::is_same_v<T, at::Half> ? 1 : (std::is_same_v<T, at::BFloat16> ? 2 : 0);
}

// The two weights of one byte (code values hi, lo), scaled and rounded to the weight's dtype, as the 16-bit
// bits of T (low half: the high nibble's weight, at the lower address). kOneRounding: the weight's dtype is T
// (bitsandbytes' usual case), so one packed conversion (F2FP, two results per instruction; a scalar F2F costs
// as much as eight FMAs per result) rounds both; otherwise each is rounded to the weight's dtype, then to T.
template <typename T, bool kOneRounding>
__device__ __forceinline__ uint32_t pair_bits_16(float hi, float lo, float scale, int w_kind) {
  hi = __fmul_rn(hi, scale);
  lo = __fmul_rn(lo, scale);
  if constexpr (kOneRounding && std::is_same_v<T, at::BFloat16>) {
    const __nv_bfloat162 r = __floats2bfloat162_rn(hi, lo);
    return *reinterpret_cast<const uint32_t*>(&r);
  } else if constexpr (kOneRounding) {
    const __half2 r = __floats2half2_rn(hi, lo);
    return *reinterpret_cast<const uint32_t*>(&r);
  } else {
    const T a = static_cast<T>(round_weight(hi, w_kind)), b = static_cast<T>(round_weight(lo, w_kind));
    return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&a)) |
           (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&b)) << 16);
  }
}

// The same pair widened back to fp32 for the products (T = float: rounded to the weight's dtype only).
template <typename T, bool kOneRounding>
__device__ __forceinline__ float2 decode_pair(float2 codes, float scale, int w_kind) {
  if constexpr (std::is_same_v<T, float>) {
    return make_float2(round_weight(__fmul_rn(codes.x, scale), w_kind),
                       round_weight(__fmul_rn(codes.y, scale), w_kind));
  } else {
    const uint32_t bits = pair_bits_16<T, kOneRounding>(codes.x, codes.y, scale, w_kind);
    if constexpr (std::is_same_v<T, at::BFloat16>) {  // bf16 -> fp32 is a shift
      return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xFFFF0000u));
    } else {
      return __half22float2(*reinterpret_cast<const __half2*>(&bits));
    }
  }
}

template <typename T>
__device__ __forceinline__ float weight_at(const Weight4bit& w, const float* code, int64_t row, int64_t col) {
  const int64_t e = row * w.K + col;
  const uint8_t byte = w.packed[e >> 1];
  const int q = (e & 1) ? (byte & 0xF) : (byte >> 4);
  return decode_weight<T>(w, code, q, block_scale(w, e >> w.log2_blocksize));
}

__device__ __forceinline__ void load_code(const Weight4bit& w, float* code) {
  if (threadIdx.x < 16) code[threadIdx.x] = w.code[threadIdx.x];
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ float lora_term(const LoRAEpilogue<T>& lora, int64_t m, int64_t j) {
  float sum = 0.f;
  for (int r = 0; r < lora.R; ++r) {
    sum = fmaf(lora.left[m * lora.left_stride + r],
               static_cast<float>(lora.right[j * lora.right_stride_j + r * lora.right_stride_r]), sum);
  }
  return lora.scaling * sum;
}

// ---------------------------------------------------------------------------------------------------------
// Decode: GEMVs, a warp per output feature or a few
// ---------------------------------------------------------------------------------------------------------

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / kWarpSize;
constexpr int kGemvRows = 8;     // the scalar path: rows of x per pass over a row of W
constexpr int kGemvSlab = 1024;  // the vector path: x's columns staged in shared memory per step (32 per lane)

// The GEMV epilogue of one output (row m, feature n), the whole warp taking part: the lanes' partial sums reduced,
// the LoRA expand scaling * xa[m] . B[n] and the bias added; lane 0 stores.
template <typename T>
__device__ __forceinline__ void gemv_store(float partial, const LoRAEpilogue<T>& lora, const T* bias, T* y,
                                           int64_t y_stride, int64_t m, int64_t n, int lane) {
  const float base = warp_sum(partial);
  float delta = 0.f;
  if (lora.R > 0) {
    for (int j = lane; j < lora.R; j += kWarpSize) {
      delta = fmaf(lora.left[m * lora.left_stride + j],
                   static_cast<float>(lora.right[n * lora.right_stride_j + j * lora.right_stride_r]), delta);
    }
    delta = lora.scaling * warp_sum(delta);
  }
  if (lane == 0) {
    float out = base + delta;
    if (bias != nullptr) out += static_cast<float>(bias[n]);
    y[m * y_stride + n] = static_cast<T>(out);
  }
}

// The vector path holds every row of x in one pass (kMaxRows: 4, or 16 for decode's largest M) and computes
// kFeatures output features per warp, which share each read of x from shared memory: 4 for a few rows (x's
// shared-memory reads then cost a quarter of a byte-pair lookup per weight), 2 for 16 rows (the accumulators
// fill the registers).
template <int kMaxRows>
constexpr int gemv_features() {
  return kMaxRows <= 4 ? 4 : 2;
}

// The vector GEMV's shared memory: x [M, kGemvSlab] of x's dtype, then the byte -> (code[hi], code[lo]) table,
// then (with the fused shrink of rank R) the block's partial xa [M, R] and the cluster's whole xa [M, R], fp32.
template <typename T>
size_t gemv_shared_bytes(int M, int R = 0) {
  return static_cast<size_t>(M) * kGemvSlab * sizeof(T) + 256 * sizeof(float2) +
         2 * static_cast<size_t>(M) * R * sizeof(float);
}

// Decode, K % 32 == 0 and 16-byte aligned bytes: a warp per kFeatures output features, every row of x in one
// pass, so W's bytes are read once whatever M. Per step of kGemvSlab columns the block stages x's slab in shared
// memory (once for all its warps' features); each lane then takes one 16-byte chunk (32 weights of one absmax
// block) of each of its warp's features, decodes a byte's two weights with one 8-byte read of the byte-pair
// table, and reads x back as 16-byte vectors. fp32 accumulation; bias and the LoRA expand in the epilogue.
// kShrink (sm_90, a grid of whole clusters of shrink.cluster blocks): the expand's xa = x A^T is computed here
// too. While a slab of x is in shared memory, each block of the cluster adds its share of the slab's columns to
// its partial xa (a warp per row of A, each element of A read once and used for every row of x, the lanes over
// the columns, A from L2); after the K loop every
// block sums the cluster's partials in rank order (the same bits in every block and on every run) into its own
// whole xa, which the epilogue reads in place of lora.left. Blocks past N's features take part all the same.
template <typename T, bool kOneRounding, int kMaxRows, bool kShrink>
__global__ void __launch_bounds__(kGemvThreads, 2)  // two blocks per SM: 16 warps streaming W
    gemv_4bit_vector_kernel(const T* __restrict__ x, int64_t x_stride_m, int64_t x_stride_k, Weight4bit w,
                            const T* __restrict__ bias, LoRAEpilogue<T> lora, FusedShrink<T> shrink,
                            T* __restrict__ y, int64_t y_stride, int M, int N) {
  extern __shared__ __align__(16) unsigned char gemv_smem[];
  T* xs = reinterpret_cast<T*>(gemv_smem);
  float2* pairs = reinterpret_cast<float2*>(gemv_smem + static_cast<size_t>(M) * kGemvSlab * sizeof(T));
  pairs[threadIdx.x] = make_float2(w.code[threadIdx.x >> 4], w.code[threadIdx.x & 15]);  // 256 threads, 256 bytes
  float* xa_part = reinterpret_cast<float*>(pairs + 256);  // kShrink: [M, R], this block's share
  float* xa_whole = xa_part + M * shrink.R;                // kShrink: [M, R], the cluster's sum
  const unsigned rank = kShrink ? cluster_rank() : 0;
  if constexpr (kShrink) {
    for (int i = threadIdx.x; i < M * shrink.R; i += kGemvThreads) xa_part[i] = 0.f;
  }
  constexpr int kFeatures = gemv_features<kMaxRows>();
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * kFeatures;
  const int64_t K = w.K;
  constexpr int kPerVector = 16 / sizeof(T);
  float acc[kFeatures][kMaxRows] = {};
  // The next slab's 16-byte chunks and block scales are loaded before this slab is used: W's latency (and the
  // nested absmax's two dependent loads) overlaps the staging of x and the arithmetic.
  uint4 next_raw[kFeatures];
  float next_scale[kFeatures];
  const auto fetch = [&](int64_t k0) {
#pragma unroll
    for (int f = 0; f < kFeatures; ++f) {
      const int64_t n = n0 + f, k = k0 + lane * 32;
      if (n < N && k < K) {
        next_raw[f] = __ldg(reinterpret_cast<const uint4*>(w.packed + (n * K + k) / 2));
        next_scale[f] = block_scale(w, (n * K + k) >> w.log2_blocksize);
      }
    }
  };
  fetch(0);
  for (int64_t k0 = 0; k0 < K; k0 += kGemvSlab) {
    const int width = static_cast<int>(K - k0 < kGemvSlab ? K - k0 : kGemvSlab);
    uint4 raw[kFeatures];
    float scale[kFeatures];
#pragma unroll
    for (int f = 0; f < kFeatures; ++f) {
      raw[f] = next_raw[f];
      scale[f] = next_scale[f];
    }
    if (k0 + kGemvSlab < K) fetch(k0 + kGemvSlab);
    __syncthreads();  // the previous slab's readers are done (and, the first time, the table is written)
    for (int i = threadIdx.x; i < M * width; i += kGemvThreads) {
      const int r = i / width, c = i % width;
      xs[r * kGemvSlab + c] = x[r * x_stride_m + (k0 + c) * x_stride_k];
    }
    __syncthreads();
    if constexpr (kShrink) {  // this block's columns [lo, hi) of the slab; warp j % kGemvWarps owns A's row j
      const int share = (width + shrink.cluster - 1) / shrink.cluster;
      const int lo = min(width, static_cast<int>(rank) * share), hi = min(width, lo + share);
      for (int j = warp; j < shrink.R; j += kGemvWarps) {
        const T* a_row = shrink.a + j * shrink.stride_r + k0 * shrink.stride_k;
        float sums[kMaxRows] = {};
        for (int c = lo + lane; c < hi; c += kWarpSize) {
          const float a = static_cast<float>(a_row[c * shrink.stride_k]);  // read once, used by every row of x
#pragma unroll
          for (int r = 0; r < kMaxRows; ++r) {
            if (r < M) sums[r] = fmaf(static_cast<float>(xs[r * kGemvSlab + c]), a, sums[r]);
          }
        }
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) {
          if (r >= M) break;  // uniform across the warp
          const float sum = warp_sum(sums[r]);
          if (lane == 0) xa_part[r * shrink.R + j] += sum;
        }
      }
    }
    const int chunk = lane;  // kGemvSlab / 32 chunks: one per lane
    if (chunk * 32 < width) {
#pragma unroll
      for (int f = 0; f < kFeatures; ++f) {
        if (n0 + f >= N) break;
        const uint32_t words[4] = {raw[f].x, raw[f].y, raw[f].z, raw[f].w};
#pragma unroll
        for (int half = 0; half < 2; ++half) {  // 16 weights at a time: half the registers for decoded weights
          float wv[16];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int byte = half * 8 + j;
            const float2 codes = pairs[(words[byte / 4] >> (8 * (byte % 4))) & 0xFF];
            const float2 pair = decode_pair<T, kOneRounding>(codes, scale[f], w.w_kind);
            wv[2 * j] = pair.x;
            wv[2 * j + 1] = pair.y;
          }
#pragma unroll
          for (int r = 0; r < kMaxRows; ++r) {
            if (r >= M) break;
            const uint4* xv = reinterpret_cast<const uint4*>(xs + r * kGemvSlab + chunk * 32 + half * 16);
            float sum = 0.f;
#pragma unroll
            for (int v = 0; v < 16 / kPerVector; ++v) {
              const uint4 packed_x = xv[v];
              const T* xe = reinterpret_cast<const T*>(&packed_x);
#pragma unroll
              for (int e = 0; e < kPerVector; ++e) sum = fmaf(wv[v * kPerVector + e], static_cast<float>(xe[e]), sum);
            }
            acc[f][r] += sum;
          }
        }
      }
    }
  }
  LoRAEpilogue<T> epilogue = lora;
  if constexpr (kShrink) {
    cluster_sync();  // every block's partial xa is complete and visible to the cluster
    for (int i = threadIdx.x; i < M * shrink.R; i += kGemvThreads) {
      float sum = 0.f;
      for (int q = 0; q < shrink.cluster; ++q) sum += peer(xa_part, static_cast<unsigned>(q))[i];
      xa_whole[i] = sum;
    }
    cluster_sync();  // xa is whole in every block, and no block reads another's partials any more
    epilogue.left = xa_whole;
    epilogue.left_stride = shrink.R;
  }
#pragma unroll
  for (int f = 0; f < kFeatures; ++f) {
    const int64_t n = n0 + f;
    if (n >= N) break;  // uniform across the warp
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r >= M) break;
      gemv_store(acc[f][r], epilogue, bias, y, y_stride, r, n, lane);
    }
  }
}

// Decode, any K or alignment: a warp per output feature, a weight per lane per step, rows of x in passes.
template <typename T>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_4bit_kernel(const T* __restrict__ x, int64_t x_stride_m, int64_t x_stride_k, Weight4bit w,
                     const T* __restrict__ bias, LoRAEpilogue<T> lora, T* __restrict__ y, int64_t y_stride, int M,
                     int N) {
  __shared__ float code[16];
  load_code(w, code);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;
  if (n >= N) return;
  const int64_t K = w.K;
  for (int m0 = 0; m0 < M; m0 += kGemvRows) {
    const int rows = min(kGemvRows, M - m0);
    float acc[kGemvRows] = {};
    const T* x_rows = x + m0 * x_stride_m;
    for (int64_t k = lane; k < K; k += kWarpSize) {
      const float wk = weight_at<T>(w, code, n, k);
      const T* xk = x_rows + k * x_stride_k;
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
        if (r < rows) acc[r] = fmaf(wk, static_cast<float>(xk[r * x_stride_m]), acc[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
      if (r < rows) gemv_store(acc[r], lora, bias, y, y_stride, m0 + r, n, lane);  // uniform across the warp
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Prefill and dx: tiles through the tensor cores (16-bit) or a thread per output (fp32)
// ---------------------------------------------------------------------------------------------------------

// kTrans = false: out [M, N] = a [M, K] . W^T (a = x; the reduction runs over W's columns).
// kTrans = true:  out [M, K] = a [M, N] . W   (a = dy; the reduction runs over W's rows).
template <bool kTrans, typename T>
__device__ __forceinline__ float weight_for(const Weight4bit& w, const float* code, int64_t reduce_index,
                                            int64_t out_col) {
  return kTrans ? weight_at<T>(w, code, reduce_index, out_col) : weight_at<T>(w, code, out_col, reduce_index);
}

template <typename T>
__device__ __forceinline__ void store_output(T* out, int64_t out_stride, const T* bias, const LoRAEpilogue<T>& lora,
                                             int64_t m, int64_t j, float acc) {
  float value = acc;
  if (lora.R > 0) value += lora_term(lora, m, j);
  if (bias != nullptr) value += static_cast<float>(bias[j]);
  out[m * out_stride + j] = static_cast<T>(value);
}

constexpr int kSimpleThreads = 256;

template <typename T, bool kTrans>
__global__ void __launch_bounds__(kSimpleThreads)
    simple_4bit_kernel(const T* __restrict__ a, int64_t a_stride_m, int64_t a_stride_r, Weight4bit w, int M,
                       int out_cols, int64_t reduce, const T* __restrict__ bias, LoRAEpilogue<T> lora,
                       T* __restrict__ out, int64_t out_stride) {
  __shared__ float code[16];
  load_code(w, code);
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kSimpleThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(M) * out_cols) return;
  const int64_t m = idx / out_cols, j = idx % out_cols;
  float acc = 0.f;
  for (int64_t r = 0; r < reduce; ++r) {
    acc = fmaf(static_cast<float>(a[m * a_stride_m + r * a_stride_r]), weight_for<kTrans, T>(w, code, r, j), acc);
  }
  store_output(out, out_stride, bias, lora, m, j, acc);
}

constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kGemmThreads = 128, kPad = 8;

template <typename T, bool kTrans>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_4bit_kernel(const T* __restrict__ a, int64_t a_stride_m, int64_t a_stride_r, Weight4bit w, int M,
                     int out_cols, int64_t reduce, const T* __restrict__ bias, LoRAEpilogue<T> lora,
                     T* __restrict__ out, int64_t out_stride) {
  using namespace nvcuda;
  using Wmma = WmmaType<T>;
  using WT = typename Wmma::type;
  __shared__ float code[16];
  __shared__ __align__(32) WT a_tile[kTileM][kTileK + kPad];
  __shared__ __align__(32) WT b_tile[kTileN][kTileK + kPad];  // b_tile[j][r] = B(r, j): column-major B
  __shared__ __align__(32) float c_tile[kTileM][kTileN + 4];
  load_code(w, code);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, j0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int warp = threadIdx.x / kWarpSize, warp_m = warp / 2, warp_n = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t r0 = 0; r0 < reduce; r0 += kTileK) {
    for (int i = threadIdx.x; i < kTileM * kTileK; i += kGemmThreads) {
      const int mm = i / kTileK, rr = i % kTileK;
      const int64_t gm = m0 + mm, gr = r0 + rr;
      const float v = (gm < M && gr < reduce) ? static_cast<float>(a[gm * a_stride_m + gr * a_stride_r]) : 0.f;
      a_tile[mm][rr] = Wmma::from_float(v);
    }
    for (int i = threadIdx.x; i < kTileN * kTileK; i += kGemmThreads) {
      const int jj = i / kTileK, rr = i % kTileK;
      const int64_t gj = j0 + jj, gr = r0 + rr;
      const float v = (gj < out_cols && gr < reduce) ? weight_for<kTrans, T>(w, code, gr, gj) : 0.f;
      b_tile[jj][rr] = Wmma::from_float(v);  // exact: v already holds a value of T
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], &a_tile[warp_m * 32 + i * 16][kk], kTileK + kPad);
        wmma::load_matrix_sync(fb[i], &b_tile[warp_n * 32 + i * 16][kk], kTileK + kPad);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(&c_tile[warp_m * 32 + i * 16][warp_n * 32 + j * 16], acc[i][j], kTileN + 4,
                              wmma::mem_row_major);
    }
  __syncthreads();
  for (int i = threadIdx.x; i < kTileM * kTileN; i += kGemmThreads) {
    const int mm = i / kTileN, jj = i % kTileN;
    const int64_t gm = m0 + mm, gj = j0 + jj;
    if (gm < M && gj < out_cols) store_output(out, out_stride, bias, lora, gm, gj, c_tile[mm][jj]);
  }
}

// Tiles on the tensor cores for 16-bit activations, a thread per output for fp32.
template <typename T, bool kTrans>
struct TiledLaunch {
  static void run(const T* a, int64_t sm, int64_t sr, const Weight4bit& w, int M, int out_cols, int64_t reduce,
                  const T* bias, const LoRAEpilogue<T>& lora, T* out, int64_t out_stride, cudaStream_t stream) {
    // Row tiles go on grid.y: more than kMaxGridY of them run as several launches, each from its first row.
    constexpr int64_t kChunkRows = kMaxGridY * kTileM;
    for (int64_t m0 = 0; m0 < M; m0 += kChunkRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kChunkRows, M - m0));
      LoRAEpilogue<T> chunk_lora = lora;
      chunk_lora.left = lora.R > 0 ? lora.left + m0 * lora.left_stride : nullptr;
      const dim3 grid((out_cols + kTileN - 1) / kTileN, (rows + kTileM - 1) / kTileM);
      gemm_4bit_kernel<T, kTrans><<<grid, kGemmThreads, 0, stream>>>(a + m0 * sm, sm, sr, w, rows, out_cols, reduce,
                                                                      bias, chunk_lora, out + m0 * out_stride,
                                                                      out_stride);
    }
  }
};
template <bool kTrans>
struct TiledLaunch<float, kTrans> {
  static void run(const float* a, int64_t sm, int64_t sr, const Weight4bit& w, int M, int out_cols, int64_t reduce,
                  const float* bias, const LoRAEpilogue<float>& lora, float* out, int64_t out_stride,
                  cudaStream_t stream) {
    const int64_t total = static_cast<int64_t>(M) * out_cols;
    const unsigned blocks = static_cast<unsigned>((total + kSimpleThreads - 1) / kSimpleThreads);
    simple_4bit_kernel<float, kTrans>
        <<<blocks, kSimpleThreads, 0, stream>>>(a, sm, sr, w, M, out_cols, reduce, bias, lora, out, out_stride);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------

int log2_exact(const char* op, const char* name, int64_t v) {
  TORCH_CHECK(v >= 1 && (v & (v - 1)) == 0, op, ": ", name, " must be a power of two, got ", v);
  int log2 = 0;
  while ((int64_t{1} << log2) < v) ++log2;
  return log2;
}

void check_on(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == dtype && t.device() == x.device() && t.is_contiguous(), op, ": ", name,
              " must be a contiguous ", dtype, " tensor on ", x.device(), ", got ", t.scalar_type(), " on ",
              t.device());
}

// ---------------------------------------------------------------------------------------------------------
// Dequantize once: W [N, K] in x's dtype, for the prefill tier
// ---------------------------------------------------------------------------------------------------------

constexpr int kDequantThreads = 256;

// The bits of one weight as T stores it (round to w_kind, then to T: bitsandbytes' value in x's dtype).
template <typename T>
__device__ __forceinline__ uint32_t weight_bits(const Weight4bit& w, const float* code, int q, float scale);
template <>
__device__ __forceinline__ uint32_t weight_bits<float>(const Weight4bit& w, const float* code, int q, float scale) {
  return __float_as_uint(round_weight(__fmul_rn(code[q], scale), w.w_kind));
}
template <>
__device__ __forceinline__ uint32_t weight_bits<at::Half>(const Weight4bit& w, const float* code, int q,
                                                          float scale) {
  return __half_as_ushort(__float2half_rn(round_weight(__fmul_rn(code[q], scale), w.w_kind)));
}
template <>
__device__ __forceinline__ uint32_t weight_bits<at::BFloat16>(const Weight4bit& w, const float* code, int q,
                                                              float scale) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(round_weight(__fmul_rn(code[q], scale), w.w_kind)));
}

// Chunks of 16 packed bytes (32 weights: one absmax block, blocksize >= 32) by a grid-stride loop, the weights
// packed into 32-bit words in registers and stored 16 bytes at a time into row n * out_stride of out (a view of
// a wider buffer: the LoRA factor beside W); the elements past the last whole chunk (or all of them when the
// bytes or the rows are not 16-byte aligned) one per thread.
template <typename T, bool kOneRounding>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_4bit_kernel(Weight4bit w, T* __restrict__ out, int64_t out_stride, int64_t numel, int64_t chunks) {
  __shared__ float code[16];
  load_code(w, code);
  constexpr int kWords = 32 * sizeof(T) / 4;  // 32-bit words holding one chunk's 32 weights
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t c = first; c < chunks; c += stride) {
    const uint4 bytes = __ldg(reinterpret_cast<const uint4*>(w.packed) + c);
    const float scale = block_scale(w, (c * 32) >> w.log2_blocksize);
    const uint32_t in[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
    uint32_t words[kWords];
#pragma unroll
    for (int i = 0; i < 16; ++i) {  // byte i holds weights 2i (high nibble) and 2i + 1 (low nibble)
      const uint32_t byte = (in[i / 4] >> (8 * (i % 4))) & 0xFF;
      if constexpr (sizeof(T) == 4) {
        words[2 * i] = weight_bits<T>(w, code, byte >> 4, scale);
        words[2 * i + 1] = weight_bits<T>(w, code, byte & 0xF, scale);
      } else {  // little endian: the lower address (weight 2i) in the low half
        words[i] = pair_bits_16<T, kOneRounding>(code[byte >> 4], code[byte & 0xF], scale, w.w_kind);
      }
    }
    const int64_t e = c * 32;  // K % 32 == 0 on this path: a chunk never straddles two rows
    uint4* dst = reinterpret_cast<uint4*>(out + (e / w.K) * out_stride + e % w.K);
#pragma unroll
    for (int v = 0; v < kWords / 4; ++v) {
      dst[v] = make_uint4(words[4 * v], words[4 * v + 1], words[4 * v + 2], words[4 * v + 3]);
    }
  }
  for (int64_t e = chunks * 32 + first; e < numel; e += stride) {
    const uint8_t byte = w.packed[e >> 1];
    const int q = (e & 1) ? (byte & 0xF) : (byte >> 4);
    const uint32_t bits = weight_bits<T>(w, code, q, block_scale(w, e >> w.log2_blocksize));
    const int64_t at = (e / w.K) * out_stride + e % w.K;
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<uint32_t*>(out)[at] = bits;
    } else {
      reinterpret_cast<uint16_t*>(out)[at] = static_cast<uint16_t>(bits);
    }
  }
}

Weight4bit make_weight(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                       const at::Tensor& code, const std::optional<at::Tensor>& absmax2,
                       const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                       int64_t blocksize, int64_t nested_blocksize, int64_t rows, int64_t cols,
                       at::ScalarType w_dtype) {
  check_on(op, "packed", packed, at::kByte, x);
  TORCH_CHECK(packed.numel() == (rows * cols + 1) / 2, op, ": packed holds ", packed.numel(), " bytes, W [", rows,
              ", ", cols, "] needs ", (rows * cols + 1) / 2);
  check_on(op, "code", code, at::kFloat, x);
  TORCH_CHECK(code.numel() == 16, op, ": code must hold 16 values");
  const bool nested = absmax2.has_value();
  TORCH_CHECK(nested == code2.has_value() && nested == offset.has_value(), op,
              ": absmax2, code2 and offset come together (double quantization) or not at all");
  const int64_t blocks = (rows * cols + blocksize - 1) / blocksize;
  check_on(op, "absmax", absmax, nested ? at::kByte : at::kFloat, x);
  TORCH_CHECK(absmax.numel() == blocks, op, ": absmax must hold ", blocks, " blocks, got ", absmax.numel());
  Weight4bit w{};
  w.packed = packed.data_ptr<uint8_t>();
  w.code = code.data_ptr<float>();
  w.K = cols;
  w.log2_blocksize = log2_exact(op, "blocksize", blocksize);
  w.log2_nested = log2_exact(op, "nested_blocksize", nested_blocksize);
  TORCH_CHECK(blocksize >= 32, op, ": blocksize must be at least 32, got ", blocksize);
  if (nested) {
    check_on(op, "absmax2", *absmax2, at::kFloat, x);
    check_on(op, "code2", *code2, at::kFloat, x);
    check_on(op, "offset", *offset, at::kFloat, x);
    TORCH_CHECK(absmax2->numel() == (blocks + nested_blocksize - 1) / nested_blocksize && code2->numel() == 256 &&
                    offset->numel() == 1,
                op, ": the nested state's sizes do not match ", blocks, " blocks");
    w.qabsmax = absmax.data_ptr<uint8_t>();
    w.absmax2 = absmax2->data_ptr<float>();
    w.code2 = code2->data_ptr<float>();
    w.offset = offset->data_ptr<float>();
  } else {
    w.absmax = absmax.data_ptr<float>();
  }
  TORCH_CHECK(w_dtype == at::kFloat || w_dtype == at::kHalf || w_dtype == at::kBFloat16, op,
              ": w_dtype must be float32, float16 or bfloat16, got ", w_dtype);
  w.w_kind = w_dtype == at::kHalf ? 1 : (w_dtype == at::kBFloat16 ? 2 : 0);
  return w;
}

void check_optional(const char* op, const char* name, const std::optional<at::Tensor>& t, at::ScalarType dtype,
                    const at::Tensor& x, int64_t rows, int64_t cols) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == dtype && t->device() == x.device(), op, ": ", name, " must be ", dtype, " on ",
              x.device(), ", got ", t->scalar_type(), " on ", t->device());
  if (cols < 0) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows, op, ": ", name, " must be [", rows, "], got ", t->sizes());
  } else {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == rows && (cols == 0 || t->size(1) == cols), op, ": ", name,
                " must be [", rows, ", ", cols, "], got ", t->sizes());
  }
}

// The vector GEMV's launch for M <= kDecodeMaxM rows (kMaxRows 4 or kDecodeMaxM); with kShrink, in clusters of
// shrink.cluster blocks. Returns false, launching nothing, where the GPU cannot hold such a cluster.
template <typename T, int kMaxRows, bool kShrink>
bool launch_vector_gemv(const at::Tensor& x, const Weight4bit& w, const T* bias, const LoRAEpilogue<T>& lora,
                        const FusedShrink<T>& shrink, at::Tensor& y, cudaStream_t stream) {
  const int M = static_cast<int>(x.size(0)), N = static_cast<int>(y.size(1));
  const size_t shared = gemv_shared_bytes<T>(M, kShrink ? shrink.R : 0);
  auto kernel = w.w_kind == kind_of<T>() ? gemv_4bit_vector_kernel<T, true, kMaxRows, kShrink>
                                         : gemv_4bit_vector_kernel<T, false, kMaxRows, kShrink>;
  if (shared > 48 * 1024) {  // fp32 x past 11 rows: opt in to more than the default 48 KB
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  }
  const int per_block = kGemvWarps * gemv_features<kMaxRows>();
  const int cluster = kShrink ? shrink.cluster : 1;
  const int64_t blocks = (N + per_block - 1) / per_block;
  const int64_t grid = (blocks + cluster - 1) / cluster * cluster;  // whole clusters: the last may hold idle blocks
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config =
      cluster_launch(static_cast<unsigned>(grid), kGemvThreads, shared, stream, cluster, attribute);
  if (!cluster_fits(kernel, config)) return false;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, x.data_ptr<T>(), x.stride(0), x.stride(1), w, bias, lora, shrink,
                                    y.data_ptr<T>(), y.stride(0), M, N));
  return true;
}

// The expand's right-hand side and scale, its left (xa) not yet set: right[j, r] is lora_b [N, R] as is, or
// lora_a [R, K] read transposed (the backward).
template <typename T>
LoRAEpilogue<T> expand_epilogue(const at::Tensor& right, int64_t R, bool right_transposed, double scaling) {
  LoRAEpilogue<T> lora{};
  lora.right = right.data_ptr<T>();
  lora.right_stride_j = right_transposed ? right.stride(1) : right.stride(0);
  lora.right_stride_r = right_transposed ? right.stride(0) : right.stride(1);
  lora.R = static_cast<int>(R);
  lora.scaling = static_cast<float>(scaling);
  return lora;
}

template <typename T>
LoRAEpilogue<T> make_epilogue(const std::optional<at::Tensor>& left, const std::optional<at::Tensor>& right,
                              bool right_transposed, double scaling) {
  if (!left.has_value()) return LoRAEpilogue<T>{};
  LoRAEpilogue<T> lora = expand_epilogue<T>(*right, left->size(1), right_transposed, scaling);
  lora.left = left->data_ptr<float>();
  lora.left_stride = left->stride(0);
  return lora;
}

}  // namespace

at::Tensor matmul_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            const at::Tensor& code, const std::optional<at::Tensor>& absmax2,
                            const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                            int64_t blocksize, int64_t nested_blocksize, int64_t n, at::ScalarType w_dtype,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& xa_in,
                            const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                            double scaling) {
  constexpr const char* op = "matmul_4bit_cuda";
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, op, ": x must be a 2-D CUDA tensor, got ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  const Weight4bit w =
      make_weight(op, x, packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, n, K, w_dtype);
  TORCH_CHECK(!(xa_in.has_value() && lora_a.has_value()), op, ": give xa or lora_a, not both");
  TORCH_CHECK((xa_in.has_value() || lora_a.has_value()) == lora_b.has_value(), op,
              ": lora_b comes with xa or lora_a");
  check_optional(op, "bias", bias, x.scalar_type(), x, n, -1);
  check_optional(op, "xa", xa_in, at::kFloat, x, M, 0);
  TORCH_CHECK(!xa_in.has_value() || xa_in->stride(1) == 1, op, ": xa's rows must be dense");
  TORCH_CHECK(!bias.has_value() || bias->is_contiguous(), op, ": bias must be contiguous");
  if (lora_a.has_value()) {
    TORCH_CHECK(lora_a->dim() == 2, op, ": lora_a must be [r, ", K, "], got ", lora_a->sizes());
    check_optional(op, "lora_a", lora_a, x.scalar_type(), x, lora_a->size(0), K);
  }
  const int64_t R = xa_in.has_value() ? xa_in->size(1) : (lora_a.has_value() ? lora_a->size(0) : 0);
  if (lora_b.has_value()) check_optional(op, "lora_b", lora_b, x.scalar_type(), x, n, R);
  auto y = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool vector = M <= kDecodeMaxM && K % 32 == 0 && aligned16(packed);
  // The shrink in the GEMV's launch where it can be (sm_90's clusters, the vector path, a small rank), else first,
  // as a launch of its own.
  const int cluster = max_cluster_on(x.get_device());
  const bool fuse = lora_a.has_value() && vector && R <= kFusedShrinkMaxR && cluster > 1;
  FASTPEFT_DISPATCH_FLOATS(x.scalar_type(), op, [&] {
    const scalar_t* bias_ptr = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    if (fuse) {
      const auto lora = expand_epilogue<scalar_t>(*lora_b, R, false, scaling);  // left: the kernel's own xa
      const FusedShrink<scalar_t> shrink{lora_a->data_ptr<scalar_t>(), lora_a->stride(0), lora_a->stride(1),
                                         static_cast<int>(R), cluster};
      const bool launched = M <= 4 ? launch_vector_gemv<scalar_t, 4, true>(x, w, bias_ptr, lora, shrink, y, stream)
                                   : launch_vector_gemv<scalar_t, kDecodeMaxM, true>(x, w, bias_ptr, lora, shrink,
                                                                                      y, stream);
      if (launched) return;
    }
    const std::optional<at::Tensor> xa = lora_a.has_value() ? std::optional(lora_shrink_cuda(x, *lora_a)) : xa_in;
    const auto lora = make_epilogue<scalar_t>(xa, lora_b, false, scaling);
    if (vector) {
      const FusedShrink<scalar_t> none{};
      if (M <= 4) {
        launch_vector_gemv<scalar_t, 4, false>(x, w, bias_ptr, lora, none, y, stream);
      } else {
        launch_vector_gemv<scalar_t, kDecodeMaxM, false>(x, w, bias_ptr, lora, none, y, stream);
      }
    } else if (M <= kDecodeMaxM) {
      const unsigned blocks = static_cast<unsigned>((n + kGemvWarps - 1) / kGemvWarps);
      gemv_4bit_kernel<scalar_t><<<blocks, kGemvThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), w, bias_ptr, lora, y.data_ptr<scalar_t>(), y.stride(0),
          static_cast<int>(M), static_cast<int>(n));
    } else {
      TiledLaunch<scalar_t, false>::run(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), w, static_cast<int>(M),
                                        static_cast<int>(n), K, bias_ptr, lora, y.data_ptr<scalar_t>(), y.stride(0),
                                        stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor matmul_4bit_t_cuda(const at::Tensor& dy, const at::Tensor& packed, const at::Tensor& absmax,
                              const at::Tensor& code, const std::optional<at::Tensor>& absmax2,
                              const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                              int64_t blocksize, int64_t nested_blocksize, int64_t k, at::ScalarType w_dtype,
                              const std::optional<at::Tensor>& dyb, const std::optional<at::Tensor>& lora_a,
                              double scaling) {
  constexpr const char* op = "matmul_4bit_t_cuda";
  TORCH_CHECK(dy.is_cuda() && dy.dim() == 2, op, ": dy must be a 2-D CUDA tensor, got ", dy.sizes());
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t M = dy.size(0), N = dy.size(1);
  const Weight4bit w =
      make_weight(op, dy, packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, N, k, w_dtype);
  TORCH_CHECK(dyb.has_value() == lora_a.has_value(), op, ": dyb and lora_a come together");
  check_optional(op, "dyb", dyb, at::kFloat, dy, M, 0);
  TORCH_CHECK(!dyb.has_value() || dyb->stride(1) == 1, op, ": dyb's rows must be dense");
  if (dyb.has_value()) check_optional(op, "lora_a", lora_a, dy.scalar_type(), dy, dyb->size(1), k);
  auto dx = at::empty({M, k}, dy.options());
  if (M == 0 || k == 0) return dx;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTPEFT_DISPATCH_FLOATS(dy.scalar_type(), op, [&] {
    const auto lora = make_epilogue<scalar_t>(dyb, lora_a, true, scaling);
    TiledLaunch<scalar_t, true>::run(dy.data_ptr<scalar_t>(), dy.stride(0), dy.stride(1), w, static_cast<int>(M),
                                     static_cast<int>(k), N, nullptr, lora, dx.data_ptr<scalar_t>(), dx.stride(0),
                                     stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

void dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                          const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                          const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize,
                          int64_t n, int64_t k, at::ScalarType w_dtype, const at::Tensor& out) {
  constexpr const char* op = "dequantize_4bit_cuda";
  TORCH_CHECK(packed.is_cuda(), op, ": packed must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(packed.device());
  const Weight4bit w = make_weight(op, packed, packed, absmax, code, absmax2, code2, offset, blocksize,
                                   nested_blocksize, n, k, w_dtype);
  TORCH_CHECK(out.device() == packed.device() && out.dim() == 2 && out.size(0) == n && out.size(1) == k &&
                  (k <= 1 || out.stride(1) == 1) && out.stride(0) >= k,
              op, ": out must be [", n, ", ", k, "] on ", packed.device(), " with unit column stride, got ",
              out.sizes(), " strides ", out.strides());
  const int64_t numel = n * k;
  if (numel == 0) return;
  const int64_t row_bytes = out.stride(0) * static_cast<int64_t>(out.element_size());
  const bool vector = aligned16(packed) && aligned16(out) && k % 32 == 0 && row_bytes % 16 == 0;
  const int64_t chunks = vector ? numel / 32 : 0;
  const int64_t work = std::max<int64_t>(chunks, numel - chunks * 32);
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, packed.get_device()));
  const int64_t wanted = (work + kDequantThreads - 1) / kDequantThreads;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTPEFT_DISPATCH_FLOATS(out.scalar_type(), op, [&] {
    auto kernel = w.w_kind == kind_of<scalar_t>() ? dequantize_4bit_kernel<scalar_t, true>
                                                  : dequantize_4bit_kernel<scalar_t, false>;
    // One wave of resident blocks looping over the chunks: no tail wave, enough loads in flight to stream.
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kDequantThreads, 0));
    const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * sms;
    const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min(wanted, resident)));
    kernel<<<blocks, kDequantThreads, 0, stream>>>(w, out.data_ptr<scalar_t>(), out.stride(0), numel, chunks);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastpeft
