"""Triton kernels for 4-bit (NF4/FP4, bitsandbytes' layout) weights: ``y = x @ dequant(W).T`` without ever
writing the dequantized W, optionally with a LoRA adapter in the same kernel.

- ``_matmul_4bit_kernel``: an output tile [BLOCK_M, BLOCK_N]; the K loop loads packed bytes of W, decodes
  both nibbles against the 16-entry code, scales them by their block's absmax (the nested 8-bit absmax decoded
  in the same kernel: ``code2[q] * absmax2[b >> log2(256)] + offset``), rounds them to the weight's dtype (so
  the product sees bitsandbytes' dequantized values exactly) and feeds ``tl.dot`` with fp32 accumulation. LoRA:
  ``LORA=1`` adds ``scaling * xa @ B.T`` in the epilogue for a precomputed fp32 ``xa``; ``LORA=2`` also
  accumulates the shrink ``xa = x @ A.T`` in the same K loop (decode: one launch, x read once).
- ``_matmul_4bit_t_kernel``: ``dx = dy @ dequant(W)`` (the backward pass), optionally ``+ scaling * dyb @ A``
  for a precomputed fp32 ``dyb = dy @ B``: tiles of W are dequantized on chip as in the forward kernel.
- ``_dequantize_4bit_kernel``: W written dense in x's dtype into a view of a wider buffer, one pass over the
  packed bytes (the host's dequantize-once tier for many rows, after which cuBLAS runs on it).

When K is even, every row of W starts on a byte and a byte holds columns (2j, 2j+1): the kernels load
[rows, BLOCK_K / 2] contiguous bytes (vectorised loads) and split the reduction into even and odd columns, two
dots of half depth; the high and low nibble of one byte share one absmax. Odd K takes a per-element path.

Decode tiles (few rows: memory-bound on W's bytes) and prefill tiles (compute-bound) are autotuned (fp32 on
tiles of its own) unless ``FASTPEFT_TRITON_AUTOTUNE=0``, which launches :func:`pinned_config`'s tile. Under
``TRITON_INTERPRET=1`` they run on CPU tensors with tiny tiles, operands upcast to fp32 (the interpreter's
``tl.dot`` is wrong on bf16), and fp32 -> bf16 rounds on the bits (the interpreter truncates).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import AUTOTUNE, INTERPRET, REFERENCE_SMS, dot_precision, on_device, r_pad

DECODE_MAX_M = 16


def _configs(rows: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in rows
    ]


# Decode: W's bytes dominate, streamed by the programs in flight: narrow column tiles (block_n).
DECODE_CONFIGS = _configs([(16, 16, 256, 4, 3), (16, 32, 256, 4, 3), (16, 64, 256, 4, 3), (16, 32, 512, 4, 2),
                           (16, 64, 128, 4, 4)])  # fmt: skip
PREFILL_CONFIGS = _configs([(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3),
                            (64, 32, 64, 4, 3), (32, 16, 64, 4, 3)])  # fmt: skip
# fp32 activations: tiles of their own (full-precision fp32 dots run on the FMA units, operands in registers).
FP32_DECODE_CONFIGS = _configs([(16, 32, 32, 8, 2), (16, 64, 32, 8, 2), (16, 32, 16, 4, 2)])
FP32_PREFILL_CONFIGS = _configs([(32, 32, 32, 8, 2), (64, 32, 32, 8, 2), (32, 64, 16, 8, 2)])
_INTERPRETER_CONFIG = _configs([(16, 16, 32, 1, 1)])[0]
_KEY = ["M_BUCKET", "N", "K"]


def block_n(row_tiles: int, n: int) -> int:
    """BLOCK_N of the forward's tiles for N output features and ``row_tiles`` tiles of rows: the widest of 64, 32
    and 16 that still gives two programs per SM of the reference GPU (W's bytes are streamed by the programs in
    flight: at N = 4096, 16-wide decode tiles give 256 programs where 32-wide ones would leave half of the SMs'
    slots empty), 16 when none does."""
    for width in (64, 32):
        if row_tiles * triton.cdiv(n, width) >= 2 * REFERENCE_SMS:
            return width
    return 16


def block_m(m: int, decode: bool) -> int:
    """BLOCK_M of the pinned 16-bit tiles: decode's 16 rows hold every row; prefill min(64, M) rows, 16 at least."""
    return 16 if decode else min(64, max(16, triton.next_power_of_2(m)))


