"""Triton kernels for the LoRA linear layer: ``y = x @ W.T + bias + scaling * (x @ A.T) @ B.T``.

Two kernels serve the three fastpeft ops of the ``lora`` slice:

- ``_lora_linear_kernel``: an output tile of the base GEMM whose epilogue adds ``scaling * xa @ B.T`` and
  the bias, with fp32 accumulation. With ``FUSE_SHRINK`` the LoRA shrink ``xa = x @ A.T`` is accumulated in
  the same K loop as the base product: one launch, but every output column tile re-reads A (from L2), which
  costs R_PAD / BLOCK_N of W's bytes and matrix work. That is the right trade for decode at small rank, where
  bytes of W dominate and launches count; the fused form is used only there (:func:`fuses_shrink`). Otherwise
  ``xa`` is read from memory, produced once by the shrink kernel.
- ``_lora_shrink_kernel``: ``xa = x @ A.T`` in fp32, optionally split over K with fp32 atomics so that few
  rows still fill the GPU.

In-kernel dropout: the shrink, the fused decode shrink and the LoRA epilogue can drop elements of x (or of dx's
LoRA term), so no dropped copy of x exists. The mask is either Philox's over x's logical [M, K] index
(:class:`PhiloxDropout`: every pass regenerates it from a seed; lora_linear's ``dropout_mode="philox"``,
tests/test_lora_philox.py) or nn.Dropout's own, read as packed bits (:class:`BitsDropout`, 1/8 byte per
element; the default mode on this backend, tests/test_lora_dropout.py).

Tile sets: decode tiles (at most ``DECODE_MAX_M`` rows: forward and the backward's ``dx`` alike) and prefill
tiles, each autotuned per (rows bucket, N, K, rank), fp32 operands with tiles of their own.
``FASTPEFT_TRITON_AUTOTUNE=0`` (read at import) launches :func:`pinned_config`'s tile, chosen by rule from the
shape: the GPU tests, the compute-sanitizer pass and the GPU check's target rows use it, so they time nothing.

Everything takes strides, so transposed or sliced operands (the backward pass feeds ``W.T``, ``B.T``) need no
copies. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors; the interpreter's ``tl.dot`` is wrong on
bf16 operands, so tiles are upcast to fp32 there (``UPCAST``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import lora_persistent as persistent
from .common import (
    AUTOTUNE,
    INTERPRET,
    REFERENCE_SMS,
    arrival_counts,
    dot_precision,
    grouped_tile,
    on_device,
    r_pad,
    sm_count,
)

# The kernels that sum with float atomics (the rounding of those sums changes from run to run): the shrink split
# over K for few rows. scripts/compile_triton.py fails any other kernel whose machine code has them.
FLOAT_ATOMIC_KERNELS = ("_lora_shrink_kernel",)
# Rows at or below which the decode tiles run (forward, and the backward's dx for small batches).
DECODE_MAX_M = 64
# The fused one-launch form re-reads A per output tile; above this padded rank the shrink runs once instead.
FUSED_MAX_R_PAD = 32
# From this many rows the base product x W^T runs on cuBLAS. The tile kernel first writes the LoRA term and the
# bias without a K loop (BASE="none": y = s xa B^T + bias, a write-only pass over y), then cuBLAS adds x W^T into y
# in place (beta = 1: y is read in the GEMM's epilogue, where a compute-bound GEMM hides it). Where the layer
# scales its output or keeps z (DoRA), the order is the other way round: cuBLAS writes x W^T, the tiles run as its
# epilogue (BASE="from_y": y = out_scale * (y + s xa B^T) + bias, one more read and write of y). The cost model
# (benchmarks/roofline.py --designs) puts the first at 1.07-1.11x the base GEMM at M = 4096, the second at
# 1.12-1.16x and the tiles with their K loop at 1.31-1.35x (assumed at 0.8 of cuBLAS's speed; they break even near
# 0.9); the first GPU run decides (the bench's fused:triton-epilogue and fused:triton-tiles rows run the others).
# Rounding: the LoRA term and bias are rounded to x's dtype before cuBLAS adds x W^T (cuBLAS's own order, as PEFT's
# base layer adds its bias); in the epilogue form x W^T is rounded once more, as PEFT's base layer rounds it.
CUBLAS_BASE_MIN_M = DECODE_MAX_M + 1
# Whether cuBLAS accumulates into the LoRA term (above) where the layer neither scales its output nor keeps z.
CUBLAS_ACCUMULATES = True
# A one-launch decode whose column tiles would fill less than this share of their waves on the GPU's SMs (224
# tiles on 132 SMs fill 85%: the busiest SMs stream two tiles of W while 40 stream one) runs on the stream-K
# schedule instead (_decode_stream_k_kernel): every SM streams the same share. The cost model predicts 1.03x the
# base GEMM for it at M <= 16 and N = 14336, against 1.18x for the tiles. So does a decode whose stream-K tile is
# wider than its column tile (64 rows, N <= 8192): each of 128 column tiles 32 wide re-reads x's 64 rows from L2,
# twice W's bytes in all (the model's 1.16x at M = 64, N = 4096); 64 columns halve that, and the schedule cuts
# each tile's K in two so that 64 tiles still fill the SMs (1.07x).
STREAM_K_BELOW_WAVE_FILL = 0.9


def _configs(rows: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) rows as autotune configs."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in rows
    ]


# Decode: few rows, memory-bound on W. For every row count up to 64 there are tiles holding all the rows (W
# read once) with BLOCK_N = 32, i.e. 128 programs at N = 4096 (224 with BLOCK_N = 64 at N = 14336); deep
# pipelines keep enough bytes in flight. tests/test_lora_configs.py checks these properties.
DECODE_CONFIGS = _configs(
    [
        (16, 16, 256, 4, 4),
        (16, 32, 256, 4, 4),
        (16, 32, 128, 4, 5),
        (16, 64, 128, 4, 4),
        (16, 64, 256, 4, 3),
        (16, 128, 128, 4, 4),
        (32, 32, 256, 4, 3),
        (32, 64, 128, 4, 4),
        (64, 32, 128, 4, 4),
        (64, 64, 128, 4, 3),
    ]
)
# Prefill: compute-bound tiles as in Triton's matmul tutorial, Hopper-sized.
PREFILL_CONFIGS = _configs(
    [
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 5),
    ]
)
SHRINK_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(16, 256, 4, 4), (64, 128, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3)]
]
# fp32 operands get tiles of their own: with torch's "highest" float32 matmul precision tl.dot runs in full fp32
# on the FMA units, whose operand tiles live in registers (16-bit tiles of the sizes above would spill).
FP32_DECODE_CONFIGS = _configs([(16, 32, 64, 4, 3), (16, 64, 32, 4, 3), (32, 32, 32, 4, 3), (64, 32, 32, 4, 2)])
FP32_PREFILL_CONFIGS = _configs([(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)])
FP32_SHRINK_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(16, 64, 4, 3), (32, 32, 4, 3), (64, 32, 8, 2)]
]
# The interpreter gets tiny tiles: autotuning there would time nothing real.
_INTERPRETER_CONFIG = _configs([(16, 16, 16, 1, 1)])[0]
_INTERPRETER_SHRINK_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)


@functools.cache  # called per decode call (the stream-K rule): the same few tiles, built once
def pinned_config(
    kind: str, m: int, n: int, r_pad: int, dtype: torch.dtype, in_kernel_dropout: bool = False, *,
    interpreter: bool = INTERPRET,
) -> triton.Config:  # fmt: skip
    """The tile launched without autotuning (``FASTPEFT_TRITON_AUTOTUNE=0``: the GPU tests, the sanitizer, the
    GPU check's target rows), chosen by rule from the shape, never by timing. ``kind``: "decode", "stream_k",
    "prefill", "epilogue" (after cuBLAS) or "shrink"; ``n`` the output features (0 for the shrink).
    scripts/compile_triton.py compiles exactly these for sm_90 at the TARGETS shapes and fails CI if a 16-bit one
    spills.

    - decode: a row tile holding every row (W read once), 32 columns (128 programs at N = 4096; 64 columns and
      224 programs at N = 14336), K in steps of 128 four stages deep (bytes in flight for a memory-bound GEMV);
      steps of 32 beyond 16 rows when the fused shrink drops x in-kernel (Philox's state per element of the x
      tile lives in registers);
    - stream_k: the decode tile of the stream-K schedule (_decode_stream_k_kernel), never narrower than it is
      tall in 16 bits (each tile re-reads x's rows from L2; the schedule's K split keeps the SMs busy);
    - prefill: 128 x 128 tiles for large M, 64 x 64 below 1024 rows, both on two warpgroups (wgmma; on one,
      the accumulator and the LoRA epilogue's operands pass 255 registers and spill);
    - epilogue: one pass over y in 64 x 64 tiles on one warpgroup, several CTAs per SM to keep loads of y in
      flight (a memory-bound pass; the 128 x 128 prefill tile on 8 warps fits one CTA per SM with DoRA's scale,
      and 64 x 128 on 4 warps spills beside the LoRA term of rank 64);
    - shrink: 64 rows, or 32 where 64-row tiles would leave SMs idle (4096 rows: 128 programs, not 64: the pass
      is bound by x's bytes, which every SM must stream), the rank on 4 warps up to 64 and on 8 beyond (the
      accumulator is BLOCK_M x R_PAD);
    - fp32: smaller tiles on more warps (full-precision fp32 dots run on the FMA units, operands in registers).
    """
    if interpreter:
        return _INTERPRETER_SHRINK_CONFIG if kind == "shrink" else _INTERPRETER_CONFIG
    fp32 = dtype == torch.float32
    rows = min(64, max(16, triton.next_power_of_2(max(m, 1))))
    if kind == "shrink":
        wide = r_pad > 64
        block_k = 32 if fp32 or r_pad > 128 else 64
        block_m = 32 if fp32 or triton.cdiv(m, 64) < REFERENCE_SMS else 64
        return triton.Config({"BLOCK_M": block_m, "BLOCK_K": block_k}, num_warps=8 if wide else 4,
                             num_stages=2 if wide else 3)  # fmt: skip
    if kind == "epilogue":  # BLOCK_K is unused: there is no K loop
        return _configs([(64, 64, 32, 4, 1)])[0]
    if kind in ("decode", "stream_k"):
        block_k = 32 if fp32 or (in_kernel_dropout and rows > 16) else 128
        warps = 8 if fp32 and rows == 64 else 4
        block_n = 32 if n <= 8192 else 64
        if kind == "stream_k" and not fp32:  # fp32's FMA dots hold their operand tiles in registers: kept narrow
            block_n = max(block_n, rows)
        return _configs([(rows, block_n, block_k, warps, 3 if fp32 else 4)])[0]
    if fp32:
        return _configs([(64, 64, 32, 8, 2)])[0]
    return _configs([(128, 128, 64, 8, 3) if m >= 1024 else (64, 64, 64, 8, 3)])[0]


def rank_chunk(r_pad: int, dtype: torch.dtype) -> int:
    """Ranks per step of the LoRA epilogue when xa comes from memory: 64, 32 for fp32 (its fp32 dot holds both
    operand tiles in registers); the interpreter walks several steps of 16."""
    return min(r_pad, 16 if INTERPRET else (32 if dtype == torch.float32 else 64))


def prune_decode_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Decode tiles worth timing for this call: no taller than the rows need, and, when the shrink is fused,
    no narrower than the padded rank (A is re-read per output tile: R_PAD / BLOCK_N of W's bytes)."""
    rows = max(16, triton.next_power_of_2(named_args["M"]))
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= rows and (not kwargs["FUSE_SHRINK"] or c.kwargs["BLOCK_N"] >= kwargs["R_PAD"])
    ]
    return kept or configs[:1]


@triton.jit
def _kept(rows, cols, seed, p, stride_r, stride_c):
    """The keep-mask of the logical [M, K] input at (rows, cols): Philox's uniform at the 64-bit counter
    ``row * stride_r + col * stride_c`` (seeded by ``seed``) is at least ``p``. The counter's low and high words
    are Philox's first two counter words, so below 2**32 it is ``tl.rand(seed, counter)`` and past it the
    pattern never repeats (activations of 2**31 elements and more are real in long-context training)."""
    counters = rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    low = (counters & 0xFFFFFFFF).to(tl.uint32)
    high = (counters >> 32).to(tl.uint32)
    zero = low * 0
    bits, _, _, _ = tl.philox(seed, low, high, zero, zero)
    return tl.uint_to_uniform_float(bits) >= p


@triton.jit
def _kept_bits(rows, cols, valid, bits_ptr, stride_bits, TRANSPOSED: tl.constexpr):
    """The keep-mask of x at (rows, cols) of the kernel's logical input (x, or x^T when TRANSPOSED) read from
    packed bits: bit j of byte i of x's row holds column 8 i + j (fastpeft.ops.dropout.pack_bits)."""
    if TRANSPOSED:
        x_rows, x_cols = cols[None, :].to(tl.int64), rows[:, None].to(tl.int64)
    else:
        x_rows, x_cols = rows[:, None].to(tl.int64), cols[None, :].to(tl.int64)
    byte = tl.load(bits_ptr + x_rows * stride_bits + x_cols // 8, mask=valid, other=0)
    return ((byte >> (x_cols % 8).to(tl.uint8)) & 1) != 0


@triton.jit
def _dropped(values, rows, cols, valid, seed, p, keep_scale, stride_r, stride_c, bits_ptr, stride_bits,
             MASK_BITS: tl.constexpr, BITS_T: tl.constexpr):  # fmt: skip
    """``values`` with dropout applied in-kernel, the kept elements scaled by ``keep_scale`` and rounded once to
    the values' dtype: the mask Philox's (:func:`_kept`, regenerated by every kernel from the seed), or with
    MASK_BITS read from packed bits (:func:`_kept_bits`). ``valid``: the elements inside the tensor."""
    if MASK_BITS:
        keep = _kept_bits(rows, cols, valid, bits_ptr, stride_bits, BITS_T)
    else:
        keep = _kept(rows, cols, seed, p, stride_r, stride_c)
    return tl.where(keep, values.to(tl.float32) * keep_scale, 0.0).to(values.dtype)


@triton.jit
def _fused_lora_term(acc, xa, offs_n, mask_n, offs_r, mask_r, b_ptr, stride_bn, stride_br, scaling,
                     LORA_PRECISION: tl.constexpr):  # fmt: skip
    """``acc + scaling * xa @ B^T`` for the tile's columns, xa [BLOCK_M, R_PAD] from the fused shrink. B's
    bf16/fp16 values are exact in tf32, so LORA_PRECISION="tf32" only rounds xa, to 11 bits."""
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None].to(tl.int64) * stride_br
    b = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    return tl.dot(xa * scaling, b, acc, input_precision=LORA_PRECISION)


@triton.jit
def _store_output(acc, offs_y, mask_y, offs_n, mask_n, y_ptr, z_ptr, out_scale_ptr, bias_ptr,
                  HAS_BIAS: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, STORE_Z: tl.constexpr):  # fmt: skip
    """z = acc (when asked), y = out_scale * acc + bias, each rounded once to its dtype."""
    if STORE_Z:
        tl.store(z_ptr + offs_y, acc.to(z_ptr.dtype.element_ty), mask=mask_y)
    if HAS_OUT_SCALE:
        acc *= tl.load(out_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_y, acc.to(y_ptr.dtype.element_ty), mask=mask_y)


@triton.jit
def _lora_linear_kernel(
    x_ptr, w_ptr, a_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr, out_scale_ptr, z_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_xam, stride_xar, stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    seed, dropout_p, keep_scale, stride_dr, stride_dc, bits_ptr, stride_bits,  # in-kernel dropout (see _dropped)
    M_BUCKET,  # autotune key only: rows rounded up to a power of two
    FUSE_SHRINK: tl.constexpr,
    DROPOUT_X: tl.constexpr,  # the fused shrink reads x with dropout at (row m, column k)
    DROPOUT_OUT: tl.constexpr,  # the LoRA term of output (row m, column n) is masked (the backward's dx)
    MASK_BITS: tl.constexpr,  # the dropout mask read from packed bits, not drawn by Philox
    BITS_T: tl.constexpr,  # the bits are x's and the kernel's input is x^T
    HAS_BIAS: tl.constexpr,
    HAS_OUT_SCALE: tl.constexpr,  # y = out_scale * (x W^T + s xa B^T) + bias, per column (DoRA's magnitude)
    STORE_Z: tl.constexpr,  # also write z = x W^T + s xa B^T, before the scale (same strides as y)
    BASE: tl.constexpr,  # "k_loop": x W^T here; "from_y": cuBLAS wrote it into y; "none": cuBLAS adds it later
    R_PAD: tl.constexpr,
    R_CHUNK: tl.constexpr,  # ranks per step of the epilogue when xa is read from memory
    DOT_PRECISION: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    # Offsets are formed in 64 bits (offsets past 2**31 elements are real), and the pointers advance by 64-bit
    # steps; a stride of 1 is a constant to Triton, so unit-stride offsets cost nothing more.
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None].to(tl.int64) * stride_wk
    a_ptrs = a_ptr + offs_r[None, :].to(tl.int64) * stride_ar + offs_k[:, None].to(tl.int64) * stride_ak
    step_x = BLOCK_K * tl.cast(stride_xk, tl.int64)
    step_w = BLOCK_K * tl.cast(stride_wk, tl.int64)
    step_a = BLOCK_K * tl.cast(stride_ak, tl.int64)
    offs_y = offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn
    mask_y = mask_m[:, None] & mask_n[None, :]
    if BASE == "from_y":  # the tile reads its own output before writing it: no other program touches it
        acc = tl.load(y_ptr + offs_y, mask=mask_y, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if BASE == "k_loop":
        for k0 in range(0, K, BLOCK_K):
            mask_k = offs_k < K - k0
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
            if FUSE_SHRINK:
                a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                if DROPOUT_X:
                    x = _dropped(x, offs_m, k0 + offs_k, mask_m[:, None] & mask_k[None, :], seed, dropout_p, keep_scale,
                                 stride_dr, stride_dc, bits_ptr, stride_bits, MASK_BITS, BITS_T)  # fmt: skip
                xa = tl.dot(x, a, xa, input_precision=DOT_PRECISION)
                a_ptrs += step_a
            x_ptrs += step_x
            w_ptrs += step_w

    # The LoRA term s * xa @ B^T. A fused shrink left xa in registers; otherwise it is read in chunks of R_CHUNK
    # ranks, so the xa and B tiles stay small beside the accumulator at any rank.
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) if DROPOUT_OUT else acc
    if FUSE_SHRINK:
        lora = _fused_lora_term(lora, xa, offs_n, mask_n, offs_r, mask_r, b_ptr, stride_bn, stride_br, scaling,
                                LORA_PRECISION)  # fmt: skip
    else:
        for r0 in tl.range(0, R_PAD, R_CHUNK, num_stages=1):  # not pipelined: no extra buffers
            offs_c = r0 + tl.arange(0, R_CHUNK)
            mask_c = offs_c < R
            xa_ptrs = xa_ptr + offs_m[:, None].to(tl.int64) * stride_xam + offs_c[None, :].to(tl.int64) * stride_xar
            xa_c = tl.load(xa_ptrs, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
            b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_c[:, None].to(tl.int64) * stride_br
            b = tl.load(b_ptrs, mask=mask_c[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            lora = tl.dot(xa_c * scaling, b, lora, input_precision=LORA_PRECISION)
    if DROPOUT_OUT:
        acc += _dropped(lora, offs_m, offs_n, mask_y, seed, dropout_p, keep_scale, stride_dr, stride_dc, bits_ptr,
                        stride_bits, MASK_BITS, BITS_T)  # fmt: skip
    else:
        acc = lora
    _store_output(acc, offs_y, mask_y, offs_n, mask_n, y_ptr, z_ptr, out_scale_ptr, bias_ptr, HAS_BIAS,
                  HAS_OUT_SCALE, STORE_Z)  # fmt: skip


@triton.jit
def _decode_stream_k_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, out_scale_ptr, z_ptr,
    partial_ptr, xa_partial_ptr, arrivals_ptr, written_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    TOTAL_ITERS, K_ITERS, MAX_SEGMENTS,
    HAS_BIAS: tl.constexpr,
    HAS_OUT_SCALE: tl.constexpr,
    STORE_Z: tl.constexpr,
    R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The one-launch decode (shrink in the K loop) on a stream-K schedule: the (column tile, K step) iterations,
    tile after tile, are cut into one equal contiguous share per program, so every SM streams the same bytes of
    W and no last wave idles. A tile cut between programs meets in fp32 partial sums (acc and xa): each program
    counts its arrival atomically when its share is done; all but the last to arrive write their sums to a
    workspace slot (one per segment) and count them written; the last waits for those writes (every one of
    their programs has already arrived, so is running: no wait on a program yet to start), adds the slots and
    its own sums in segment order, so the result does not depend on who arrives last, finishes the tile and
    resets both counts for the next launch. The last program's sums never go through memory: a tile cut in two
    writes and reads back one partial, not two. One row tile holds every row (M <= BLOCK_M). No in-kernel
    dropout: Philox's state per element of the x tile beside the stream-K bookkeeping passes 255 registers;
    those calls run on the tiles."""
    # Iteration numbers in 64 bits: program * TOTAL_ITERS passes 2**31 for large layers on many SMs.
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    it = pid * TOTAL_ITERS // programs
    end = (pid + 1) * TOTAL_ITERS // programs
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    step_x = BLOCK_K * tl.cast(stride_xk, tl.int64)
    step_w = BLOCK_K * tl.cast(stride_wk, tl.int64)
    step_a = BLOCK_K * tl.cast(stride_ak, tl.int64)
    while it < end:
        tile = it // K_ITERS
        k_first = it % K_ITERS
        k_last = tl.minimum(K_ITERS, k_first + end - it)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k0 = k_first * BLOCK_K
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k0 + offs_k[None, :]) * stride_xk
        w_ptrs = w_ptr + offs_n[None, :] * stride_wn + (k0 + offs_k[:, None]) * stride_wk
        a_ptrs = a_ptr + offs_r[None, :].to(tl.int64) * stride_ar + (k0 + offs_k[:, None]) * stride_ak
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for step in range(k_first, k_last):
            mask_k = offs_k < K - step * BLOCK_K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
            xa = tl.dot(x, a, xa, input_precision=DOT_PRECISION)
            x_ptrs += step_x
            w_ptrs += step_w
            a_ptrs += step_a
        finished = (k_first == 0) & (k_last == K_ITERS)
        if not finished:
            # The programs sharing this tile: the owners of its first and last iterations and those between.
            first = ((tile * K_ITERS + 1) * programs - 1) // TOTAL_ITERS
            last = ((tile + 1) * K_ITERS * programs - 1) // TOTAL_ITERS
            mine = pid - first
            offs_acc = offs_m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            offs_xa = offs_m[:, None] * R_PAD + offs_r[None, :]
            arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="relaxed", scope="gpu")
            finished = arrived == last - first
            if not finished:
                slot = (tile * MAX_SEGMENTS + mine).to(tl.int64)
                tl.store(partial_ptr + slot * (BLOCK_M * BLOCK_N) + offs_acc, acc)
                tl.store(xa_partial_ptr + slot * (BLOCK_M * R_PAD) + offs_xa, xa)
                tl.debug_barrier()  # every thread's partial stored before it is counted written (release)
                tl.atomic_add(written_ptr + tile, 1, sem="release", scope="gpu")
            else:  # the last to arrive: the others' slots from L2 once written, its own sums in their place
                while tl.atomic_add(written_ptr + tile, 0, sem="acquire", scope="gpu") < last - first:
                    pass
                own, own_xa = acc, xa
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
                for segment in range(0, last - first + 1):
                    base = (tile * MAX_SEGMENTS + segment).to(tl.int64)
                    other = segment != mine
                    acc += tl.where(other, tl.load(partial_ptr + base * (BLOCK_M * BLOCK_N) + offs_acc,
                                                   mask=other, other=0.0, cache_modifier=".cg"), own)  # fmt: skip
                    xa += tl.where(other, tl.load(xa_partial_ptr + base * (BLOCK_M * R_PAD) + offs_xa,
                                                  mask=other, other=0.0, cache_modifier=".cg"), own_xa)  # fmt: skip
                # ready for the next launch (launches on one stream do not overlap: nobody reads them meanwhile)
                tl.atomic_xchg(arrivals_ptr + tile, 0, sem="relaxed", scope="gpu")
                tl.atomic_xchg(written_ptr + tile, 0, sem="relaxed", scope="gpu")
        if finished:
            acc = _fused_lora_term(acc, xa, offs_n, mask_n, offs_r, mask_r, b_ptr, stride_bn, stride_br, scaling,
                                   LORA_PRECISION)  # fmt: skip
            offs_y = offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn
            _store_output(acc, offs_y, mask_m[:, None] & mask_n[None, :], offs_n, mask_n, y_ptr, z_ptr,
                          out_scale_ptr, bias_ptr, HAS_BIAS, HAS_OUT_SCALE, STORE_Z)  # fmt: skip
        it += k_last - k_first


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, xa_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_xam, stride_xar,
    seed, dropout_p, keep_scale, stride_dr, stride_dc, bits_ptr, stride_bits,  # in-kernel dropout on x (_dropped)
    M_BUCKET,  # autotune key only
    DROPOUT: tl.constexpr,
    MASK_BITS: tl.constexpr,
    BITS_T: tl.constexpr,
    SPLIT_K: tl.constexpr,
    R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R

    # Program pid_k takes the K blocks pid_k, pid_k + SPLIT_K, pid_k + 2 * SPLIT_K, ...
    k_start = pid_k * BLOCK_K
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_start + offs_k[None, :]).to(tl.int64) * stride_xk
    a_ptrs = a_ptr + offs_r[None, :].to(tl.int64) * stride_ar + (k_start + offs_k[:, None]).to(tl.int64) * stride_ak
    step_x = BLOCK_K * SPLIT_K * tl.cast(stride_xk, tl.int64)
    step_a = BLOCK_K * SPLIT_K * tl.cast(stride_ak, tl.int64)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(k_start, K, BLOCK_K * SPLIT_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DROPOUT:
            x = _dropped(x, offs_m, k0 + offs_k, mask_m[:, None] & mask_k[None, :], seed, dropout_p, keep_scale,
                         stride_dr, stride_dc, bits_ptr, stride_bits, MASK_BITS, BITS_T)  # fmt: skip
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
        x_ptrs += step_x
        a_ptrs += step_a

    xa_ptrs = xa_ptr + offs_m[:, None].to(tl.int64) * stride_xam + offs_r[None, :].to(tl.int64) * stride_xar
    mask = mask_m[:, None] & mask_r[None, :]
    if SPLIT_K == 1:
        tl.store(xa_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(xa_ptrs, acc, mask=mask)


_KEY = ["M_BUCKET", "N", "K", "R_PAD", "FUSE_SHRINK"]
if AUTOTUNE:
    _decode_kernel = triton.autotune(
        DECODE_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": prune_decode_configs}
    )(_lora_linear_kernel)
    _prefill_kernel = triton.autotune(PREFILL_CONFIGS, key=_KEY)(_lora_linear_kernel)
    _shrink_kernel = triton.autotune(SHRINK_CONFIGS, key=["M_BUCKET", "K", "R_PAD"], reset_to_zero=["xa_ptr"])(
        _lora_shrink_kernel
    )
    _FP32_TUNED = {
        "decode": triton.autotune(
            FP32_DECODE_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": prune_decode_configs}
        )(_lora_linear_kernel),
        "prefill": triton.autotune(FP32_PREFILL_CONFIGS, key=_KEY)(_lora_linear_kernel),
        "shrink": triton.autotune(FP32_SHRINK_CONFIGS, key=["M_BUCKET", "K", "R_PAD"], reset_to_zero=["xa_ptr"])(
            _lora_shrink_kernel
        ),
    }
else:  # the pinned configurations (pinned_config): nothing is timed
    _decode_kernel = _prefill_kernel = _lora_linear_kernel
    _shrink_kernel = _lora_shrink_kernel
# The epilogue after cuBLAS updates y in place: never autotuned (each timed run would add the LoRA term again);
# the LoRA term before cuBLAS is a pass over y alike, on the same pinned tile.
_epilogue_kernel = _lora_term_kernel = _lora_linear_kernel
# Its workspace follows its tile, so stream-K runs the pinned decode tile.
_stream_k_kernel = _decode_stream_k_kernel


def _launcher(kind: str, m: int, n: int, r_pad: int, dtype: torch.dtype, in_kernel_dropout: bool = False) -> tuple:
    """(kernel, launch options) for ``kind`` ("decode", "prefill", "shrink"): the autotuned kernel of the dtype
    (no options: the autotuner picks the tile), or the kernel and its :func:`pinned_config`."""
    kernel = globals()[f"_{kind}_kernel"]  # read at call time: tests put spies in its place
    if AUTOTUNE:
        return (_FP32_TUNED[kind] if dtype == torch.float32 else kernel), {}
    return kernel, pinned_config(kind, m, n, r_pad, dtype, in_kernel_dropout).all_kwargs()


def base_on_cublas(m: int, r: int) -> bool:
    """Whether lora_linear of m rows at rank r runs x W^T on cuBLAS and the tile kernel as its epilogue."""
    return m >= CUBLAS_BASE_MIN_M and not fuses_shrink(m, r)


def uses_stream_k(
    m: int, n: int, k: int, r: int, dtype: torch.dtype, sms: int, in_kernel_dropout: bool = False, *,
    interpreter: bool = INTERPRET,
) -> bool:  # fmt: skip
    """Whether the one-launch decode of m rows, n outputs and reduction k runs on the stream-K schedule: its
    column tiles would fill less than STREAM_K_BELOW_WAVE_FILL of their waves on ``sms`` SMs, or the stream-K
    tile is the wider (fewer re-reads of x from L2); one row tile holds every row, K has at least two steps to
    share out, and x is not dropped in the kernel (see _decode_stream_k_kernel)."""
    if not fuses_shrink(m, r) or in_kernel_dropout:
        return False
    tile = pinned_config("decode", m, n, r_pad(r), dtype, interpreter=interpreter).kwargs
    wide = pinned_config("stream_k", m, n, r_pad(r), dtype, interpreter=interpreter).kwargs
    tiles = triton.cdiv(n, tile["BLOCK_N"])
    fill = tiles / (triton.cdiv(tiles, sms) * sms)
    one_row_tile = m <= wide["BLOCK_M"]  # on a GPU always; the interpreter's tiles hold 16 rows
    fewer_rereads = wide["BLOCK_N"] > tile["BLOCK_N"]
    return one_row_tile and triton.cdiv(k, wide["BLOCK_K"]) >= 2 and (fill < STREAM_K_BELOW_WAVE_FILL or fewer_rereads)


def shrinks_in_persistent_pass(
    x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor
) -> bool:
    """Whether lora_linear of x's rows past the decode rows runs as one launch of the persistent kernel, x A^T in
    its own pass over x: the kernel on (lora_persistent.PERSISTENT_PREFILL_MIN_M) and taking the call, A
    included."""
    m = x.shape[0]
    return (
        lora_a is not None
        and m > DECODE_MAX_M
        and m >= persistent.PERSISTENT_PREFILL_MIN_M
        and persistent.takes(x, weight, lora_b, lora_a)
    )


def fuses_shrink(m: int, r: int) -> bool:
    """Whether lora_linear of m rows at rank r runs as one launch (shrink fused into the decode kernel)."""
    return m <= DECODE_MAX_M and r_pad(r) <= FUSED_MAX_R_PAD


def cublas_accumulates(m: int, r: int, scaled: bool = False) -> bool:
    """Whether lora_linear of m rows at rank r writes the LoRA term first and lets cuBLAS add x W^T into it
    (``scaled``: the call has an out_scale or a z, which need the whole sum before they apply)."""
    return base_on_cublas(m, r) and CUBLAS_ACCUMULATES and not scaled


def launch_plan(m: int, r: int, scaled: bool = False) -> tuple[str, ...]:
    """The kernels the forward of m rows at rank r launches, in order (for tests, docs and warm-up); ``scaled``
    as in :func:`cublas_accumulates`."""
    if fuses_shrink(m, r):
        return ("decode+shrink",)
    if cublas_accumulates(m, r, scaled):
        return ("shrink", "lora_term", "cublas")
    if base_on_cublas(m, r):
        return ("shrink", "cublas", "epilogue")
    return ("shrink", "decode" if m <= DECODE_MAX_M else "prefill")


def _check_devices(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: all tensors must share one device")


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), 8192)


def stream_k_programs(tiles: int, k_iters: int, sms: int) -> int:
    """Programs of the stream-K decode over ``tiles`` tiles of ``k_iters`` K steps on ``sms`` SMs: one per SM, or,
    where the tiles fit at least twice on the SMs, the largest multiple of the tile count (each tile's K cut in
    the same number of equal shares: no program straddles two tiles, so each writes one partial sum, not two)."""
    splits = min(sms // tiles, k_iters)
    return max(1, min(tiles * k_iters, tiles * splits if splits >= 2 else sms))


def stream_k_sms(device: torch.device) -> int:
    """The SMs the stream-K decode shares out: the device's (the interpreter takes 5, so tiny shapes still cut
    tiles between programs)."""
    return 5 if INTERPRET else sm_count(device)


def stream_k_shares(tiles: int, k_iters: int, programs: int) -> list[int]:
    """How many programs share each tile on the stream-K schedule (program p takes iterations [p T / P,
    (p + 1) T / P) of the T = tiles * k_iters, tile after tile)."""
    total = tiles * k_iters
    owner = lambda i: ((i + 1) * programs - 1) // total  # the program whose share holds iteration i
    return [owner((t + 1) * k_iters - 1) - owner(t * k_iters) + 1 for t in range(tiles)]


@functools.cache
def stream_k_segments(tiles: int, k_iters: int, programs: int) -> int:
    """The most programs that share one tile on the stream-K schedule (its workspace slots per tile)."""
    return max(stream_k_shares(tiles, k_iters, programs))


def _decode_stream_k(x, weight, lora_a, lora_b, scaling, bias, out_scale, z, y) -> torch.Tensor:
    """lora_linear's one-launch decode on the stream-K schedule (arguments checked and prepared by it)."""
    (m, k), (n, r) = x.shape, lora_b.shape
    tile = pinned_config("stream_k", m, n, r_pad(r), x.dtype)
    block_m, block_n, block_k = (tile.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    tiles, k_iters = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    programs = stream_k_programs(tiles, k_iters, stream_k_sms(x.device))
    slots = tiles * stream_k_segments(tiles, k_iters, programs)
    counts = arrival_counts(x.device, 2 * tiles)  # per tile: programs arrived, partial sums written
    partial = torch.empty(slots * block_m * block_n, device=x.device, dtype=torch.float32)
    xa_partial = torch.empty(slots * block_m * r_pad(r), device=x.device, dtype=torch.float32)
    with on_device(x):
        globals()["_stream_k_kernel"][(programs,)](  # read at call time: tests put spies in its place
            x, weight, lora_a, lora_b, y if bias is None else bias, y, y if out_scale is None else out_scale,
            y if z is None else z, partial, xa_partial, counts[:tiles], counts[tiles:],
            m, n, k, r,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
            lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
            float(scaling),
            tiles * k_iters, k_iters, slots // tiles,
            HAS_BIAS=bias is not None,
            HAS_OUT_SCALE=out_scale is not None,
            STORE_Z=z is not None,
            R_PAD=r_pad(r),
            DOT_PRECISION=dot_precision(x.dtype),
            LORA_PRECISION=dot_precision(x.dtype) if x.dtype == torch.float32 else "tf32",
            UPCAST=INTERPRET,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=8 if block_m == 64 else tile.num_warps,  # 64 rows on 4 warps spill beside its bookkeeping
            num_stages=tile.num_stages,
        )  # fmt: skip
    return y


def _shrink_split_k(m: int, k: int, device: torch.device) -> int:
    """Split K when the row tiles alone would leave most SMs idle (decode, backward of small batches)."""
    if INTERPRET:
        return 1 if k <= 32 else 2  # exercise both code paths on tiny interpreter shapes
    row_tiles = triton.cdiv(m, 16)
    return max(1, min(sm_count(device) // row_tiles, triton.cdiv(k, 1024), 16))


@dataclass(frozen=True)
class PhiloxDropout:
    """In-kernel dropout on a logical [M, K] tensor: element (i, j) is kept when Philox's uniform for counter
    ``i * stride_r + j * stride_c`` under ``seed`` is at least ``p``, then scaled by ``keep_scale``. Strides
    name the element's position in the layer's input x, so a kernel reading x transposed regenerates the
    forward's mask (counters are 64-bit: the pattern never repeats within a tensor)."""

    seed: int
    p: float
    keep_scale: float
    stride_r: int
    stride_c: int

    def transposed(self) -> PhiloxDropout:
        return PhiloxDropout(self.seed, self.p, self.keep_scale, self.stride_c, self.stride_r)

    def launch(self, placeholder: torch.Tensor) -> tuple[tuple, dict]:
        return (self.seed, self.p, self.keep_scale, self.stride_r, self.stride_c, placeholder, 0), _PHILOX


@dataclass(frozen=True, eq=False)  # eq=False: a tensor field has no truth value to compare by
class BitsDropout:
    """In-kernel dropout with a given keep-mask of the layer's input x [M, K]: ``bits`` uint8 [M, ceil(K / 8)]
    (fastpeft.ops.dropout.pack_bits: bit j of byte i of a row holds column 8 i + j), kept elements scaled by
    ``keep_scale``. ``by_columns``: the kernel's logical input is x^T (the backward's shrink for dA)."""

    bits: torch.Tensor
    keep_scale: float
    by_columns: bool = False

    def transposed(self) -> BitsDropout:
        return BitsDropout(self.bits, self.keep_scale, not self.by_columns)

    def launch(self, placeholder: torch.Tensor) -> tuple[tuple, dict]:
        del placeholder  # the bits are the pointer
        flags = {"MASK_BITS": True, "BITS_T": self.by_columns}
        return (0, 0.0, self.keep_scale, 0, 0, self.bits, self.bits.stride(0)), flags


Dropout = PhiloxDropout | BitsDropout
_PHILOX = {"MASK_BITS": False, "BITS_T": False}


def _dropout_launch(dropout: Dropout | None, placeholder: torch.Tensor) -> tuple[tuple, dict]:
    """The kernels' dropout arguments and flags for ``dropout`` (none: nothing dropped, ``placeholder`` the
    never-read bits pointer)."""
    if dropout is None:
        return (0, 0.0, 1.0, 0, 0, placeholder, 0), _PHILOX
    return dropout.launch(placeholder)


@triton.jit
def _keep_mask_kernel(out_ptr, M, K, row_start, seed, dropout_p, stride_r, stride_c, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    kept = _kept(row_start + rows.to(tl.int64), cols, seed, dropout_p, stride_r, stride_c)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], kept, mask=inside)


def keep_mask(dropout: PhiloxDropout, m: int, k: int, device: torch.device, row_start: int = 0) -> torch.Tensor:
    """Rows ``row_start`` to ``row_start + m`` of the [*, k] bool keep-mask ``dropout`` draws: what the kernels
    apply, materialised for references, tests and the other backends."""
    out = torch.empty((m, k), device=device, dtype=torch.bool)
    if m and k:
        with on_device(out):
            _keep_mask_kernel[(triton.cdiv(m, 32), triton.cdiv(k, 32))](
                out, m, k, row_start, dropout.seed, dropout.p, dropout.stride_r, dropout.stride_c, BLOCK=32
            )
    return out


@triton.jit
def _pack_bits_kernel(mask_ptr, out_ptr, M, K, BYTES, stride_mr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    byte = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    bit = tl.arange(0, 8)
    cols = byte[:, None] * 8 + bit[None, :]  # [BLOCK_B, 8]: the 8 columns of each byte
    inside = (rows[:, None, None] < M) & (cols[None, :, :] < K)
    kept = tl.load(mask_ptr + rows[:, None, None].to(tl.int64) * stride_mr + cols[None, :, :], mask=inside, other=0)
    packed = tl.sum((kept != 0).to(tl.int32) << bit[None, None, :], axis=2)
    out = out_ptr + rows[:, None].to(tl.int64) * BYTES + byte[None, :]
    tl.store(out, packed.to(tl.uint8), mask=(rows[:, None] < M) & (byte[None, :] < BYTES))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """fastpeft.ops.dropout.pack_bits in one pass: bool [M, K] (rows of unit column stride) -> uint8
    [M, ceil(K / 8)], bit j of byte i holding column 8 i + j (the bools read once, the bytes written once)."""
    m, k = mask.shape
    out = torch.empty((m, triton.cdiv(k, 8)), device=mask.device, dtype=torch.uint8)
    if m and k:
        mask = mask if k == 1 or mask.stride(1) == 1 else mask.contiguous()
        block_r, block_b = (16, 4) if INTERPRET else (32, 32)
        with on_device(mask):
            _pack_bits_kernel[(triton.cdiv(m, block_r), triton.cdiv(out.shape[1], block_b))](
                mask.view(torch.uint8), out, m, k, out.shape[1], mask.stride(0), BLOCK_R=block_r, BLOCK_B=block_b
            )  # fmt: skip
    return out


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, dropout: Dropout | None = None) -> torch.Tensor:
    """``xa = dropout(x) @ lora_a.T`` in fp32 (no dropout when None).

    x: [M, K] fp16/bf16/fp32, any strides; lora_a: [R, K], same dtype. Returns [M, R] fp32, contiguous.
    """
    _check_devices(x, lora_a=lora_a)
    m, k = x.shape
    r = lora_a.shape[0]
    split_k = _shrink_split_k(m, k, x.device)
    alloc = torch.zeros if split_k > 1 else torch.empty
    xa = alloc((m, r), device=x.device, dtype=torch.float32)
    if m == 0:
        return xa
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), split_k)
    kernel, options = _launcher("shrink", m, 0, r_pad(r), x.dtype, dropout is not None)
    dropout_args, dropout_flags = _dropout_launch(dropout, xa)
    with on_device(x):
        kernel[grid](
            x, lora_a, xa,
            m, k, r,
            x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), xa.stride(0), xa.stride(1),
            *dropout_args,
            _m_bucket(m),
            DROPOUT=dropout is not None,
            **dropout_flags,
            SPLIT_K=split_k,
            R_PAD=r_pad(r),
            DOT_PRECISION=dot_precision(x.dtype),
            UPCAST=INTERPRET,
            **options,
        )  # fmt: skip
    return xa


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
    xa: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dropout_x: Dropout | None = None,
    dropout_out: Dropout | None = None,
) -> torch.Tensor:
    """``y = out_scale * (x @ weight.T + scaling * xa @ lora_b.T) + bias`` with ``xa = x @ lora_a.T`` fused when
    not given. ``dropout_x``: the fused shrink reads x with that in-kernel dropout; ``dropout_out``: the LoRA term
    of output element (m, n) is dropped (the backward's dx, whose columns are x's).

    x: [M, K]; weight: [N, K]; lora_a: [R, K] (unused when ``xa`` is given); lora_b: [N, R]; bias: [N] or
    None; xa: [M, R] fp32 or None; out_scale: [N] fp32 or None (no scale); z: None, or an [M, N] contiguous
    tensor of x's dtype that receives the value before ``out_scale`` and bias. fp16/bf16/fp32, one dtype, any
    strides. Returns y [M, N] in x's dtype. Up to DECODE_MAX_M rows run on decode tiles, more on prefill tiles;
    from CUBLAS_BASE_MIN_M rows x W^T runs on cuBLAS, added in place to the LoRA term the tiles wrote first (with
    out_scale or z, the tiles run after it as its epilogue); from lora_persistent.PERSISTENT_PREFILL_MIN_M rows the
    persistent TMA kernel runs where it takes the call. The fused form needs decode rows, or past them the
    persistent kernel, which computes x A^T in its own pass over x (:func:`shrinks_in_persistent_pass`; no
    dropout, out_scale or z).
    """
    _check_devices(x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias, xa=xa, out_scale=out_scale, z=z)
    m, k = x.shape
    n, r = lora_b.shape
    fuse = xa is None
    if dropout_x is not None and (not fuse or dropout_out is not None):
        raise ValueError("dropout_x applies to the fused shrink only, and not together with dropout_out")
    if fuse and m > DECODE_MAX_M and (dropout_x is not None or out_scale is not None or z is not None
                                      or not shrinks_in_persistent_pass(x, weight, lora_a, lora_b)):  # fmt: skip
        raise ValueError(f"the fused shrink runs on decode tiles (at most {DECODE_MAX_M} rows) or in the persistent "
                         f"kernel's pass over x (shrinks_in_persistent_pass), got {m} rows")  # fmt: skip
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if z is not None and (z.shape != y.shape or z.stride() != y.stride() or z.dtype != y.dtype):
        raise ValueError(f"z must be a contiguous [{m}, {n}] {x.dtype} tensor, got {tuple(z.shape)} {z.dtype}")
    if m == 0 or n == 0:
        return y
    if bias is not None:
        bias = bias.contiguous()  # [N]: the kernel reads it with unit stride
    if out_scale is not None:
        out_scale = out_scale.float().contiguous()
    if fuse and uses_stream_k(m, n, k, r, x.dtype, sm_count(x.device), dropout_x is not None):
        return _decode_stream_k(x, weight, lora_a, lora_b, scaling, bias, out_scale, z, y)
    if m > DECODE_MAX_M and fuse:  # x A^T in the persistent kernel's own pass over x
        return persistent.lora_linear_persistent(x, weight, None, lora_b, scaling, bias, lora_a=lora_a)
    dropout = dropout_x or dropout_out
    if (not fuse and dropout is None and out_scale is None and z is None and xa.stride(1) == 1
            and m >= persistent.PERSISTENT_PREFILL_MIN_M and persistent.takes(x, weight, lora_b)):  # fmt: skip
        return persistent.lora_linear_persistent(x, weight, xa, lora_b, scaling, bias)
    cublas = not fuse and base_on_cublas(m, r)
    accumulate = cublas and cublas_accumulates(m, r, scaled=out_scale is not None or z is not None)
    if cublas:
        if not accumulate:
            torch.mm(x, weight.t(), out=y)  # follows torch's float32 matmul precision, as DOT_PRECISION does
        # read at call time: tests put spies in their place
        kernel = globals()["_lora_term_kernel" if accumulate else "_epilogue_kernel"]
        options = pinned_config("epilogue", m, n, r_pad(r), x.dtype).all_kwargs()
    else:
        kernel, options = _launcher("decode" if m <= DECODE_MAX_M else "prefill", m, n, r_pad(r), x.dtype,
                                    dropout is not None)  # fmt: skip
    if fuse:
        xa = y  # placeholder pointer, never read when FUSE_SHRINK
    else:
        lora_a = xa  # placeholder pointer, never read without FUSE_SHRINK
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    dropout_args, dropout_flags = _dropout_launch(dropout, y)
    with on_device(x):
        kernel[grid](
            x, weight, lora_a, xa, lora_b, y if bias is None else bias, y,
            y if out_scale is None else out_scale, y if z is None else z,
            m, n, k, r,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
            xa.stride(0), xa.stride(1), lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
            float(scaling),
            *dropout_args,
            _m_bucket(m),
            FUSE_SHRINK=fuse,
            **dropout_flags,
            DROPOUT_X=dropout_x is not None,
            DROPOUT_OUT=dropout_out is not None,
            HAS_BIAS=bias is not None,
            HAS_OUT_SCALE=out_scale is not None,
            STORE_Z=z is not None,
            BASE="none" if accumulate else ("from_y" if cublas else "k_loop"),
            R_PAD=r_pad(r),
            R_CHUNK=rank_chunk(r_pad(r), x.dtype),
            DOT_PRECISION=dot_precision(x.dtype),
            LORA_PRECISION=dot_precision(x.dtype) if x.dtype == torch.float32 else "tf32",
            UPCAST=INTERPRET,
            **options,
        )  # fmt: skip
    if accumulate:
        y.addmm_(x, weight.t())  # in place: cuBLAS with beta = 1 (out-of-place addmm would copy y first)
    return y
