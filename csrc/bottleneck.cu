// The `bottleneck` op family on CUDA: a bottleneck adapter's forward, x read once and y written once.
//
//   bottleneck_rows_kernel  decode (few rows) and every shape the tile kernel does not take: rows of x staged in
//                           shared memory (fp32), the LayerNorm applied there, a warp per bottleneck unit for
//                           z = act(h . Wd[j] + bd[j]) (z kept in shared memory), then a thread per feature for
//                           y = residual + s * (z . Wu^T[:, k] + bu[k]), Wu read transposed so that a warp's
//                           reads are coalesced; optionally the add + LayerNorm after (out_residual, out_ln_*)
//   bottleneck_tile_kernel  prefill in fp16/bf16 (d and m multiples of 16): 16 rows per block staged once in
//                           shared memory in x's dtype (16 x 4096 x 2 bytes = 128 KiB at d = 4096), both products
//                           on the tensor cores (WMMA 16x16x16, fp32 accumulators), the LayerNorm folded into
//                           the down-projection as the Triton kernel folds it, z in shared memory, y built in
//                           place of x in shared memory (the add + LayerNorm after included) and stored once
//
// Both kernels re-read the adapter's weights per block (from L2): the weights are small next to x at the sizes
// bottleneck adapters have (m <= 256).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "bottleneck.h"
#include "cluster.cuh"
#include "cuda_utils.cuh"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kSharedBudget = 40 * 1024;  // rows per block: under the 48 KiB a block gets without opting in
constexpr int64_t kDecodeRows = 64;        // up to this many rows, the rows kernel (fastpeft/ops/bottleneck.py)

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

// ---------------------------------------------------------------------------------------------------------
// Prefill: bottleneck_tile_kernel
// ---------------------------------------------------------------------------------------------------------
//
// A cluster of `cluster` blocks (1 before sm_90, which has no clusters) owns a tile of 16 x kRowFrags rows, and
// block `rank` of it owns the features [rank * d / cluster, (rank + 1) * d / cluster) of those rows. The block
// stages its slice of x in shared memory (the only read of x) and multiplies it by its slice of Wd: a partial
// h. The cluster's partial h are added through distributed shared memory, each block adding a share of the
// elements and writing their activations into every block's z; each block then builds its slice of y in place of
// its x and stores it (the only write of y). A LayerNorm's row statistics, before and after, are added across
// the cluster the same way. Why a cluster: one block cannot hold 64 rows of x at d = 4096 (512 KiB), and fewer
// rows per block re-read both projections from L2 once per few rows (16 rows: 1 MiB of weights per 256 KiB of x
// and y at d = 4096, m = 64), which bounds the kernel by L2 traffic, not by HBM. 64 rows in a cluster of 8 read
// the projections once per 64 rows, each block its eighth of them.

constexpr int kTileThreads = 256;
constexpr int kTileWarps = kTileThreads / kWarpSize;
constexpr int kRowPad = 8;      // elements: rows stay 16-byte aligned and start on different banks
constexpr int kAccLd = 16 + 4;  // a warp's fp32 scratch tile [16][kAccLd]
constexpr int64_t kTileMaxM = 256;
// Two blocks share an SM's 228 KiB (1 KiB of it reserved per block): one block's loads then overlap the other's
// products and stores, which a block alone serialises.
constexpr int64_t kTwoBlocksPerSm = 113 * 1024;
constexpr int64_t kTileStaticShared = 128;  // the run's bounds (8 bytes) as allocated: in 128-byte granules

// Where each buffer of the tile kernel lies in its dynamic shared memory (bytes; the same on host and device),
// for a block owning `d_slice` features of `rows` rows.
struct TileLayout {
  int64_t ldx, ldz, ldh;  // row pitches (elements) of xs, zs, hs
  int ksplit;             // warps that share one 16-column tile of h, each over a part of the slice
  size_t xs, hs, zs, stats, total;
};

