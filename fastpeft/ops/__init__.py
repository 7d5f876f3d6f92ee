"""Functional entry points, one module per op family (schema, checks, backends, autograd, reference)."""

from fastpeft.ops.batch_description import BatchDescription, describe_batch
from fastpeft.ops.bottleneck import bottleneck_adapter, bottleneck_reference
from fastpeft.ops.dora import dora_linear, dora_linear_reference
from fastpeft.ops.lora import lora_linear, lora_linear_reference
from fastpeft.ops.multi_lora import multi_lora_add, multi_lora_linear, multi_lora_sgmv, segment_adapter_ids
from fastpeft.ops.multi_lora_4bit import multi_lora_linear_4bit
from fastpeft.ops.qlora import matmul_4bit, qlora_linear, qlora_linear_reference
from fastpeft.ops.quant_4bit import QuantState, dequantize_4bit, quantize_4bit

__all__ = [
    "BatchDescription",
    "QuantState",
    "bottleneck_adapter",
    "bottleneck_reference",
    "dequantize_4bit",
    "describe_batch",
    "dora_linear",
    "dora_linear_reference",
    "lora_linear",
    "lora_linear_reference",
    "matmul_4bit",
    "multi_lora_add",
    "multi_lora_linear",
    "multi_lora_linear_4bit",
    "multi_lora_sgmv",
    "qlora_linear",
    "qlora_linear_reference",
    "quantize_4bit",
    "segment_adapter_ids",
]
