"""nn.Module wrappers around fastpeft ops, one module per op family."""

from fastpeft.modules.bottleneck import Activation, BottleneckAdapter
from fastpeft.modules.lora import LoRALinear
from fastpeft.modules.multi_lora import MultiLoRALinear, adapter_batch
from fastpeft.modules.qlora import Linear4bit, QLoRALinear

__all__ = [
    "Activation",
    "BottleneckAdapter",
    "Linear4bit",
    "LoRALinear",
    "MultiLoRALinear",
    "QLoRALinear",
    "adapter_batch",
]