__host__ __device__ inline TileLayout tile_layout(int64_t d_slice, int64_t m, int rows) {
  TileLayout l{};
  const int m_tiles = static_cast<int>(m / 16);
  l.ksplit = m_tiles >= kTileWarps ? 1 : kTileWarps / m_tiles;
  l.ldx = d_slice + kRowPad;
  l.ldz = m + kRowPad;
  l.ldh = m + 4;
  const size_t h_parts = static_cast<size_t>(l.ksplit) * rows * l.ldh * sizeof(float);
  const size_t acc = static_cast<size_t>(kTileWarps) * 16 * kAccLd * sizeof(float);
  l.xs = 0;
  l.hs = l.xs + static_cast<size_t>(rows) * l.ldx * 2;  // 16-bit elements; a multiple of 256 bytes
  l.zs = l.hs + (h_parts > acc ? h_parts : acc);         // hs holds h's partial sums, later the warps' tiles
  l.stats = l.zs + static_cast<size_t>(rows) * l.ldz * 2;
  l.total = l.stats + 6 * static_cast<size_t>(rows) * sizeof(float);  // 4 partial row sums, mean, rstd
  return l;
}

// The rows and cluster size of a launch (row_frags == 0: the tile kernel does not take the shape).
struct TilePlan {
  int row_frags = 0;
  int cluster = 0;
};

// The plan for rows [*, d] with bottleneck m on a device whose blocks may opt in to `optin` bytes of shared
// memory and which runs clusters of up to `max_cluster` blocks: the most rows per tile (each tile reads both
// projections once, from L2), two blocks per SM where they fit, then the fewest blocks per cluster.
// fastpeft/ops/bottleneck.py's cuda_tile_plan mirrors it (tests/test_bottleneck.py compares the two).
TilePlan tile_plan(int64_t d, int64_t m, int64_t optin, int64_t max_cluster) {
  if (d % 16 != 0 || m % 16 != 0 || m <= 0 || m > kTileMaxM) return {};
  for (int frags : {4, 2, 1}) {
    for (int64_t budget : {std::min(kTwoBlocksPerSm, optin), optin}) {
      for (int c = 1; c <= max_cluster; c *= 2) {
        if (d % (16 * c) != 0) continue;
        if (static_cast<int64_t>(tile_layout(d / c, m, 16 * frags).total) + kTileStaticShared <= budget) {
          return {frags, c};
        }
      }
    }
  }
  return {};
}

// A LayerNorm's mean and 1 / sqrt(var + eps) (two passes) of each of the tile's rows, whose d features lie in
// slices of `d_slice` across the cluster, into mean_s and rstd_s [kRows] of every block. partial: [2][kRows] of
// this block, read by the others (a LayerNorm after the adapter takes other slots: a block may still be reading
// the first pair's).
template <typename T, int kRows>
__device__ void cluster_row_stats(const typename WmmaType<T>::type* rows, int64_t ldx, int64_t d_slice, int64_t d,
                                  float eps, int cluster, float* partial, float* mean_s, float* rstd_s) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int r = warp; r < kRows; r += kTileWarps) {
    float sum = 0.f;
    for (int64_t k = lane; k < d_slice; k += kWarpSize) sum += WmmaType<T>::to_float(rows[r * ldx + k]);
    sum = warp_sum(sum);
    if (lane == 0) partial[r] = sum;
  }
  cluster_sync();
  for (int r = threadIdx.x; r < kRows; r += kTileThreads) {
    float sum = 0.f;
    for (int q = 0; q < cluster; ++q) sum += peer(partial, q)[r];
    mean_s[r] = sum / d;
  }
  __syncthreads();
  for (int r = warp; r < kRows; r += kTileWarps) {
    float sq = 0.f;
    for (int64_t k = lane; k < d_slice; k += kWarpSize) {
      const float dv = WmmaType<T>::to_float(rows[r * ldx + k]) - mean_s[r];
      sq += dv * dv;
    }
    sq = warp_sum(sq);
    if (lane == 0) partial[kRows + r] = sq;
  }
  cluster_sync();
  for (int r = threadIdx.x; r < kRows; r += kTileThreads) {
    float sq = 0.f;
    for (int q = 0; q < cluster; ++q) sq += peer(partial + kRows, q)[r];
    rstd_s[r] = rsqrtf(sq / d + eps);
  }
  __syncthreads();
}

// acc[f] += A_f . b for the row fragments f in [f_lo, f_hi), A_f the 16 rows f * 16 ... of the 16-bit tile at `a`
// (row pitch lda) in shared memory.
template <int kRowFrags, typename WT, typename FragmentB>
__device__ __forceinline__ void mma_row_fragments(
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[kRowFrags], const WT* a,
    unsigned lda, const FragmentB& b, int f_lo, int f_hi) {
  using namespace nvcuda;
#pragma unroll
  for (int f = 0; f < kRowFrags; ++f) {
    if (f < f_lo || f >= f_hi) continue;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + f * 16 * lda, lda);
    wmma::mma_sync(acc[f], fa, b, acc[f]);
  }
}

