"""fastpeft: fused CUDA and Triton kernels for parameter-efficient fine-tuning layers."""

from fastpeft.backends import available_backends
from fastpeft.integrations.peft import explain_patch, patch_peft_model, unpatch_peft_model
from fastpeft.integrations.peft_checkpoint import load_peft_adapter
from fastpeft.modules.lora import LoRALinear
from fastpeft.modules.multi_lora import MultiLoRALinear, adapter_batch
from fastpeft.ops.adapter_pool import AdapterPool
from fastpeft.ops.dora import dora_linear
from fastpeft.ops.lora import lora_linear
from fastpeft.ops.multi_lora import multi_lora_linear
from fastpeft.warmup import warmup

__version__ = "0.1.0"

__all__ = [
    "AdapterPool",
    "LoRALinear",
    "MultiLoRALinear",
    "__version__",
    "adapter_batch",
    "available_backends",
    "dora_linear",
    "explain_patch",
    "load_peft_adapter",
    "lora_linear",
    "multi_lora_linear",
    "patch_peft_model",
    "unpatch_peft_model",
    "warmup",
]
