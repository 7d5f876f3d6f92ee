"""Triton kernels for many LoRA adapters in one batch (punica-style shrink and expand over an adapter pool).

The pool (fastpeft.ops.adapter_pool.AdapterPool) stacks every adapter's rank rows without padding: adapter i owns
rows ``a_offsets[i]:a_offsets[i + 1]`` of ``lora_a`` [P, K] (its A rows for every output slice); slice s of
adapter i has rank ``ranks[s, i]``, its columns of v start at ``v_starts[s, i]``, its B transposed lies
row-major [rank, width_s] at element ``b_starts[s, i]`` of the flat ``lora_b``. Token t carries
``adapter_ids[t]``; -1 means no adapter.

- shrink: ``v[t, :R_i] = x[t] @ lora_a[rows of i].T`` in fp32 (x read once for every slice); columns past the
  adapter's total rank, and rows of tokens without an adapter, are zero.
- expand: ``y[t, slice s] = base[t, slice s] + scaling[s, i] * v[t, slice s's columns] @ B[s, i].T`` in fp32,
  rounded once to y's dtype. One launch covers every slice (grid axis 2).

Two forms of each:
- per token (decode, few rows): one program per token, GEMV-like, reading only that token's adapter;
- per tile (prefill, the segment form): a program takes BLOCK_M consecutive tokens and walks the runs of one
  adapter inside them with ``tl.dot``; when contiguous tokens share an adapter (a sequence's segment), a tile
  costs one or two dot products, and any id layout stays correct (a tile of distinct ids is BLOCK_M runs).

With a batch description (decode): the grouped shrink (each adapter's A once per step, split over K into fp32
slabs), then the expand or the base GEMM with the expand in its epilogue (``sgmv_tile`` and ``sgmv_epilogue``,
which triton_kernels/multi_lora_4bit.py's 4-bit layer shares), launched on sm_90 to start while the shrink runs.

An id outside [0, num_adapters) reads nothing (masked loads: the token gets the base output), so a bad id never
addresses memory outside the pool. Grids depend on the shapes and the pool's largest rank only, never on the ids,
and nothing is allocated from data: every launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import dot_precision, gdc_launch_dependents, gdc_wait, on_device, programmatic_launch, sm_count
from .lora import pinned_config

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Rows at or below which the per-token kernels run; above, the per-tile (tl.dot) kernels. The interpreter takes
# the tile kernels from 9 rows, so that the tests' tiny shapes exercise both forms.
DECODE_MAX_M = 8 if INTERPRET else 64
# The tile kernels' blocks and launch options (the interpreter gets tiny ones); scripts/compile_triton.py
# compiles exactly these for sm_90.
TILE_M = 16 if INTERPRET else 64
TILE_K = 16 if INTERPRET else 64
TILE_N = 16 if INTERPRET else 128
# The expand's accumulator [64, 128] (fp32) and its rank chunk's v and B tiles take two warpgroups without spilling.
TILE_OPTIONS = {"shrink": dict(num_warps=4, num_stages=3), "expand": dict(num_warps=8, num_stages=2)}
# The rank is walked in chunks of at most this many columns of v (tile kernels), so their tiles fit in registers
# and shared memory whatever the pool's rank; the interpreter's tiny chunk exercises the chunk loops.
TILE_RANK_CHUNK = 16 if INTERPRET else 64


def tile_blocks(dtype: torch.dtype, v_width: int) -> tuple[int, int]:
    """(rank chunk, K block) of the tile kernels: fp32 operands take halves (their full-precision dots run on
    the FMA units with both tiles in registers; scripts/compile_triton.py shows the 16-bit sizes spill there)."""
    if dtype == torch.float32 and not INTERPRET:
        return min(v_width, TILE_RANK_CHUNK // 2), TILE_K // 2
    return min(v_width, TILE_RANK_CHUNK), TILE_K


# The per-token kernels hold a [rank chunk, K or N block] tile in registers: at most this many elements.
TOKEN_TILE_ELEMENTS = 256 if INTERPRET else 2048


def token_blocks(v_width: int, extent: int) -> tuple[int, int]:
    """(rank chunk, block along K or N) of a per-token kernel: blocks of up to 128 along the extent (K for the
    shrink, the widest slice for the expand), the rank chunk what the register budget leaves, at least 16."""
    block = min(128, max(16, triton.next_power_of_2(extent)))
    return min(v_width, max(16, TOKEN_TILE_ELEMENTS // block)), block


@triton.jit
def adapter_of(ids, num_adapters):
    """(valid, index safe to address with) for adapter ids; invalid ids (-1, or outside the pool) read nothing."""
    valid = (ids >= 0) & (ids < num_adapters)
    return valid, tl.where(valid, ids, 0)


@triton.jit
def _slice_of(adapter, valid, s, num_adapters, ranks_ptr, v_starts_ptr, b_starts_ptr, scalings_ptr):
    """(rank, first column in v, first element in lora_b, scaling) of slice s of ``adapter``; rank 0 if invalid."""
    at = tl.cast(s, tl.int64) * num_adapters + adapter
    rank = tl.load(ranks_ptr + at, mask=valid, other=0)
    v_start = tl.load(v_starts_ptr + at, mask=valid, other=0)
    b_start = tl.load(b_starts_ptr + at, mask=valid, other=0)
    scaling = tl.load(scalings_ptr + at, mask=valid, other=0.0)
    return rank, v_start, b_start, scaling


@triton.jit
def next_run(ids, pending, BLOCK_M: tl.constexpr):
    """The adapter of the tile's first pending token, and the pending tokens that use it."""
    lanes = tl.arange(0, BLOCK_M)
    first = tl.min(tl.where(pending, lanes, BLOCK_M), axis=0)
    adapter = tl.max(tl.where(lanes == first, ids, -1), axis=0)
    return adapter, pending & (ids == adapter)