// grid (cluster * ceil(M / kRows)) in clusters of `cluster` blocks, block kTileThreads, dynamic shared memory
// tile_layout(d / cluster, m, kRows).total. x, res, out_res and y are 16-byte aligned with row strides that are
// multiples of 8 elements; wd (LayerNorm weight folded in, as triton_kernels/bottleneck.py's _folded makes it) and
// wu_t are [A, m, d], 32-byte aligned; c1 = rowsum(wd) and c0 = Wd . ln_bias + bd (bd without LayerNorm) are fp32
// [A, m]. res == nullptr: the residual is x. d is a multiple of 16 * cluster.
template <typename T, bool kLayerNorm, int kRowFrags>
__global__ void __launch_bounds__(kTileThreads, 2)  // two blocks per SM where the shared memory allows
    bottleneck_tile_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ wd,
                           const float* __restrict__ c1, const float* __restrict__ c0, const T* __restrict__ wu_t,
                           const T* __restrict__ bu, const float* __restrict__ scale, const int* __restrict__ ids,
                           const T* __restrict__ out_res, const T* __restrict__ out_ln_w,
                           const T* __restrict__ out_ln_b, T* __restrict__ y, Params p, int cluster) {
  using namespace nvcuda;
  using Wmma = WmmaType<T>;
  using WT = typename Wmma::type;
  constexpr int kRows = 16 * kRowFrags;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  const unsigned rank = cluster_rank();
  const int64_t d_slice = p.d / cluster, f0 = rank * d_slice;  // this block's features
  const TileLayout l = tile_layout(d_slice, p.m, kRows);
  WT* xs = reinterpret_cast<WT*>(shared_bytes + l.xs);  // [kRows][ldx]: the rows' slice of x, then of y
  float* hs = reinterpret_cast<float*>(shared_bytes + l.hs);
  WT* zs = reinterpret_cast<WT*>(shared_bytes + l.zs);  // [kRows][ldz]
  float* partial = reinterpret_cast<float*>(shared_bytes + l.stats);  // [4][kRows]: read by the cluster
  float* mean_s = partial + 4 * kRows;
  float* rstd_s = mean_s + kRows;
  __shared__ int run_adapter, run_end;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t first = static_cast<int64_t>(blockIdx.x / cluster) * kRows;
  const int rows = static_cast<int>(p.rows - first < kRows ? p.rows - first : kRows);
  constexpr int kVec = 8;  // elements per 16-byte access
  const int64_t vecs = d_slice / kVec;

  // The only read of x: 16-byte loads into shared memory, rows past M zero.
  for (int64_t i = threadIdx.x; i < kRows * vecs; i += kTileThreads) {
    const int r = static_cast<int>(i / vecs);
    const int64_t c = (i % vecs) * kVec;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < rows) v = __ldg(reinterpret_cast<const uint4*>(x + (first + r) * p.x_stride + f0 + c));
    *reinterpret_cast<uint4*>(xs + r * l.ldx + c) = v;
  }
  __syncthreads();
  // Whether this block may still read another's shared memory after the last cluster barrier (then it must not
  // leave before the others are done: one more barrier at the end). The same in every block of the cluster.
  bool peers_read = false;
  if constexpr (kLayerNorm) {
    cluster_row_stats<T, kRows>(xs, l.ldx, d_slice, p.d, p.ln_eps, cluster, partial, mean_s, rstd_s);
    peers_read = true;
  }

  // Runs of rows with one adapter (a sample's rows share one; a tile may straddle samples): each run computes
  // h for the row fragments it touches and keeps its own rows. Every block of the cluster sees the same runs, so
  // all take the same cluster barriers.
  const int m_tiles = static_cast<int>(p.m / 16);
  for (int r0 = 0; r0 < rows;) {
    __syncthreads();  // every thread has read the previous run's bounds; the statistics are in place
    if (threadIdx.x == 0) {
      const int a = ids == nullptr ? 0 : ids[first + r0];
      int r1 = r0 + 1;
      while (r1 < rows && (ids == nullptr || ids[first + r1] == a)) ++r1;
      run_adapter = a;
      run_end = r1;
    }
    __syncthreads();
    const int a = run_adapter, r1 = run_end;
    const bool active = a >= 0 && a < p.adapters;
    const int f_lo = r0 / 16, f_hi = (r1 + 15) / 16;  // the row fragments the run touches
    if (active) {
      // This block's partial h = x_slice . Wd'_slice^T: warp t owns the 16 columns t % m_tiles over the part
      // t / m_tiles of the slice, each Wd' fragment loaded once for all the run's row fragments.
      const T* wa = wd + static_cast<int64_t>(a) * p.m * p.d + f0;
      for (int t = warp; t < m_tiles * l.ksplit; t += kTileWarps) {
        const int n = t % m_tiles, part = t / m_tiles;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kRowFrags];
#pragma unroll
        for (int f = 0; f < kRowFrags; ++f) wmma::fill_fragment(acc[f], 0.f);
        for (int64_t k = part * 16; k < d_slice; k += 16 * l.ksplit) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> fb;  // B(k, j) = Wd'[j, k]
          wmma::load_matrix_sync(fb, reinterpret_cast<const WT*>(wa + n * 16 * p.d + k), static_cast<unsigned>(p.d));
          mma_row_fragments<kRowFrags>(acc, xs + k, static_cast<unsigned>(l.ldx), fb, f_lo, f_hi);
        }
#pragma unroll
        for (int f = 0; f < kRowFrags; ++f) {
          if (f < f_lo || f >= f_hi) continue;
          wmma::store_matrix_sync(hs + (part * kRows + f * 16) * l.ldh + n * 16, acc[f], static_cast<unsigned>(l.ldh),
                                  wmma::mem_row_major);
        }
      }
      cluster_sync();  // every block's partial h is in place
      // z = act(h + c0) for the run's rows, h the cluster's partials added in one fixed order (block, then part)
      // by the block that owns the element (elements i = rank mod cluster), the LayerNorm unfolded: h = rstd *
      // (x . Wd'^T - mean * c1) + c0; rounded to x's dtype as the unfused module's activations are, and written
      // into every block's z.
      const int elems = (r1 - r0) * static_cast<int>(p.m);
      for (int i = static_cast<int>(rank) + cluster * threadIdx.x; i < elems; i += cluster * kTileThreads) {
        const int r = r0 + i / static_cast<int>(p.m), j = i % static_cast<int>(p.m);
        float h = 0.f;
        for (int q = 0; q < cluster; ++q) {
          const float* hq = peer(hs, q);
          for (int part = 0; part < l.ksplit; ++part) h += hq[(part * kRows + r) * l.ldh + j];
        }
        if constexpr (kLayerNorm) h = rstd_s[r] * (h - mean_s[r] * c1[a * p.m + j]);
        const WT z = Wmma::from_float(activate(h + c0[a * p.m + j], p.activation));
        for (int q = 0; q < cluster; ++q) peer(zs, q)[r * l.ldz + j] = z;
      }
      cluster_sync();  // z is whole in every block, and no block reads another's h any more
      peers_read = false;
    }
    // y = residual + s * (z . Wu^T + bu) (+ out_residual) for this run's rows, written over their x in shared
    // memory: warp w owns the 16-feature columns w, w + 8, ... of the slice; an element is read and written by
    // one lane.
    float* scratch = hs + warp * 16 * kAccLd;
    const T* ua = wu_t + static_cast<int64_t>(active ? a : 0) * p.m * p.d + f0;
    for (int64_t n = warp; n < d_slice / 16; n += kTileWarps) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kRowFrags];
      if (active) {
#pragma unroll
        for (int f = 0; f < kRowFrags; ++f) wmma::fill_fragment(acc[f], 0.f);
        for (int64_t j = 0; j < p.m; j += 16) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::row_major> fb;  // B(j, k) = Wu[k, j]
          wmma::load_matrix_sync(fb, reinterpret_cast<const WT*>(ua + j * p.d + n * 16), static_cast<unsigned>(p.d));
          mma_row_fragments<kRowFrags>(acc, zs + j, static_cast<unsigned>(l.ldz), fb, f_lo, f_hi);
        }
      }
