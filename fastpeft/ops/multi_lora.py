"""The ``multi_lora`` op family: many LoRA adapters in one batch, each token with its own adapter.

    y[t] = x[t] @ W.T + bias + scaling[id[t]] * (x[t] @ A[id[t]].T) @ B[id[t]].T        (id[t] = -1: no adapter)

for a plain linear layer, and slice by slice for a packed one (q/k/v or gate/up: one base weight, each output
slice with its own LoRA pair per adapter). Adapters live in an :class:`~fastpeft.ops.adapter_pool.AdapterPool`
(rank rows stacked without padding). Two custom ops, each with a fake implementation:

- ``fastpeft::multi_lora_shrink(x, lora_a, a_offsets, adapter_ids, max_rank)``: ``v`` fp32 [M, >= max_rank],
  every slice's shrink in one pass over x;
- ``fastpeft::multi_lora_expand(base, v, lora_b, adapter_ids, ranks, v_starts, b_starts, scalings, out_starts,
  max_width)``: ``base + scaling * v B^T`` on every slice, in one launch;
- ``fastpeft::multi_lora_sgmv(base, x, ..., order, starts, ...)``: both, with the tokens grouped by adapter by a
  batch description (fastpeft/ops/batch_description.py): decode's grouped kernels, each adapter's A and B read
  once per step;
- ``fastpeft::multi_lora_sgmv_linear(x, weight, bias, ..., order, starts, ...)``: the whole decode layer with a
  description, the grouped expand in the base GEMM's epilogue (y written once);

and :func:`multi_lora_linear`, the layer: the base GEMM (cuBLAS through torch), then shrink and expand. Backends:
``cuda`` (csrc/multi_lora.cu, per-token kernels), ``triton`` (triton_kernels/multi_lora.py; grouped kernels for
decode with a batch description, per-token kernels for decode without, tiles of tokens through ``tl.dot`` for
prefill segments) and ``torch`` (a loop over the adapters present, the CPU path). The op serves inference: it
has no autograd formula.
"""

# No `from __future__ import annotations`: torch.library reads these annotations at runtime.
import math
from typing import Optional

import torch

from fastpeft.backends import select_backend
from fastpeft.ops.adapter_pool import AdapterPool
from fastpeft.ops.batch_description import BatchDescription, check_adapter_ids
from fastpeft.ops.common import check_tensor
from fastpeft.ops.lora import check_lora_linear_args
from fastpeft.ops.route import Route, choose_route

ID_DTYPES = (torch.int32, torch.int64)
# Prefill (many rows) runs the Triton tile kernels; the CUDA kernels are per-token (decode).
_DECODE_PREFERENCE = ("cuda", "triton")
_PREFILL_PREFERENCE = ("triton", "cuda")
_CUDA_DECODE_MAX_M = 64
# Decode with a batch description: the grouped kernels (each adapter's A and B once per step) before the CUDA
# per-token kernels (A read once per token). Prefill keeps the tiles, which walk runs of one adapter already.
SGMV_PREFERENCE = ("triton", "cuda")
SGMV_MAX_M = 64
# Prefill on the Triton tiles writes the adapters' terms (and the bias) first and lets cuBLAS add x W^T into them
# in place (beta = 1), rather than cuBLAS first and an expand that reads and rewrites y: y's extra read then
# happens inside the compute-bound GEMM (benchmarks/roofline.py: 1.11x the base GEMM at M = 4096, against 1.16x).
TERMS_BEFORE_BASE = True


# ----------------------------------------------------------------------------------------------------------
# The torch backend: a loop over the adapters present (the CPU path, and the reference's shape)
# ----------------------------------------------------------------------------------------------------------


def _rows_per_adapter(adapter_ids: torch.Tensor, num_adapters: int) -> list[tuple[int, torch.Tensor]]:
    """(adapter, token indices) for every adapter some token uses; ids outside the pool use none."""
    present = torch.unique(adapter_ids[(adapter_ids >= 0) & (adapter_ids < num_adapters)]).tolist()
    return [(i, (adapter_ids == i).nonzero().squeeze(1)) for i in present]


