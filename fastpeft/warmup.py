"""Warm-up before CUDA-graph capture: compile and autotune every kernel a model's LoRA layers will launch.

Triton compiles a kernel and autotunes it on the first call of each shape bucket; both synchronise with the
GPU, so that call cannot happen inside ``torch.cuda.graph(...)``. :func:`warmup` makes those first calls
ahead of time, for the row counts the model will see; afterwards a decode step can be captured and replayed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fastpeft.integrations.peft import is_patched
from fastpeft.integrations.peft.base_4bit import is_peft_4bit_layer
from fastpeft.modules.lora import LoRALinear
from fastpeft.modules.qlora import Linear4bit, QLoRALinear


def _fastpeft_layers(model: nn.Module) -> list[nn.Module]:
    kinds = (LoRALinear, QLoRALinear, Linear4bit)
    layers = [m for m in model.modules() if isinstance(m, kinds) or is_patched(m)]
    inside = {id(m.base_layer) for m in layers if isinstance(m, QLoRALinear)}  # run through their QLoRA layer
    return [m for m in layers if id(m) not in inside]


def _input_like(layer: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the inputs the layer computes in: its weight's, or a 4-bit base's compute dtype
    (else the dtype it dequantizes to)."""
    base = layer.base_layer if isinstance(layer, QLoRALinear) or is_peft_4bit_layer(layer) else layer
    if isinstance(base, Linear4bit):
        return base.weight.device, base.compute_dtype or base.quant_state.dtype
    if is_peft_4bit_layer(layer):
        return base.weight.device, base.compute_dtype or base.weight.quant_state.dtype
    weight = next(layer.parameters())
    return weight.device, weight.dtype


def _signature(layer: nn.Module) -> tuple:
    """Layers with the same parameter shapes, dtypes and device launch the same kernels."""
    params = tuple((name, tuple(p.shape), p.dtype, p.device) for name, p in layer.named_parameters())
    return (type(layer), layer.training, params)


def _run_layer(layer: nn.Module, rows: int, dtype: torch.dtype | None, training: bool) -> None:
    device, own_dtype = _input_like(layer)
    compute = dtype or own_dtype
    x = torch.randn(rows, layer.in_features, device=device, dtype=compute, requires_grad=training)
    autocast = torch.autocast(device.type, dtype=compute, enabled=dtype is not None)
    with autocast, torch.set_grad_enabled(training):
        y = layer(x)
    if training:  # torch.autograd.grad leaves every .grad untouched
        inputs = [x] + [p for p in layer.parameters() if p.requires_grad]
        torch.autograd.grad(y, inputs, torch.randn_like(y))


def warmup(
    model: nn.Module,
    token_counts: Iterable[int],
    *,
    training: bool = False,
    dtype: torch.dtype | None = None,
) -> int:
    """Run every fastpeft LoRA layer of ``model`` once per row count, so its kernels are compiled and tuned.

    Args:
        model: a module holding :class:`fastpeft.LoRALinear`, :class:`fastpeft.QLoRALinear` or
            :class:`fastpeft.Linear4bit` layers, or PEFT LoRA layers (4-bit ones included) patched by
            :func:`fastpeft.patch_peft_model` (the layers' current train/eval modes are kept).
        token_counts: the row counts M the layers will see: batch x sequence length of each step to capture
            (for decode, the batch sizes).
        training: also run the backward pass (its gradients are discarded; ``.grad`` stays untouched).
        dtype: the compute dtype when it differs from the weights' (the model runs under autocast).

    Inputs are random [M, in_features] tensors on each layer's device. Layers with identical parameter shapes
    run once. Returns the number of (distinct layer, row count) calls made.
    """
    counts = sorted({int(m) for m in token_counts})
    if any(m < 0 for m in counts):
        raise ValueError(f"token_counts must be non-negative, got {counts}")
    seen: set[tuple] = set()
    calls = 0
    for layer in _fastpeft_layers(model):
        signature = _signature(layer)
        if signature in seen:
            continue
        seen.add(signature)
        for rows in counts:
            _run_layer(layer, rows, dtype, training)
            calls += 1
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return calls