#pragma unroll
      for (int f = 0; f < kRowFrags; ++f) {
        if (f < f_lo || f >= f_hi) continue;
        if (active) {
          wmma::store_matrix_sync(scratch, acc[f], kAccLd, wmma::mem_row_major);
          __syncwarp();
        }
        for (int e = lane; e < 16 * 16; e += kWarpSize) {
          const int r = f * 16 + e / 16;
          const int64_t k = n * 16 + e % 16;  // within the slice
          if (r < r0 || r >= r1) continue;
          WT& slot = xs[r * l.ldx + k];
          float out =
              res == nullptr ? Wmma::to_float(slot) : static_cast<float>(res[(first + r) * p.res_stride + f0 + k]);
          if (active) {
            const float s = p.scale_kind == 0 ? p.scale_value : scale[p.scale_kind == 1 ? a : a * p.d + f0 + k];
            out += s * (scratch[(e / 16) * kAccLd + e % 16] + static_cast<float>(bu[a * p.d + f0 + k]));
          }
          if (out_res != nullptr) out += static_cast<float>(out_res[(first + r) * p.out_res_stride + f0 + k]);
          slot = Wmma::from_float(out);
        }
        __syncwarp();  // the scratch tile is read before the next fragment overwrites it
      }
    }
    r0 = r1;
  }
  __syncthreads();

  // With the LayerNorm after, the rows are normalised in place first (statistics of the rounded sums, as a
  // LayerNorm applied to the stored sum sees them).
  if (out_ln_w != nullptr) {
    cluster_row_stats<T, kRows>(xs, l.ldx, d_slice, p.d, p.out_ln_eps, cluster, partial + 2 * kRows, mean_s,
                                rstd_s);
    peers_read = true;
    for (int64_t i = threadIdx.x; i < rows * d_slice; i += kTileThreads) {
      const int r = static_cast<int>(i / d_slice);
      const int64_t k = i % d_slice;
      WT& v = xs[r * l.ldx + k];
      v = Wmma::from_float((Wmma::to_float(v) - mean_s[r]) * rstd_s[r] * static_cast<float>(out_ln_w[f0 + k]) +
                           static_cast<float>(out_ln_b[f0 + k]));
    }
    __syncthreads();
  }
  // The only write of y: 16-byte stores, a warp per row.
  for (int r = warp; r < rows; r += kTileWarps) {
    for (int64_t c = lane * kVec; c < d_slice; c += kWarpSize * kVec) {
      *reinterpret_cast<uint4*>(y + (first + r) * p.d + f0 + c) = *reinterpret_cast<const uint4*>(xs + r * l.ldx + c);
    }
  }
  // No block leaves while another may still read its shared memory; after a run's barriers none does (the
  // plain forward: two cluster barriers per tile).
  if (peers_read) cluster_sync();
}