def _shrink_torch(x, lora_a, a_offsets, adapter_ids, max_rank):
    v = torch.zeros((x.shape[0], v_width(max_rank)), device=x.device, dtype=torch.float32)
    bounds = a_offsets.tolist()
    for i, rows in _rows_per_adapter(adapter_ids, len(bounds) - 1):
        start, end = bounds[i], bounds[i + 1]
        v[rows, : end - start] = x[rows].float() @ lora_a[start:end].float().t()
    return v


def _expand_torch(base, v, lora_b, adapter_ids, ranks, v_starts, b_starts, scalings, out_starts, max_width):
    y = base.to(torch.float32, copy=True)  # never the input itself: a custom op may not return an alias
    ranks_, v_starts_, b_starts_, scalings_ = (t.tolist() for t in (ranks, v_starts, b_starts, scalings))
    bounds = out_starts.tolist()
    for i, rows in _rows_per_adapter(adapter_ids, ranks.shape[1]):
        for s in range(ranks.shape[0]):
            rank, v0, b0, width = ranks_[s][i], v_starts_[s][i], b_starts_[s][i], bounds[s + 1] - bounds[s]
            if rank:
                b_t = lora_b[b0 : b0 + rank * width].view(rank, width).float()
                y[rows, bounds[s] : bounds[s + 1]] += scalings_[s][i] * (v[rows, v0 : v0 + rank] @ b_t)
    return y.to(base.dtype)


def _token_groups(adapter_ids: torch.Tensor, num_adapters: int) -> list[tuple[int, slice | torch.Tensor]]:
    """(adapter, its tokens) for every adapter present: runs of consecutive tokens as slices (views of x, no
    gather) when the batch comes in runs (one id per sample, a prefill's segments), else each adapter's token
    indices (a decode batch with ids interleaved)."""
    values, counts = torch.unique_consecutive(adapter_ids, return_counts=True)
    runs, start = [], 0
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        if 0 <= value < num_adapters:
            runs.append((value, slice(start, start + count)))
        start += count
    # A run costs a GEMM call per slice; an index group the same plus a gather and a scatter of its rows.
    if len(runs) <= 2 * len({adapter for adapter, _ in runs}):
        return runs
    return _rows_per_adapter(adapter_ids, num_adapters)


def _add_torch(base: torch.Tensor, x: torch.Tensor, pool: AdapterPool, adapter_ids: torch.Tensor) -> torch.Tensor:
    """shrink + expand in one pass on the torch backend (eager): per adapter present, ``x A_i^T`` once and one
    ``addmm`` per slice into the fp32 output. ``base`` [M, out] is overwritten when it is fp32 (the caller's
    own). On a CPU this is the layer's fastest form: no [M, max_rank] buffer, no table reads per call."""
    tables = pool.host_tables
    y = base if base.dtype == torch.float32 else base.float()
    for adapter, tokens in _token_groups(adapter_ids, pool.num_adapters):
        start, end = tables.a_offsets[adapter], tables.a_offsets[adapter + 1]
        v = torch.mm(x[tokens].float(), pool.lora_a[start:end].float().t())
        for s in range(len(pool.slice_widths)):
            rank = tables.ranks[s][adapter]
            if not rank:
                continue
            v0, b0 = tables.v_starts[s][adapter], tables.b_starts[s][adapter]
            cols = slice(tables.out_starts[s], tables.out_starts[s + 1])
            b_t = pool.lora_b[b0 : b0 + rank * pool.slice_widths[s]].view(rank, -1).float()
            scaling = tables.scalings[s][adapter]
            if isinstance(tokens, slice):
                y[tokens, cols].addmm_(v[:, v0 : v0 + rank], b_t, alpha=scaling)
            else:
                y[:, cols].index_add_(0, tokens, v[:, v0 : v0 + rank] @ b_t, alpha=scaling)
    return y.to(base.dtype)


