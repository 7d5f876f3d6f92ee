"""A persistent Hopper kernel for the multi-adapter prefill: ``y[t] = x[t] W^T + bias + s_i (x[t] A_i^T) B_i^T``
(i = id[t]) in one launch, each token's adapter term one more step of the base GEMM's K loop and ``x A_i^T``
computed in the same pass over x.

The single-adapter kernel (triton_kernels/lora_persistent.py) for a prefill whose tokens carry their own
adapters: one program per SM walks the 128 x 128 output tiles, x, W and A through tensor descriptors (TMA on
sm_90), y stored once. A row block of a prefill holds a run or two of one adapter (a sequence's tokens share
it): the first tile to reach a row block multiplies each x block it loads by the A blocks of the row block's
first two adapters (its first token's, and the first token's of another, if any), keeps each token's own
columns, publishes the fp32 result and sets the row block's flag; the other tiles of the
row block read it from L2. A row block with more adapters (sequences under 128 tokens) has the rest computed
after the K loop, one more pass over its x rows per adapter, by that first tile only. Then every tile adds, per
adapter present in its rows, ``(s_i x A_i^T)`` of those rows, rounded to x's dtype as PEFT's ``lora_A`` output
is, times B_i's tile (zero past the adapter's rank): a few more MMA steps of r columns each.

No tile waits on another (one that finds the flag unset computes x A^T itself: the same instructions on the
same blocks, the same bits), and the last tile of a row block to finish resets its counts, as in the
single-adapter kernel. The cost model (benchmarks/roofline.py) predicts 1.07x cuBLAS's base GEMM for 4096
tokens in 8 segments at 4096 -> 4096 if the kernel reaches 0.95 of cuBLAS's GEMM speed, against 1.11x for what
ships (the terms written first, cuBLAS adding x W^T into them): MULTI_PERSISTENT_PREFILL_MIN_M keeps it off
until a GPU run ranks them (benchmarks/bench_multi_lora.py's fused:triton-persistent rows).

Takes a pool of one output slice (a plain linear layer) whose largest rank pads to at most MAX_R_PAD, 16-bit
x, W and pool, rows as TMA reads them (:func:`takes`). Ids outside [0, num_adapters) give their token the base
output: no id is ever used as an address before it is checked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    INTERPRET,
    arrival_counts,
    descriptor_scratch,
    dot_precision,
    first_columns_first,
    on_device,
    r_pad,
    rows_for_tma,
    sm_count,
)
from .lora_persistent import tile_options
from .multi_lora import adapter_of, next_run

# Rows from which the multi-adapter prefill takes this kernel instead of the terms and cuBLAS: off (never) until
# a GPU run says it is faster; the bench's fused:triton-persistent rows set it to time it.
MULTI_PERSISTENT_PREFILL_MIN_M = 2**62
# Two x A^T accumulators [BLOCK_M, R_PAD] beside the output tile's: at R_PAD = 64 they spill (255 registers on
# sm_90); at 32 and under they do not. Wider pools run the terms and cuBLAS.
MAX_R_PAD = 32


@triton.jit
def _shrink_step(x, a_desc, a_row, k0, xa, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """xa += x A^T for the x block at column k0, A's rows [R_PAD] from a_row of the pool's stacked A."""
    a = a_desc.load([a_row, k0]).T  # [BLOCK_K, R_PAD]
    if UPCAST:
        a = a.to(tl.float32)
    return tl.dot(x, a, xa, input_precision=DOT_PRECISION)


@triton.jit
def _base_loop(x_desc, w_desc, a_desc, row0, col0, a_row1, a_row2, k_steps, acc, xa1, xa2,
               SHRINKS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, R_PAD: tl.constexpr,
               BLOCK_K: tl.constexpr):  # fmt: skip
    """acc += x W^T over K for the tile at (row0, col0); with SHRINKS = 1 also xa1 += x A^T, with 2 also
    xa2 += x A^T, on the same x blocks, A's rows from a_row1 and a_row2 of the pool's stacked A (rows past an
    adapter's rank belong to the next one: the caller keeps each token's own columns)."""
    for step in range(k_steps):
        x = x_desc.load([row0, step * BLOCK_K])
        w = w_desc.load([col0, step * BLOCK_K]).T
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if SHRINKS >= 1:
            xa1 = _shrink_step(x, a_desc, a_row1, step * BLOCK_K, xa1, UPCAST, DOT_PRECISION)
        if SHRINKS == 2:
            xa2 = _shrink_step(x, a_desc, a_row2, step * BLOCK_K, xa2, UPCAST, DOT_PRECISION)
    return acc, xa1, xa2


@triton.jit
def _shrink_loop(x_desc, a_desc, row0, a_row, k_steps, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """x A^T for the row block at row0, A's rows from a_row: a third or later adapter's, after the K loop."""
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for step in range(k_steps):
        x = x_desc.load([row0, step * BLOCK_K])
        if UPCAST:
            x = x.to(tl.float32)
        xa = _shrink_step(x, a_desc, a_row, step * BLOCK_K, xa, UPCAST, DOT_PRECISION)
    return xa


@triton.jit
def _own_columns(xa, run, rank, offs_r):
    """xa's rows of ``run`` up to ``rank`` columns; zero elsewhere (xa is finite). Products with 0/1 factors, not a
    select: a mask met by the MMA operand's layout would move through shared memory, which takes no 1-bit type."""
    return xa * run.to(tl.float32)[:, None] * (offs_r < rank).to(tl.float32)[None, :]


