"""Which backend and which CUDA launch run a bottleneck adapter's forward on a GPU (fastpeft/ops/bottleneck.py's
dispatch, and the cost model's): the rules, their reasons, and the mirror of csrc/bottleneck.cu's tile plan.

- **Decode** (at most 64 rows): the CUDA rows kernel, which stages a row of d + m floats (opting in past 48 KB).
- **Prefill on the CUDA tile kernel** where it reads x once and each projection once per 32 rows or more, and
  the Triton tiles could not: those read x twice, the second time from L2 only while the tiles in flight (two
  per SM) fit in it (d = 4096: 132 x 2 x 64 rows x 8 KB = 138 MB, more than the H200's 60 MB). The tile kernel
  spreads a tile of rows over a cluster of up to 8 blocks (sm_90), each owning a slice of d (x staged once in
  shared memory), so 64 rows fit at d = 4096 (benchmarks/roofline.py: 0.59 of the bandwidth roofline for the
  Triton tiles there, 0.76 for the clusters).
- **Prefill on the Triton tiles** everywhere else: their second read of x comes from L2 (d = 768: 0.78 of the
  roofline, against 0.70 for the clusters, whose barriers and launch weigh more on a small tile of work), or the
  CUDA kernel would re-read the projections every 16 rows (no clusters: sm_80, sm_89).

The thresholds are the cost model's, not measured: the first GPU run ranks them (the bench's fused:cuda and
fused:triton rows at each target shape).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

# csrc/bottleneck.cu's constants (tests/test_bottleneck.py reads them from the source).
CUDA_DECODE_MAX_M = 64  # kDecodeRows
CUDA_TILE_MAX_M = 256  # kTileMaxM
_TILE_WARPS = 8  # kTileWarps
_ROW_PAD = 8  # kRowPad
_ACC_LD = 20  # kAccLd
MAX_CLUSTER = 8  # kMaxCluster (csrc/cluster.cuh)
TWO_BLOCKS_PER_SM = 113 * 1024  # kTwoBlocksPerSm
TILE_STATIC_SHARED = 128  # kTileStaticShared

CUDA_FIRST = ("cuda", "triton")
TRITON_FIRST = ("triton", "cuda")


class Gpu(NamedTuple):
    """What the dispatch needs to know of a GPU."""

    shared_optin: int  # bytes of shared memory a block may opt in to
    max_cluster: int  # blocks per cluster it runs: 8 from sm_90 on, 1 before
    l2_bytes: int
    sms: int


H200 = Gpu(shared_optin=227 * 1024, max_cluster=MAX_CLUSTER, l2_bytes=60 * 1024**2, sms=132)


def gpu_of(device: torch.device) -> Gpu:
    """The :class:`Gpu` facts of a CUDA device (asked once per device: every prefill call dispatches on them)."""
    return _gpu_of_index(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _gpu_of_index(index: int) -> Gpu:
    props = torch.cuda.get_device_properties(index)
    return Gpu(getattr(props, "shared_memory_per_block_optin", 48 * 1024), MAX_CLUSTER if props.major >= 9 else 1,
               getattr(props, "L2_cache_size", 0), props.multi_processor_count)  # fmt: skip


class TilePlan(NamedTuple):
    rows: int  # rows of x per tile (16, 32 or 64)
    cluster: int  # blocks per cluster, each owning d / cluster features of the tile


def tile_layout_bytes(d_slice: int, m: int, rows: int) -> int:
    """csrc/bottleneck.cu's tile_layout(d_slice, m, rows).total: the dynamic shared memory of a block owning
    ``d_slice`` features of ``rows`` rows (x's slice in 16 bits, h's partial sums in fp32, z, row statistics)."""
    m_tiles = m // 16
    ksplit = 1 if m_tiles >= _TILE_WARPS else _TILE_WARPS // m_tiles
    h_parts = ksplit * rows * (m + 4) * 4
    warp_tiles = _TILE_WARPS * 16 * _ACC_LD * 4
    return rows * (d_slice + _ROW_PAD) * 2 + max(h_parts, warp_tiles) + rows * (m + _ROW_PAD) * 2 + 6 * rows * 4


@functools.cache  # every prefill call on a GPU asks: a few (d, m) per model
def cuda_tile_plan(d: int, m: int, gpu: Gpu) -> Optional[TilePlan]:
    """csrc/bottleneck.cu's tile_plan: the most rows per tile, two blocks per SM where they fit, then the fewest
    blocks per cluster; None where the tile kernel does not take d and m (multiples of 16, m <= 256)."""
    if d % 16 or m % 16 or not 0 < m <= CUDA_TILE_MAX_M:
        return None
    for frags in (4, 2, 1):
        for budget in (min(TWO_BLOCKS_PER_SM, gpu.shared_optin), gpu.shared_optin):
            cluster = 1
            while cluster <= gpu.max_cluster:
                fits = tile_layout_bytes(d // cluster, m, 16 * frags) + TILE_STATIC_SHARED <= budget
                if d % (16 * cluster) == 0 and fits:
                    return TilePlan(16 * frags, cluster)
                cluster *= 2
    return None


def triton_tile_rows(m: int, dtype: torch.dtype) -> Optional[int]:
    """Rows per program of the Triton forward on a GPU (None without triton)."""
    try:
        from fastpeft.triton_kernels.bottleneck import tile_options
    except ImportError:
        return None
    mb_pad = max(16, 1 << (m - 1).bit_length())
    return tile_options(mb_pad, dtype, backward=False, interpreter=False)["BLOCK_M"]


@functools.cache  # as cuda_tile_plan
def triton_rereads_x_from_hbm(d: int, m: int, dtype: torch.dtype, gpu: Gpu) -> bool:
    """Whether the Triton tiles in flight (two per SM) hold more of x than the L2 does, so that their second
    read of x comes from HBM."""
    rows = triton_tile_rows(m, dtype)
    return rows is None or gpu.sms * 2 * rows * d * dtype.itemsize > gpu.l2_bytes


def prefill_on_cuda_tiles(rows: int, d: int, m: int, dtype: torch.dtype, gpu: Gpu) -> bool:
    """Whether prefill takes csrc/bottleneck.cu's tile kernel (module docstring)."""
    if rows <= CUDA_DECODE_MAX_M or dtype not in (torch.float16, torch.bfloat16):
        return False
    plan = cuda_tile_plan(d, m, gpu)
    return plan is not None and plan.rows >= 32 and triton_rereads_x_from_hbm(d, m, dtype, gpu)


def preference(rows: int, d: int, m: int, dtype: torch.dtype, gpu: Gpu) -> tuple[str, ...]:
    """The backend order for ``rows`` rows [M, d] with bottleneck ``m`` on ``gpu`` (module docstring). Either
    backend takes every shape when forced."""
    decode = rows <= CUDA_DECODE_MAX_M and (d + m) * 4 <= gpu.shared_optin
    return CUDA_FIRST if decode or prefill_on_cuda_tiles(rows, d, m, dtype, gpu) else TRITON_FIRST