def v_width(max_rank: int) -> int:
    """v's columns on every backend: the kernels' rank block (tl.arange needs a power of two >= 16)."""
    return max(16, 1 << (max(max_rank, 1) - 1).bit_length())


# The triton and cuda backends (imported on first use: triton and fastpeft._C are optional)


def _shrink_triton(x, lora_a, a_offsets, adapter_ids, max_rank):
    from fastpeft.triton_kernels.multi_lora import multi_lora_shrink

    return multi_lora_shrink(x, lora_a, a_offsets, adapter_ids, v_width(max_rank))


def _expand_triton(base, v, lora_b, adapter_ids, *tables_and_width):
    from fastpeft.triton_kernels.multi_lora import multi_lora_expand

    return multi_lora_expand(base, v, lora_b, adapter_ids, *tables_and_width)


def _shrink_cuda(x, lora_a, a_offsets, adapter_ids, max_rank):
    return torch.ops.fastpeft.multi_lora_shrink_cuda(x, lora_a, a_offsets, adapter_ids, v_width(max_rank))


def _expand_cuda(base, v, lora_b, adapter_ids, ranks, v_starts, b_starts, scalings, out_starts, max_width):
    return torch.ops.fastpeft.multi_lora_expand_cuda(
        base, v, lora_b, adapter_ids, ranks, v_starts, b_starts, scalings, out_starts, max_width
    )


def _sgmv_triton(base, x, lora_a, a_offsets, lora_b, adapter_ids, order, starts, *tables, max_rank, max_width):
    from fastpeft.triton_kernels.multi_lora import multi_lora_sgmv

    return multi_lora_sgmv(base, x, lora_a, a_offsets, lora_b, order, starts, *tables, v_width(max_rank), max_width)


def _sgmv_linear_triton(x, weight, bias, lora_a, a_offsets, lora_b, adapter_ids, order, starts, *tables, max_rank,
                        max_width):  # fmt: skip
    from fastpeft.triton_kernels.multi_lora import multi_lora_sgmv_linear

    return multi_lora_sgmv_linear(x, weight, bias, lora_a, a_offsets, lora_b, order, starts, *tables,
                                  v_width(max_rank), max_width)  # fmt: skip


def _sgmv_linear_unfused(backend: str):
    """The grouped layer on a backend without its fused kernel: the base GEMM, then that backend's adapters."""

    def run(x, weight, bias, *adapter_args, max_rank, max_width):
        base = torch.nn.functional.linear(x, weight, bias)
        return IMPLS["multi_lora_sgmv"][backend](base, x, *adapter_args, max_rank=max_rank, max_width=max_width)

    return run


def _sgmv_unsorted(backend: str):
    """The grouped op on a backend without grouped kernels: its shrink and expand, token by token."""

    def run(base, x, lora_a, a_offsets, lora_b, adapter_ids, order, starts, *tables, max_rank, max_width):
        v = IMPLS["multi_lora_shrink"][backend](x, lora_a, a_offsets, adapter_ids, max_rank)
        return IMPLS["multi_lora_expand"][backend](base, v, lora_b, adapter_ids, *tables, max_width)

    return run


IMPLS = {
    "multi_lora_shrink": {"torch": _shrink_torch, "triton": _shrink_triton, "cuda": _shrink_cuda},
    "multi_lora_expand": {"torch": _expand_torch, "triton": _expand_triton, "cuda": _expand_cuda},
    "multi_lora_sgmv": {"torch": _sgmv_unsorted("torch"), "triton": _sgmv_triton, "cuda": _sgmv_unsorted("cuda")},
    "multi_lora_sgmv_linear": {
        "torch": _sgmv_linear_unfused("torch"),
        "triton": _sgmv_linear_triton,
        "cuda": _sgmv_linear_unfused("cuda"),
    },
}


