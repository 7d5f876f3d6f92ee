"""The ``multi_lora`` op family: many LoRA adapters in one batch, each token with its own adapter.

    y[t] = x[t] @ W.T + bias + scaling[id[t]] * (x[t] @ A[id[t]].T) @ B[id[t]].T        (id[t] = -1: no adapter)

Adapters live in an :class:`AdapterPool`: their rank rows stacked without padding (adapter i owns rows
``offsets[i]:offsets[i + 1]`` of ``lora_a`` [P, in] and of ``lora_b_t`` [P, out], B stored transposed), so
adapters of different ranks cost only their own bytes. Two custom ops, each with a fake implementation:

- ``fastpeft::multi_lora_shrink(x, lora_a, offsets, adapter_ids, max_rank)``: ``v`` fp32 [M, >= max_rank];
- ``fastpeft::multi_lora_expand(base, v, lora_b_t, offsets, scalings, adapter_ids)``: ``base + scaling * v B^T``;

and :func:`multi_lora_linear`, the layer: the base GEMM (cuBLAS through torch), then shrink and expand. Backends:
``triton`` (triton_kernels/multi_lora.py; per-token programs, capturable in CUDA graphs) and ``torch`` (a loop
over the adapters present, the CPU path). The op serves inference: it has no autograd formula.
"""

# No `from __future__ import annotations`: torch.library reads these annotations at runtime.
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from fastpeft.backends import select_backend
from fastpeft.ops.lora import FLOAT_DTYPES, check_lora_linear_args

ID_DTYPES = (torch.int32, torch.int64)
_PREFERENCE = ("triton",)  # no CUDA kernel for this family yet


