"""nn.Module wrappers around fastpeft ops, one module per op family."""

from fastpeft.modules.lora import LoRALinear
from fastpeft.modules.multi_lora import MultiLoRALinear, adapter_batch

__all__ = ["LoRALinear", "MultiLoRALinear", "adapter_batch"]
