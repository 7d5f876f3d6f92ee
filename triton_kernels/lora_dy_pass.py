"""The LoRA backward's one pass over dy (``fastpeft::lora_dy_pass``): both products that read dy beside the dx GEMM.

    dyb = dy @ B               [M, R] fp32: the reduction over N (dx's and dA's LoRA factor)
    db  = s * dy^T @ xa        [N, R] in dy's dtype: the reduction over M (xa = dropout(x) A^T, the forward's)

Computed apart, each reads all of dy (2 M N bytes: 34 MB at M = N = 4096 in bf16). Here one launch reads it once:
a grid of row tiles (BLOCK_M rows) by SPLITS slices of N; each program streams its [BLOCK_M, N / SPLITS] share of
dy in BLOCK_N-column steps and from each step takes both products on the tensor cores: ``dy_tile @ B_tile`` into a
[BLOCK_M, R] accumulator, and ``dy_tile^T @ xa_rows``, the step's columns of its row tile's partial dB, stored in
fp32. A second launch adds the partials in a fixed order (split 0, 1, ...; row tile 0, 1, ...): no float atomics,
the same bits on every run. The partials cost 4 R (M / BLOCK_M * N + SPLITS * M) bytes written, then read back
(6 MB at 4096 x 4096, r = 16, against the 34 MB of dy saved; mostly from L2 between the two launches).
:func:`one_pass_pays` says where they would cost more than the second read of dy (tall dy at high rank).

Under ``TRITON_INTERPRET=1`` the dot operands are upcast to fp32 (the interpreter's 16-bit dot is unreliable).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import INTERPRET, dot_precision, on_device, r_pad, sm_count


@functools.cache  # asked three times per call (one_pass_pays, partial_bytes, the launch): the same few shapes
def tile_options(m: int, n: int, r_pad: int, dtype: torch.dtype, sms: int, interpreter: bool = INTERPRET) -> dict:
    """BLOCK_M, BLOCK_N, SPLITS (slices of N), STEPS_PER_SPLIT and warps for dy of m rows and n columns.

    About one program per SM, each streaming an equal share of dy (a memory-bound pass: a 256 x 64 bf16 tile is
    32 KB in flight per stage); tall row tiles, since dB's partials grow with the row tiles and dy B's with the
    splits, and the accumulator [BLOCK_M, R_PAD] stays in registers beside the dy tile up to R_PAD 64. fp32 dy
    gets small tiles (its full-precision dots run on the FMA units, operands in registers)."""
    if interpreter:
        block_m, block_n, warps = 16, 16, 1
    elif dtype == torch.float32:
        block_m, block_n, warps = (64, 32, 4) if r_pad <= 16 else (32, 16, 4)
    else:
        block_m = (256 if r_pad <= 64 else 128) if m >= 2048 else (128 if m >= 512 else 64)
        block_n, warps = 64, 8 if block_m >= 128 else 4
    row_tiles = triton.cdiv(max(m, 1), block_m)
    steps = triton.cdiv(max(n, 1), block_n)
    per_split = triton.cdiv(steps, max(1, min(steps, triton.cdiv(sms, row_tiles))))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLITS": triton.cdiv(steps, per_split),
            "STEPS_PER_SPLIT": per_split, "num_warps": warps}  # fmt: skip


def partial_bytes(m: int, n: int, r: int, dtype: torch.dtype, sms: int, interpreter: bool = INTERPRET) -> int:
    """The fp32 partial sums one call writes (and the second launch reads back): dB's per row tile, dy B's per
    split."""
    tile = tile_options(m, n, r_pad(r), dtype, sms, interpreter)
    return 4 * r_pad(r) * (triton.cdiv(max(m, 1), tile["BLOCK_M"]) * n + tile["SPLITS"] * m)


# Below this many bytes of partial sums a call is bound by its launches, not its bytes (and stays in L2).
SMALL_PARTIALS = 4 << 20


def one_pass_pays(m: int, n: int, r: int, dtype: torch.dtype, sms: int, interpreter: bool = INTERPRET) -> bool:
    """Whether one pass beats two products: its partials (written, then read back) cost less than half the
    second read of dy they save, or too little to matter. Tall dy at high rank (16384 x 4096 at r = 64: 80 MB of
    partials) reads dy twice instead."""
    traffic = 2 * partial_bytes(m, n, r, dtype, sms, interpreter)
    return traffic <= max(dy_bytes(m, n, dtype) / 2, SMALL_PARTIALS)


def dy_bytes(m: int, n: int, dtype: torch.dtype) -> int:
    return m * n * (torch.finfo(dtype).bits // 8)


@triton.jit
def _lora_dy_pass_kernel(
    dy_ptr, b_ptr, xa_ptr, dyb_part_ptr, db_part_ptr,
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar,
    DOT_PRECISION: tl.constexpr,  # dy @ B: exact for 16-bit operands in any mode
    LORA_PRECISION: tl.constexpr,  # dy^T @ xa: xa is fp32, so "tf32" rounds it to 11 bits (B's values are exact)
    UPCAST: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STEPS_PER_SPLIT: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rows_r = mask_m[:, None] & mask_r[None, :]
    xa = tl.load(xa_ptr + offs_m[:, None].to(tl.int64) * stride_xam + offs_r[None, :].to(tl.int64) * stride_xar,
                 mask=rows_r, other=0.0)  # fmt: skip
    dyb = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    first = split * (STEPS_PER_SPLIT * BLOCK_N)
    # Partial dB of this row tile: slab pid_m of [row tiles, N, R_PAD], dense.
    db_part = db_part_ptr + pid_m.to(tl.int64) * N * R_PAD
    for step in range(STEPS_PER_SPLIT):
        offs_n = first + step * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)  # fmt: skip
        b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :].to(tl.int64) * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # fmt: skip
        if UPCAST:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        dyb = tl.dot(dy, b, dyb, input_precision=DOT_PRECISION)
        partial = tl.dot(tl.trans(dy.to(tl.float32)), xa, input_precision=LORA_PRECISION)  # [BLOCK_N, R_PAD]
        tl.store(db_part + offs_n[:, None].to(tl.int64) * R_PAD + offs_r[None, :], partial, mask=mask_n[:, None])
    dyb_part = dyb_part_ptr + split.to(tl.int64) * M * R_PAD
    tl.store(dyb_part + offs_m[:, None].to(tl.int64) * R_PAD + offs_r[None, :], dyb, mask=mask_m[:, None])


@triton.jit
def _sum_slabs(part_ptr, out_ptr, rows, stride_out, scaling, ROWS, R, SLABS, R_PAD: tl.constexpr,
               BLOCK: tl.constexpr):  # fmt: skip
    """out[rows, :R] = scaling * sum over slabs s = 0, 1, ... of part[s, rows, :] (the order fixed), rounded to
    out's dtype."""
    offs_r = tl.arange(0, R_PAD)
    mask = (rows[:, None] < ROWS) & (offs_r[None, :] < R)
    offs = rows[:, None].to(tl.int64) * R_PAD + offs_r[None, :]
    acc = tl.zeros((BLOCK, R_PAD), dtype=tl.float32)
    for s in range(SLABS):
        acc += tl.load(part_ptr + tl.cast(s, tl.int64) * ROWS * R_PAD + offs, mask=mask, other=0.0)
    out = out_ptr + rows[:, None].to(tl.int64) * stride_out + offs_r[None, :]
    tl.store(out, (acc * scaling).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_dy_reduce_kernel(dyb_part_ptr, db_part_ptr, dyb_ptr, db_ptr, M, N, R, SPLITS, ROW_TILES, scaling,
                           R_PAD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """The first cdiv(M, BLOCK) programs sum dy B's splits (fp32), the rest dB's row tiles (times s, dy's dtype)."""
    pid = tl.program_id(0)
    dyb_programs = tl.cdiv(M, BLOCK)
    if pid < dyb_programs:
        _sum_slabs(dyb_part_ptr, dyb_ptr, pid * BLOCK + tl.arange(0, BLOCK), R, 1.0, M, R, SPLITS, R_PAD, BLOCK)
    else:
        rows = (pid - dyb_programs) * BLOCK + tl.arange(0, BLOCK)
        _sum_slabs(db_part_ptr, db_ptr, rows, R, scaling, N, R, ROW_TILES, R_PAD, BLOCK)


def lora_dy_pass(dy: torch.Tensor, lora_b: torch.Tensor, xa: torch.Tensor,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dy @ lora_b, scaling * dy.T @ xa)`` from one read of dy, bitwise reproducible.

    dy: [M, N] fp16/bf16/fp32, any strides; lora_b: [N, R] of dy's dtype; xa: [M, R] fp32. Returns dyb [M, R]
    fp32 and db [N, R] in dy's dtype, both contiguous.
    """
    for name, t in (("lora_b", lora_b), ("xa", xa)):
        if t.device != dy.device:
            raise ValueError(f"{name} is on {t.device}, dy on {dy.device}: every tensor must be on one device")
    m, n = dy.shape
    r = lora_b.shape[1]
    dyb = torch.empty((m, r), device=dy.device, dtype=torch.float32)
    db = torch.empty((n, r), device=dy.device, dtype=dy.dtype)
    if m == 0 or n == 0 or r == 0:
        return dyb.zero_(), db.zero_()
    padded = r_pad(r)
    tile = tile_options(m, n, padded, dy.dtype, sm_count(dy.device))
    row_tiles, splits = triton.cdiv(m, tile["BLOCK_M"]), tile["SPLITS"]
    dyb_part = torch.empty((splits, m, padded), device=dy.device, dtype=torch.float32)
    db_part = torch.empty((row_tiles, n, padded), device=dy.device, dtype=torch.float32)
    with on_device(dy):
        _lora_dy_pass_kernel[(row_tiles, splits)](
            dy, lora_b, xa, dyb_part, db_part,
            m, n, r,
            dy.stride(0), dy.stride(1), lora_b.stride(0), lora_b.stride(1), xa.stride(0), xa.stride(1),
            DOT_PRECISION=dot_precision(dy.dtype),
            LORA_PRECISION=dot_precision(dy.dtype) if dy.dtype == torch.float32 else "tf32",
            UPCAST=INTERPRET,
            R_PAD=padded,
            BLOCK_M=tile["BLOCK_M"],
            BLOCK_N=tile["BLOCK_N"],
            STEPS_PER_SPLIT=tile["STEPS_PER_SPLIT"],
            num_warps=tile["num_warps"],
        )  # fmt: skip
        block = 16 if INTERPRET else max(16, 2048 // padded)  # the [block, R_PAD] fp32 sum: 16 registers a thread
        _lora_dy_reduce_kernel[(triton.cdiv(m, block) + triton.cdiv(n, block),)](
            dyb_part, db_part, dyb, db, m, n, r, splits, row_tiles, float(scaling), R_PAD=padded, BLOCK=block,
            num_warps=1 if INTERPRET else 4,
        )  # fmt: skip
    return dyb, db
