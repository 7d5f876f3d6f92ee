// Thread-block clusters (sm_90): the device primitives the cluster kernels share (csrc/bottleneck.cu's tiles,
// csrc/qlora.cu's GEMV with the adapter's shrink), reduced to the block's own where a GPU has no clusters (the
// kernels then run with clusters of one), and the host's launch of a kernel in clusters.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>

namespace fastpeft {

constexpr int kMaxCluster = 8;  // the portable cluster size

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FASTPEFT_HAS_CLUSTERS 1
#endif

__device__ __forceinline__ unsigned cluster_rank() {
#ifdef FASTPEFT_HAS_CLUSTERS
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}

// Every thread of every block of the cluster waits here; shared memory written before is visible after.
__device__ __forceinline__ void cluster_sync() {
#ifdef FASTPEFT_HAS_CLUSTERS
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

// `p` (in this block's shared memory) as it lies in block `rank`'s shared memory.
template <typename P>
__device__ __forceinline__ P* peer(P* p, unsigned rank) {
#ifdef FASTPEFT_HAS_CLUSTERS
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  return p;
#endif
}

// Clusters of up to kMaxCluster blocks from sm_90 on; none (1) before.
inline int max_cluster_on(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 9 ? kMaxCluster : 1;
}

// A launch of `blocks` blocks (a multiple of `cluster`) in clusters of `cluster` along x. `attribute` must outlive
// the launch call (the config points at it).
inline cudaLaunchConfig_t cluster_launch(unsigned blocks, unsigned threads, size_t shared, cudaStream_t stream,
                                         int cluster, cudaLaunchAttribute& attribute) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  attribute = cudaLaunchAttribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = cluster > 1 ? 1 : 0;
  return config;
}

// Whether the GPU can hold at least one cluster of this launch at a time (a cluster's blocks must fit on the SMs
// of one GPC together; cudaLaunchKernelEx fails the launch otherwise). Clusters of one always fit. The answer is
// kept per kernel, block, shared memory, cluster size and device: the decode launches that ask sit on the hot path.
template <typename Kernel>
bool cluster_fits(Kernel kernel, const cudaLaunchConfig_t& config) {
  if (config.numAttrs == 0) return true;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), config.blockDim.x, config.dynamicSmemBytes,
                                   config.attrs[0].val.clusterDim.x, device);
  static std::mutex mutex;
  static std::map<decltype(key), bool> known;
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto found = known.find(key); found != known.end()) return found->second;
  int clusters = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config));
  return known[key] = clusters > 0;
}

}  // namespace fastpeft