void check_param(const char* name, const at::Tensor& t, const at::Tensor& x, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device() && t.is_contiguous(),
              "bottleneck_forward_cuda: ", name, " must be contiguous, of x's dtype and device");
  TORCH_CHECK(t.sizes().vec() == std::vector<int64_t>(shape), "bottleneck_forward_cuda: ", name, " must be ",
              at::IntArrayRef(shape), ", got ", t.sizes());
}

// ``t`` itself when its data is ``bytes``-aligned and its rows start at multiples of 8 elements, else an
// aligned contiguous copy (a view at an odd offset, or rows of odd pitch, is rare: the copy is the simple way).
at::Tensor aligned_rows(const at::Tensor& t, int64_t bytes) {
  const bool ok = reinterpret_cast<std::uintptr_t>(t.data_ptr()) % bytes == 0 && t.stride(0) % 8 == 0 &&
                  (t.dim() < 3 || t.is_contiguous());
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

int64_t shared_optin(const at::Tensor& x) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.get_device()));
  return optin;
}

int64_t max_cluster(const at::Tensor& x) { return max_cluster_on(x.get_device()); }

// The tile kernel's plan for these rows on this device, or none (then the rows kernel): fp16/bf16 prefill only.
// tile_rows and cluster, when positive, force a plan (the tests' way to run every one); it must fit.
TilePlan plan_for(const at::Tensor& x, int64_t M, int64_t d, int64_t m, int64_t tile_rows, int64_t cluster) {
  const bool half_width = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  if (tile_rows <= 0 && cluster <= 0) {
    if (M <= kDecodeRows || !half_width) return {};
    return tile_plan(d, m, shared_optin(x), max_cluster(x));
  }
  TORCH_CHECK(half_width && (tile_rows == 16 || tile_rows == 32 || tile_rows == 64) && cluster >= 1 &&
                  cluster <= max_cluster(x) && (cluster & (cluster - 1)) == 0,
              "bottleneck_forward_cuda: a forced tile plan takes fp16/bf16 x, tile_rows 16, 32 or 64 and a power-of-"
              "two cluster up to ", max_cluster(x), " on this GPU; got tile_rows=", tile_rows, ", cluster=", cluster);
  TORCH_CHECK(d % (16 * cluster) == 0 && m % 16 == 0 && m > 0 && m <= kTileMaxM &&
                  static_cast<int64_t>(tile_layout(d / cluster, m, static_cast<int>(tile_rows)).total) +
                          kTileStaticShared <= shared_optin(x),
              "bottleneck_forward_cuda: the tile kernel cannot take d=", d, ", m=", m, " in tiles of ", tile_rows,
              " rows over clusters of ", cluster);
  return {static_cast<int>(tile_rows / 16), static_cast<int>(cluster)};
}