@dataclass(frozen=True)
class AdapterPool:
    """Adapters stacked by rank rows. ``lora_a`` [P, in_features]; ``lora_b_t`` [P, out_features] (each
    adapter's B transposed); ``offsets`` int32 [num_adapters + 1] (adapter i owns rows offsets[i]:offsets[i+1]);
    ``scalings`` fp32 [num_adapters]; ``max_rank`` the largest rank (fixes kernel grids and v's width)."""

    lora_a: torch.Tensor
    lora_b_t: torch.Tensor
    offsets: torch.Tensor
    scalings: torch.Tensor
    max_rank: int

    @property
    def num_adapters(self) -> int:
        return self.offsets.numel() - 1

    @classmethod
    def build(cls, adapters: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> "AdapterPool":
        """A pool of ``adapters``, each ``(lora_a [r_i, in], lora_b [out, r_i], scaling)`` in index order; all of
        one dtype and device. Copies the weights once."""
        if not adapters:
            raise ValueError("adapters must hold at least one (lora_a, lora_b, scaling)")
        first_a = adapters[0][0]
        in_features, out_features = first_a.shape[1], adapters[0][1].shape[0]
        for index, (lora_a, lora_b, scaling) in enumerate(adapters):
            for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
                if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES or t.dim() != 2:
                    raise TypeError(f"adapter {index}: {name} must be a 2-D float16/bfloat16/float32 tensor")
                if t.dtype != first_a.dtype or t.device != first_a.device:
                    raise TypeError(f"adapter {index}: {name} must match adapter 0's dtype and device")
            r = lora_a.shape[0]
            if r < 1 or lora_a.shape[1] != in_features or tuple(lora_b.shape) != (out_features, r):
                raise ValueError(f"adapter {index}: lora_a must be [r, {in_features}] and lora_b [{out_features}, r], "
                                 f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")  # fmt: skip
            if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
                raise TypeError(f"adapter {index}: scaling must be a float, got {type(scaling).__name__}")
        ranks = [a.shape[0] for a, _, _ in adapters]
        offsets = torch.tensor([0, *torch.tensor(ranks).cumsum(0).tolist()], dtype=torch.int32)
        return cls(
            lora_a=torch.cat([a for a, _, _ in adapters]).contiguous(),
            lora_b_t=torch.cat([b.t() for _, b, _ in adapters]).contiguous(),
            offsets=offsets.to(first_a.device),
            scalings=torch.tensor([float(s) for _, _, s in adapters], dtype=torch.float32, device=first_a.device),
            max_rank=max(ranks),
        )


# ----------------------------------------------------------------------------------------------------------
# The torch backend: a loop over the adapters present (the CPU path, and the reference's shape)
# ----------------------------------------------------------------------------------------------------------


def _rows_per_adapter(adapter_ids: torch.Tensor, num_adapters: int) -> list[tuple[int, torch.Tensor]]:
    """(adapter, token indices) for every adapter some token uses; ids outside the pool use none."""
    present = torch.unique(adapter_ids[(adapter_ids >= 0) & (adapter_ids < num_adapters)]).tolist()
    return [(i, (adapter_ids == i).nonzero().squeeze(1)) for i in present]


def _shrink_torch(x, lora_a, offsets, adapter_ids, max_rank):
    v = torch.zeros((x.shape[0], _v_width(max_rank)), device=x.device, dtype=torch.float32)
    bounds = offsets.tolist()
    for i, rows in _rows_per_adapter(adapter_ids, len(bounds) - 1):
        start, end = bounds[i], bounds[i + 1]
        v[rows, : end - start] = x[rows].float() @ lora_a[start:end].float().t()
    return v


def _expand_torch(base, v, lora_b_t, offsets, scalings, adapter_ids):
    y = base.to(torch.float32, copy=True)  # never the input itself: a custom op may not return an alias
    bounds = offsets.tolist()
    for i, rows in _rows_per_adapter(adapter_ids, len(bounds) - 1):
        start, end = bounds[i], bounds[i + 1]
        y[rows] += scalings[i] * (v[rows, : end - start] @ lora_b_t[start:end].float())
    return y.to(base.dtype)


def _v_width(max_rank: int) -> int:
    """v's columns on every backend: the Triton kernels' rank block (tl.arange needs a power of two >= 16)."""
    return max(16, 1 << (max_rank - 1).bit_length())


def _shrink_triton(x, lora_a, offsets, adapter_ids, max_rank):
    from fastpeft.triton_kernels.multi_lora import multi_lora_shrink

    return multi_lora_shrink(x, lora_a, offsets, adapter_ids, _v_width(max_rank))


def _expand_triton(base, v, lora_b_t, offsets, scalings, adapter_ids):
    from fastpeft.triton_kernels.multi_lora import multi_lora_expand

    return multi_lora_expand(base, v, lora_b_t, offsets, scalings, adapter_ids)


IMPLS = {
    "multi_lora_shrink": {"torch": _shrink_torch, "triton": _shrink_triton},
    "multi_lora_expand": {"torch": _expand_torch, "triton": _expand_triton},
}


def _run(op: str, x: torch.Tensor, *args) -> torch.Tensor:
    backend = select_backend(op, x.device, _PREFERENCE)
    if backend not in IMPLS[op]:
        raise RuntimeError(f"fastpeft::{op} has no {backend} implementation yet (it runs on triton or torch)")
    return IMPLS[op][backend](x, *args)


@torch.library.custom_op("fastpeft::multi_lora_shrink", mutates_args=())
def _multi_lora_shrink_op(
    x: torch.Tensor, lora_a: torch.Tensor, offsets: torch.Tensor, adapter_ids: torch.Tensor, max_rank: int
) -> torch.Tensor:
    return _run("multi_lora_shrink", x, lora_a, offsets, adapter_ids, max_rank)


@_multi_lora_shrink_op.register_fake
def _(x, lora_a, offsets, adapter_ids, max_rank):
    return x.new_empty((x.shape[0], _v_width(max_rank)), dtype=torch.float32)


@torch.library.custom_op("fastpeft::multi_lora_expand", mutates_args=())
def _multi_lora_expand_op(
    base: torch.Tensor,
    v: torch.Tensor,
    lora_b_t: torch.Tensor,
    offsets: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
) -> torch.Tensor:
    return _run("multi_lora_expand", base, v, lora_b_t, offsets, scalings, adapter_ids)


@_multi_lora_expand_op.register_fake
def _(base, v, lora_b_t, offsets, scalings, adapter_ids):
    return torch.empty_like(base)


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


def _token_ids(x: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
    """One id per token as a flat int tensor: ids shaped like x's leading dims, or one per sample ([batch]) for
    a 3-D x."""
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in ID_DTYPES:
        raise TypeError(f"adapter_ids must be an int32 or int64 tensor, "
                        f"got {getattr(adapter_ids, 'dtype', type(adapter_ids).__name__)}")  # fmt: skip
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device}, x on {x.device}")
    if tuple(adapter_ids.shape) == tuple(x.shape[:-1]):
        return adapter_ids.reshape(-1)
    if x.dim() == 3 and tuple(adapter_ids.shape) == (x.shape[0],):
        return adapter_ids[:, None].expand(x.shape[0], x.shape[1]).reshape(-1)
    raise ValueError(f"adapter_ids must be one id per token {tuple(x.shape[:-1])} or, for a 3-D x, one per "
                     f"sample ({x.shape[0]},); got {tuple(adapter_ids.shape)}")  # fmt: skip


def check_adapter_ids(adapter_ids: torch.Tensor, num_adapters: int) -> None:
    """IndexError unless every id is -1 or in [0, num_adapters). Reads the ids on the host (a sync on a GPU)."""
    if adapter_ids.numel() == 0:
        return
    low, high = int(adapter_ids.min()), int(adapter_ids.max())
    if low < -1 or high >= num_adapters:
        bad = low if low < -1 else high
        raise IndexError(f"adapter_ids holds {bad}, outside [-1, {num_adapters}) (-1: no adapter)")


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    pool: AdapterPool,
    adapter_ids: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    check_ids: bool = True,
) -> torch.Tensor:
    """A linear layer with a different LoRA adapter per token: ``x W^T + bias + s_i (x A_i^T) B_i^T``.

    Args:
        x: [..., in_features], any leading shape, any strides.
        weight: [out_features, in_features], the shared base weight.
        pool: the adapters (:class:`AdapterPool`), in x's dtype and on its device.
        adapter_ids: int32/int64, one per token (``x.shape[:-1]``) or one per sample (``[batch]`` for a 3-D
            x); -1 runs the base layer only.
        bias: [out_features] or None.
        check_ids: raise IndexError for ids outside [-1, num_adapters) (reads them on the host: pass False
            inside CUDA-graph capture; the kernels then give such tokens the base output, never reading
            outside the pool).

    Returns [..., out_features] in x's dtype: the base GEMM in x's dtype, the adapter term in fp32 added once.
    Inference only (no autograd).
    """
    if not isinstance(pool, AdapterPool):
        raise TypeError(f"pool must be an AdapterPool, got {type(pool).__name__}")
    # The pool's first rank row stands in for A and B: the checks compare dtypes, devices and widths.
    check_lora_linear_args(x, weight, pool.lora_a[:1], pool.lora_b_t[:1].t(), 1.0, bias)
    if pool.lora_a.device != x.device:
        raise ValueError(f"pool is on {pool.lora_a.device}, x on {x.device}")
    ids = _token_ids(x, adapter_ids)
    if check_ids:
        check_adapter_ids(ids, pool.num_adapters)
    rows = x.reshape(-1, x.shape[-1])
    base = torch.nn.functional.linear(rows, weight, bias)
    v = _multi_lora_shrink_op(rows, pool.lora_a, pool.offsets, ids, pool.max_rank)
    y = _multi_lora_expand_op(base, v, pool.lora_b_t, pool.offsets, pool.scalings, ids)
    return y.reshape(*x.shape[:-1], weight.shape[0])