def pinned_config(decode: bool, m: int, dtype: torch.dtype, lora_shrink: bool, even_k: bool,
                  out_features: int | None = None) -> triton.Config:  # fmt: skip
    """The tile launched without autotuning (FASTPEFT_TRITON_AUTOTUNE=0), by rule. Decode: 16 rows over K steps
    of 128 (64 when the shrink rides the K loop or K is odd, 32 when both: those keep more of the step in
    registers). Prefill: min(64, M) rows (16 at least), W decoded once per row tile, two warpgroups on 64 x 64
    tiles and one on smaller ones. BLOCK_N by
    :func:`block_n` for the forward (``out_features`` given); the backward's dx tiles keep 32 (their BLOCK_N is
    the reduction step). fp32: smaller tiles of their own. scripts/compile_triton.py compiles these for sm_90 and
    fails CI if a 16-bit one spills."""
    if INTERPRET:
        return _INTERPRETER_CONFIG
    if dtype == torch.float32:
        return (FP32_DECODE_CONFIGS if decode else FP32_PREFILL_CONFIGS)[0]
    rows = block_m(m, decode)
    width = 32 if out_features is None else block_n(triton.cdiv(m, rows), out_features)
    if decode:
        block_k = 32 if lora_shrink and not even_k else 64 if lora_shrink or not even_k else 128
        return _configs([(rows, width, block_k, 4, 3)])[0]
    width = width if out_features is not None else 64
    return _configs([(rows, width, 64, 8 if rows * width >= 64 * 64 else 4, 3)])[0]


_TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask,
                 NESTED: tl.constexpr, LOG2_NESTED: tl.constexpr):  # fmt: skip
    """fp32 absmax of ``block`` (any shape): read, or decoded from the double quantization in place."""
    # One return, both branches constexpr: the compiler types only the branch taken (absmax is uint8 if nested).
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + (block >> LOG2_NESTED), mask=mask, other=0.0)
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * scale2 + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


# The interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even: there the rounding is done on the bits.
_ROUND_BF16_ON_BITS = tl.constexpr(INTERPRET)


@triton.jit
def _rounded(value, DTYPE: tl.constexpr):
    """fp32 ``value`` in DTYPE, rounded to nearest even (finite values)."""
    if _ROUND_BF16_ON_BITS and DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is the constexpr argument)
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return value.to(DTYPE)


@triton.jit
def _decode(code_ptr, nibble, scale, mask, W_DTYPE: tl.constexpr, OPERAND: tl.constexpr):
    """Weights from 4-bit indices: ``code[q] * absmax`` in fp32, rounded to the weight's dtype (bitsandbytes'
    values), then to the dot's operand dtype."""
    value = tl.load(code_ptr + nibble.to(tl.int32), mask=mask, other=0.0) * scale
    if W_DTYPE == OPERAND:
        return _rounded(value, W_DTYPE)
    return _rounded(_rounded(value, W_DTYPE).to(tl.float32), OPERAND)


@triton.jit
def _weight_pairs(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows, pairs, mask, K, K_BYTES,
                  LOG2_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, LOG2_NESTED: tl.constexpr,
                  W_DTYPE: tl.constexpr, OPERAND: tl.constexpr):  # fmt: skip
    """(W[rows, 2 * pairs], W[rows, 2 * pairs + 1]) for even K: one byte per pair, contiguous along pairs.
    K_BYTES = K / 2 comes from the host as an argument of its own, so that Triton's divisibility specialisation
    sees rows that start on 16 bytes (K a multiple of 32) and loads them 16 bytes at a time."""
    packed = tl.load(w_ptr + rows.to(tl.int64) * K_BYTES + pairs, mask=mask, other=0)
    block = ((rows.to(tl.int64) * K + 2 * pairs) >> LOG2_BLOCKSIZE).to(tl.int32)
    scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask, NESTED, LOG2_NESTED)
    high = _decode(code_ptr, packed >> 4, scale, mask, W_DTYPE, OPERAND)
    low = _decode(code_ptr, packed & 0xF, scale, mask, W_DTYPE, OPERAND)
    return high, low


