"""Triton kernels for many LoRA adapters in one batch (punica-style shrink and expand over an adapter pool).

The pool (fastpeft.ops.multi_lora.AdapterPool) stacks every adapter's rank rows without padding: adapter i owns
rows ``offsets[i]:offsets[i + 1]`` of ``lora_a`` [P, K] and of ``lora_b_t`` [P, N] (B transposed, so the expand
reads contiguous rows of N). Each token t carries ``adapter_ids[t]``; -1 means no adapter.

- ``_shrink_kernel``: ``v[t, :r] = x[t] @ A[id[t]].T`` in fp32, one program per token looping over K, columns
  past the adapter's rank written as zeros.
- ``_expand_kernel``: ``y[t, n] = base[t, n] + scaling[id[t]] * v[t] @ B[id[t]].T`` for a block of n, in fp32,
  rounded once to y's dtype.

An id outside [0, num_adapters) reads nothing (the token gets the base output): the kernels never address the
pool through an unchecked id. Grids depend on the shapes and the pool's largest rank only, never on the ids, and
nothing is allocated from data: both launches can be captured in a CUDA graph.

Per-token programs re-read an adapter's rows for every token that uses it (from L2 when the batch shares
adapters); the segment form (tokens of one sequence share an adapter, tiles of tokens through ``tl.dot``) is the
prefill path still to come.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora import _on_device


@triton.jit
def _adapter_rows(ids_ptr, offsets_ptr, t, num_adapters):
    """(first pool row, rank) of token t's adapter; rank 0 for -1 or any id outside the pool."""
    adapter = tl.load(ids_ptr + t).to(tl.int32)
    valid = (adapter >= 0) & (adapter < num_adapters)
    safe = tl.where(valid, adapter, 0)
    start = tl.load(offsets_ptr + safe)
    end = tl.load(offsets_ptr + safe + 1)
    return start, tl.where(valid, end - start, 0), safe


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, ids_ptr, offsets_ptr, v_ptr,
    K, num_adapters,
    stride_xm, stride_xk, stride_ap, stride_ak, stride_vm,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    start, rank, _ = _adapter_rows(ids_ptr, offsets_ptr, t, num_adapters)
    rows = tl.arange(0, BLOCK_R)
    row_mask = rows < rank
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        xk = tl.load(x_ptr + t * stride_xm + ks * stride_xk, mask=k_mask & (rank > 0), other=0.0).to(tl.float32)
        a = tl.load(
            a_ptr + (start + rows)[:, None] * stride_ap + ks[None, :] * stride_ak,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(a * xk[None, :], axis=1)
    tl.store(v_ptr + t * stride_vm + rows, acc)


@triton.jit
def _expand_kernel(
    base_ptr, v_ptr, b_ptr, ids_ptr, offsets_ptr, scalings_ptr, y_ptr,
    N, num_adapters,
    stride_base_m, stride_base_n, stride_vm, stride_bp, stride_bn, stride_ym, stride_yn,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    start, rank, safe = _adapter_rows(ids_ptr, offsets_ptr, t, num_adapters)
    rows = tl.arange(0, BLOCK_R)
    row_mask = rows < rank
    v = tl.load(v_ptr + t * stride_vm + rows, mask=row_mask, other=0.0)
    b = tl.load(
        b_ptr + (start + rows)[:, None] * stride_bp + cols[None, :] * stride_bn,
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    scaling = tl.where(rank > 0, tl.load(scalings_ptr + safe), 0.0)
    delta = tl.sum(v[:, None] * b, axis=0) * scaling
    base = tl.load(base_ptr + t * stride_base_m + cols * stride_base_n, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * stride_ym + cols * stride_yn, (base + delta).to(y_ptr.dtype.element_ty), mask=col_mask)


def multi_lora_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, offsets: torch.Tensor, adapter_ids: torch.Tensor, v_width: int
) -> torch.Tensor:
    """``v[t, :r] = x[t] @ A[id[t]].T``: fp32 [M, v_width] (the rank block: a power of two >= 16 and >= the
    pool's largest rank, chosen by fastpeft.ops.multi_lora; columns past each token's rank, and whole rows of
    tokens without an adapter, are zero). x [M, K]; lora_a [P, K]; offsets int [n + 1]; adapter_ids int [M]."""
    m, k = x.shape
    v = torch.empty((m, v_width), device=x.device, dtype=torch.float32)
    if m == 0:
        return v
    with _on_device(x):
        _shrink_kernel[(m,)](
            x, lora_a, adapter_ids, offsets, v, k, offsets.numel() - 1,
            x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), v.stride(0),
            BLOCK_R=v_width, BLOCK_K=min(128, max(16, triton.next_power_of_2(k))),
        )  # fmt: skip
    return v


def multi_lora_expand(
    base: torch.Tensor,
    v: torch.Tensor,
    lora_b_t: torch.Tensor,
    offsets: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[t] = base[t] + scaling[id[t]] * v[t, :r] @ B[id[t]].T`` in fp32, rounded once to base's dtype.
    base [M, N]; v fp32 [M, BLOCK_R] from :func:`multi_lora_shrink`; lora_b_t [P, N]; scalings fp32 [n].
    ``out`` may be ``base`` itself (each element is read before it is written, by the same program)."""
    m, n = base.shape
    y = torch.empty_like(base) if out is None else out
    if m == 0 or n == 0:
        return y
    block_n = 128 if n >= 128 else max(16, triton.next_power_of_2(n))
    with _on_device(base):
        _expand_kernel[(m, triton.cdiv(n, block_n))](
            base, v, lora_b_t, adapter_ids, offsets, scalings, y, n, offsets.numel() - 1,
            base.stride(0), base.stride(1), v.stride(0), lora_b_t.stride(0), lora_b_t.stride(1),
            y.stride(0), y.stride(1),
            BLOCK_R=v.shape[1], BLOCK_N=block_n,
        )  # fmt: skip
    return y
