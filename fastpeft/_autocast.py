"""The dtype a layer computes in: autocast's, when autocast is on for the input's device, else the input's."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would compute ``x`` in right now (autocast-aware)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def without_autocast(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run ``fn`` (a backend computing in explicit dtypes) with autocast off for its input's device.

    Custom ops do not leave autocast's scope, so without this autocast would recast the fp32 math inside.
    """

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return fn(x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper
