"""fastpeft's modules built from one adapter of a PEFT layer (a copy of the adapter; the base is shared)."""

from __future__ import annotations

from torch import nn

from fastpeft.integrations.peft.base_4bit import is_peft_4bit_layer
from fastpeft.integrations.peft.layers import peft_4bit_adapter, peft_adapter
from fastpeft.modules.lora import LoRALinear
from fastpeft.modules.qlora import Linear4bit, QLoRALinear


def from_peft_layer(layer: nn.Module, adapter_name: str = "default") -> LoRALinear | QLoRALinear:
    """A :class:`~fastpeft.LoRALinear` (PEFT ``lora.Linear`` on ``nn.Linear`` or ``Conv1D``) or a
    :class:`~fastpeft.QLoRALinear` (PEFT ``lora.bnb.Linear4bit``: the 4-bit bytes shared) holding a copy of one
    adapter, with PEFT's scaling, dropout, lora_bias and adapter dtype. TypeError for another layer class;
    ValueError for an adapter the module does not express (DoRA, a variant, a missing name)."""
    if is_peft_4bit_layer(layer):
        adapter = peft_4bit_adapter(layer, adapter_name)
        return QLoRALinear.from_adapter(Linear4bit.from_bnb(layer.base_layer), adapter.lora_a, adapter.lora_b,
                                        adapter.scaling, lora_dropout=adapter.dropout)  # fmt: skip
    adapter = peft_adapter(layer, adapter_name)
    return LoRALinear.from_adapter(layer.base_layer, adapter.lora_a, adapter.lora_b, adapter.scaling,
                                   lora_dropout=adapter.dropout, lora_bias=adapter.lora_bias)  # fmt: skip
