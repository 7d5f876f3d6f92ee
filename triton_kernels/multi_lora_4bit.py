"""Many LoRA adapters on one 4-bit base at decode sizes: bitsandbytes' NF4/FP4 weight decoded on chip with every
token's adapter added in the epilogue.

    multi_lora_sgmv_linear_4bit  the grouped shrink (triton_kernels/multi_lora.py: each adapter's A read once,
                                 fp32 slabs), then one kernel: tiles of the tokens in the batch description's
                                 order, W's 4-bit bytes decoded in the K loop (triton_kernels/qlora.py's steps, the
                                 4-bit decode tier's tiles), bias, then each adapter whose tokens meet the tile adds
                                 s v B^T from its B tile; y written once. On sm_90 the second kernel is launched
                                 while the shrink runs and waits for its slabs only before the epilogue.

Without it a 4-bit multi-adapter layer is three launches (the 4-bit product, the shrink, an expand that reads the
product back and writes y again). The shapes and tables are the pool's and the description's, as for
triton_kernels/multi_lora.py's grouped kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, dot_precision, on_device
from .multi_lora import (
    SGMV_RANK_CHUNK,
    lora_precision,
    pdl_launch_options,
    sgmv_epilogue,
    sgmv_shrink,
    sgmv_tile,
)
from .qlora import format_args, pinned_config, step_elements, step_pairs


@triton.jit
def _sgmv_linear_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr,
    part_ptr, b_ptr, order_ptr, starts_ptr, ranks_ptr, v_starts_ptr, b_starts_ptr, scalings_ptr, out_starts_ptr,
    y_ptr,
    M, K, K_BYTES, num_adapters, splits,
    stride_xm, stride_xk, stride_ym, stride_yn,
    LOG2_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, LOG2_NESTED: tl.constexpr, W_DTYPE: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, PDL: tl.constexpr, V_WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # Program (row tile of the tokens in the description's order, column tile, slice): x W^T (+ bias) of its
    # tokens over the slice's columns (W's rows out_start + cols, decoded from 4 bits in the K loop), then the
    # grouped expand of triton_kernels/multi_lora.py's _sgmv_linear_kernel in the epilogue.
    s, width, cols, col_mask, out_cols, tile_lo, pos, in_rows, toks = sgmv_tile(order_ptr, out_starts_ptr, M,
                                                                                BLOCK_M, BLOCK_N)  # fmt: skip
    operand = tl.float32 if UPCAST else x_ptr.dtype.element_ty
    x_rows = x_ptr + toks[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if EVEN_K:
        offs_p = tl.arange(0, BLOCK_K // 2)
        for k0 in range(0, K, BLOCK_K):
            pairs = k0 // 2 + offs_p
            acc, _, _ = step_pairs(acc, x_rows, stride_xk, in_rows, w_ptr, absmax_ptr, code_ptr, absmax2_ptr,
                                   code2_ptr, offset_ptr, out_cols, col_mask, pairs, pairs < K_BYTES, K, K_BYTES,
                                   LOG2_BLOCKSIZE, NESTED, LOG2_NESTED, W_DTYPE, operand, DOT_PRECISION)  # fmt: skip
    else:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            acc, _ = step_elements(acc, x_rows, stride_xk, in_rows, w_ptr, absmax_ptr, code_ptr, absmax2_ptr,
                                   code2_ptr, offset_ptr, out_cols, col_mask, ks, ks < K, K, LOG2_BLOCKSIZE, NESTED,
                                   LOG2_NESTED, W_DTYPE, operand, DOT_PRECISION)  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    sgmv_epilogue(acc, part_ptr, b_ptr, starts_ptr, ranks_ptr, v_starts_ptr, b_starts_ptr, scalings_ptr, y_ptr,
                  s, width, cols, col_mask, out_cols, tile_lo, pos, in_rows, toks, M, num_adapters, splits,
                  stride_ym, stride_yn, PDL, LORA_PRECISION, V_WIDTH, BLOCK_M, BLOCK_R)  # fmt: skip


def multi_lora_sgmv_linear_4bit(
    x: torch.Tensor,
    weight: tuple,
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
    """``x dequant(W)^T + bias + s_i (x A_i^T) B_i^T`` per token and slice, the tokens grouped by adapter, in two
    launches. x [M, K] (fp16/bf16/fp32, any strides); ``weight`` = (packed uint8, absmax, code, absmax2, code2,
    offset, blocksize, nested_blocksize, n, w_dtype), fastpeft.ops.qlora.Weight4bit.forward_args() (W [n, K]); bias
    [n] or None; the rest as triton_kernels/multi_lora.py's multi_lora_sgmv_linear. Returns [M, n] in x's dtype."""
    packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, n, w_dtype = weight
    m, k = x.shape
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    num_slices, num_adapters = ranks.shape
    part, splits, pdl = sgmv_shrink(x, lora_a, a_offsets, order, starts, num_adapters, v_width)
    state, constexprs = format_args(absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, w_dtype)
    tile = pinned_config(True, m, x.dtype, False, k % 2 == 0, max_width).all_kwargs()  # the 4-bit decode tier's
    grid = (triton.cdiv(m, tile["BLOCK_M"]), triton.cdiv(max_width, tile["BLOCK_N"]), num_slices)
    with on_device(x):
        _sgmv_linear_4bit_kernel[grid](
            x, packed, *state, y if bias is None else bias, part, lora_b, order, starts, ranks, v_starts, b_starts,
            scalings, out_starts, y,
            m, k, k // 2, num_adapters, splits,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            **constexprs, EVEN_K=k % 2 == 0, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype),
            LORA_PRECISION=lora_precision(x.dtype), UPCAST=INTERPRET, PDL=pdl, V_WIDTH=v_width,
            BLOCK_R=min(v_width, SGMV_RANK_CHUNK), **tile, **pdl_launch_options(pdl),
        )  # fmt: skip
    return y