def _run(op: str, x: torch.Tensor, *args) -> torch.Tensor:
    decode = x.shape[0] <= _CUDA_DECODE_MAX_M
    backend = select_backend(op, x.device, _DECODE_PREFERENCE if decode else _PREFILL_PREFERENCE)
    return IMPLS[op][backend](x, *args)


@torch.library.custom_op("fastpeft::multi_lora_shrink", mutates_args=())
def _multi_lora_shrink_op(
    x: torch.Tensor, lora_a: torch.Tensor, a_offsets: torch.Tensor, adapter_ids: torch.Tensor, max_rank: int
) -> torch.Tensor:
    return _run("multi_lora_shrink", x, lora_a, a_offsets, adapter_ids, max_rank)


@_multi_lora_shrink_op.register_fake
def _(x, lora_a, a_offsets, adapter_ids, max_rank):
    return x.new_empty((x.shape[0], v_width(max_rank)), dtype=torch.float32)


@torch.library.custom_op("fastpeft::multi_lora_expand", mutates_args=())
def _multi_lora_expand_op(
    base: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
    v_starts: torch.Tensor,
    b_starts: torch.Tensor,
    scalings: torch.Tensor,
    out_starts: torch.Tensor,
    max_width: int,
) -> torch.Tensor:
    return _run("multi_lora_expand", base, v, lora_b, adapter_ids, ranks, v_starts, b_starts, scalings,
                out_starts, max_width)  # fmt: skip


@_multi_lora_expand_op.register_fake
def _(base, v, lora_b, adapter_ids, ranks, v_starts, b_starts, scalings, out_starts, max_width):
    return torch.empty_like(base)


def grouped_args(pool: AdapterPool, description: BatchDescription) -> tuple:
    """The grouped ops' arguments after their tensors of x (and weight, bias): the pool and the description."""
    return (pool.lora_a, pool.a_offsets, pool.lora_b, description.ids, description.order, description.starts,
            pool.ranks, pool.v_starts, pool.b_starts, pool.scalings, pool.out_starts, pool.max_rank,
            max(pool.slice_widths))  # fmt: skip


@torch.library.custom_op("fastpeft::multi_lora_sgmv", mutates_args=())
def _multi_lora_sgmv_op(
    base: torch.Tensor,
    x: torch.Tensor,
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
    """shrink + expand with the tokens grouped by adapter (a batch description's ``order`` and ``starts``):
    Triton's grouped kernels, or another backend's shrink and expand."""
    backend = select_backend("multi_lora_sgmv", x.device, SGMV_PREFERENCE)
    return IMPLS["multi_lora_sgmv"][backend](base, x, lora_a, a_offsets, lora_b, adapter_ids, order, starts, ranks,
                                             v_starts, b_starts, scalings, out_starts, max_rank=max_rank,
                                             max_width=max_width)  # fmt: skip


@_multi_lora_sgmv_op.register_fake
def _(base, *_args):
    return torch.empty_like(base)


def multi_lora_sgmv(
    base: torch.Tensor, x: torch.Tensor, pool: AdapterPool, description: BatchDescription
) -> torch.Tensor:
    """``base + s_i (x A_i^T) B_i^T`` per token and slice with the tokens grouped by adapter (SGMV: each adapter's
    A and B read once per tile of its tokens). base [M, out] and x [M, in] (2-D, x's dtype), ``description``
    built for M tokens and this pool (:func:`~fastpeft.ops.batch_description.describe_batch`). Returns a new
    [M, out] tensor in base's dtype."""
    return _multi_lora_sgmv_op(base, x, *grouped_args(pool, description))


@torch.library.custom_op("fastpeft::multi_lora_sgmv_linear", mutates_args=())
def _multi_lora_sgmv_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
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
    """The decode layer with a batch description: Triton's grouped shrink and the base GEMM with the grouped
    expand in its epilogue, or another backend's base GEMM, shrink and expand."""
    backend = select_backend("multi_lora_sgmv_linear", x.device, SGMV_PREFERENCE)
    return IMPLS["multi_lora_sgmv_linear"][backend](x, weight, bias, lora_a, a_offsets, lora_b, adapter_ids, order,
                                                    starts, ranks, v_starts, b_starts, scalings, out_starts,
                                                    max_rank=max_rank, max_width=max_width)  # fmt: skip


@_multi_lora_sgmv_linear_op.register_fake
def _(x, weight, *_args):
    return x.new_empty((x.shape[0], weight.shape[0]))


def multi_lora_sgmv_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pool: AdapterPool,
    description: BatchDescription,
) -> torch.Tensor:
    """``x W^T + bias + s_i (x A_i^T) B_i^T`` per token and slice, the tokens grouped by adapter: on Triton, the
    grouped shrink and one GEMM whose epilogue adds the adapters (y written once). x [M, in] (2-D), weight
    [out, in], bias [out] or None, ``description`` built for M tokens and this pool. Returns [M, out]."""
    return _multi_lora_sgmv_linear_op(x, weight, bias, *grouped_args(pool, description))


