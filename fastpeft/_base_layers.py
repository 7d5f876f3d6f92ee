"""The base layers a LoRA layer can sit on: ``nn.Linear`` and GPT-2's ``Conv1D`` (transformers), which stores its
weight transposed, [in_features, out_features] (PEFT's ``fan_in_fan_out=True``). The fused op reads either as
``nn.Linear``'s [out_features, in_features] through a transposed view: strides, not a copy per call.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional: without it there are no Conv1D layers to meet
        return None
    return Conv1D


def is_conv1d(layer: nn.Module) -> bool:
    """True for transformers' Conv1D (GPT-2's projections): ``y = x @ weight + bias``, weight [in, out]."""
    conv1d = _conv1d_class()
    return conv1d is not None and type(layer) is conv1d


def is_linear_like(layer: nn.Module) -> bool:
    """An ``nn.Linear`` (that class exactly: subclasses may compute something else) or a Conv1D."""
    return type(layer) is nn.Linear or is_conv1d(layer)


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as [out_features, in_features]: nn.Linear's own, a transposed view of a Conv1D's."""
    return layer.weight.t() if is_conv1d(layer) else layer.weight


def check_fan_in_fan_out(layer: nn.Module, fan_in_fan_out: bool | None) -> bool:
    """The layout flag that fits ``layer`` (True for Conv1D); ValueError naming fan_in_fan_out if a given
    value disagrees with how the layer stores its weight."""
    expected = is_conv1d(layer)
    if fan_in_fan_out is not None and bool(fan_in_fan_out) != expected:
        stored = "[in_features, out_features]" if expected else "[out_features, in_features]"
        raise ValueError(
            f"fan_in_fan_out={fan_in_fan_out} disagrees with the base layer: {type(layer).__name__} stores its "
            f"weight {tuple(layer.weight.shape)} as {stored}"
        )
    return expected
