"""Functional entry points, one module per op family (schema, checks, backends, autograd, reference)."""

from fastpeft.ops.dora import dora_linear, dora_linear_reference
from fastpeft.ops.lora import lora_linear, lora_linear_reference
from fastpeft.ops.multi_lora import multi_lora_linear, segment_adapter_ids

__all__ = [
    "dora_linear",
    "dora_linear_reference",
    "lora_linear",
    "lora_linear_reference",
    "multi_lora_linear",
    "segment_adapter_ids",
]