@triton.jit
def _weight_elements(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows, cols, mask, K,
                     LOG2_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, LOG2_NESTED: tl.constexpr,
                     W_DTYPE: tl.constexpr, OPERAND: tl.constexpr):  # fmt: skip
    """W[rows, cols] for any K: element e = row * K + col is nibble (e & 1) of byte e >> 1, high nibble first."""
    element = rows.to(tl.int64) * K + cols
    packed = tl.load(w_ptr + (element >> 1), mask=mask, other=0)
    nibble = (packed >> (4 - 4 * (element & 1)).to(tl.uint8)) & 0xF
    block = (element >> LOG2_BLOCKSIZE).to(tl.int32)
    scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask, NESTED, LOG2_NESTED)
    return _decode(code_ptr, nibble, scale, mask, W_DTYPE, OPERAND)


@triton.jit
def step_pairs(acc, x_rows, stride_xk, mask_m, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                rows_n, mask_n, pairs, mask_p, K, K_BYTES, LOG2_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                LOG2_NESTED: tl.constexpr, W_DTYPE: tl.constexpr, OPERAND: tl.constexpr,
                DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One K step of ``acc += x W^T`` for even K over the byte ``pairs`` of W's rows ``rows_n`` (x's rows at
    ``x_rows``, masked by ``mask_m``): returns acc and x's even and odd columns of the step (a LoRA shrink in the
    same loop reuses them), in the dot's OPERAND dtype."""
    w_even, w_odd = _weight_pairs(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows_n[:, None],
                                  pairs[None, :], mask_n[:, None] & mask_p[None, :], K, K_BYTES, LOG2_BLOCKSIZE,
                                  NESTED, LOG2_NESTED, W_DTYPE, OPERAND)  # fmt: skip
    x_mask = mask_m[:, None] & mask_p[None, :]
    even = (2 * pairs[None, :]).to(tl.int64)  # W's even columns (x's, A's): the odd ones follow each
    x_even = tl.load(x_rows + even * stride_xk, mask=x_mask, other=0.0).to(OPERAND)
    x_odd = tl.load(x_rows + (even + 1) * stride_xk, mask=x_mask, other=0.0).to(OPERAND)
    acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision=DOT_PRECISION)
    acc = tl.dot(x_odd, tl.trans(w_odd), acc, input_precision=DOT_PRECISION)
    return acc, x_even, x_odd


