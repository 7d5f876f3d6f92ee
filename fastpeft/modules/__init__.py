"""nn.Module wrappers around fastpeft ops, one module per op family."""

from fastpeft.modules.lora import LoRALinear

__all__ = ["LoRALinear"]