template <typename T, bool kLayerNorm, int kRowFrags, typename... Args>
void launch_tile(const TilePlan& plan, int64_t rows, size_t shared, Args... args) {
  auto kernel = bottleneck_tile_kernel<T, kLayerNorm, kRowFrags>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  const int64_t tiles = (rows + 16 * kRowFrags - 1) / (16 * kRowFrags);
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config =
      cluster_launch(static_cast<unsigned>(tiles * plan.cluster), kTileThreads, shared,
                     c10::cuda::getCurrentCUDAStream(), plan.cluster, attribute);
  // A clear refusal where the GPU's GPCs cannot hold one cluster (no sm_90 part known here is so small).
  TORCH_CHECK(cluster_fits(kernel, config), "bottleneck_forward_cuda: this GPU cannot hold a cluster of ",
              plan.cluster, " blocks of ", shared, " bytes of shared memory; pass a smaller forced plan (cluster=)");
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args..., plan.cluster));
}

template <typename T>
void launch_tile_kernel(const TilePlan& plan, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                        const at::Tensor& down_weight, const at::Tensor& down_bias, const at::Tensor& up_weight_t,
                        const at::Tensor& up_bias, const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                        const std::optional<at::Tensor>& ids, const std::optional<at::Tensor>& out_residual,
                        const std::optional<at::Tensor>& out_ln_weight, const std::optional<at::Tensor>& out_ln_bias,
                        at::Tensor& y, Params p) {
  const at::Tensor xx = aligned_rows(x, 16);
  const std::optional<at::Tensor> res = residual.has_value() ? std::optional(aligned_rows(*residual, 16)) : std::nullopt;
  const std::optional<at::Tensor> out_res =
      out_residual.has_value() ? std::optional(aligned_rows(*out_residual, 16)) : std::nullopt;
  p.x_stride = xx.stride(0);
  p.res_stride = res.has_value() ? res->stride(0) : 0;
  p.out_res_stride = out_res.has_value() ? out_res->stride(0) : 0;
  // The LayerNorm folded into the down-projection, as triton_kernels/bottleneck.py's _folded does it.
  const bool ln = ln_weight.has_value();
  const at::Tensor wd_f = down_weight.to(at::kFloat);
  const at::Tensor w_eff = aligned_rows(ln ? (wd_f * ln_weight->to(at::kFloat).unsqueeze(1)).to(x.scalar_type())
                                           : down_weight, 32);
  const at::Tensor c1 = ln ? w_eff.to(at::kFloat).sum(-1).contiguous() : down_bias.to(at::kFloat).contiguous();
  const at::Tensor c0 =
      ln ? (at::matmul(wd_f, ln_bias->to(at::kFloat).unsqueeze(-1)).squeeze(-1) + down_bias.to(at::kFloat)).contiguous()
         : c1;
  const at::Tensor wu_t = aligned_rows(up_weight_t, 32);
  const size_t shared = tile_layout(p.d / plan.cluster, p.m, 16 * plan.row_frags).total;
  const T* res_ptr = res.has_value() ? res->data_ptr<T>() : nullptr;
  const float* scale_ptr = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  const int* ids_ptr = ids.has_value() ? ids->data_ptr<int>() : nullptr;
  const T* out_res_ptr = out_res.has_value() ? out_res->data_ptr<T>() : nullptr;
  const T* out_ln_w = out_ln_weight.has_value() ? out_ln_weight->data_ptr<T>() : nullptr;
  const T* out_ln_b = out_ln_bias.has_value() ? out_ln_bias->data_ptr<T>() : nullptr;
  auto launch = [&](auto layer_norm, auto frags) {
    launch_tile<T, decltype(layer_norm)::value, decltype(frags)::value>(
        plan, p.rows, shared, xx.data_ptr<T>(), res_ptr, w_eff.data_ptr<T>(), c1.data_ptr<float>(),
        c0.data_ptr<float>(), wu_t.data_ptr<T>(), up_bias.data_ptr<T>(), scale_ptr, ids_ptr, out_res_ptr, out_ln_w,
        out_ln_b, y.data_ptr<T>(), p);
  };
  auto with_frags = [&](auto layer_norm) {
    switch (plan.row_frags) {
      case 4: launch(layer_norm, std::integral_constant<int, 4>{}); break;
      case 2: launch(layer_norm, std::integral_constant<int, 2>{}); break;
      default: launch(layer_norm, std::integral_constant<int, 1>{}); break;
    }
  };
  if (ln) {
    with_frags(std::true_type{});
  } else {
    with_frags(std::false_type{});
  }
}

}  // namespace