def multi_lora_shrink(x: torch.Tensor, pool: AdapterPool, adapter_ids: torch.Tensor) -> torch.Tensor:
    """``v[t, :R_i] = x[t] @ A_i.T`` for every slice at once: x [M, in] (2-D), adapter_ids int [M]; returns
    fp32 [M, v_width(pool.max_rank)], zero past each token's rank."""
    return _multi_lora_shrink_op(x, pool.lora_a, pool.a_offsets, adapter_ids, pool.max_rank)


def multi_lora_expand(
    base: torch.Tensor, v: torch.Tensor, pool: AdapterPool, adapter_ids: torch.Tensor
) -> torch.Tensor:
    """``base + scaling_si * v[:, slice s of i] @ B_si.T`` on every slice: base [M, out] (x's dtype), v from
    :func:`multi_lora_shrink`; returns a new [M, out] tensor in base's dtype."""
    return _multi_lora_expand_op(base, v, pool.lora_b, adapter_ids, pool.ranks, pool.v_starts, pool.b_starts,
                                 pool.scalings, pool.out_starts, max(pool.slice_widths))  # fmt: skip


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
    # The kernels read ids[t] at t: a contiguous copy where a view would keep strides (an expanded batch of 1).
    if tuple(adapter_ids.shape) == tuple(x.shape[:-1]):
        return adapter_ids.reshape(-1).contiguous()
    if x.dim() == 3 and tuple(adapter_ids.shape) == (x.shape[0],):
        return adapter_ids[:, None].expand(x.shape[0], x.shape[1]).reshape(-1).contiguous()
    raise ValueError(f"adapter_ids must be one id per token {tuple(x.shape[:-1])} or, for a 3-D x, one per "
                     f"sample ({x.shape[0]},); got {tuple(adapter_ids.shape)}")  # fmt: skip


def resolve_ids(
    x: torch.Tensor, pool: AdapterPool, adapter_ids: torch.Tensor | BatchDescription, check_ids: bool
) -> torch.Tensor | BatchDescription:
    """Flat per-token ids (checked when ``check_ids``), or a batch description as it is (checked when built)."""
    if isinstance(adapter_ids, BatchDescription):
        tokens = math.prod(x.shape[:-1])
        if adapter_ids.num_tokens != tokens or adapter_ids.num_adapters != pool.num_adapters:
            raise ValueError(f"adapter_ids describes {adapter_ids.num_tokens} tokens over {adapter_ids.num_adapters} "
                             f"adapters; x has {tokens} tokens and the pool {pool.num_adapters}")  # fmt: skip
        if adapter_ids.ids.device != x.device:
            raise ValueError(f"adapter_ids is on {adapter_ids.ids.device}, x on {x.device}")
        return adapter_ids
    ids = _token_ids(x, adapter_ids)
    if check_ids:
        check_adapter_ids(ids, pool.num_adapters)
    return ids


