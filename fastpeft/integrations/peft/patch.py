"""``patch_peft_model`` / ``unpatch_peft_model`` / ``explain_patch``: the top of the PEFT integration.

A patched layer's forward is :func:`.lora.fused_forward` (``lora.Linear`` on a floating-point ``nn.Linear`` or
``Conv1D``) or :func:`.qlora.fused_forward_4bit` (PEFT's ``lora.bnb.Linear4bit``), installed per instance; each
decides per call whether it runs fused or PEFT's own forward."""

from __future__ import annotations

import types

from torch import nn

from fastpeft.integrations.peft.base_4bit import is_peft_4bit_layer
from fastpeft.integrations.peft.layers import (
    active_adapters,
    base_unsupported_reason,
    dropout_mode,
    dropout_p,
    is_dora,
    peft_lora_linear_class,
    require_peft_model,
    why_not_fused,
)
from fastpeft.integrations.peft.lora import fused_forward
from fastpeft.integrations.peft.mixed_batch import mixed_batch_unsupported_reason
from fastpeft.integrations.peft.qlora import explain_4bit, fused_forward_4bit
from fastpeft.integrations.report import LayerPath, PatchReport
from fastpeft.ops.dropout import DROPOUT_MODES


def is_patched(module: nn.Module) -> bool:
    """True when ``module`` is a PEFT LoRA layer running fastpeft's forward (patch_peft_model)."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) in (fused_forward, fused_forward_4bit)


def patch_peft_model(model: nn.Module, *, dropout_mode: str = "torch") -> nn.Module:
    """Make the LoRA layers of a PEFT model run fastpeft's fused op; returns ``model``, patched in place.

    ``dropout_mode``: ``"torch"`` draws each dropout mask as PEFT's nn.Dropout would (PEFT's numbers under the
    same seed); ``"philox"`` draws it inside the kernels (no dropped copy of x; other masks than PEFT's, so
    seeded runs no longer match PEFT's bit for bit). Patching again sets the mode anew.

    Covers PEFT ``lora.Linear`` layers directly on a floating-point ``nn.Linear`` or Conv1D, and PEFT's LoRA
    layers on bitsandbytes 4-bit bases (``lora.bnb.Linear4bit``: QLoRA models, through
    :mod:`fastpeft.integrations.peft.qlora`), plain calls and ``adapter_names`` mixed batches (one multi_lora
    launch per layer, inference). Other layers (LoRA stacked on another tuner, 8-bit or tensor-subclass bases),
    and calls the fused ops do not express (DoRA beside other adapters or in a mixed batch, merged or disabled
    adapters), keep PEFT's own forward.
    Idempotent: call it again after adding LoRA layers to cover them. :func:`explain_patch` shows what runs where.
    TypeError when ``model`` is not a PEFT model (it would do nothing).
    """
    require_peft_model(model, "patch_peft_model")
    if dropout_mode not in DROPOUT_MODES:
        raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}, got {dropout_mode!r}")
    lora_linear_class = peft_lora_linear_class()
    for module in model.modules():
        four_bit = is_peft_4bit_layer(module)
        if (type(module) is lora_linear_class or four_bit) and base_unsupported_reason(module) is None:
            module.forward = types.MethodType(fused_forward_4bit if four_bit else fused_forward, module)
            module._fastpeft_dropout_mode = dropout_mode
    return model


def unpatch_peft_model(model: nn.Module) -> nn.Module:
    """Restore PEFT's own forward on every layer :func:`patch_peft_model` patched; returns ``model``."""
    for module in model.modules():
        if is_patched(module):
            del module.forward
            module.__dict__.pop("_fastpeft_dropout_mode", None)
    return model


def patched_layer_count(model: nn.Module) -> int:
    """How many layers of ``model`` run fastpeft's forward."""
    return sum(is_patched(m) for m in model.modules())


def _explain(layer: nn.Module, adapter_names: list[str] | None) -> tuple[str, str]:
    if is_patched(layer) and is_peft_4bit_layer(layer) and adapter_names is None:
        return explain_4bit(layer)
    if not is_patched(layer):
        if type(layer) is not peft_lora_linear_class() and not is_peft_4bit_layer(layer):
            return "not patched", f"{type(layer).__name__} is not PEFT's lora.Linear"
        return "not patched", base_unsupported_reason(layer) or "patch_peft_model has not run on it"
    if adapter_names is not None:
        reason = mixed_batch_unsupported_reason(layer, adapter_names, None)
        if reason is not None:
            return "PEFT", f"mixed batch: {reason}"
        used = sorted({n for n in adapter_names if n in layer.lora_A})
        return "fused", f"mixed batch in one multi_lora call, adapters {used} on this layer"
    reason = why_not_fused(layer, None, False)
    if reason is not None:
        return "PEFT", reason
    adapters = active_adapters(layer)
    ps = [dropout_p(layer.lora_dropout[name]) for name in adapters]
    detail = f"adapters {adapters} in one call" if len(adapters) > 1 else f"adapter {adapters[0]!r}"
    if is_dora(layer, adapters[0]):
        detail += " (DoRA)"
    if layer.training and any(ps):
        in_kernel = dropout_mode(layer) == "philox" and len(adapters) == 1 and not is_dora(layer, adapters[0])
        how = "in-kernel (philox)" if in_kernel else "with PEFT's mask" + ("s" if len(adapters) > 1 else "")
        detail += f", dropout p={ps[0] if len(ps) == 1 else ps} {how}"
    return "fused", detail


def explain_patch(model: nn.Module, adapter_names: list[str] | None = None) -> PatchReport:
    """Per PEFT LoRA layer of ``model``: the path a plain call runs now (train/eval mode, active adapters, merged
    or disabled state as they are) and why; with ``adapter_names``, the path of that mixed batch (shapes and
    input dtype are not known here and not checked). TypeError when ``model`` is not a PEFT model."""
    require_peft_model(model, "explain_patch")
    from peft.tuners.lora.layer import LoraLayer

    report = PatchReport()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            report.append(LayerPath(name, *_explain(module, adapter_names)))
    return report