@triton.jit
def _shrink_token_kernel(
    x_ptr, a_ptr, ids_ptr, a_offsets_ptr, v_ptr,
    K, num_adapters,
    stride_xm, stride_xk, stride_ap, stride_ak, stride_vm,
    V_WIDTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # v's row in chunks of BLOCK_R columns (the A tile [BLOCK_R, BLOCK_K] stays small in registers at any rank);
    # chunks past the adapter's rank are written as zeros without reading anything.
    t = tl.program_id(0).to(tl.int64)
    valid, adapter = adapter_of(tl.load(ids_ptr + t), num_adapters)
    start = tl.load(a_offsets_ptr + adapter, mask=valid, other=0)
    rank = tl.load(a_offsets_ptr + adapter + 1, mask=valid, other=0) - start
    x_row = x_ptr + t * stride_xm
    for r0 in range(0, V_WIDTH, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < rank
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        if r0 < rank:
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < K
                xk = tl.load(x_row + ks.to(tl.int64) * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
                a = tl.load(
                    a_ptr + (start + rows)[:, None].to(tl.int64) * stride_ap + ks[None, :].to(tl.int64) * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(a * xk[None, :], axis=1)
        tl.store(v_ptr + t * stride_vm + rows, acc)


@triton.jit
def _shrink_tile_kernel(
    x_ptr, a_ptr, ids_ptr, a_offsets_ptr, v_ptr,
    M, K, num_adapters,
    stride_xm, stride_xk, stride_ap, stride_ak, stride_vm,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    V_WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Per run of one adapter, v's columns in chunks of BLOCK_R (the accumulator and the A tile stay within
    # registers and shared memory at any rank: a packed q/k/v pool of rank 128 per slice has v 512 wide); the
    # x tile is re-read per chunk, from L2.
    toks = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = toks < M
    ids = tl.load(ids_ptr + toks, mask=in_range, other=-1)
    valid, _ = adapter_of(ids, num_adapters)
    v_rows = v_ptr + toks[:, None].to(tl.int64) * stride_vm
    x_rows = x_ptr + toks[:, None].to(tl.int64) * stride_xm
    for r0 in range(0, V_WIDTH, BLOCK_R):  # tokens without an adapter: v's row is zero
        cols = r0 + tl.arange(0, BLOCK_R)
        tl.store(
            v_rows + cols[None, :], tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), mask=(in_range & ~valid)[:, None]
        )
    pending = valid
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        adapter, run = next_run(ids, pending, BLOCK_M)
        start = tl.load(a_offsets_ptr + adapter)
        rank = tl.load(a_offsets_ptr + adapter + 1) - start
        for r0 in range(0, V_WIDTH, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            if r0 < rank:
                for k0 in range(0, K, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_mask = ks < K
                    x = tl.load(x_rows + ks[None, :].to(tl.int64) * stride_xk, mask=run[:, None] & k_mask[None, :],
                                other=0.0)  # fmt: skip
                    a = tl.load(  # A's rows of this adapter, as [BLOCK_K, BLOCK_R]
                        a_ptr + (start + rows)[None, :].to(tl.int64) * stride_ap + ks[:, None].to(tl.int64) * stride_ak,
                        mask=(rows < rank)[None, :] & k_mask[:, None],
                        other=0.0,
                    )
                    if UPCAST:
                        x = x.to(tl.float32)
                        a = a.to(tl.float32)
                    acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
            tl.store(v_rows + rows[None, :], acc, mask=run[:, None])
        pending = pending & (ids != adapter)


@triton.jit
def _expand_token_kernel(
    base_ptr, v_ptr, b_ptr, ids_ptr, ranks_ptr, v_starts_ptr, b_starts_ptr, scalings_ptr, out_starts_ptr, y_ptr,
    num_adapters,
    stride_base_m, stride_base_n, stride_vm, stride_ym, stride_yn,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    t, s = tl.program_id(0).to(tl.int64), tl.program_id(2)
    out_start = tl.load(out_starts_ptr + s)
    width = tl.load(out_starts_ptr + s + 1) - out_start
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < width  # slices narrower than the widest leave their last column blocks idle
    valid, adapter = adapter_of(tl.load(ids_ptr + t), num_adapters)
    rank, v_start, b_start, scaling = _slice_of(
        adapter, valid, s, num_adapters, ranks_ptr, v_starts_ptr, b_starts_ptr, scalings_ptr
    )
    delta = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # the rank in chunks: the B tile [BLOCK_R, BLOCK_N] stays in registers
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < rank
        v = tl.load(v_ptr + t * stride_vm + v_start + rows, mask=row_mask, other=0.0)
        b = tl.load(
            b_ptr + b_start + rows[:, None].to(tl.int64) * width + cols[None, :],
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        delta += tl.sum(v[:, None] * b, axis=0)
    out_cols = (out_start + cols).to(tl.int64)
    base = tl.load(base_ptr + t * stride_base_m + out_cols * stride_base_n, mask=col_mask, other=0.0)
    y = (base.to(tl.float32) + delta * scaling).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + t * stride_ym + out_cols * stride_yn, y, mask=col_mask)


@triton.jit
def _expand_tile_kernel(
    base_ptr, v_ptr, b_ptr, ids_ptr, ranks_ptr, v_starts_ptr, b_starts_ptr, scalings_ptr, out_starts_ptr, y_ptr,
    M, num_adapters,
    stride_base_m, stride_base_n, stride_vm, stride_ym, stride_yn,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(2)
    out_start = tl.load(out_starts_ptr + s)
    width = tl.load(out_starts_ptr + s + 1) - out_start
    toks = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = toks < M
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < width
    out_cols = (out_start + cols).to(tl.int64)
    tile_mask = in_range[:, None] & col_mask[None, :]
    base = tl.load(
        base_ptr + toks[:, None].to(tl.int64) * stride_base_m + out_cols[None, :] * stride_base_n,
        mask=tile_mask,
        other=0.0,
    )
    acc = base.to(tl.float32)
    ids = tl.load(ids_ptr + toks, mask=in_range, other=-1)
    pending, _ = adapter_of(ids, num_adapters)
    v_rows = v_ptr + toks[:, None].to(tl.int64) * stride_vm
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        adapter, run = next_run(ids, pending, BLOCK_M)
        rank, v_start, b_start, scaling = _slice_of(
            adapter, True, s, num_adapters, ranks_ptr, v_starts_ptr, b_starts_ptr, scalings_ptr
        )
        # The rank in chunks of BLOCK_R: the v and B tiles fit in shared memory at any rank (a pool of rank 128
        # per q/k/v slice has v 512 wide; whole, its tiles would need ~384 KB).
        for r0 in range(0, rank, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            v = tl.load(v_rows + v_start + rows[None, :], mask=run[:, None] & (rows < rank)[None, :], other=0.0)
            b = tl.load(
                b_ptr + b_start + rows[:, None].to(tl.int64) * width + cols[None, :],
                mask=(rows < rank)[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            # B's 16-bit values are exact in tf32, so a tf32 dot only rounds v, to 11 bits.
            acc = tl.dot(v * scaling, b, acc, input_precision=DOT_PRECISION)
        pending = pending & (ids != adapter)
    tl.store(
        y_ptr + toks[:, None].to(tl.int64) * stride_ym + out_cols[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=tile_mask,
    )


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, order_ptr, starts_ptr, a_offsets_ptr, part_ptr,
    M, K, k_chunk,
    stride_xm, stride_xk, stride_ap, stride_ak,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
    V_WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Program (adapter, K split): the adapter's tokens (a segment of the batch description's order) times its A
    # rows over one chunk of K, in tiles of BLOCK_M tokens: A's chunk is read once per tile, so once per step
    # when the adapter has at most BLOCK_M tokens (decode). The split's partial sums go to its own slab of
    # ``part`` [splits, M, V_WIDTH]; the expand adds the slabs in split order (no atomics). With PDL the next
    # kernel (launched programmatically) may start now: it waits for these slabs before it reads them.
    if PDL:
        gdc_launch_dependents()
    a = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)  # K offsets and the slab in 64 bits
    seg_lo = tl.load(starts_ptr + a)
    seg_hi = tl.load(starts_ptr + a + 1)
    start = tl.load(a_offsets_ptr + a)
    rank = tl.load(a_offsets_ptr + a + 1) - start
    k_lo = split * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    part = part_ptr + split * M * V_WIDTH
    for t0 in range(seg_lo, seg_hi, BLOCK_M):
        pos = t0 + tl.arange(0, BLOCK_M)
        in_seg = pos < seg_hi
        toks = tl.load(order_ptr + pos, mask=in_seg, other=0).to(tl.int64)
        for r0 in range(0, rank, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_mask = rows < rank
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < k_hi
                x = tl.load(x_ptr + toks[:, None] * stride_xm + ks[None, :] * stride_xk,
                            mask=in_seg[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
                w = tl.load(a_ptr + (start + rows)[None, :].to(tl.int64) * stride_ap + ks[:, None] * stride_ak,
                            mask=row_mask[None, :] & k_mask[:, None], other=0.0)  # fmt: skip
                if UPCAST:
                    x = x.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
            tl.store(part + toks[:, None] * V_WIDTH + rows[None, :], acc, mask=in_seg[:, None] & row_mask[None, :])


@triton.jit
def _grouped_term(
    acc, part_ptr, b_ptr, toks, rows_mask, rank, v_start, b_start, scaling, width, cols, col_mask, M, splits,
    PRECISION: tl.constexpr, V_WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``acc + scaling * v B^T`` for one adapter's slice over a tile of tokens ``toks`` (rows outside
    ``rows_mask`` add nothing) and columns ``cols``: v summed over the grouped shrink's slabs in split order, B's
    tile read once, the rank in chunks of BLOCK_R."""
    for r0 in range(0, rank, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < rank
        v_mask = rows_mask[:, None] & row_mask[None, :]
        v_offs = toks[:, None] * V_WIDTH + (v_start + rows)[None, :]
        v = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for split in range(0, splits):
            v += tl.load(part_ptr + tl.cast(split, tl.int64) * M * V_WIDTH + v_offs, mask=v_mask, other=0.0)
        b = tl.load(b_ptr + b_start + rows[:, None].to(tl.int64) * width + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)  # fmt: skip
        acc = tl.dot(v * scaling, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _sgmv_expand_kernel(
    base_ptr, part_ptr, b_ptr, order_ptr, starts_ptr, ranks_ptr, v_starts_ptr, b_starts_ptr, scalings_ptr,
    out_starts_ptr, y_ptr,
    M, num_adapters, splits,
    stride_base_m, stride_base_n, stride_ym, stride_yn,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
    V_WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Program (group, column tile, slice): the group's tokens (adapter a's, or for a = num_adapters the tokens
    # without one, which get the base output) in tiles of BLOCK_M: v summed over the shrink's splits in order,
    # times the slice's B tile (read once per token tile), scaled, added to base, written once.
    a = tl.program_id(0)
    s, width, cols, col_mask, out_cols = _slice_columns(out_starts_ptr, BLOCK_N)
    seg_lo = tl.load(starts_ptr + a)
    seg_hi = tl.load(starts_ptr + a + 1)
    rank, v_start, b_start, scaling = _slice_of(
        a, a < num_adapters, s, num_adapters, ranks_ptr, v_starts_ptr, b_starts_ptr, scalings_ptr
    )
    if PDL:  # launched while the shrink ran: its slabs are whole from here on
        gdc_wait()
    for t0 in range(seg_lo, seg_hi, BLOCK_M):
        pos = t0 + tl.arange(0, BLOCK_M)
        in_seg = pos < seg_hi
        toks = tl.load(order_ptr + pos, mask=in_seg, other=0).to(tl.int64)
        mask = in_seg[:, None] & col_mask[None, :]
        acc = tl.load(base_ptr + toks[:, None] * stride_base_m + out_cols[None, :] * stride_base_n, mask=mask,
                      other=0.0).to(tl.float32)  # fmt: skip
        acc = _grouped_term(acc, part_ptr, b_ptr, toks, in_seg, rank, v_start, b_start, scaling, width, cols, col_mask,
                            M, splits, DOT_PRECISION, V_WIDTH, BLOCK_M, BLOCK_R)  # fmt: skip
        tl.store(y_ptr + toks[:, None] * stride_ym + out_cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=mask)  # fmt: skip


@triton.jit
def _sgmv_linear_kernel(
    x_ptr, w_ptr, bias_ptr, part_ptr, b_ptr, order_ptr, starts_ptr, ranks_ptr, v_starts_ptr, b_starts_ptr,
    scalings_ptr, out_starts_ptr, y_ptr,
    M, K, num_adapters, splits,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    PDL: tl.constexpr, V_WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    # Program (row tile of the tokens in the description's order, column tile, slice): the base GEMM x W^T (+
    # bias) of its tokens over the slice's columns, streaming W once per row tile (decode: one row tile), then
    # the expand in the epilogue: the tokens sorted by adapter, each adapter whose tokens meet the tile adds
    # s v B^T from its B tile (read once per column tile), v summed over the shrink's slabs in split order.
    # y is written once; no separate pass over it. With PDL this kernel starts while the shrink runs (the base
    # GEMM needs nothing of it) and waits for the slabs before the epilogue.
    s, width, cols, col_mask, out_cols, tile_lo, pos, in_rows, toks = sgmv_tile(order_ptr, out_starts_ptr, M,
                                                                                BLOCK_M, BLOCK_N)  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + toks[:, None] * stride_xm + ks[None, :].to(tl.int64) * stride_xk,
                    mask=in_rows[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_ptr + out_cols[None, :] * stride_wn + ks[:, None].to(tl.int64) * stride_wk,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # fmt: skip
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    sgmv_epilogue(acc, part_ptr, b_ptr, starts_ptr, ranks_ptr, v_starts_ptr, b_starts_ptr, scalings_ptr, y_ptr,
                  s, width, cols, col_mask, out_cols, tile_lo, pos, in_rows, toks, M, num_adapters, splits,
                  stride_ym, stride_yn, PDL, LORA_PRECISION, V_WIDTH, BLOCK_M, BLOCK_R)  # fmt: skip


@triton.jit
def _slice_columns(out_starts_ptr, BLOCK_N: tl.constexpr):
    """The program's slice (grid axis 2) and column tile (axis 1): (slice, its width, the tile's columns in it,
    their mask, their output columns)."""
    s = tl.program_id(2)
    out_start = tl.load(out_starts_ptr + s)
    width = tl.load(out_starts_ptr + s + 1) - out_start
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return s, width, cols, cols < width, (out_start + cols).to(tl.int64)


@triton.jit
def sgmv_tile(order_ptr, out_starts_ptr, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A decode layer program's tile (row tile of the tokens in the description's order, column tile, slice):
    (slice, its width, the tile's columns in it, their mask, their output columns, the first position, the
    positions, their mask, the tokens at them)."""
    s, width, cols, col_mask, out_cols = _slice_columns(out_starts_ptr, BLOCK_N)
    tile_lo = tl.program_id(0) * BLOCK_M
    pos = tile_lo + tl.arange(0, BLOCK_M)
    in_rows = pos < M
    toks = tl.load(order_ptr + pos, mask=in_rows, other=0).to(tl.int64)
    return s, width, cols, col_mask, out_cols, tile_lo, pos, in_rows, toks


@triton.jit
def sgmv_epilogue(
    acc, part_ptr, b_ptr, starts_ptr, ranks_ptr, v_starts_ptr, b_starts_ptr, scalings_ptr, y_ptr,
    s, width, cols, col_mask, out_cols, tile_lo, pos, in_rows, toks, M, num_adapters, splits, stride_ym, stride_yn,
    PDL: tl.constexpr, LORA_PRECISION: tl.constexpr, V_WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    """The grouped expand on a decode layer's tile (:func:`sgmv_tile`), then y's only write: each adapter whose
    tokens meet the tile adds s v B^T from its B tile, v summed over the shrink's slabs in split order. With PDL
    (the kernel launched while the shrink ran) the slabs are awaited here, after the base product."""
    tile_hi = tl.minimum(tile_lo + BLOCK_M, M)
    if PDL:
        gdc_wait()
    for a in range(0, num_adapters):
        lo = tl.maximum(tl.load(starts_ptr + a), tile_lo)
        hi = tl.minimum(tl.load(starts_ptr + a + 1), tile_hi)
        if lo < hi:
            rank, v_start, b_start, scaling = _slice_of(
                a, True, s, num_adapters, ranks_ptr, v_starts_ptr, b_starts_ptr, scalings_ptr
            )
            mine = (pos >= lo) & (pos < hi)
            acc = _grouped_term(acc, part_ptr, b_ptr, toks, mine, rank, v_start, b_start, scaling, width, cols,
                                col_mask, M, splits, LORA_PRECISION, V_WIDTH, BLOCK_M, BLOCK_R)  # fmt: skip
    tl.store(y_ptr + toks[:, None] * stride_ym + out_cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=in_rows[:, None] & col_mask[None, :])  # fmt: skip


def multi_lora_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, a_offsets: torch.Tensor, adapter_ids: torch.Tensor, v_width: int
) -> torch.Tensor:
    """``v[t, :R] = x[t] @ A[id[t]].T``: fp32 [M, v_width] (the rank block: a power of two >= 16 and >= the
    pool's largest total rank, chosen by fastpeft.ops.multi_lora; columns past each token's rank, and whole rows
    of tokens without an adapter, are zero). x [M, K]; lora_a [P, K]; a_offsets int32 [n + 1]; adapter_ids
    int32/int64 [M]."""
    m, k = x.shape
    adapter_ids = adapter_ids.contiguous()  # the kernels read ids[t] at t (a no-op for the usual contiguous ids)
    v = torch.empty((m, v_width), device=x.device, dtype=torch.float32)
    if m == 0:
        return v
    num_adapters = a_offsets.numel() - 1
    strides = (x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), v.stride(0))
    with on_device(x):
        if m <= DECODE_MAX_M:
            block_r, block_k = token_blocks(v_width, k)
            _shrink_token_kernel[(m,)](
                x, lora_a, adapter_ids, a_offsets, v, k, num_adapters, *strides,
                V_WIDTH=v_width, BLOCK_R=block_r, BLOCK_K=block_k,
            )  # fmt: skip
        else:
            block_r, block_k = tile_blocks(x.dtype, v_width)
            _shrink_tile_kernel[(triton.cdiv(m, TILE_M),)](
                x, lora_a, adapter_ids, a_offsets, v, m, k, num_adapters, *strides,
                DOT_PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET, V_WIDTH=v_width, BLOCK_M=TILE_M,
                BLOCK_R=block_r, BLOCK_K=block_k, **TILE_OPTIONS["shrink"],
            )  # fmt: skip
    return v


def multi_lora_expand(
    base: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
    v_starts: torch.Tensor,
    b_starts: torch.Tensor,
    scalings: torch.Tensor,
    out_starts: torch.Tensor,
    max_width: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[t, slice s] = base[t, slice s] + scaling[s, i] * v[t, cols of s] @ B[s, i].T`` in fp32, rounded once
    to base's dtype. base [M, N]; v fp32 [M, v_width] from :func:`multi_lora_shrink`; lora_b flat; ranks,
    v_starts int32 [S, n], b_starts int64 [S, n], scalings fp32 [S, n], out_starts int32 [S + 1]; ``max_width``
    the widest slice. ``out`` may be ``base`` itself (each element is read before it is written, by the same
    program)."""
    m, n = base.shape
    adapter_ids = adapter_ids.contiguous()
    y = torch.empty_like(base) if out is None else out
    if m == 0 or n == 0:
        return y
    num_slices, num_adapters = ranks.shape
    tables = (ranks, v_starts, b_starts, scalings, out_starts)
    strides = (base.stride(0), base.stride(1), v.stride(0), y.stride(0), y.stride(1))
    with on_device(base):
        if m <= DECODE_MAX_M:
            block_r, block_n = token_blocks(v.shape[1], max_width)
            grid = (m, triton.cdiv(max_width, block_n), num_slices)
            _expand_token_kernel[grid](
                base, v, lora_b, adapter_ids, *tables, y, num_adapters, *strides,
                BLOCK_R=block_r, BLOCK_N=block_n,
            )  # fmt: skip
        else:
            block_n = min(TILE_N, max(16, triton.next_power_of_2(max_width)))
            grid = (triton.cdiv(m, TILE_M), triton.cdiv(max_width, block_n), num_slices)
            _expand_tile_kernel[grid](
                base, v, lora_b, adapter_ids, *tables, y, m, num_adapters, *strides,
                DOT_PRECISION=dot_precision(base.dtype) if base.dtype == torch.float32 else "tf32",
                BLOCK_M=TILE_M, BLOCK_R=tile_blocks(base.dtype, v.shape[1])[0], BLOCK_N=block_n,
                **TILE_OPTIONS["expand"],
            )  # fmt: skip
    return y


# The grouped (SGMV) kernels' blocks: decode segments are a few tokens (16, the least tl.dot takes); K in
# steps of 128 (64 beside a rank chunk wider than 32: [128, 64] A tiles spill on 4 warps), N in tiles of 128;
# the interpreter's small ones exercise every loop.
SGMV_M = 16
SGMV_RANK_CHUNK = 16 if INTERPRET else 64
# The kernel after the grouped shrink (the decode tiles, or the expand) is launched to start while the shrink
# runs, on sm_90 (programmatic dependent launch): its base GEMM or its loads need nothing of the shrink, and it
# waits for the slabs before its epilogue; the launch gap between the two (about 1 us of a 10 us decode layer)
# disappears. The cost model's decode rows read it.
PROGRAMMATIC_AFTER_SHRINK = True


def sgmv_blocks(interpreter: bool = INTERPRET) -> tuple[int, int]:
    """(K step, N tile) of the grouped kernels (the cost model asks for a GPU's)."""
    return (16, 16) if interpreter else (128, 128)


def sgmv_splits(num_adapters: int, k: int, programs: int, interpreter: bool = INTERPRET) -> tuple[int, int]:
    """(splits, chunk) of the shrink's K: enough splits that the adapters' programs number about ``programs``
    (two per SM: a decode shrink streams little per program), each chunk a multiple of the K block; a function
    of the pool and the shapes only, never of the ids (so a captured CUDA graph replays with any ids)."""
    step = sgmv_blocks(interpreter)[0]
    wanted = max(1, min(triton.cdiv(programs, max(num_adapters, 1)), triton.cdiv(k, step)))
    chunk = triton.cdiv(triton.cdiv(k, wanted), step) * step
    return triton.cdiv(k, chunk), chunk


def sgmv_shrink(x, lora_a, a_offsets, order, starts, num_adapters: int, v_width: int) -> tuple[torch.Tensor, int, bool]:
    """The grouped shrink's fp32 slabs [splits, M, v_width], their number, and whether the next launch is to be
    programmatic (:func:`follows_the_shrink`: the shrink then lets it start at once)."""
    pdl = follows_the_shrink(x.device, num_adapters)
    m, k = x.shape
    splits, chunk = sgmv_splits(num_adapters, k, 4 if INTERPRET else 2 * sm_count(x.device))
    part = torch.empty((splits, m, v_width), device=x.device, dtype=torch.float32)
    rank_chunk = min(v_width, SGMV_RANK_CHUNK)
    step = sgmv_blocks()[0]
    with on_device(x):
        _sgmv_shrink_kernel[(num_adapters, splits)](
            x, lora_a, order, starts, a_offsets, part, m, k, chunk,
            x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1),
            DOT_PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET, PDL=pdl, V_WIDTH=v_width, BLOCK_M=SGMV_M,
            BLOCK_R=rank_chunk, BLOCK_K=step if rank_chunk <= 32 else step // 2,
        )  # fmt: skip
    return part, splits, pdl


def follows_the_shrink(device: torch.device, num_adapters: int) -> bool:
    """Whether the kernel after the grouped shrink is launched programmatically (PROGRAMMATIC_AFTER_SHRINK): only
    where the shrink launches (a pool of no adapters launches none, and the kernel before it in the stream, which
    may be writing x, must not be overlapped)."""
    return PROGRAMMATIC_AFTER_SHRINK and num_adapters > 0 and programmatic_launch(device)


def pdl_launch_options(pdl: bool) -> dict:
    """The launch options of a kernel launched programmatically (``pdl``), or none (older Triton takes none)."""
    return {"launch_pdl": True} if pdl else {}


def lora_precision(dtype: torch.dtype) -> str:
    """The expand's dot precision: B's 16-bit values are exact in tf32, so a tf32 dot only rounds v."""
    return dot_precision(dtype) if dtype == torch.float32 else "tf32"


def multi_lora_sgmv(
    base: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    a_offsets: torch.Tensor,
    lora_b: torch.Tensor,
    order: torch.Tensor,
    starts: torch.Tensor,
    ranks: torch.Tensor,
    v_starts: torch.Tensor,
    b_starts: torch.Tensor,
    scalings: torch.Tensor,
    out_starts: torch.Tensor,
    v_width: int,
    max_width: int,
) -> torch.Tensor:
    """``y[t] = base[t] + scaling * (x[t] A_i^T) B_i^T`` per slice, tokens grouped by adapter (SGMV): two
    launches, the shrink split over K into fp32 slabs and the expand summing them. base [M, N]; x [M, K];
    order int32 [M] and starts int32 [num_adapters + 2] from fastpeft.ops.batch_description; the pool's tables
    as in :func:`multi_lora_expand`; ``v_width`` the rank block. Returns a new [M, N] tensor in base's dtype."""
    m = x.shape[0]
    y = torch.empty_like(base)
    if m == 0 or base.shape[1] == 0:
        return y
    num_slices, num_adapters = ranks.shape
    part, splits, pdl = sgmv_shrink(x, lora_a, a_offsets, order, starts, num_adapters, v_width)
    block_n = min(sgmv_blocks()[1], max(16, triton.next_power_of_2(max_width)))
    with on_device(x):
        _sgmv_expand_kernel[(num_adapters + 1, triton.cdiv(max_width, block_n), num_slices)](
            base, part, lora_b, order, starts, ranks, v_starts, b_starts, scalings, out_starts, y,
            m, num_adapters, splits,
            base.stride(0), base.stride(1), y.stride(0), y.stride(1),
            DOT_PRECISION=lora_precision(base.dtype), PDL=pdl, V_WIDTH=v_width, BLOCK_M=SGMV_M,
            BLOCK_R=min(v_width, SGMV_RANK_CHUNK), BLOCK_N=block_n, **pdl_launch_options(pdl),
        )  # fmt: skip
    return y


def multi_lora_sgmv_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    a_offsets: torch.Tensor,
    lora_b: torch.Tensor,
    order: torch.Tensor,
    starts: torch.Tensor,
    ranks: torch.Tensor,
    v_starts: torch.Tensor,
    b_starts: torch.Tensor,
    scalings: torch.Tensor,
    out_starts: torch.Tensor,
    v_width: int,
    max_width: int,
) -> torch.Tensor:
    """The whole decode layer in two launches: the grouped shrink, then the base GEMM ``x W^T + bias`` with the
    grouped expand in its epilogue (y written once). x [M, K]; weight [N, K] (any strides); bias [N] or None; the
    rest as :func:`multi_lora_sgmv`. Returns [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    num_slices, num_adapters = ranks.shape
    part, splits, pdl = sgmv_shrink(x, lora_a, a_offsets, order, starts, num_adapters, v_width)
    tile = pinned_config("decode", m, max_width, v_width, x.dtype)
    grid = (triton.cdiv(m, tile.kwargs["BLOCK_M"]), triton.cdiv(max_width, tile.kwargs["BLOCK_N"]), num_slices)
    with on_device(x):
        _sgmv_linear_kernel[grid](
            x, weight, y if bias is None else bias, part, lora_b, order, starts, ranks, v_starts, b_starts,
            scalings, out_starts, y,
            m, k, num_adapters, splits,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype), LORA_PRECISION=lora_precision(x.dtype),
            UPCAST=INTERPRET, PDL=pdl, V_WIDTH=v_width, BLOCK_M=tile.kwargs["BLOCK_M"],
            BLOCK_N=tile.kwargs["BLOCK_N"], BLOCK_K=tile.kwargs["BLOCK_K"], BLOCK_R=min(v_width, SGMV_RANK_CHUNK),
            num_warps=8, num_stages=tile.num_stages, **pdl_launch_options(pdl),
        )  # fmt: skip
    return y
