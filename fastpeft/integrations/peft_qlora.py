"""PEFT's LoRA layers on bitsandbytes 4-bit bases (``peft.tuners.lora.bnb.Linear4bit``: a model loaded by
transformers with ``BitsAndBytesConfig(load_in_4bit=True)`` and wrapped by PEFT) running fastpeft's fused QLoRA
op: the 4-bit product and the adapter in one :func:`fastpeft.ops.qlora.qlora_linear` call, forward and
backward, with PEFT's numbers. :func:`fastpeft.patch_peft_model` installs :func:`fused_forward_4bit` on them.

What runs fused: one active vanilla adapter (dropout in training drawn with PEFT's mask), or several active
adapters without dropout (their ranks stacked), and ``adapter_names`` mixed batches at inference (the 4-bit
product, then one multi_lora shrink and expand). PEFT's forward keeps the rest: DoRA and other variants,
``lora_bias``, several adapters with dropout in training, merged or disabled adapters.

The dtypes follow bitsandbytes: x is cast to the base's ``compute_dtype`` (when set) and the result back to x's
dtype. PEFT computes the adapter in its own dtype (fp32 by default) and adds it in x's; here it runs in the
compute dtype with fp32 accumulation, added once: the two differ by rounding only.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fastpeft.ops.dropout import draw_mask
from fastpeft.ops.qlora import Weight4bit, qlora_forward_unchecked, qlora_linear
from fastpeft.ops.quant_4bit import BLOCKSIZES, QUANT_TYPES, QuantState, restore_bnb_layout


@functools.cache
def _peft_4bit_class() -> type | None:
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft without bitsandbytes defines no such class
        return None
    return Linear4bit


def is_peft_4bit_layer(module: nn.Module) -> bool:
    """True for PEFT's LoRA layer on a bitsandbytes 4-bit base (that class exactly)."""
    cls = _peft_4bit_class()
    return cls is not None and type(module) is cls


def base_4bit_unsupported_reason(layer: nn.Module) -> str | None:
    """None when the layer's bitsandbytes base is quantized in a layout the kernels read."""
    state = getattr(getattr(layer.base_layer, "weight", None), "quant_state", None)
    if state is None:
        return "bitsandbytes 4-bit base is not quantized yet (it quantizes when moved to a device)"
    if state.quant_type not in QUANT_TYPES or state.blocksize not in BLOCKSIZES:
        return f"4-bit state {state.quant_type} with blocksize {state.blocksize}"
    return None


def kernel_weight(layer: nn.Module) -> Weight4bit:
    """The base's 4-bit weight as the kernels take it, kept while its bytes and state are the same objects."""
    from fastpeft.integrations.peft import _cached

    weight = layer.base_layer.weight
    restore_bnb_layout(weight)  # a forward before the patch may have repacked it (bitsandbytes' CPU inference)
    state = weight.quant_state
    key = (weight.data_ptr(), id(state), state.absmax.data_ptr(), weight.device)
    return _cached(layer, "weight4bit", key, lambda: Weight4bit.from_state(weight.data, QuantState.from_bnb(state)))


def _compute_dtype(layer: nn.Module, x: torch.Tensor) -> torch.dtype:
    return getattr(layer.base_layer, "compute_dtype", None) or x.dtype