def segment_adapter_ids(
    segment_lengths: torch.Tensor, segment_adapters: torch.Tensor, num_tokens: int, *, check: bool = True
) -> torch.Tensor:
    """Per-token ids for the segment form (a prefill of packed sequences): segment j is ``segment_lengths[j]``
    contiguous tokens using adapter ``segment_adapters[j]`` (-1: none). Both int tensors [S] on one device;
    ``num_tokens`` is their total, given so that the expansion needs no host sync (``check=True`` verifies it,
    which does sync; pass False inside graph capture). Returns int32 [num_tokens]."""
    for name, t in (("segment_lengths", segment_lengths), ("segment_adapters", segment_adapters)):
        if not isinstance(t, torch.Tensor) or t.dtype not in ID_DTYPES or t.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int32 or int64 tensor")
    if segment_lengths.shape != segment_adapters.shape:
        raise ValueError(f"segment_lengths {tuple(segment_lengths.shape)} and segment_adapters "
                         f"{tuple(segment_adapters.shape)} must have one entry per segment")  # fmt: skip
    if check and int(segment_lengths.sum()) != num_tokens:
        raise ValueError(f"segment_lengths sum to {int(segment_lengths.sum())}, not num_tokens={num_tokens}")
    return torch.repeat_interleave(segment_adapters.to(torch.int32), segment_lengths, output_size=num_tokens)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    pool: AdapterPool,
    adapter_ids: torch.Tensor | BatchDescription,
    bias: Optional[torch.Tensor] = None,
    *,
    check_ids: bool = True,
) -> torch.Tensor:
    """A linear layer with a different LoRA adapter per token: ``x W^T + bias + s_i (x A_i^T) B_i^T`` (per output
    slice for a packed pool). Tokens in contiguous runs of one adapter (a prefill's segments, one id per sample
    of a 3-D x) take the tile kernels, one ``tl.dot`` per run and tile.

    Args:
        x: [..., in_features], any leading shape, any strides.
        weight: [out_features, in_features], the shared base weight (for a packed layer, the slices' weights
            stacked along out_features, in the pool's slice order).
        pool: the adapters (:class:`AdapterPool`), in x's dtype and on its device.
        adapter_ids: int32/int64, one per token (``x.shape[:-1]``) or one per sample (``[batch]`` for a 3-D
            x); -1 runs the base layer only. Or a :class:`~fastpeft.ops.batch_description.BatchDescription` of
            the tokens for this pool, built once per step and checked then (every layer of a model shares it):
            decode then runs the grouped (SGMV) kernels, and the call neither checks nor syncs.
        bias: [out_features] or None.
        check_ids: raise IndexError for ids outside [-1, num_adapters) (reads them on the host: pass False
            inside CUDA-graph capture; the kernels then give such tokens the base output, never reading
            outside the pool). Not used with a batch description.

    Returns [..., out_features] in x's dtype: the base GEMM in x's dtype, the adapter term in fp32 added once.
    Inference only (no autograd).
    """
    check_multi_lora_args(x, weight, pool, bias)
    return multi_lora_forward_unchecked(x, weight, pool, resolve_ids(x, pool, adapter_ids, check_ids), bias)


