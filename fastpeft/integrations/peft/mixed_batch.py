"""PEFT's mixed-adapter batches, ``model(..., adapter_names=[...])``, as one fused multi_lora call per layer.

PEFT's ``_mixed_batch_forward`` runs the base layer, then loops in Python over the distinct names of the batch:
index the sub-batch, two GEMMs, scale, scatter-add. A patched layer (:func:`fastpeft.patch_peft_model`) runs
instead ``fastpeft.ops.multi_lora_linear``: the base GEMM, one shrink and one expand launch for the whole batch.
Same semantics: one name per sample (dim 0 of x), ``"__base__"`` or a name the layer does not have (an adapter
that targets other modules) gets the base output; the scaling is the layer's own (``lora_alpha / r`` or rsLoRA).

The layer's adapters are pooled once and kept while their weights and scalings are unchanged (an adapter loaded,
deleted, or trained in between re-pools on the next call). A call falls back to PEFT's own forward, with the
reason :func:`mixed_batch_unsupported_reason` gives, when the kernels would not give PEFT's numbers: DoRA or other
variants, lora_bias, dropout in training, gradients needed (the op has no autograd), merged or disabled
adapters (PEFT's own errors and rules then apply).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from fastpeft._base_layers import linear_weight
from fastpeft.integrations.peft.base_4bit import base_forward, is_peft_4bit_layer
from fastpeft.integrations.peft.cache import cached, version_key
from fastpeft.integrations.peft.layers import dropout_p, layer_state_reason, plain_adapter_reasons
from fastpeft.ops.adapter_pool import AdapterPool
from fastpeft.ops.batch_description import BatchDescription, describe_batch, refresh_description_
from fastpeft.ops.multi_lora import multi_lora_add, multi_lora_forward_unchecked

BASE_NAME = "__base__"


def _used(layer: nn.Module, names: Sequence[str]) -> list[str]:
    """The adapters of ``names`` that this layer has, in first-seen order."""
    return [name for name in dict.fromkeys(names) if name != BASE_NAME and name in layer.lora_A]


def is_mixed_batch_call(args: tuple, kwargs: dict) -> bool:
    """Whether a patched layer's call is ``layer(x, adapter_names=...)`` and nothing else."""
    return not args and len(kwargs) == 1 and kwargs.get("adapter_names") is not None


def mixed_batch_unsupported_reason(layer: nn.Module, names: object, x: torch.Tensor | None) -> str | None:
    """None when a call with ``adapter_names=names`` runs fused, else why PEFT's forward runs it."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return "adapter_names is not a list of str"
    state = layer_state_reason(layer)
    if state is not None:
        return state
    if x is not None:
        if x.dim() < 2 or len(names) != x.shape[0]:
            return "adapter_names does not give one name per sample"
        four_bit = is_peft_4bit_layer(layer)  # bitsandbytes casts x to its compute dtype itself
        if (not four_bit and x.dtype != layer.base_layer.weight.dtype) or torch.is_autocast_enabled(x.device.type):
            return "input dtype differs from the base weight's, or autocast is on"
    used = _used(layer, names)
    reasons = plain_adapter_reasons(layer)
    for name in used:
        reason = reasons[name]
        if reason is None and layer.training and dropout_p(layer.lora_dropout[name]) > 0:
            reason = "dropout in training"
        if reason is not None:
            return f"adapter {name!r}: {reason}"
    if torch.is_grad_enabled() and (
        (x is not None and x.requires_grad)
        or any(p.requires_grad for name in used for p in (layer.lora_A[name].weight, layer.lora_B[name].weight))
    ):
        return "gradients are needed (the multi_lora op is inference-only: use torch.no_grad())"
    return None


def _pool_key(layer: nn.Module, names: list[str], dtype: torch.dtype) -> tuple:
    weights = [t for name in names for t in (layer.lora_A[name].weight, layer.lora_B[name].weight)]
    return (tuple(names), tuple(float(layer.scaling[n]) for n in names), dtype, *version_key(*weights))


def layer_pool(layer: nn.Module, dtype: torch.dtype) -> tuple[AdapterPool, dict[str, int]]:
    """The layer's plain LoRA adapters (no DoRA, variant or lora_bias) pooled in ``dtype``, and their indices."""
    names = [name for name, reason in plain_adapter_reasons(layer).items() if reason is None]

    def build() -> tuple[AdapterPool, dict[str, int]]:
        adapters = [
            (layer.lora_A[n].weight.detach().to(dtype), layer.lora_B[n].weight.detach().to(dtype), layer.scaling[n])
            for n in names
        ]
        pool = AdapterPool.build(adapters, in_features=layer.in_features, out_features=layer.out_features,
                                 dtype=dtype, device=layer.base_layer.weight.device)  # fmt: skip
        return pool, {name: i for i, name in enumerate(names)}

    return cached(layer, "multi_lora_pool", _pool_key(layer, names, dtype), build)


