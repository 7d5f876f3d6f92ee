"""Tensors derived from a PEFT layer's weights (a pooled batch of adapters, a 4-bit weight's kernel view, DoRA's
norms), kept on the layer while the weights they came from are unchanged."""

from __future__ import annotations

import torch
from torch import nn


def cached(layer: nn.Module, slot: str, key: tuple, compute) -> torch.Tensor:
    """``compute()``, kept on the layer until ``key`` changes (tensors' storage and version counters in it).
    While torch.compile traces, what is kept is used as it is (the key's data pointers cannot be traced), or
    computed in the graph when nothing is kept: run the model once eagerly after changing its adapters."""
    cache = layer.__dict__.setdefault("_fastpeft_cache", {})
    if torch.compiler.is_compiling():
        return cache[slot][1] if slot in cache else compute()
    if slot not in cache or cache[slot][0] != key:
        cache[slot] = (key, compute())
    return cache[slot][1]


def version_key(*tensors: torch.Tensor) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