@triton.jit
def _multi_lora_persistent_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, ids_ptr, a_offsets_ptr, b_starts_ptr, scalings_ptr, bias_ptr, y_ptr, xa_ptr,
    published_ptr, finished_ptr,
    M, N, K, P, num_adapters,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One program per SM over the output tiles, every row block's first column tile first. x [M, K], W [N, K],
    the pool's A [P, K] (TMA: adapter i's rows from a_offsets[i], its rank the next offset's difference); B
    transposed and flat, [rank_i, N] from b_starts[i]; scalings [n]; ids [M]; xa_ptr fp32 [M, R_PAD] scratch;
    published_ptr and finished_ptr one int32 count per row block, zero at launch and left zero."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[P, K], strides=[K, 1], block_shape=[R_PAD, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        pid_m, pid_n = first_columns_first(tile, num_m, num_n, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        rows = row0 + tl.arange(0, BLOCK_M)
        ids = tl.load(ids_ptr + rows, mask=rows < M, other=-1)
        valid, _ = adapter_of(ids, num_adapters)
        # The row block's first two adapters: its first token's, and the first token's of another (-1: none).
        first, run1 = next_run(ids, valid, BLOCK_M)
        second, run2 = next_run(ids, valid & ~run1, BLOCK_M)
        has_adapter = first >= 0
        xa_offsets = rows[:, None].to(tl.int64) * R_PAD + offs_r[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        xa1 = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        xa2 = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        published = tl.atomic_add(published_ptr + pid_m, 0, sem="acquire", scope="gpu")
        if has_adapter & (published == 0):
            a_row1 = tl.load(a_offsets_ptr + first)
            rank1 = tl.load(a_offsets_ptr + first + 1) - a_row1
            if second >= 0:
                a_row2 = tl.load(a_offsets_ptr + second)
                acc, xa1, xa2 = _base_loop(x_desc, w_desc, a_desc, row0, col0, a_row1, a_row2, k_steps, acc, xa1,
                                           xa2, 2, UPCAST, DOT_PRECISION, R_PAD, BLOCK_K)  # fmt: skip
                xa2 = _own_columns(xa2, run2, tl.load(a_offsets_ptr + second + 1) - a_row2, offs_r)
            else:  # one adapter in these rows (xa2 stays zero)
                acc, xa1, xa2 = _base_loop(x_desc, w_desc, a_desc, row0, col0, a_row1, a_row1, k_steps, acc, xa1,
                                           xa2, 1, UPCAST, DOT_PRECISION, R_PAD, BLOCK_K)  # fmt: skip
            xa = _own_columns(xa1, run1, rank1, offs_r) + xa2
            rest = valid & ~run1 & ~run2
            while tl.max(rest.to(tl.int32), axis=0) > 0:  # a third adapter or more: another pass over x's rows
                adapter, run = next_run(ids, rest, BLOCK_M)
                a_row = tl.load(a_offsets_ptr + adapter)
                own = _shrink_loop(x_desc, a_desc, row0, a_row, k_steps, UPCAST, DOT_PRECISION, BLOCK_M, R_PAD,
                                   BLOCK_K)  # fmt: skip
                xa += _own_columns(own, run, tl.load(a_offsets_ptr + adapter + 1) - a_row, offs_r)
                rest = rest & ~run
            tl.store(xa_ptr + xa_offsets, xa, mask=(rows < M)[:, None])
            tl.debug_barrier()  # every thread's part stored before the row block is flagged (release)
            tl.atomic_xchg(published_ptr + pid_m, 1, sem="release", scope="gpu")
        else:  # no adapter in these rows, or another tile published their x A^T
            acc, xa1, xa2 = _base_loop(x_desc, w_desc, a_desc, row0, col0, 0, 0, k_steps, acc, xa1, xa2, 0, UPCAST,
                                       DOT_PRECISION, R_PAD, BLOCK_K)  # fmt: skip
            xa = tl.load(xa_ptr + xa_offsets, mask=(rows < M)[:, None] & has_adapter, other=0.0, cache_modifier=".cg")
        # Each adapter's K step: its rows of s x A^T, rounded to x's dtype, times B's tile [R_PAD, BLOCK_N].
        cols = col0 + tl.arange(0, BLOCK_N)
        pending = valid
        while tl.max(pending.to(tl.int32), axis=0) > 0:
            adapter, run = next_run(ids, pending, BLOCK_M)
            rank = tl.load(a_offsets_ptr + adapter + 1) - tl.load(a_offsets_ptr + adapter)
            b_start = tl.load(b_starts_ptr + adapter)
            scaling = tl.load(scalings_ptr + adapter)
            b = tl.load(b_ptr + b_start + offs_r[:, None].to(tl.int64) * N + cols[None, :],
                        mask=(offs_r < rank)[:, None] & (cols < N)[None, :], other=0.0)  # fmt: skip
            term = _own_columns(xa * scaling, run, rank, offs_r).to(b.dtype)
            if UPCAST:
                term = term.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(term, b, acc, input_precision=DOT_PRECISION)
            pending = pending & ~run
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([row0, col0], acc.to(y_ptr.dtype.element_ty))
        # The row block's last tile to finish leaves its counts at zero for the next launch.
        if tl.atomic_add(finished_ptr + pid_m, 1, sem="relaxed", scope="gpu") == num_n - 1:
            tl.atomic_xchg(published_ptr + pid_m, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(finished_ptr + pid_m, 0, sem="relaxed", scope="gpu")


def takes(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, num_slices: int, max_rank: int) -> bool:
    """Whether this kernel takes the layer: one output slice, a 16-bit dtype, the pool's largest rank within
    MAX_R_PAD once padded, and x, W, the pool's A and y with rows as TMA reads them (contiguous, 16-byte
    aligned: K and N multiples of 8)."""
    return (
        num_slices == 1
        and lora_a.shape[0] > 0
        and x.dtype in (torch.float16, torch.bfloat16)
        and r_pad(max_rank) <= MAX_R_PAD
        and (weight.shape[0] * x.element_size()) % 16 == 0
        and all(rows_for_tma(t) for t in (x, weight, lora_a))
    )


def multi_lora_linear_persistent(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    a_offsets: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    b_starts: torch.Tensor,
    scalings: torch.Tensor,
    max_rank: int,
) -> torch.Tensor:
    """``y[t] = x[t] W^T + bias + s_i (x[t] A_i^T) B_i^T`` with i = adapter_ids[t] (outside [0, n): none) on the
    persistent kernel. x [M, K], weight [N, K], lora_a [P, K] (fp16/bf16, one dtype, as :func:`takes`
    requires); a_offsets int32 [n + 1]; lora_b flat (B_i transposed, [rank_i, N] at b_starts[0, i]);
    b_starts int64 and scalings fp32 [1, n] (the one slice's tables); adapter_ids int32/int64 [M]; bias [N] or
    None; ``max_rank`` the pool's largest rank. Returns y [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    options = tile_options()
    padded = r_pad(max_rank)
    row_blocks = triton.cdiv(m, options["BLOCK_M"])
    tiles = row_blocks * triton.cdiv(n, options["BLOCK_N"])
    programs = min(tiles, 4 if INTERPRET else sm_count(x.device))
    xa = torch.empty((m, padded), device=x.device, dtype=torch.float32)
    counts = arrival_counts(x.device, 2 * row_blocks)  # per row block: published, finished
    if x.is_cuda:
        triton.set_allocator(descriptor_scratch)
    with on_device(x):
        _multi_lora_persistent_kernel[(programs,)](
            x, weight, lora_a, lora_b, adapter_ids.contiguous(), a_offsets, b_starts, scalings,
            y if bias is None else bias.contiguous(), y, xa, counts[:row_blocks], counts[row_blocks:],
            m, n, k, lora_a.shape[0], a_offsets.numel() - 1,
            HAS_BIAS=bias is not None, R_PAD=padded, DOT_PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET,
            **options,
        )  # fmt: skip
    return y
