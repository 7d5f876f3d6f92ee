"""fastpeft: fused CUDA and Triton kernels for parameter-efficient fine-tuning layers."""

from fastpeft.backends import available_backends
from fastpeft.integrations.adapterhub import (
    explain_adapterhub_patch,
    patch_adapterhub_model,
    unpatch_adapterhub_model,
)
from fastpeft.integrations.bottleneck_checkpoint import load_bottleneck_adapter, save_bottleneck_adapter
from fastpeft.integrations.bottleneck_models import (
    BottleneckConfig,
    add_bottleneck_adapters,
    bottleneck_batch,
    set_active_bottleneck,
)
from fastpeft.integrations.peft import (
    explain_patch,
    from_peft_layer,
    load_peft_adapter,
    patch_peft_model,
    reassign_adapter_names,
    unpatch_peft_model,
)
from fastpeft.integrations.quantize import quantize_model
from fastpeft.modules.bottleneck import BottleneckAdapter
from fastpeft.modules.lora import LoRALinear
from fastpeft.modules.multi_lora import MultiLoRALinear, adapter_batch
from fastpeft.modules.qlora import Linear4bit, QLoRALinear
from fastpeft.ops.adapter_pool import AdapterPool
from fastpeft.ops.batch_description import BatchDescription, describe_batch
from fastpeft.ops.bottleneck import bottleneck_adapter
from fastpeft.ops.dora import dora_linear
from fastpeft.ops.lora import lora_linear
from fastpeft.ops.multi_lora import multi_lora_linear
from fastpeft.ops.qlora import matmul_4bit, qlora_linear
from fastpeft.ops.quant_4bit import QuantState, dequantize_4bit, quantize_4bit
from fastpeft.warmup import warmup

__version__ = "0.1.0"

__all__ = [
    "AdapterPool",
    "BatchDescription",
    "BottleneckAdapter",
    "BottleneckConfig",
    "Linear4bit",
    "LoRALinear",
    "MultiLoRALinear",
    "QLoRALinear",
    "QuantState",
    "__version__",
    "adapter_batch",
    "add_bottleneck_adapters",
    "available_backends",
    "bottleneck_adapter",
    "bottleneck_batch",
    "dequantize_4bit",
    "describe_batch",
    "dora_linear",
    "explain_adapterhub_patch",
    "explain_patch",
    "from_peft_layer",
    "load_bottleneck_adapter",
    "load_peft_adapter",
    "lora_linear",
    "matmul_4bit",
    "multi_lora_linear",
    "patch_adapterhub_model",
    "patch_peft_model",
    "qlora_linear",
    "quantize_4bit",
    "quantize_model",
    "reassign_adapter_names",
    "save_bottleneck_adapter",
    "set_active_bottleneck",
    "unpatch_adapterhub_model",
    "unpatch_peft_model",
    "warmup",
]
