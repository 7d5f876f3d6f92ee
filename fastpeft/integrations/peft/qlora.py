"""The patched forward of PEFT's LoRA layers on bitsandbytes 4-bit bases (QLoRA): the 4-bit product and the
adapter in one :func:`fastpeft.ops.qlora.qlora_linear` call, forward and backward, with PEFT's numbers.

What runs fused: one active vanilla adapter (dropout in training drawn with PEFT's mask), or several active
adapters without dropout (their ranks stacked), and ``adapter_names`` mixed batches at inference (the 4-bit
product, then one multi_lora shrink and expand). PEFT's forward keeps the rest: DoRA and other variants,
``lora_bias``, several adapters with dropout in training, merged or disabled adapters.

PEFT computes the adapter in its own dtype (fp32 by default) and adds it in x's; here it runs in the compute
dtype with fp32 accumulation, added once: the two differ by rounding only.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpeft.integrations.peft.base_4bit import base_bias_4bit, compute_dtype_4bit, kernel_weight
from fastpeft.integrations.peft.layers import (
    active_adapters,
    dropout_p,
    inference_plan,
    layer_state_reason,
    plain_adapter_reasons,
    stacked,
)
from fastpeft.integrations.peft.mixed_batch import (
    is_mixed_batch_call,
    mixed_batch_forward,
    mixed_batch_unsupported_reason,
)
from fastpeft.ops.dropout import draw_mask
from fastpeft.ops.qlora import qlora_forward_unchecked, qlora_linear


def why_not_fused_4bit(layer: nn.Module) -> str | None:
    """Why the layer's next plain call keeps PEFT's forward, or None when it runs fused."""
    state = layer_state_reason(layer)
    if state is not None:
        return state
    active = active_adapters(layer)
    if not active:
        return "no active adapter on this layer"
    reasons = plain_adapter_reasons(layer)
    for name in active:
        reason = reasons[name]
        if reason is not None:
            return f"adapter {name!r}: {reason}"
    if len(active) > 1 and layer.training and any(dropout_p(layer.lora_dropout[n]) for n in active):
        return "several active adapters with dropout in training"
    return None


def fused_forward_4bit(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The patched forward of a PEFT 4-bit LoRA layer (installed by :func:`fastpeft.patch_peft_model`)."""
    names = kwargs.get("adapter_names")
    # a mixed batch: one multi_lora call if it can
    if is_mixed_batch_call(args, kwargs) and mixed_batch_unsupported_reason(self, names, x) is None:
        return mixed_batch_forward(self, x, names)
    plan = None if args or kwargs or torch.compiler.is_compiling() else inference_plan(self, x, _plan_4bit)
    if plan is not None:  # inference with one plain adapter: the layer's own tensors, nothing to check
        name, lora_a, lora_b, dtype = plan
        y = qlora_forward_unchecked(x.to(dtype), kernel_weight(self), lora_a, lora_b, float(self.scaling[name]),
                                    base_bias_4bit(self, dtype))  # fmt: skip
        return y.to(x.dtype)
    if args or kwargs or why_not_fused_4bit(self) is not None:
        return type(self).forward(self, x, *args, **kwargs)
    dtype = compute_dtype_4bit(self, x)
    adapters = active_adapters(self)
    lora_a, lora_b, scaling, _ = stacked(self, adapters, dtype)
    p = dropout_p(self.lora_dropout[adapters[0]]) if self.training and len(adapters) == 1 else 0.0
    # PEFT's nn.Dropout draws its mask for x cast to the adapter's dtype: the same generator state is consumed.
    mask = draw_mask(tuple(x.shape), p, self.lora_A[adapters[0]].weight.dtype, x.device) if p > 0 else None
    if p == 0:  # the arguments are the layer's own, cast to dtype: nothing to check per call
        y = qlora_forward_unchecked(
            x.to(dtype), kernel_weight(self), lora_a, lora_b, scaling, base_bias_4bit(self, dtype)
        )
    else:
        y = qlora_linear(x.to(dtype), kernel_weight(self), None, lora_a, lora_b, scaling, base_bias_4bit(self, dtype),
                         dropout_p=p, dropout_mask=mask)  # fmt: skip
    return y.to(x.dtype)


def _plan_4bit(layer: nn.Module, name: str, x_dtype: torch.dtype, bias) -> tuple | None:
    """(adapter, lora_a, lora_b, compute dtype) for :func:`~fastpeft.integrations.peft.inference_plan`, when the
    adapter's weights are already in the compute dtype (no cast per call), else None."""
    if why_not_fused_4bit(layer) is not None:
        return None
    dtype = getattr(layer.base_layer, "compute_dtype", None) or x_dtype
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return (name, lora_a, lora_b, dtype) if lora_a.dtype == dtype == lora_b.dtype else None


def explain_4bit(layer: nn.Module) -> tuple[str, str]:
    """(path, detail) for :func:`fastpeft.explain_patch` on a patched 4-bit layer."""
    reason = why_not_fused_4bit(layer)
    if reason is not None:
        return "PEFT", reason
    state = layer.base_layer.weight.quant_state
    adapters = active_adapters(layer)
    nested = " double-quantized" if getattr(state, "nested", False) else ""
    kind = f"{state.quant_type} blocksize {state.blocksize}{nested}"
    return "fused", f"4-bit {kind} base with adapters {adapters} in one qlora_linear call"
