"""DoRA's own kernels (fastpeft/ops/dora.py; its products run on the lora kernels): the weight norm in one pass
over W, and the backward's pass over its output gradient, both terms that read dy in one pass.

    norm   = ||W_n + s (B A)_n||   [N] fp32: W + s B A formed block by block in registers (B A on the tensor
             cores) and its squares summed, one read of W, A and B; never stored. The PyTorch form takes about
             ten launches (W A^T, A A^T, the identity's terms) and cancels where ||W + s B A|| << ||W||.

The backward's pass:

    dz     = dy * c                [M, N] in dy's dtype (c = m / ||W + s B A||, fp32 [N]): the LoRA product's gradient
    dscale = sum over rows of dy * z   [N] fp32 (z = x W^T + s x A^T B^T, the forward's pre-scale product)

As torch ops they are seven passes over [M, N] tensors (dy and z widened to fp32, the products, the cast and the
sum: about 48 bytes an element in bf16); here one launch reads dy and z once and writes dz once (6 bytes an
element). Programs own a column tile and a block of rows, whose fp32 column sums they store; the host adds those
partial sums over the row blocks in a fixed order (no float atomics: the same bits on every run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, dot_precision, on_device, r_pad


def tile_options(m: int, interpreter: bool = INTERPRET) -> dict:
    """64 x 128 tiles on 8 warps (a memory-bound pass: 16 KB of each 16-bit operand per step; on 4 warps the two
    fp32 tiles spill), up to 8 row tiles a program so the partial sums stay within an eighth of dy's rows;
    16 x 16 in the interpreter."""
    if interpreter:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "STEPS": 2, "num_warps": 1}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "STEPS": min(8, triton.cdiv(max(m, 1), 64)), "num_warps": 8}


@triton.jit
def _dora_grad_scale_kernel(
    dy_ptr, z_ptr, scale_ptr, dz_ptr, part_ptr,
    M, N,
    stride_dym, stride_dyn, stride_zm, stride_zn, stride_dzm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STEPS: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    c = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    column_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for step in range(STEPS):
        offs_m = (block * STEPS + step) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < M) & mask_n[None, :]
        rows = offs_m[:, None].to(tl.int64)
        cols = offs_n[None, :].to(tl.int64)
        dy = tl.load(dy_ptr + rows * stride_dym + cols * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows * stride_zm + cols * stride_zn, mask=mask, other=0.0).to(tl.float32)
        tl.store(dz_ptr + rows * stride_dzm + cols, (dy * c[None, :]).to(dz_ptr.dtype.element_ty), mask=mask)
        column_sum += tl.sum(dy * z, axis=0)
    tl.store(part_ptr + block.to(tl.int64) * N + offs_n, column_sum, mask=mask_n)


def dora_grad_scale(dy: torch.Tensor, z: torch.Tensor, out_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``((dy * out_scale).to(dy.dtype), (dy * z).sum(0))`` in fp32 math from one read of dy and z.

    dy, z: [M, N] fp16/bf16/fp32, one dtype, any strides; out_scale: [N] fp32. Returns dz [M, N] in dy's dtype
    (contiguous) and dscale [N] fp32.
    """
    for name, t in (("z", z), ("out_scale", out_scale)):
        if t.device != dy.device:
            raise ValueError(f"{name} is on {t.device}, dy on {dy.device}: every tensor must be on one device")
    m, n = dy.shape
    dz = torch.empty((m, n), device=dy.device, dtype=dy.dtype)
    if m == 0 or n == 0:
        return dz, torch.zeros(n, device=dy.device, dtype=torch.float32)
    tile = tile_options(m)
    blocks = triton.cdiv(m, tile["BLOCK_M"] * tile["STEPS"])
    partial = torch.empty((blocks, n), device=dy.device, dtype=torch.float32)
    out_scale = out_scale.float().contiguous()
    with on_device(dy):
        _dora_grad_scale_kernel[(blocks, triton.cdiv(n, tile["BLOCK_N"]))](
            dy, z, out_scale, dz, partial,
            m, n,
            dy.stride(0), dy.stride(1), z.stride(0), z.stride(1), dz.stride(0),
            BLOCK_M=tile["BLOCK_M"], BLOCK_N=tile["BLOCK_N"], STEPS=tile["STEPS"], num_warps=tile["num_warps"],
        )  # fmt: skip
    return dz, partial.sum(0)


# The weight norm's kernel holds a row block of B [BLOCK_N, R_PAD] as an MMA operand beside the merged block:
# ranks up to 128; wider ones run the PyTorch composition.
NORM_MAX_R_PAD = 128


def norm_options(dtype: torch.dtype, r_padded: int, interpreter: bool = INTERPRET) -> dict:
    """32 rows of W a program (N = 4096 gives 128 programs, about one per SM: a streaming pass over W) on 4 warps,
    K in steps that keep A's block [R_PAD, BLOCK_K] at 4 KB (8 KB in 16 bits: 128 columns at rank 16, 16 at
    rank 128; without spills on sm_90); 16s in the interpreter."""
    if interpreter:
        return {"BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1}
    elements = 1024 if dtype == torch.float32 else 2048
    return {"BLOCK_N": 32, "BLOCK_K": max(16, elements // r_padded), "num_warps": 4}


@triton.jit
def _dora_weight_norm_kernel(
    w_ptr, a_ptr, b_ptr, norm_ptr,
    N, K, R, scaling,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """||W_n + s (B A)_n|| for a block of rows n: each [BLOCK_N, BLOCK_K] block of W + s B A formed in fp32 in
    registers (B's rows times A's block on the tensor cores) and its squares summed; nothing merged is stored."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    row_mask, rank_mask = rows < N, ranks < R
    b = tl.load(b_ptr + rows[:, None].to(tl.int64) * stride_bn + ranks[None, :].to(tl.int64) * stride_br,
                mask=row_mask[:, None] & rank_mask[None, :], other=0.0)  # fmt: skip
    if UPCAST:
        b = b.to(tl.float32)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    a_rows = a_ptr + ranks[:, None].to(tl.int64) * stride_ar
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        w = tl.load(w_rows + ks[None, :].to(tl.int64) * stride_wk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_rows + ks[None, :].to(tl.int64) * stride_ak, mask=rank_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        merged = w.to(tl.float32) + scaling * tl.dot(b, a, input_precision=DOT_PRECISION)
        sq += tl.sum(merged * merged, axis=1)
    tl.store(norm_ptr + rows, tl.sqrt(sq), mask=row_mask)


def dora_weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W + scaling * B A||`` per output row in one pass over W: fp32 [N]. weight [N, K], lora_a [R, K],
    lora_b [N, R] (one dtype, any strides; R padded to at most NORM_MAX_R_PAD)."""
    n, k = weight.shape
    norm = torch.empty(n, device=weight.device, dtype=torch.float32)
    if n == 0:
        return norm
    options = norm_options(weight.dtype, r_pad(lora_a.shape[0]))
    with on_device(weight):
        _dora_weight_norm_kernel[(triton.cdiv(n, options["BLOCK_N"]),)](
            weight, lora_a, lora_b, norm,
            n, k, lora_a.shape[0], float(scaling),
            weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1), lora_b.stride(0),
            lora_b.stride(1),
            DOT_PRECISION=dot_precision(weight.dtype), UPCAST=INTERPRET, R_PAD=r_pad(lora_a.shape[0]), **options,
        )  # fmt: skip
    return norm