def multi_lora_forward_unchecked(
    x: torch.Tensor,
    weight: torch.Tensor,
    pool: AdapterPool,
    ids: torch.Tensor | BatchDescription,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """:func:`multi_lora_linear` for arguments already known to fit (a patched PEFT layer's own) and flat int
    ids, one per token (contiguous, within [-1, num_adapters)), or a batch description of them: no checks per
    call. Returns [..., out]."""
    rows = x.reshape(-1, x.shape[-1])
    grouped = grouped_decode(ids, rows.shape[0], pool)
    out_shape = (*x.shape[:-1], weight.shape[0])
    if grouped and not runs_torch_loop(x.device, rows.shape[0]):
        return multi_lora_sgmv_linear(rows, weight, bias, pool, ids).reshape(out_shape)
    if not grouped and _prefill_on_triton(rows, pool):
        flat = ids.ids if isinstance(ids, BatchDescription) else ids
        if _on_persistent(rows, weight, pool):
            return _persistent_linear(rows, weight, bias, pool, flat).reshape(out_shape)
        if TERMS_BEFORE_BASE:
            return _terms_then_base(rows, weight, bias, pool, flat).reshape(out_shape)
    base = torch.nn.functional.linear(rows, weight, bias)
    return add_adapters(base.reshape(out_shape), x, pool, ids, owned=True)


def _prefill_on_triton(rows: torch.Tensor, pool: AdapterPool) -> bool:
    """Whether the prefill of ``rows`` may run the layer's Triton forms (:func:`_terms_then_base`, the persistent
    kernel): eagerly, past the decode rows, a pool holding adapters, the adapters' expand on Triton."""
    if not (pool.num_adapters and rows.shape[0] > _CUDA_DECODE_MAX_M):
        return False
    if torch.compiler.is_compiling() or runs_torch_loop(rows.device, rows.shape[0]):
        return False
    return select_backend("multi_lora_expand", rows.device, _PREFILL_PREFERENCE, record=False) == "triton"


def _on_persistent(rows: torch.Tensor, weight: torch.Tensor, pool: AdapterPool) -> bool:
    """Whether the Triton prefill of ``rows`` runs on the persistent kernel: from its
    MULTI_PERSISTENT_PREFILL_MIN_M rows (off until a GPU ranks it), where it takes the layer."""
    from fastpeft.triton_kernels import multi_lora_persistent as persistent

    return rows.shape[0] >= persistent.MULTI_PERSISTENT_PREFILL_MIN_M and persistent.takes(
        rows, weight, pool.lora_a, len(pool.slice_widths), pool.max_rank
    )


def _persistent_linear(rows, weight, bias, pool: AdapterPool, ids: torch.Tensor) -> torch.Tensor:
    """The whole layer in one launch of triton_kernels/multi_lora_persistent.py: each token's term a K step of
    the base GEMM, x A_i^T computed in the same pass over x."""
    from fastpeft.triton_kernels.multi_lora_persistent import multi_lora_linear_persistent

    return multi_lora_linear_persistent(rows, weight, bias, pool.lora_a, pool.a_offsets, pool.lora_b, ids,
                                        pool.b_starts, pool.scalings, pool.max_rank)  # fmt: skip


def _terms_then_base(rows, weight, bias, pool: AdapterPool, ids: torch.Tensor) -> torch.Tensor:
    """The layer as the adapters' terms first, then the base: the expand adds each token's terms to the bias
    (or zero) broadcast over the rows, writing y once; cuBLAS then adds x W^T into y in place (beta = 1). The
    terms and bias are rounded to x's dtype before cuBLAS adds the base, as cuBLAS adds a bias."""
    n = weight.shape[0]
    start = bias if bias is not None else rows.new_zeros(1).expand(n)  # stride 0: nothing to read per row
    y = multi_lora_expand(start.expand(rows.shape[0], n), multi_lora_shrink(rows, pool, ids), pool, ids)
    return y.addmm_(rows, weight.t())


def multi_lora_add(
    base: torch.Tensor,
    x: torch.Tensor,
    pool: AdapterPool,
    adapter_ids: torch.Tensor | BatchDescription,
    *,
    check_ids: bool = True,
) -> torch.Tensor:
    """``base + s_i (x A_i^T) B_i^T`` per token: the adapters of :func:`multi_lora_linear` on top of a base
    output computed elsewhere (a 4-bit layer, :class:`fastpeft.Linear4bit`). base [..., out_features] and x
    [..., in_features] share leading dims and x's dtype; ids as in :func:`multi_lora_linear`. Returns a new
    tensor like base."""
    check_pool_for(x, pool)
    if base.shape[:-1] != x.shape[:-1] or base.dtype != x.dtype or base.shape[-1] != pool.out_features:
        raise ValueError(f"base {tuple(base.shape)} {base.dtype} must be [..., {pool.out_features}] with x's "
                         f"leading dims {tuple(x.shape[:-1])} and dtype {x.dtype}")  # fmt: skip
    return add_adapters(base, x, pool, resolve_ids(x, pool, adapter_ids, check_ids), owned=False)


def check_pool_for(x: torch.Tensor, pool: AdapterPool) -> None:
    """TypeError/ValueError naming the argument unless ``pool`` is an AdapterPool for x's features, dtype and
    device."""
    if not isinstance(pool, AdapterPool):
        raise TypeError(f"pool must be an AdapterPool, got {type(pool).__name__}")
    if x.shape[-1] != pool.in_features or pool.dtype != x.dtype or pool.device != x.device:
        raise ValueError(f"pool is {pool.in_features} features, {pool.dtype} on {pool.device}; x is "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")  # fmt: skip


def grouped_decode(ids: torch.Tensor | BatchDescription, rows: int, pool: AdapterPool) -> bool:
    """Whether ``rows`` tokens described by ``ids`` take the grouped decode kernels: a batch description, at most
    SGMV_MAX_M tokens, a pool that holds adapters."""
    return isinstance(ids, BatchDescription) and rows <= SGMV_MAX_M and pool.num_adapters > 0


def runs_torch_loop(device: torch.device, rows: int) -> bool:
    """Whether the adapters of ``rows`` tokens run eagerly on the torch backend's loop over the adapters present
    (the CPU path: no [M, rank] buffer, no kernels)."""
    preference = _DECODE_PREFERENCE if rows <= _CUDA_DECODE_MAX_M else _PREFILL_PREFERENCE
    # Inference only: no tensors given, so the route is the custom ops (compiling) or the backend.
    backend = choose_route("multi_lora_add", device, preference, ()) is Route.BACKEND
    return backend and select_backend("multi_lora_add", device, preference) == "torch"


def add_adapters(
    base: torch.Tensor, x: torch.Tensor, pool: AdapterPool, ids: torch.Tensor | BatchDescription, owned: bool
) -> torch.Tensor:
    """multi_lora_add for checked arguments and flat ids or a batch description; ``owned``: base is the
    caller's temporary, which the torch backend may overwrite."""
    if not pool.num_adapters:
        return base if owned else base.clone()
    description = ids if isinstance(ids, BatchDescription) else None
    ids = ids.ids if description is not None else ids
    rows, base_rows = x.reshape(-1, x.shape[-1]), base.reshape(-1, base.shape[-1])
    if runs_torch_loop(x.device, rows.shape[0]):
        base_rows = base_rows if owned or base.dtype != torch.float32 else base_rows.clone()
        return _add_torch(base_rows, rows, pool, ids).reshape(base.shape)
    if description is not None and rows.shape[0] <= SGMV_MAX_M:
        return multi_lora_sgmv(base_rows, rows, pool, description).reshape(base.shape)
    return multi_lora_expand(base_rows, multi_lora_shrink(rows, pool, ids), pool, ids).reshape(base.shape)


def check_multi_lora_args(x: torch.Tensor, weight: torch.Tensor, pool: AdapterPool, bias: Optional[torch.Tensor]):
    """TypeError/ValueError naming the argument unless x, weight, bias and the pool fit together."""
    if not isinstance(pool, AdapterPool):
        raise TypeError(f"pool must be an AdapterPool, got {type(pool).__name__}")
    check_tensor("weight", weight, dims=2)
    # weight's own first row and column stand in for a rank-1 A and B: the lora checks then cover x and bias.
    check_lora_linear_args(x, weight, weight[:1], weight[:, :1], 1.0, bias)
    if pool.dtype != x.dtype or pool.device != x.device:
        raise ValueError(f"pool is {pool.dtype} on {pool.device}, x is {x.dtype} on {x.device}")
    if (pool.in_features, pool.out_features) != (weight.shape[1], weight.shape[0]):
        raise ValueError(f"pool is {pool.in_features} -> {pool.out_features} features (slices "
                         f"{list(pool.slice_widths)}), weight {weight.shape[1]} -> {weight.shape[0]}")  # fmt: skip