# Batch descriptions, shared by every layer whose pool indexes the same adapters (most layers of a model): one
# per batch of names and token shape, so a decode step builds it once, not once per layer. A few are kept (the
# shapes of a generation: its prefill and its decode steps).
_DESCRIPTIONS: OrderedDict[tuple, BatchDescription] = OrderedDict()
_KEPT_DESCRIPTIONS = 8
# Descriptions a CUDA graph read while it was captured: never evicted (the graph holds their addresses).
_CAPTURED: set[tuple] = set()


def _token_ids(names: Sequence[str], index: dict[str, int], device: torch.device, token_shape: tuple) -> torch.Tensor:
    """int32 ids, one per token of a batch shaped ``token_shape`` ([batch, ...]): sample b's ``index[names[b]]``,
    -1 where the pool lacks the name."""
    per_sample = torch.tensor([index.get(n, -1) for n in names], dtype=torch.int32, device=device)
    return per_sample.repeat_interleave(math.prod(token_shape[1:]))


def batch_description(names: Sequence[str], index: dict[str, int], x: torch.Tensor) -> BatchDescription:
    """The description of x's tokens ([batch, ..., in]) for a pool whose adapters ``index`` numbers: sample b
    uses ``names[b]`` (-1 where the pool lacks it). Built on first use, kept for the next calls and layers."""
    key = (tuple(names), tuple(index.items()), x.device, tuple(x.shape[:-1]))
    found = _DESCRIPTIONS.get(key)
    if found is None:
        per_token = _token_ids(names, index, x.device, tuple(x.shape[:-1]))
        found = _DESCRIPTIONS[key] = describe_batch(per_token, len(index), check=False)  # valid by construction
        for old in [k for k in _DESCRIPTIONS if k not in _CAPTURED][: max(0, len(_DESCRIPTIONS) - _KEPT_DESCRIPTIONS)]:
            del _DESCRIPTIONS[old]
    else:
        _DESCRIPTIONS.move_to_end(key)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        _CAPTURED.add(key)
    return found


def reassign_adapter_names(captured: Sequence[str], names: Sequence[str]) -> int:
    """Serve ``names`` (one per sample) with a CUDA graph captured for ``model(..., adapter_names=captured)``:
    the batch descriptions every patched layer read during the capture are rewritten in place for ``names``
    (same batch size), so replaying the graph runs the new assignment. Call it outside the capture, before the
    replay. The descriptions stay cached under ``names`` (an eager call with ``names`` reuses them; one with
    ``captured`` builds new ones). Returns the number of descriptions rewritten (0: nothing was captured with
    ``captured``: run the model with it once first). Descriptions read during a capture are never evicted from
    the cache (the graph holds their addresses); warm up with the names eagerly before capturing (a description
    is built from the names on the host)."""
    captured, names = list(captured), list(names)
    if len(names) != len(captured) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"names must be {len(captured)} str, one per sample as captured, got {names!r}")
    rewritten = 0
    for key in [key for key in _DESCRIPTIONS if list(key[0]) == captured]:
        description = _DESCRIPTIONS.pop(key)
        _, index_items, device, token_shape = key
        refresh_description_(description, _token_ids(names, dict(index_items), device, token_shape), check=False)
        new_key = (tuple(names), index_items, device, token_shape)
        _DESCRIPTIONS[new_key] = description
        if key in _CAPTURED:
            _CAPTURED.discard(key)
            _CAPTURED.add(new_key)
        rewritten += 1
    return rewritten


def mixed_batch_forward(layer: nn.Module, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """PEFT's ``_mixed_batch_forward`` for a supported call (:func:`mixed_batch_unsupported_reason` is None)."""
    pool, index = layer_pool(layer, x.dtype)
    description = batch_description(names, index, x)
    base = layer.base_layer
    if is_peft_4bit_layer(layer):  # the 4-bit product fused, then the adapters on top of it
        return multi_lora_add(base_forward(layer, x), x, pool, description)
    return multi_lora_forward_unchecked(x, linear_weight(base), pool, description, base.bias)
