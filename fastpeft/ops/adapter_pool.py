"""The adapter pool of the ``multi_lora`` family: many LoRA adapters of one layer, stacked by rank rows.

A layer may be *packed*: one base weight whose output is several slices (q/k/v, or gate/up), each slice with its
own LoRA pair per adapter. Adapter i holds ``(A[s, i] [r_si, in], B[s, i] [width_s, r_si], scaling[s, i])`` for
each slice s (r_si = 0 when the adapter leaves that slice alone). The pool stores, without padding any rank:

- ``lora_a`` [P, in]: adapter i's A rows for every slice, slice after slice, in rows
  ``a_offsets[i]:a_offsets[i + 1]``. One shrink reads x once for all slices: ``v[t] = x[t] @ lora_a[rows].T``.
- ``lora_b`` (1-D): every ``B[s, i]`` transposed, ``[r_si, width_s]`` row-major at element ``b_starts[s, i]``,
  so the expand reads whole rows of the slice's output.
- ``ranks``, ``v_starts`` (where slice s's columns of v start for adapter i), ``b_starts``, ``scalings``:
  [S, n] each; ``out_starts`` int32 [S + 1], the slices' column ranges in the layer's output.

A single linear layer is the one-slice case (:meth:`AdapterPool.build`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# One adapter's LoRA pair on one slice: (lora_a [r, in], lora_b [width, r], scaling); None: no LoRA there.
SliceAdapter = tuple[torch.Tensor, torch.Tensor, float]


class HostTables(NamedTuple):
    """:class:`AdapterPool`'s index tables on the host: ``a_offsets`` [n + 1], then [S][n] lists."""

    a_offsets: list[int]
    ranks: list[list[int]]
    v_starts: list[list[int]]
    b_starts: list[list[int]]
    scalings: list[list[float]]
    out_starts: list[int]