def _bias(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    bias = layer.base_layer.bias
    return None if bias is None else bias.to(dtype)


def base_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' ``Linear4bit(x)`` on the fused kernels: x cast to the compute dtype, the result to x's."""
    dtype = _compute_dtype(layer, x)
    return qlora_linear(x.to(dtype), kernel_weight(layer), None, None, None, bias=_bias(layer, dtype)).to(x.dtype)


def why_not_fused_4bit(layer: nn.Module) -> str | None:
    """Why the layer's next plain call keeps PEFT's forward, or None when it runs fused."""
    from fastpeft.integrations.peft import _active_adapters, _dropout_p, layer_state_reason, plain_adapter_reasons

    state = layer_state_reason(layer)
    if state is not None:
        return state
    active = _active_adapters(layer)
    if not active:
        return "no active adapter on this layer"
    reasons = plain_adapter_reasons(layer)
    for name in active:
        reason = reasons[name]
        if reason is not None:
            return f"adapter {name!r}: {reason}"
    if len(active) > 1 and layer.training and any(_dropout_p(layer.lora_dropout[n]) for n in active):
        return "several active adapters with dropout in training"
    return None


def fused_forward_4bit(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The patched forward of a PEFT 4-bit LoRA layer (installed by :func:`fastpeft.patch_peft_model`)."""
    from fastpeft.integrations.peft import _active_adapters, _dropout_p, _stacked, inference_plan

    names = kwargs.get("adapter_names")
    if not args and names is not None and len(kwargs) == 1:
        from fastpeft.integrations.peft_mixed_batch import mixed_batch_forward, mixed_batch_unsupported_reason

        if mixed_batch_unsupported_reason(self, names, x) is None:
            return mixed_batch_forward(self, x, names)
    plan = None if args or kwargs or torch.compiler.is_compiling() else inference_plan(self, x, _plan_4bit)
    if plan is not None:  # inference with one plain adapter: the layer's own tensors, nothing to check
        name, lora_a, lora_b, dtype = plan
        y = qlora_forward_unchecked(x.to(dtype), kernel_weight(self), lora_a, lora_b, float(self.scaling[name]),
                                    _bias(self, dtype))  # fmt: skip
        return y.to(x.dtype)
    if args or kwargs or why_not_fused_4bit(self) is not None:
        return type(self).forward(self, x, *args, **kwargs)
    dtype = _compute_dtype(self, x)
    adapters = _active_adapters(self)
    lora_a, lora_b, scaling, _ = _stacked(self, adapters, dtype)
    p = _dropout_p(self.lora_dropout[adapters[0]]) if self.training and len(adapters) == 1 else 0.0
    # PEFT's nn.Dropout draws its mask for x cast to the adapter's dtype: the same generator state is consumed.
    mask = draw_mask(tuple(x.shape), p, self.lora_A[adapters[0]].weight.dtype, x.device) if p > 0 else None
    if p == 0:  # the arguments are the layer's own, cast to dtype: nothing to check per call
        y = qlora_forward_unchecked(x.to(dtype), kernel_weight(self), lora_a, lora_b, scaling, _bias(self, dtype))
    else:
        y = qlora_linear(x.to(dtype), kernel_weight(self), None, lora_a, lora_b, scaling, _bias(self, dtype),
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
    from fastpeft.integrations.peft import _active_adapters

    reason = why_not_fused_4bit(layer)
    if reason is not None:
        return "PEFT", reason
    state = layer.base_layer.weight.quant_state
    adapters = _active_adapters(layer)
    nested = " double-quantized" if getattr(state, "nested", False) else ""
    kind = f"{state.quant_type} blocksize {state.blocksize}{nested}"
    return "fused", f"4-bit {kind} base with adapters {adapters} in one qlora_linear call"


def peft_4bit_adapter(layer: nn.Module, adapter_name: str = "default"):
    """One adapter of a PEFT 4-bit LoRA layer as :class:`~fastpeft.integrations.peft.PeftAdapter`; ValueError
    when the fused op does not express it."""
    from fastpeft.integrations.peft import PeftAdapter, _dropout_p, _is_dora, unsupported_reason

    if not is_peft_4bit_layer(layer):
        raise TypeError(f"layer must be PEFT's lora.bnb.Linear4bit, got {type(layer).__name__}")
    reason = "DoRA" if _is_dora(layer, adapter_name) else unsupported_reason(layer, adapter_name)
    if reason is None and layer.lora_B[adapter_name].bias is not None:
        reason = "lora_bias"
    if reason is not None:
        raise ValueError(f"adapter {adapter_name!r} of this layer cannot run fused: {reason}")
    return PeftAdapter(
        lora_a=layer.lora_A[adapter_name].weight,
        lora_b=layer.lora_B[adapter_name].weight,
        lora_bias=None,
        scaling=float(layer.scaling[adapter_name]),
        r=int(layer.r[adapter_name]),
        dropout=_dropout_p(layer.lora_dropout[adapter_name]),
    )
