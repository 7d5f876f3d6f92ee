"""Many LoRA adapters on one 4-bit base (a :class:`fastpeft.Linear4bit`, bitsandbytes' NF4/FP4 layout), each token
with its own adapter:

    y[t] = x[t] @ dequant(W).T + bias + scaling[id[t]] * (x[t] @ A[id[t]].T) @ B[id[t]].T     (id[t] = -1: none)

``fastpeft::multi_lora_sgmv_linear_4bit`` is the decode layer with a batch description (fake implementation
included): on ``triton`` (triton_kernels/multi_lora_4bit.py) the grouped shrink, then one kernel that decodes W's
4 bits in its K loop and adds every token's adapter in its epilogue (y written once; three launches without it);
on ``torch`` and ``cuda`` the 4-bit product (``fastpeft::matmul_4bit``), then that backend's grouped adapters.
:func:`multi_lora_linear_4bit` is the layer: that op for decode with a description, else the 4-bit product and
:func:`fastpeft.ops.multi_lora.multi_lora_add`. Inference only, as the multi_lora family.
"""

# No `from __future__ import annotations`: torch.library reads these annotations at runtime.
from typing import Optional

import torch

from fastpeft.backends import select_backend
from fastpeft.ops import multi_lora
from fastpeft.ops.adapter_pool import AdapterPool
from fastpeft.ops.batch_description import BatchDescription
from fastpeft.ops.multi_lora import (
    add_adapters,
    check_pool_for,
    grouped_args,
    grouped_decode,
    resolve_ids,
    runs_torch_loop,
    v_width,
)
from fastpeft.ops.qlora import Weight4bit, qlora_linear


def _triton(x, w: Weight4bit, bias, lora_a, a_offsets, lora_b, adapter_ids, order, starts, *tables, max_rank,
            max_width):  # fmt: skip
    from fastpeft.triton_kernels.multi_lora_4bit import multi_lora_sgmv_linear_4bit

    return multi_lora_sgmv_linear_4bit(x, w.forward_args(), bias, lora_a, a_offsets, lora_b, order, starts, *tables,
                                       v_width(max_rank), max_width)  # fmt: skip


def _unfused(backend: str):
    """The layer on a backend without the fused kernel: the 4-bit product, then that backend's adapters."""

    def run(x, w: Weight4bit, bias, *adapter_args, max_rank, max_width):
        base = torch.ops.fastpeft.matmul_4bit(x, *w.forward_args(), bias, None, None, None, 1.0)
        return multi_lora.IMPLS["multi_lora_sgmv"][backend](base, x, *adapter_args, max_rank=max_rank,
                                                            max_width=max_width)  # fmt: skip

    return run


IMPLS = {"torch": _unfused("torch"), "triton": _triton, "cuda": _unfused("cuda")}


@torch.library.custom_op("fastpeft::multi_lora_sgmv_linear_4bit", mutates_args=())
def _multi_lora_sgmv_linear_4bit_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: Optional[torch.Tensor],
    code2: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    nested_blocksize: int,
    n: int,
    w_dtype: torch.dtype,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    a_offsets: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    order: torch.Tensor,
    starts: torch.Tensor,
    ranks: torch.Tensor,
    v_starts: torch.Tensor,
    b_starts: torch.Tensor,
    scalings: torch.Tensor,
    out_starts: torch.Tensor,
    max_rank: int,
    max_width: int,
) -> torch.Tensor:
    """The 4-bit decode layer with a batch description (module docstring), on the backend the dispatch picks."""
    state = (absmax, code, absmax2, code2, offset, blocksize, nested_blocksize)
    w = Weight4bit.from_op_args(packed, state, n, x.shape[1], w_dtype)
    backend = select_backend("multi_lora_sgmv_linear_4bit", x.device, multi_lora.SGMV_PREFERENCE)
    return IMPLS[backend](x, w, bias, lora_a, a_offsets, lora_b, adapter_ids, order, starts, ranks, v_starts,
                          b_starts, scalings, out_starts, max_rank=max_rank, max_width=max_width)  # fmt: skip


@_multi_lora_sgmv_linear_4bit_op.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, n, *_args):
    return x.new_empty((x.shape[0], n))


def multi_lora_sgmv_linear_4bit(
    x: torch.Tensor, weight: Weight4bit, bias: Optional[torch.Tensor], pool: AdapterPool, description: BatchDescription
) -> torch.Tensor:
    """``x dequant(W)^T + bias + s_i (x A_i^T) B_i^T`` per token and slice, the tokens grouped by adapter. x [M,
    in] (2-D, the weight's compute dtype), ``weight`` W [out, in] in 4 bits, bias [out] or None, ``description``
    built for M tokens and this pool. Returns [M, out] in x's dtype."""
    return _multi_lora_sgmv_linear_4bit_op(x, *weight.forward_args(), bias, *grouped_args(pool, description))


def multi_lora_linear_4bit(
    x: torch.Tensor,
    weight: Weight4bit,
    bias: Optional[torch.Tensor],
    pool: AdapterPool,
    adapter_ids: torch.Tensor | BatchDescription,
    *,
    check_ids: bool = True,
) -> torch.Tensor:
    """The multi-adapter layer on a 4-bit base: ``x dequant(W)^T + bias + s_i (x A_i^T) B_i^T`` per token.

    Args:
        x: [..., in_features] in the dtype the layer computes in (float16/bfloat16/float32), the pool's dtype.
        weight: W [out_features, in_features] in 4 bits (:meth:`fastpeft.Linear4bit.kernel_weight`).
        bias: [out_features] in x's dtype, or None.
        pool, adapter_ids, check_ids: as for :func:`fastpeft.ops.multi_lora.multi_lora_linear` (a batch
            description at decode sizes takes the fused op, :func:`multi_lora_sgmv_linear_4bit`).

    Returns [..., out_features] in x's dtype.
    """
    if not isinstance(weight, Weight4bit):
        raise TypeError(f"weight must be a Weight4bit (Linear4bit.kernel_weight()), got {type(weight).__name__}")
    check_pool_for(x, pool)
    if (weight.in_features, weight.out_features) != (pool.in_features, pool.out_features):
        raise ValueError(f"pool is {pool.in_features} -> {pool.out_features} features, the 4-bit weight "
                         f"{weight.in_features} -> {weight.out_features}")  # fmt: skip
    ids = resolve_ids(x, pool, adapter_ids, check_ids)
    rows = x.reshape(-1, x.shape[-1])
    if grouped_decode(ids, rows.shape[0], pool) and not runs_torch_loop(x.device, rows.shape[0]):
        out = multi_lora_sgmv_linear_4bit(rows, weight, bias, pool, ids)
        return out.reshape(*x.shape[:-1], weight.out_features)
    base = qlora_linear(x, weight, None, None, None, bias=bias)
    return add_adapters(base, x, pool, ids, owned=True)
