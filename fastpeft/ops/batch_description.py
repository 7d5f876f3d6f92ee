"""A mixed-adapter batch described once per forward: what every multi-LoRA layer of a model shares.

Built on the device from the per-token adapter ids (no host sync, fixed shapes, so it can be built inside
``torch.compile`` and inside a captured CUDA graph), and checked once, at build time, when asked:

- ``ids`` int32 [M]: one adapter per token (-1, or any id outside the pool: no adapter);
- ``order`` int32 [M]: the tokens sorted by adapter, stably (a sequence's tokens stay in order), those without
  an adapter last;
- ``starts`` int32 [num_adapters + 2]: adapter a's tokens are ``order[starts[a]:starts[a + 1]]``, and the
  tokens without one ``order[starts[num_adapters]:]``.

The grouped (SGMV) kernels give each adapter one program per tile of its tokens, so an adapter's A and B are
read once per step however many tokens use it, and nothing they launch depends on the ids' values.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

ID_DTYPES = (torch.int32, torch.int64)


class BatchDescription(NamedTuple):
    """The adapters of one batch of M tokens, grouped on the device (see the module's docstring)."""

    ids: torch.Tensor  # int32 [M]
    order: torch.Tensor  # int32 [M]
    starts: torch.Tensor  # int32 [num_adapters + 2]

    @property
    def num_adapters(self) -> int:
        return self.starts.numel() - 2

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()


def check_adapter_ids(adapter_ids: torch.Tensor, num_adapters: int) -> None:
    """IndexError unless every id is -1 or in [0, num_adapters). Reads the ids on the host (a sync on a GPU)."""
    if adapter_ids.numel() == 0:
        return
    low, high = int(adapter_ids.min()), int(adapter_ids.max())
    if low < -1 or high >= num_adapters:
        bad = low if low < -1 else high
        raise IndexError(f"adapter_ids holds {bad}, outside [-1, {num_adapters}) (-1: no adapter)")


def describe_batch(adapter_ids: torch.Tensor, num_adapters: int, *, check: bool = True) -> BatchDescription:
    """The :class:`BatchDescription` of per-token ids ``adapter_ids`` (int32/int64 [M], flat) for a pool of
    ``num_adapters``. ``check=True`` refuses ids outside [-1, num_adapters) with an IndexError naming the id
    (one host sync, here and nowhere else); with ``check=False`` (inside graph capture or compiled code) such
    ids give their tokens no adapter."""
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in ID_DTYPES or adapter_ids.dim() != 1:
        raise TypeError(f"adapter_ids must be a 1-D int32 or int64 tensor, got "
                        f"{getattr(adapter_ids, 'dtype', type(adapter_ids).__name__)}")  # fmt: skip
    if isinstance(num_adapters, bool) or not isinstance(num_adapters, int) or num_adapters < 0:
        raise ValueError(f"num_adapters must be an int >= 0, got {num_adapters!r}")
    if check:
        check_adapter_ids(adapter_ids, num_adapters)
    ids = adapter_ids.to(torch.int32).contiguous()
    # Tokens without an adapter sort into the group after the last adapter's.
    group = torch.where((ids >= 0) & (ids < num_adapters), ids, num_adapters)
    sorted_groups, order = torch.sort(group, stable=True)
    bounds = torch.arange(num_adapters + 2, device=ids.device, dtype=torch.int32)
    starts = torch.searchsorted(sorted_groups, bounds, out_int32=True)
    return BatchDescription(ids, order.to(torch.int32), starts)


def refresh_description_(
    description: BatchDescription, adapter_ids: torch.Tensor, *, check: bool = True
) -> BatchDescription:
    """Describe new ids (int32/int64 [M], the same M and pool) into ``description``'s own tensors, in place: what
    a captured CUDA graph reads stays where it is, so the next replay serves the new batch. Run it outside the
    capture (its few small kernels run eagerly). Returns ``description``."""
    if not isinstance(description, BatchDescription):
        raise TypeError(f"description must be a BatchDescription, got {type(description).__name__}")
    if isinstance(adapter_ids, torch.Tensor) and adapter_ids.shape != description.ids.shape:
        raise ValueError(f"adapter_ids must be {tuple(description.ids.shape)} like the description's, got "
                         f"{tuple(adapter_ids.shape)}")  # fmt: skip
    fresh = describe_batch(adapter_ids.to(description.ids.device), description.num_adapters, check=check)
    for old, new in zip(description, fresh, strict=True):
        old.copy_(new)
    return description
