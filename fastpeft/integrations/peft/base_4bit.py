"""PEFT's LoRA layers on bitsandbytes 4-bit bases (``peft.tuners.lora.bnb.Linear4bit``): recognising them, and
their base ``Linear4bit(x)`` on the fused kernels.

The dtypes follow bitsandbytes: x is cast to the base's ``compute_dtype`` (when set) and the result back to x's
dtype."""

from __future__ import annotations

import functools

import torch
from torch import nn

from fastpeft.integrations.peft.cache import cached
from fastpeft.ops.qlora import Weight4bit, qlora_linear
from fastpeft.ops.quant_4bit import BLOCKSIZES, QUANT_TYPES, QuantState, restore_bnb_layout


@functools.cache
def peft_4bit_class() -> type | None:
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft without bitsandbytes defines no such class
        return None
    return Linear4bit


def is_peft_4bit_layer(module: nn.Module) -> bool:
    """True for PEFT's LoRA layer on a bitsandbytes 4-bit base (that class exactly)."""
    cls = peft_4bit_class()
    return cls is not None and type(module) is cls


def base_4bit_unsupported_reason(layer: nn.Module) -> str | None:
    """None when the layer's bitsandbytes base is quantized in a layout the kernels read."""
    state = getattr(getattr(layer.base_layer, "weight", None), "quant_state", None)
    if state is None:
        return "bitsandbytes 4-bit base is not quantized yet (it quantizes when moved to a device)"
    if state.quant_type not in QUANT_TYPES or state.blocksize not in BLOCKSIZES:
        return f"4-bit state {state.quant_type} with blocksize {state.blocksize}"
    return None


def kernel_weight(layer: nn.Module) -> Weight4bit:
    """The base's 4-bit weight as the kernels take it, kept while its bytes and state are the same objects."""
    weight = layer.base_layer.weight
    restore_bnb_layout(weight)  # a forward before the patch may have repacked it (bitsandbytes' CPU inference)
    state = weight.quant_state
    key = (weight.data_ptr(), id(state), state.absmax.data_ptr(), weight.device)
    return cached(layer, "weight4bit", key, lambda: Weight4bit.from_state(weight.data, QuantState.from_bnb(state)))


def compute_dtype_4bit(layer: nn.Module, x: torch.Tensor) -> torch.dtype:
    return getattr(layer.base_layer, "compute_dtype", None) or x.dtype


def base_bias_4bit(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    bias = layer.base_layer.bias
    return None if bias is None else bias.to(dtype)


def base_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' ``Linear4bit(x)`` on the fused kernels: x cast to the compute dtype, the result to x's."""
    dtype = compute_dtype_4bit(layer, x)
    return qlora_linear(x.to(dtype), kernel_weight(layer), None, None, None, bias=base_bias_4bit(layer, dtype)).to(
        x.dtype
    )