std::vector<int64_t> bottleneck_tile_plan_cuda(int64_t d, int64_t m, int64_t shared_optin, int64_t max_cluster) {
  const TilePlan plan = tile_plan(d, m, shared_optin, max_cluster);
  return {16 * plan.row_frags, plan.cluster};
}

at::Tensor bottleneck_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                   const at::Tensor& down_weight, const at::Tensor& down_bias,
                                   const at::Tensor& up_weight_t, const at::Tensor& up_bias,
                                   const std::optional<at::Tensor>& scale, double scale_value,
                                   const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                                   double ln_eps, const std::optional<at::Tensor>& ids, int64_t activation,
                                   const std::optional<at::Tensor>& out_residual,
                                   const std::optional<at::Tensor>& out_ln_weight,
                                   const std::optional<at::Tensor>& out_ln_bias, double out_ln_eps, int64_t tile_rows,
                                   int64_t cluster) {
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
  Params p{M, d, m, A, x.stride(0), res.stride(0), out_residual.has_value() ? out_residual->stride(0) : 0,
           scale_kind, static_cast<float>(scale_value), static_cast<float>(ln_eps), static_cast<float>(out_ln_eps),
           static_cast<int>(activation)};
  const TilePlan plan = plan_for(x, M, d, m, tile_rows, cluster);
  if (plan.row_frags > 0) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "bottleneck_forward_cuda", [&] {
      launch_tile_kernel<scalar_t>(plan, x, residual, down_weight, down_bias, up_weight_t, up_bias, scale, ln_weight,
                                   ln_bias, ids, out_residual, out_ln_weight, out_ln_bias, y, p);
    });
    return y;
  }
  // A few rows per block within kSharedBudget; one row per block beyond it (d = 12288 and 16384 are real
  // hidden sizes), the block then opting in to the shared memory the row needs, up to the device's limit
  // (fastpeft/ops/bottleneck.py's preference mirrors this: it picks this kernel only where the row fits).
  const int64_t per_row = (d + m) * static_cast<int64_t>(sizeof(float));
  const int64_t optin = shared_optin(x);
  TORCH_CHECK(per_row <= optin, "bottleneck_forward_cuda: d + m = ", d + m, " needs ", per_row,
              " bytes of shared memory per row, more than this GPU's ", optin);
  const int rows_per_block = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(8, kSharedBudget / per_row)));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((M + rows_per_block - 1) / rows_per_block);
  const size_t shared = static_cast<size_t>(rows_per_block) * per_row;
  FASTPEFT_DISPATCH_FLOATS(x.scalar_type(), "bottleneck_forward_cuda", [&] {
    const bool ln = ln_weight.has_value();
    auto kernel = ln ? bottleneck_rows_kernel<scalar_t, true> : bottleneck_rows_kernel<scalar_t, false>;
    if (shared > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared)));
    }
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
