"""Functional entry points, one module per op family (schema, checks, backends, autograd, reference)."""

from fastpeft.ops.lora import lora_linear, lora_linear_reference

__all__ = ["lora_linear", "lora_linear_reference"]