@dataclass(frozen=True)
class AdapterPool:
    """Adapters of one (possibly packed) layer, stacked by rank rows (see the module docstring for the layout).
    Build with :meth:`build` (one output slice) or :meth:`build_packed`."""

    lora_a: torch.Tensor  # [P, in_features], x's dtype
    lora_b: torch.Tensor  # 1-D, x's dtype
    a_offsets: torch.Tensor  # int32 [n + 1]
    ranks: torch.Tensor  # int32 [S, n]
    v_starts: torch.Tensor  # int32 [S, n]
    b_starts: torch.Tensor  # int64 [S, n]
    scalings: torch.Tensor  # fp32 [S, n]
    out_starts: torch.Tensor  # int32 [S + 1]
    slice_widths: tuple[int, ...]
    max_rank: int  # the largest total rank of an adapter (over its slices): v's width and the kernels' grids

    @functools.cached_property
    def host_tables(self) -> HostTables:
        """The index tables as Python lists, read once (the CPU path walks them on every call)."""
        return HostTables(
            self.a_offsets.tolist(),
            self.ranks.tolist(),
            self.v_starts.tolist(),
            self.b_starts.tolist(),
            self.scalings.tolist(),
            self.out_starts.tolist(),
        )

    @property
    def num_adapters(self) -> int:
        return self.a_offsets.numel() - 1

    @property
    def in_features(self) -> int:
        return self.lora_a.shape[1]

    @property
    def out_features(self) -> int:
        return sum(self.slice_widths)

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_a.dtype

    @property
    def device(self) -> torch.device:
        return self.lora_a.device

    def lora_b_t(self, adapter: int, slice_index: int = 0) -> torch.Tensor:
        """``B[slice, adapter]`` transposed, [r, width] (a view into the pool)."""
        start = int(self.b_starts[slice_index, adapter])
        rank, width = int(self.ranks[slice_index, adapter]), self.slice_widths[slice_index]
        return self.lora_b[start : start + rank * width].view(rank, width)

    @classmethod
    def build(
        cls,
        adapters: Sequence[SliceAdapter],
        *,
        in_features: int | None = None,
        out_features: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> AdapterPool:
        """A pool for a plain linear layer: ``adapters`` are ``(lora_a [r, in], lora_b [out, r], scaling)`` in
        index order, one dtype and device. An empty list needs ``in_features``, ``out_features``, ``dtype`` and
        ``device``. Copies the weights once."""
        widths = None if out_features is None else [out_features]
        one_slice = [[adapter] for adapter in adapters]
        return cls.build_packed(one_slice, slice_widths=widths, in_features=in_features, dtype=dtype, device=device)

    @classmethod
    def build_packed(
        cls,
        adapters: Sequence[Sequence[SliceAdapter | None]],
        *,
        slice_widths: Sequence[int] | None = None,
        in_features: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> AdapterPool:
        """A pool for a packed layer: ``adapters[i][s]`` is adapter i's ``(lora_a [r, in], lora_b [width_s, r],
        scaling)`` on output slice s, or None where it has no LoRA. ``slice_widths`` (the slices' output widths)
        may be left out when every slice has an adapter to read it from."""
        first = next((pair for slices in adapters for pair in slices if pair is not None), None)
        num_slices = len(slice_widths) if slice_widths is not None else len(adapters[0]) if adapters else 0
        widths = _slice_widths(adapters, num_slices, slice_widths)
        if first is not None:  # what the caller leaves out comes from the first adapter
            in_features = first[0].shape[1] if in_features is None else in_features
            dtype = first[0].dtype if dtype is None else dtype
            device = first[0].device if device is None else _full_device(device)
        if in_features is None or dtype is None or device is None:
            raise ValueError("a pool without adapters needs in_features, dtype and device (and the slice widths)")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"the pool's dtype must be float16, bfloat16 or float32, got {dtype}")
        a_rows, b_flat, ranks, v_starts, b_starts, scalings = [], [], [], [], [], []
        b_used = 0
        for index, slices in enumerate(adapters):
            if len(slices) != num_slices:
                raise ValueError(f"adapter {index}: expected {num_slices} slices, got {len(slices)}")
            slice_ranks = [
                0 if pair is None else _checked_rank(pair, index, in_features, widths[s], dtype, device)
                for s, pair in enumerate(slices)
            ]
            for s, (pair, rank) in enumerate(zip(slices, slice_ranks, strict=True)):
                v_starts.append(sum(slice_ranks[:s]))
                b_starts.append(b_used)
                scalings.append(0.0 if pair is None else float(pair[2]))
                if rank:
                    a_rows.append(pair[0])
                    b_flat.append(pair[1].t().reshape(-1))
                b_used += rank * widths[s]
            ranks.append(slice_ranks)
        totals = [sum(r) for r in ranks]
        ranks = [r for slice_ranks in ranks for r in slice_ranks]
        int32 = dict(dtype=torch.int32, device=device)
        # [n, S] lists become [S, n] tensors; zero-size shapes keep their slice dimension.
        as_table = lambda rows, **kw: torch.tensor(rows, **kw).reshape(len(adapters), num_slices).t().contiguous()
        return cls(
            lora_a=torch.cat(a_rows) if a_rows else torch.empty((0, in_features), dtype=dtype, device=device),
            lora_b=torch.cat(b_flat) if b_flat else torch.empty((0,), dtype=dtype, device=device),
            a_offsets=torch.tensor([0, *torch.tensor(totals, dtype=torch.int64).cumsum(0).tolist()], **int32),
            ranks=as_table(ranks, **int32),
            v_starts=as_table(v_starts, **int32),
            b_starts=as_table(b_starts, dtype=torch.int64, device=device),
            scalings=as_table(scalings, dtype=torch.float32, device=device),
            out_starts=torch.tensor([0, *torch.tensor(widths).cumsum(0).tolist()], **int32),
            slice_widths=tuple(widths),
            max_rank=max(totals, default=0),
        )


def _full_device(device: torch.device | str) -> torch.device:
    """``"cuda"`` as ``cuda:<current>``, the device tensors report."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _slice_widths(adapters, num_slices: int, given: Sequence[int] | None) -> list[int]:
    if num_slices < 1:
        raise ValueError("a pool needs at least one output slice (pass slice_widths, or out_features)")
    widths = list(given) if given is not None else [None] * num_slices
    for slices in adapters:
        for s, pair in enumerate(slices[:num_slices]):
            if pair is not None and widths[s] is None:
                widths[s] = pair[1].shape[0]
    if any(w is None or w < 1 for w in widths):
        raise ValueError(f"every slice needs a positive output width, got {widths} (pass slice_widths)")
    return widths


def _checked_rank(pair, index: int, in_features: int, width: int, dtype, device) -> int:
    """The rank of one adapter's pair on one slice, after checking its types and shapes."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 3:
        raise TypeError(f"adapter {index}: expected (lora_a, lora_b, scaling), got {type(pair).__name__}")
    lora_a, lora_b, scaling = pair
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES or t.dim() != 2:
            raise TypeError(f"adapter {index}: {name} must be a 2-D float16/bfloat16/float32 tensor")
        if t.dtype != dtype or t.device != device:
            raise TypeError(f"adapter {index}: {name} must be {dtype} on {device} like the rest of the pool, "
                            f"got {t.dtype} on {t.device}")  # fmt: skip
    rank = lora_a.shape[0]
    if rank < 1 or lora_a.shape[1] != in_features or tuple(lora_b.shape) != (width, rank):
        raise ValueError(f"adapter {index}: lora_a must be [r, {in_features}] and lora_b [{width}, r], "
                         f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")  # fmt: skip
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"adapter {index}: scaling must be a float, got {type(scaling).__name__}")
    return rank
