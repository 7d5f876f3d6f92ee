"""The fused LoRA layer on tensor-parallel shards (``torch.distributed.tensor``): which shards each rank holds and
why one local :func:`~fastpeft.ops.lora.lora_linear` call per rank gives the whole layer.

    y = x W^T + bias + s (x A^T) B^T          W [N, K], A [r, K], B [N, r]

Column-parallel (Megatron's ColumnParallelLinear, ``W`` sharded on out_features, ``Shard(0)``): rank i holds
``W_i [N/p, K]``, ``B_i [N/p, r]`` (``Shard(0)``) and the whole ``A`` (``Replicate``); x is replicated. Then
``y_i = x W_i^T + bias_i + s (x A^T) B_i^T`` is rank i's slice of y's columns: one local fused call, no
communication, output ``Shard(-1)``. The shrink ``x A^T`` is computed on every rank (r columns: cheap).

Row-parallel (RowParallelLinear, ``W`` sharded on in_features, ``Shard(1)``): rank i holds ``W_i [N, K/p]``,
``A_i [r, K/p]`` (``Shard(1)``) and the whole ``B`` (``Replicate``); x arrives sharded on its last dim (a
column-parallel layer's output). Because the LoRA term is linear in ``x A^T = sum_i x_i A_i^T``,
``y = sum_i (x_i W_i^T + s (x_i A_i^T) B^T) + bias``: one local fused call per rank (bias on none of them), the
partial sums all-reduced once, as the base layer alone would, then the bias. Output ``Replicate``.

Both are differentiable: autograd runs each rank's fused backward on its shards, and DTensor's redistribution
carries the all-reduce's gradient. Gradients of the replicated inputs (x and A column-parallel, B row-parallel)
are each rank's share, placed ``Partial``: summed when read whole (``full_tensor()``, an optimizer step).
"""

from __future__ import annotations

from typing import Any

import torch

from fastpeft.ops.lora import lora_linear


def _dtensor_api() -> Any:
    try:
        from torch.distributed import tensor as api  # torch >= 2.5
    except ImportError:  # torch 2.4
        from torch.distributed import _tensor as api
    return api


def _partial(api: Any) -> Any:
    """DTensor's pending-sum placement (``Partial``; torch 2.4 names it ``_Partial``)."""
    partial = getattr(api, "Partial", None)
    if partial is None:
        from torch.distributed._tensor.placement_types import _Partial as partial
    return partial()


def _check_placements(name: str, t: object, expected: tuple, mesh) -> Any:
    api = _dtensor_api()
    if not isinstance(t, api.DTensor):
        raise TypeError(f"{name} must be a DTensor (torch.distributed.tensor), got {type(t).__name__}")
    if mesh is not None and t.device_mesh != mesh:
        raise ValueError(f"{name} lives on another device mesh than the weight")
    if t.device_mesh.ndim != 1 or tuple(t.placements) != expected:
        raise ValueError(f"{name} must be placed {list(expected)} on a 1-D mesh, got {list(t.placements)}")
    return t


def _checked_mesh(**named: tuple[object, tuple]) -> Any:
    """The 1-D device mesh of the first DTensor named (the weight), every named one placed as given (None: no
    such tensor); TypeError/ValueError naming the first that is not."""
    mesh = None
    for name, (t, placements) in named.items():
        if t is not None:
            mesh = _check_placements(name, t, placements, mesh).device_mesh
    return mesh


def column_parallel_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoRA on a column-parallel linear layer: one fused call per rank on its shards, no communication.

    Args:
        x: [..., K] DTensor, ``Replicate()`` (every rank the whole input).
        weight: [N, K] DTensor, ``Shard(0)``. lora_b: [N, r] DTensor, ``Shard(0)`` (sharded like weight).
        lora_a: [r, K] DTensor, ``Replicate()``. bias: [N] DTensor, ``Shard(0)``, or None.

    Returns [..., N] as a DTensor ``Shard(-1)``: rank i holds its slice of the output's columns. All on one 1-D
    mesh; N divisible by the mesh size keeps the shards even.
    """
    api = _dtensor_api()
    shard0, replicate = (api.Shard(0),), (api.Replicate(),)
    mesh = _checked_mesh(weight=(weight, shard0), x=(x, replicate), lora_a=(lora_a, replicate),
                         lora_b=(lora_b, shard0), bias=(bias, shard0))  # fmt: skip
    # The replicated inputs' gradients are each rank's share: Partial, summed when read whole.
    partial = (_partial(api),)
    x_local, a_local = x.to_local(grad_placements=partial), lora_a.to_local(grad_placements=partial)
    local_bias = None if bias is None else bias.to_local()
    local = lora_linear(x_local, weight.to_local(), a_local, lora_b.to_local(), scaling, local_bias)
    out_shape = (*x.shape[:-1], weight.shape[0])
    return api.DTensor.from_local(local, mesh, (api.Shard(local.dim() - 1),), shape=out_shape,
                                  stride=torch.empty(out_shape, device="meta").stride())  # fmt: skip


def row_parallel_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoRA on a row-parallel linear layer: one fused call per rank on its shards, one all-reduce of the sum.

    Args:
        x: [..., K] DTensor, ``Shard(-1)`` (rank i the columns of its weight shard).
        weight: [N, K] DTensor, ``Shard(1)``. lora_a: [r, K] DTensor, ``Shard(1)`` (sharded like weight).
        lora_b: [N, r] DTensor, ``Replicate()``. bias: [N] DTensor, ``Replicate()``, or None (added once, after
            the reduction).

    Returns [..., N] as a DTensor ``Replicate()``. All on one 1-D mesh.
    """
    api = _dtensor_api()
    shard1, replicate = (api.Shard(1),), (api.Replicate(),)
    mesh = _checked_mesh(weight=(weight, shard1), x=(x, (api.Shard(x.dim() - 1),)), lora_a=(lora_a, shard1),
                         lora_b=(lora_b, replicate), bias=(bias, replicate))  # fmt: skip
    b_local = lora_b.to_local(grad_placements=(_partial(api),))  # its gradient: this rank's share
    local = lora_linear(x.to_local(), weight.to_local(), lora_a.to_local(), b_local, scaling)
    out_shape = (*x.shape[:-1], weight.shape[0])
    partial = api.DTensor.from_local(local, mesh, (_partial(api),), shape=out_shape, stride=local.stride())
    out = partial.redistribute(mesh, replicate)
    return out if bias is None else out + bias