@triton.jit
def step_elements(acc, x_rows, stride_xk, mask_m, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                   rows_n, mask_n, cols, mask_k, K, LOG2_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                   LOG2_NESTED: tl.constexpr, W_DTYPE: tl.constexpr, OPERAND: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One K step of ``acc += x W^T`` for any K over the columns ``cols``: returns acc and x's step."""
    w = _weight_elements(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows_n[:, None],
                         cols[None, :], mask_n[:, None] & mask_k[None, :], K, LOG2_BLOCKSIZE, NESTED, LOG2_NESTED,
                         W_DTYPE, OPERAND)  # fmt: skip
    x = tl.load(x_rows + cols[None, :].to(tl.int64) * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    x = x.to(OPERAND)
    acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc, x


@triton.jit
def _matmul_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr,
    a_ptr, xa_ptr, b_ptr, y_ptr,
    M, N, K, K_BYTES, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_xam, stride_xar, stride_bn, stride_br,
    stride_ym, stride_yn,
    scaling,
    M_BUCKET,  # autotune key only
    LOG2_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, LOG2_NESTED: tl.constexpr,
    W_DTYPE: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    LORA: tl.constexpr,  # 0: none; 1: xa given; 2: the shrink x @ A^T accumulated here
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)  # row tiles on the unbounded grid axis (axis 1 stops at 65535)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    operand = tl.float32 if UPCAST else x_ptr.dtype.element_ty
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if EVEN_K:
        HALF: tl.constexpr = BLOCK_K // 2
        offs_p = tl.arange(0, HALF)
        for k0 in range(0, K, BLOCK_K):
            pairs = k0 // 2 + offs_p
            mask_p = pairs < K_BYTES
            acc, x_even, x_odd = step_pairs(acc, x_rows, stride_xk, mask_m, w_ptr, absmax_ptr, code_ptr, absmax2_ptr,
                                            code2_ptr, offset_ptr, offs_n, mask_n, pairs, mask_p, K, K_BYTES,
                                            LOG2_BLOCKSIZE, NESTED, LOG2_NESTED, W_DTYPE, operand,
                                            DOT_PRECISION)  # fmt: skip
            if LORA == 2:
                even = (2 * pairs[None, :]).to(tl.int64)
                a_rows = a_ptr + offs_r[:, None].to(tl.int64) * stride_ar
                a_mask = mask_r[:, None] & mask_p[None, :]
                a_even = tl.load(a_rows + even * stride_ak, mask=a_mask, other=0.0).to(operand)
                a_odd = tl.load(a_rows + (even + 1) * stride_ak, mask=a_mask, other=0.0).to(operand)
                xa = tl.dot(x_even, tl.trans(a_even), xa, input_precision=DOT_PRECISION)
                xa = tl.dot(x_odd, tl.trans(a_odd), xa, input_precision=DOT_PRECISION)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k
            mask_k = cols < K
            acc, x = step_elements(acc, x_rows, stride_xk, mask_m, w_ptr, absmax_ptr, code_ptr, absmax2_ptr,
                                   code2_ptr, offset_ptr, offs_n, mask_n, cols, mask_k, K, LOG2_BLOCKSIZE, NESTED,
                                   LOG2_NESTED, W_DTYPE, operand, DOT_PRECISION)  # fmt: skip
            if LORA == 2:
                a_ptrs = a_ptr + offs_r[:, None].to(tl.int64) * stride_ar + cols[None, :].to(tl.int64) * stride_ak
                a = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(operand)
                xa = tl.dot(x, tl.trans(a), xa, input_precision=DOT_PRECISION)

    if LORA == 1:
        xa_ptrs = xa_ptr + offs_m[:, None].to(tl.int64) * stride_xam + offs_r[None, :].to(tl.int64) * stride_xar
        xa = tl.load(xa_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    if LORA != 0:
        b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None].to(tl.int64) * stride_br
        b = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(xa * scaling, b, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    offs_y = offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn
    tl.store(y_ptr + offs_y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _matmul_4bit_t_kernel(
    dy_ptr, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, dyb_ptr, a_ptr, dx_ptr,
    M, N, K, K_BYTES, R,
    stride_dym, stride_dyn, stride_dybm, stride_dybr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    scaling,
    M_BUCKET,  # autotune key only
    LOG2_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, LOG2_NESTED: tl.constexpr,
    W_DTYPE: tl.constexpr, EVEN_K: tl.constexpr, LORA: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # dx [M, K] = dy [M, N] @ W [N, K]: a tile of dx's columns, the loop over W's rows.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    operand = tl.float32 if UPCAST else dy_ptr.dtype.element_ty
    dy_rows = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym
    dx_rows = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm
    if LORA:
        dyb_ptrs = dyb_ptr + offs_m[:, None].to(tl.int64) * stride_dybm + offs_r[None, :].to(tl.int64) * stride_dybr
        dyb = tl.load(dyb_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0) * scaling
    if EVEN_K:
        HALF: tl.constexpr = BLOCK_K // 2
        pairs = pid_k * HALF + tl.arange(0, HALF)
        mask_p = pairs < K_BYTES
        acc_even = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        acc_odd = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + offs_n
            mask_n = rows < N
            w_even, w_odd = _weight_pairs(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                          rows[:, None], pairs[None, :], mask_n[:, None] & mask_p[None, :], K,
                                          K_BYTES, LOG2_BLOCKSIZE, NESTED, LOG2_NESTED, W_DTYPE,
                                          operand)  # fmt: skip
            dy = tl.load(
                dy_rows + rows[None, :].to(tl.int64) * stride_dyn, mask=mask_m[:, None] & mask_n[None, :], other=0.0
            )
            dy = dy.to(operand)
            acc_even = tl.dot(dy, w_even, acc_even, input_precision=DOT_PRECISION)
            acc_odd = tl.dot(dy, w_odd, acc_odd, input_precision=DOT_PRECISION)
        if LORA:
            a_mask = mask_r[:, None] & mask_p[None, :]
            a_rows = a_ptr + offs_r[:, None].to(tl.int64) * stride_ar
            even = (2 * pairs[None, :]).to(tl.int64)
            a_even = tl.load(a_rows + even * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
            a_odd = tl.load(a_rows + (even + 1) * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
            acc_even = tl.dot(dyb, a_even, acc_even, input_precision="ieee")
            acc_odd = tl.dot(dyb, a_odd, acc_odd, input_precision="ieee")
        out_mask = mask_m[:, None] & mask_p[None, :]
        out_ty = dx_ptr.dtype.element_ty
        even = (2 * pairs[None, :]).to(tl.int64)
        tl.store(dx_rows + even * stride_dxk, acc_even.to(out_ty), mask=out_mask)
        tl.store(dx_rows + (even + 1) * stride_dxk, acc_odd.to(out_ty), mask=out_mask)
    else:
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = cols < K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + offs_n
            mask_n = rows < N
            w = _weight_elements(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows[:, None],
                                 cols[None, :], mask_n[:, None] & mask_k[None, :], K, LOG2_BLOCKSIZE, NESTED,
                                 LOG2_NESTED, W_DTYPE, operand)  # fmt: skip
            dy = tl.load(
                dy_rows + rows[None, :].to(tl.int64) * stride_dyn, mask=mask_m[:, None] & mask_n[None, :], other=0.0
            )
            acc = tl.dot(dy.to(operand), w, acc, input_precision=DOT_PRECISION)
        if LORA:
            a_ptrs = a_ptr + offs_r[:, None].to(tl.int64) * stride_ar + cols[None, :].to(tl.int64) * stride_ak
            a = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(dyb, a, acc, input_precision="ieee")
        tl.store(dx_rows + cols[None, :].to(tl.int64) * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_k[None, :])  # fmt: skip


if AUTOTUNE:
    _TUNED = {
        (kernel, decode, fp32): triton.autotune(configs, key=_KEY)(kernel)
        for kernel in (_matmul_4bit_kernel, _matmul_4bit_t_kernel)
        for decode, fp32, configs in (
            (True, False, DECODE_CONFIGS),
            (False, False, PREFILL_CONFIGS),
            (True, True, FP32_DECODE_CONFIGS),
            (False, True, FP32_PREFILL_CONFIGS),
        )
    }


@triton.jit
def _dequantize_4bit_kernel(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, K, K_BYTES,
                            stride_out,
                            LOG2_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, LOG2_NESTED: tl.constexpr,
                            W_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, EVEN_K: tl.constexpr,
                            BLOCK_COLS: tl.constexpr):  # fmt: skip
    """Row ``program_id(0)`` of W, columns [BLOCK_COLS * program_id(1), ...), written to out's row (a bandwidth
    pass: half a byte read per element written). Even K: one byte per column pair, both nibbles of one block
    (blocksizes are even), the pair stored interleaved as contiguous columns; odd K: per element."""
    row = tl.program_id(0).to(tl.int64)
    out_row = out_ptr + row * stride_out
    if EVEN_K:
        pairs = tl.program_id(1) * (BLOCK_COLS // 2) + tl.arange(0, BLOCK_COLS // 2)
        in_row = pairs < K_BYTES
        high, low = _weight_pairs(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, row, pairs,
                                  in_row, K, K_BYTES, LOG2_BLOCKSIZE, NESTED, LOG2_NESTED, W_DTYPE,
                                  OUT_DTYPE)  # fmt: skip
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        tl.store(out_row + cols, tl.interleave(high, low), mask=cols < K)  # contiguous: 16-byte stores
    else:
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        in_row = cols < K
        weights = _weight_elements(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, row, cols,
                                   in_row, K, LOG2_BLOCKSIZE, NESTED, LOG2_NESTED, W_DTYPE, OUT_DTYPE)  # fmt: skip
        tl.store(out_row + cols, weights, mask=in_row)


def _launcher(kernel, m: int, dtype: torch.dtype, lora_shrink: bool, even_k: bool, out_features: int | None) -> tuple:
    """(kernel, launch options): autotuned over the tile set of the row count and dtype, or the kernel and its
    :func:`pinned_config`."""
    decode = m <= DECODE_MAX_M
    if AUTOTUNE:
        return _TUNED[kernel, decode, dtype == torch.float32], {}
    return kernel, pinned_config(decode, m, dtype, lora_shrink, even_k, out_features).all_kwargs()


def format_args(absmax, code, absmax2, code2, offset, blocksize: int, nested_blocksize: int, w_dtype: torch.dtype):
    """The state's tensors (absmax stands in for the absent nested ones) and its constexprs."""
    nested = absmax2 is not None
    tensors = (absmax, code, absmax2 if nested else absmax, code2 if nested else code, offset if nested else code)
    constexprs = {
        "LOG2_BLOCKSIZE": blocksize.bit_length() - 1,
        "NESTED": nested,
        "LOG2_NESTED": nested_blocksize.bit_length() - 1,
        "W_DTYPE": _TORCH_TO_TL[w_dtype],
    }
    return tensors, constexprs


def matmul_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    n: int,
    w_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    xa: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """``y = x @ dequant(W).T + bias (+ scaling * xa @ lora_b.T)`` for x [M, K] (fp16/bf16/fp32, any strides),
    W [n, K] as packed uint8 bytes with its state. LoRA: give lora_b [n, R] and either xa fp32 [M, R] or lora_a
    [R, K] (the shrink then runs in this kernel: for decode). Returns [M, n] in x's dtype."""
    m, k = x.shape
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    state, constexprs = format_args(absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, w_dtype)
    lora = 0 if lora_b is None else (2 if lora_a is not None else 1)
    r = 0 if lora_b is None else lora_b.shape[1]
    a = lora_a if lora_a is not None else x
    xa_ = xa if xa is not None else y
    b = lora_b if lora_b is not None else y
    kernel, options = _launcher(_matmul_4bit_kernel, m, x.dtype, lora == 2, k % 2 == 0, n)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
    with on_device(x):
        kernel[grid](
            x, packed, *state, bias if bias is not None else y, a, xa_, b, y,
            m, n, k, k // 2, r,
            x.stride(0), x.stride(1), a.stride(0), a.stride(1), xa_.stride(0), xa_.stride(1), b.stride(0),
            b.stride(1), y.stride(0), y.stride(1),
            float(scaling), min(triton.next_power_of_2(m), 8192),
            EVEN_K=k % 2 == 0, HAS_BIAS=bias is not None, LORA=lora, R_PAD=r_pad(r),
            DOT_PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET, **constexprs, **options,
        )  # fmt: skip
    return y


def matmul_4bit_t(
    dy: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    k: int,
    w_dtype: torch.dtype,
    dyb: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """``dx = dy @ dequant(W) (+ scaling * dyb @ lora_a)`` for dy [M, N] and W [N, k]; dyb fp32 [M, R] with
    lora_a [R, k] for a LoRA layer's backward. Returns [M, k] in dy's dtype."""
    m, n = dy.shape
    dx = torch.empty((m, k), device=dy.device, dtype=dy.dtype)
    if m == 0:
        return dx
    state, constexprs = format_args(absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, w_dtype)
    r = 0 if dyb is None else dyb.shape[1]
    dyb_ = dyb if dyb is not None else dx
    a = lora_a if lora_a is not None else dx
    kernel, options = _launcher(_matmul_4bit_t_kernel, m, dy.dtype, False, k % 2 == 0, None)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"]))
    with on_device(dy):
        kernel[grid](
            dy, packed, *state, dyb_, a, dx,
            m, n, k, k // 2, r,
            dy.stride(0), dy.stride(1), dyb_.stride(0), dyb_.stride(1), a.stride(0), a.stride(1), dx.stride(0),
            dx.stride(1),
            float(scaling), min(triton.next_power_of_2(m), 8192),
            EVEN_K=k % 2 == 0, LORA=dyb is not None, R_PAD=r_pad(r), DOT_PRECISION=dot_precision(dy.dtype),
            UPCAST=INTERPRET, **constexprs, **options,
        )  # fmt: skip
    return dx


# Columns per program of the dequantize pass: 4096 (8 KB of bf16 written; 14336 programs for a 4096 x 14336 weight,
# many waves on 132 SMs); the interpreter gets small programs.
DEQUANTIZE_BLOCK_COLS = 32 if INTERPRET else 4096


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    n: int,
    k: int,
    w_dtype: torch.dtype,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write W [n, k] into ``out`` ([n, k], unit column stride, any row stride: a view of a wider buffer) in out's
    dtype: ``code[q] * absmax`` in fp32, rounded to ``w_dtype`` (bitsandbytes' values), then to out's dtype. One
    pass: n * k / 2 bytes read, n * k elements written (the prefill tier's transient weight). Returns out."""
    if n * k == 0:
        return out
    state, constexprs = format_args(absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, w_dtype)
    grid = (n, triton.cdiv(k, DEQUANTIZE_BLOCK_COLS))
    with on_device(packed):
        _dequantize_4bit_kernel[grid](
            packed, *state, out, k, k // 2, out.stride(0), OUT_DTYPE=_TORCH_TO_TL[out.dtype], EVEN_K=k % 2 == 0,
            BLOCK_COLS=DEQUANTIZE_BLOCK_COLS, num_warps=4, **constexprs,
        )  # fmt: skip
    return out
