"""The DoRA backward's pass over its output gradient (fastpeft/ops/dora.py): both terms that read dy, in one pass.

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

from .common import INTERPRET, on_device


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
