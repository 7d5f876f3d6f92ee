"""The patched forward of PEFT's ``lora.Linear`` on a floating-point ``nn.Linear`` or ``Conv1D`` base.

Fused, one call for all active adapters (their ranks stacked): vanilla LoRA with or without ``lora_bias``,
rsLoRA, in eval and in training; dropout in training with the masks PEFT's ``nn.Dropout`` modules would draw
(same generator, same order, one per adapter, drawn for the dtype PEFT casts x to), or, with
``dropout_mode="philox"`` and one adapter, drawn inside the kernels; DoRA as the only active adapter; and
``adapter_names`` mixed batches (:mod:`.mixed_batch`). PEFT's own forward otherwise, decided per call."""

from __future__ import annotations

import torch
from torch import nn

from fastpeft._autocast import compute_dtype
from fastpeft._base_layers import linear_weight
from fastpeft.integrations.peft.cache import cached, version_key
from fastpeft.integrations.peft.layers import (
    active_adapters,
    dropout_dtype,
    dropout_mode,
    dropout_p,
    inference_plan,
    is_dora,
    stacked,
    to_dtype,
    why_not_fused,
)
from fastpeft.integrations.peft.mixed_batch import (
    is_mixed_batch_call,
    mixed_batch_forward,
    mixed_batch_unsupported_reason,
)
from fastpeft.ops.dora import dora_linear, dora_weight_norm, weight_row_norm_sq
from fastpeft.ops.dropout import draw_mask
from fastpeft.ops.lora import lora_forward_no_dropout, lora_linear


def _dora_forward(layer: nn.Module, name: str, x: torch.Tensor, weight, bias) -> torch.Tensor:
    """PEFT's DoRA for one adapter, fused: ||W||^2 cached while W is unchanged, the whole norm while A, B and the
    weight are unchanged and the layer is in eval (in training A and B move every step). Dropout in training
    draws PEFT's mask whatever the dropout mode (dora_linear has no in-kernel mode)."""
    lora_a = layer.lora_A[name].weight.to(x.dtype)
    lora_b = layer.lora_B[name].weight.to(x.dtype)
    scaling = float(layer.scaling[name])
    base_weight = layer.base_layer.weight
    norm_sq = cached(layer, "weight_norm_sq", (*version_key(base_weight), x.dtype), lambda: weight_row_norm_sq(weight))
    norm = None
    if not layer.training:
        key = (*version_key(base_weight, layer.lora_A[name].weight, layer.lora_B[name].weight), x.dtype, scaling)
        norm = cached(layer, f"norm:{name}", key, lambda: dora_weight_norm(weight, lora_a, lora_b, scaling, norm_sq))
    magnitude = layer.lora_magnitude_vector[name].weight
    p = dropout_p(layer.lora_dropout[name]) if layer.training else 0.0
    mask = draw_mask(tuple(x.shape), p, dropout_dtype(layer, name, x), x.device) if p > 0 else None
    return dora_linear(x, weight, lora_a, lora_b, magnitude, scaling, bias, weight_norm_sq=norm_sq, weight_norm=norm,
                       dropout_p=p, dropout_mask=mask)  # fmt: skip


def fused_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    names = kwargs.get("adapter_names")
    # a mixed batch: one multi_lora call if it can
    if is_mixed_batch_call(args, kwargs) and mixed_batch_unsupported_reason(self, names, x) is None:
        return mixed_batch_forward(self, x, names)
    # Under torch.compile the checks are traced once and guarded: no cache (its keys read data pointers).
    plan = None if args or kwargs or torch.compiler.is_compiling() else inference_plan(self, x)
    if plan is not None:
        name, weight, lora_a, lora_b, bias = plan
        return lora_forward_no_dropout(x, weight, lora_a, lora_b, float(self.scaling[name]), bias)
    if args or kwargs or why_not_fused(self, x.dtype, torch.is_autocast_enabled(x.device.type)) is not None:
        self.__dict__.pop("_fastpeft_cache", None)  # merged or unmerged weights may follow: cached norms go
        return type(self).forward(self, x, *args, **kwargs)  # extra arguments include adapter_names
    base = self.base_layer
    dtype = compute_dtype(x)
    weight = to_dtype(linear_weight(base), dtype)
    bias = None if base.bias is None else to_dtype(base.bias, dtype)
    adapters = active_adapters(self)
    if is_dora(self, adapters[0]):  # the only active adapter (why_not_fused)
        return _dora_forward(self, adapters[0], x.to(dtype), weight, bias)
    ps = [dropout_p(self.lora_dropout[name]) if self.training else 0.0 for name in adapters]
    lora_a, lora_b, scaling, lora_bias = stacked(self, adapters, dtype)
    if not any(ps):
        return lora_linear(to_dtype(x, dtype), weight, lora_a, lora_b, scaling, bias, lora_bias=lora_bias)
    if len(adapters) == 1 and dropout_mode(self) == "philox":
        return lora_linear(x.to(dtype), weight, lora_a, lora_b, scaling, bias, lora_bias=lora_bias, dropout_p=ps[0],
                           dropout_mode="philox")  # fmt: skip
    # PEFT's masks: each adapter's nn.Dropout draws one, in the adapters' order, for x cast to its A's dtype.
    masks = [
        draw_mask(tuple(x.shape), p, dropout_dtype(self, name, x), x.device)
        if p
        else torch.ones(x.shape, dtype=torch.bool, device=x.device)
        for name, p in zip(adapters, ps, strict=True)
    ]
    if len(adapters) == 1:
        return lora_linear(x.to(dtype), weight, lora_a, lora_b, scaling, bias, lora_bias=lora_bias, dropout_p=ps[0],
                           dropout_mask=masks[0])  # fmt: skip
    ranks = [self.lora_A[name].weight.shape[0] for name in adapters]
    return lora_linear(x.to(dtype), weight, lora_a, lora_b, scaling, bias, lora_bias=lora_bias, dropout_p=ps,
                       dropout_mask=torch.stack(masks), rank_groups=ranks)  # fmt: skip
