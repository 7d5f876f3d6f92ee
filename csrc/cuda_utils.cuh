// Device helpers shared by the op families' CUDA kernels (csrc/*.cu): 16-byte vector loads, warp sums, the
// tensor cores' element types.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

// The activation dtypes fastpeft's ops take: fp32, fp16, bf16 (no fp64 instantiations: the Python ops refuse
// float64 before any kernel, and each one would add compile time and binary size for nothing).
#define FASTPEFT_DISPATCH_FLOATS(TYPE, NAME, ...)                                                            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastpeft {

constexpr int kWarpSize = 32;
// CUDA's grid dimensions y and z stop at 65535 blocks: launches whose rows go there run in chunks of this many
// blocks (activations of millions of tokens are real in long-context training).
constexpr int64_t kMaxGridY = 65535;

template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
}

// Loads vec_width<T>() consecutive elements (16 bytes, aligned) and widens them to fp32.
template <typename T>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[vec_width<T>()]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(ptr));
  const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < vec_width<T>(); ++i) out[i] = static_cast<float>(values[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0; }

// The WMMA element type of a 16-bit torch dtype (same bits), with conversions to and from fp32.
template <typename T>
struct WmmaType;
template <>
struct WmmaType<c10::Half> {
  using type = __half;
  static __device__ __forceinline__ type from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float to_float(type v) { return __half2float(v); }
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ type from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float to_float(type v) { return __bfloat162float(v); }
};

}  // namespace fastpeft
