"""Make a PEFT model's LoRA layers run fastpeft's fused ``lora_linear``, with PEFT's numbers.

``patch_peft_model(model)`` replaces, per instance, the ``forward`` of every PEFT ``lora.Linear`` layer (that
class exactly: its subclasses, such as torchao's or INC's, have forwards of their own) whose direct base layer
is a floating-point ``nn.Linear`` holding plain tensors. The direct base, not ``get_base_layer()``: when LoRA
is stacked on another tuner (a LoHa or LoKr layer in a mixed model), ``get_base_layer()`` descends to the
innermost ``nn.Linear`` and fusing with its weight would drop that tuner's contribution.

The replacement decides per call: when the call is one the fused op expresses (adapters enabled and unmerged,
no ``adapter_names`` mixed batch, vanilla LoRA without DoRA or lora_bias, dropout inactive), the first active
adapter runs fused with the base GEMM and any further active adapters add their deltas as PEFT does; otherwise
PEFT's own forward runs, unchanged. ``unpatch_peft_model(model)`` removes the replacement.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft._autocast import compute_dtype
from fastpeft.ops.lora import FLOAT_DTYPES, lora_linear


def _peft_lora_linear_class() -> type:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as exc:
        raise ImportError("patching PEFT models needs peft: pip install 'fastpeft[peft]'") from exc
    return Linear


@dataclass
class PeftAdapter:
    """One adapter of a PEFT LoRA layer, as the fused op sees it."""

    lora_a: torch.Tensor  # [r, in_features]
    lora_b: torch.Tensor  # [out_features, r]
    scaling: float
    r: int
    dropout: float


def _dropout_p(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def _is_plain_tensor(t: torch.Tensor | None) -> bool:
    # Tensor subclasses (torchao's quantized weights, DTensor shards) carry their own matmul semantics.
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def _base_unsupported_reason(layer: nn.Module) -> str | None:
    """None when the fused op can compute the direct base of the PEFT layer: a plain floating-point nn.Linear."""
    base = layer.base_layer
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not nn.Linear"
    if base.weight.dtype not in FLOAT_DTYPES:
        return f"base weight dtype {base.weight.dtype}"
    if not (_is_plain_tensor(base.weight) and _is_plain_tensor(base.bias)):
        return f"base weight is a {type(base.weight).__name__}, not a plain tensor"
    return None


def unsupported_reason(layer: nn.Module, adapter_name: str) -> str | None:
    """None when ``adapter_name`` of the PEFT layer can run fused, else what stops it."""
    reason = _base_unsupported_reason(layer)
    if reason is not None:
        return reason
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    if adapter_name not in layer.lora_A:
        return f"no adapter named {adapter_name!r}"
    if getattr(layer, "use_dora", {}).get(adapter_name, False):
        return "DoRA"
    if getattr(layer, "lora_bias", {}).get(adapter_name, False):
        return "lora_bias"
    if adapter_name in getattr(layer, "lora_variant", {}):
        return "a LoRA variant"
    if not isinstance(layer.lora_A[adapter_name], nn.Linear):
        return "lora_A is not an nn.Linear"
    return None


def peft_adapter(layer: nn.Module, adapter_name: str = "default") -> PeftAdapter:
    """Read one adapter of a PEFT ``lora.Linear`` layer; ValueError when it cannot run fused."""
    if type(layer) is not _peft_lora_linear_class():
        raise TypeError(f"layer must be a PEFT lora.Linear, got {type(layer).__name__}")
    reason = unsupported_reason(layer, adapter_name)
    if reason is not None:
        raise ValueError(f"adapter {adapter_name!r} of this layer cannot run fused: {reason}")
    return PeftAdapter(
        lora_a=layer.lora_A[adapter_name].weight,
        lora_b=layer.lora_B[adapter_name].weight,
        scaling=float(layer.scaling[adapter_name]),
        r=int(layer.r[adapter_name]),
        dropout=_dropout_p(layer.lora_dropout[adapter_name]),
    )


def _fusable_adapters(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> list[str] | None:
    """The active adapters to run fused for this call, or None to run PEFT's own forward."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None  # extra arguments include adapter_names (mixed batches): PEFT's path
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active:
        return None
    for name in active:
        if unsupported_reason(layer, name) is not None:
            return None
        if layer.training and _dropout_p(layer.lora_dropout[name]) > 0:
            return None
    base_dtype = layer.base_layer.weight.dtype
    if x.dtype != base_dtype and not torch.is_autocast_enabled(x.device.type):
        return None  # nn.Linear would refuse this; let PEFT raise its own error
    return active


def _fused_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapters = _fusable_adapters(self, x, args, kwargs)
    if adapters is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    dtype = compute_dtype(x)
    first, *others = adapters
    result = lora_linear(
        x.to(dtype),
        base.weight.to(dtype),
        self.lora_A[first].weight.to(dtype),
        self.lora_B[first].weight.to(dtype),
        float(self.scaling[first]),
        None if base.bias is None else base.bias.to(dtype),
    )
    for name in others:  # several active adapters add their deltas, as in PEFT
        lora_a = self.lora_A[name]
        delta = self.lora_B[name](lora_a(x.to(lora_a.weight.dtype))) * self.scaling[name]
        result = result + delta
    return result.to(dtype)


def is_patched(module: nn.Module) -> bool:
    """True when ``module`` is a PEFT LoRA layer running fastpeft's forward (patch_peft_model)."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _fused_forward


def patch_peft_model(model: nn.Module) -> nn.Module:
    """Make the LoRA layers of a PEFT model run fastpeft's fused op; returns ``model``, patched in place.

    Covers PEFT ``lora.Linear`` layers directly on a floating-point ``nn.Linear``. Other layers (LoRA stacked on
    another tuner, Conv1D, quantized or tensor-subclass bases), and calls the fused op does not express (DoRA,
    lora_bias, active dropout in training, ``adapter_names`` mixed batches, merged or disabled adapters), keep
    PEFT's own forward.
    """
    lora_linear_class = _peft_lora_linear_class()
    for module in model.modules():
        if type(module) is lora_linear_class and not is_patched(module) and _base_unsupported_reason(module) is None:
            module.forward = types.MethodType(_fused_forward, module)
    return model


def unpatch_peft_model(model: nn.Module) -> nn.Module:
    """Restore PEFT's own forward on every layer :func:`patch_peft_model` patched; returns ``model``."""
    for module in model.modules():
        if is_patched(module):
            del module.forward
    return model


def patched_layer_count(model: nn.Module) -> int:
    """How many layers of ``model`` run fastpeft's forward."""
    return sum(is_patched(m) for m in model.modules())
