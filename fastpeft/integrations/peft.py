"""Make a PEFT model's LoRA layers run fastpeft's fused ``lora_linear``, with PEFT's numbers.

``patch_peft_model(model)`` replaces, per instance, the ``forward`` of every PEFT ``lora.Linear`` layer (that
class exactly: its subclasses, such as torchao's or INC's, have forwards of their own) whose direct base layer
is a floating-point ``nn.Linear`` or GPT-2 ``Conv1D`` holding plain tensors. The direct base, not
``get_base_layer()``: when LoRA is stacked on another tuner (a LoHa or LoKr layer in a mixed model),
``get_base_layer()`` descends to the innermost layer and fusing with its weight would drop that tuner.

The replacement decides per call, from the layer's state then (so adapters added, loaded, switched or deleted
through PEFT's API after patching are covered on the next call; new LoRA layers by patching again):

- fused, one call for all active adapters (their ranks stacked): vanilla LoRA with or without ``lora_bias``,
  rsLoRA, any number of active adapters, in eval and in training;
- dropout in training with the masks PEFT's ``nn.Dropout`` modules would draw (same generator, same order, one
  per adapter, drawn for the dtype PEFT casts x to), or, with ``dropout_mode="philox"`` and one adapter, drawn
  inside the kernels;
- DoRA as the only active adapter, with or without dropout (:mod:`fastpeft.ops.dora`);
- ``adapter_names`` mixed batches (``model(..., adapter_names=[...])``, one name per sample) in one
  ``multi_lora_linear`` call per layer (:mod:`fastpeft.integrations.peft_mixed_batch`), at inference;
- PEFT's LoRA layers on bitsandbytes 4-bit bases (QLoRA), in :mod:`fastpeft.integrations.peft_qlora`: the
  4-bit product and the adapter in one fused op, in training and inference, mixed batches included;
- PEFT's own forward otherwise: DoRA beside other adapters, other LoRA variants, merged or disabled adapters,
  other dropout modules, mixed batches the multi_lora op does not express (DoRA, lora_bias, training).

:func:`explain_patch` says, per layer, which path runs now and why. ``unpatch_peft_model`` removes the patch.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft._autocast import compute_dtype
from fastpeft._base_layers import is_linear_like, linear_weight
from fastpeft.ops.dora import dora_linear, dora_weight_norm, weight_row_norm_sq
from fastpeft.ops.dropout import DROPOUT_MODES, draw_mask
from fastpeft.ops.lora import FLOAT_DTYPES, lora_forward_no_dropout, lora_linear


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
    lora_bias: torch.Tensor | None  # [out_features], PEFT's lora_bias=True
    scaling: float
    r: int
    dropout: float


def _dropout_p(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def _is_plain_tensor(t: torch.Tensor | None) -> bool:
    # Tensor subclasses (torchao's quantized weights, DTensor shards) carry their own matmul semantics.
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def _base_unsupported_reason(layer: nn.Module) -> str | None:
    """None when the fused op can compute the direct base of the PEFT layer: a plain floating-point nn.Linear
    or Conv1D, or (for PEFT's bitsandbytes 4-bit layers) a quantized NF4/FP4 weight."""
    from fastpeft.integrations.peft_qlora import base_4bit_unsupported_reason, is_peft_4bit_layer

    if is_peft_4bit_layer(layer):
        return base_4bit_unsupported_reason(layer)
    base = layer.base_layer
    if not is_linear_like(base):
        return f"base layer is {type(base).__name__}, not nn.Linear or Conv1D"
    if base.weight.dtype not in FLOAT_DTYPES:
        return f"base weight dtype {base.weight.dtype}"
    if not (_is_plain_tensor(base.weight) and _is_plain_tensor(base.bias)):
        return f"base weight is a {type(base.weight).__name__}, not a plain tensor"
    return None


def unsupported_reason(layer: nn.Module, adapter_name: str) -> str | None:
    """None when ``adapter_name`` of the PEFT layer can run fused, else what stops it."""
    return _base_unsupported_reason(layer) or adapter_unsupported_reason(layer, adapter_name)


def adapter_unsupported_reason(layer: nn.Module, adapter_name: str) -> str | None:
    """None when ``adapter_name`` itself (whatever the base) is something the fused ops express.

    An allow-list, read from the layer's structure rather than from the config that built it: no LoRA variant but
    PEFT's DoRA (any other variant class, including ones a newer PEFT adds, keeps PEFT's forward), ``lora_A`` and
    ``lora_B`` plain ``nn.Linear`` modules (BD-LoRA's block-diagonal ones are not, and have no ``bias``), plain
    dropout. Nothing past a failed check is read, so an unknown structure is a reason, never an error."""
    if adapter_name not in layer.lora_A:
        return f"no adapter named {adapter_name!r}"
    variant = getattr(layer, "lora_variant", {}).get(adapter_name)
    if variant is not None and type(variant).__name__ != "DoraLinearVariant":
        return f"LoRA variant {type(variant).__name__}"
    lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        return f"lora_A / lora_B are {type(lora_a).__name__} / {type(lora_b).__name__}, not nn.Linear"
    if type(layer.lora_dropout[adapter_name]) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(layer.lora_dropout[adapter_name]).__name__}"
    if _is_dora(layer, adapter_name) and lora_b.bias is not None:
        return "DoRA with lora_bias"
    return None


def _is_dora(layer: nn.Module, adapter_name: str) -> bool:
    return bool(getattr(layer, "use_dora", {}).get(adapter_name, False))


def peft_adapter(layer: nn.Module, adapter_name: str = "default") -> PeftAdapter:
    """Read one adapter of a PEFT ``lora.Linear`` layer; ValueError when it cannot run fused (or is DoRA, which
    LoRALinear does not hold)."""
    if type(layer) is not _peft_lora_linear_class():
        raise TypeError(f"layer must be a PEFT lora.Linear, got {type(layer).__name__}")
    reason = "DoRA" if _is_dora(layer, adapter_name) else unsupported_reason(layer, adapter_name)
    if reason is not None:
        raise ValueError(f"adapter {adapter_name!r} of this layer cannot run fused: {reason}")
    return PeftAdapter(
        lora_a=layer.lora_A[adapter_name].weight,
        lora_b=layer.lora_B[adapter_name].weight,
        lora_bias=layer.lora_B[adapter_name].bias,
        scaling=float(layer.scaling[adapter_name]),
        r=int(layer.r[adapter_name]),
        dropout=_dropout_p(layer.lora_dropout[adapter_name]),
    )


def _base_hooked(base: nn.Module) -> bool:
    """Whether calling ``base`` does more than its weight's product: forward hooks, or a forward of the instance's
    own (accelerate's offloading hooks wrap it to bring the weight in first)."""
    return bool(base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__)


def layer_state_reason(layer: nn.Module) -> str | None:
    """Why no call of the PEFT layer runs fused in its current state (adapters disabled or merged, a hooked base
    layer), or None. Checked on every call, by every patched forward: these change after patching."""
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapters merged into the base weight"
    if _base_hooked(layer._modules["base_layer"]):
        return "the base layer has forward hooks or a forward of its own (e.g. accelerate's offloading)"
    return None


def _why_not_fused(layer: nn.Module, x_dtype: torch.dtype | None, autocast: bool) -> str | None:
    """Why the layer's next plain call (no extra arguments) keeps PEFT's forward, or None when it runs fused."""
    state = layer_state_reason(layer)
    if state is not None:
        return state
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active:
        return "no active adapter on this layer"
    reasons = _adapter_facts(layer)
    for name in active:
        reason = reasons[name][0]
        if reason is not None:
            return f"adapter {name!r}: {reason}"
    dora = [name for name in active if reasons[name][1]]
    if dora and len(active) > 1:
        return f"DoRA adapter {dora[0]!r} with other active adapters"  # PEFT scales their deltas too
    if x_dtype is not None and x_dtype != layer.base_layer.weight.dtype and not autocast:
        return "input dtype differs from the base weight's"  # nn.Linear would refuse it: PEFT raises its error
    return None


def inference_plan(layer: nn.Module, x: torch.Tensor, build=None) -> tuple | None:
    """What an inference call of a PEFT LoRA layer with one plain adapter active passes to the fused op, or None
    (the general path decides): ``build(layer, adapter, x_dtype, bias)``'s tuple (default: a plain layer's
    (adapter, weight, lora_a, lora_b, bias), all in x's dtype). Kept on the layer while the modules, parameters,
    active adapter, flags and x's dtype are unchanged: on a CPU the checks behind it cost more than a small
    layer's GEMMs. The key reads nn.Module's registries directly (no __getattr__ per read)."""
    active = layer.active_adapter  # a name, or a list of names (PEFT >= 0.14 keeps a list)
    if not isinstance(active, str):
        if len(active) != 1:
            return None
        active = active[0]
    if layer.training:
        return None
    modules = layer._modules
    adapter = [modules[kind]._modules.get(active) for kind in ("lora_A", "lora_B", "lora_dropout")]
    base = modules["base_layer"]
    params = [None if m is None else m._parameters.get("weight") for m in (*adapter[:2], base)]
    bias = base._parameters.get("bias")
    if params[2] is None:
        return None
    autocast = torch.is_autocast_enabled(x.device.type)
    key = (x.dtype, autocast, layer.disable_adapters, layer.merged, _base_hooked(base), active,
           *map(id, (*adapter, base, *params, bias)), params[2].data_ptr())  # fmt: skip
    cache = layer.__dict__.get("_fastpeft_plan")
    if cache is None or cache[0] != key:
        plan = None if autocast else (build or _plan)(layer, active, x.dtype, bias)
        cache = (key, plan)
        layer.__dict__["_fastpeft_plan"] = cache
    return cache[1]


def _plan(layer: nn.Module, name: str, dtype: torch.dtype, bias) -> tuple | None:
    if _why_not_fused(layer, dtype, False) is not None or _is_dora(layer, name):
        return None
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    weight = linear_weight(layer.base_layer)
    if layer.lora_B[name].bias is not None or any(t.dtype != dtype for t in (lora_a, lora_b, weight)):
        return None
    if bias is not None and bias.dtype != dtype:
        return None
    return name, weight, lora_a, lora_b, bias


def plain_adapter_reasons(layer: nn.Module) -> dict[str, str | None]:
    """Per adapter of the PEFT layer: None when it runs fused as plain LoRA, else why not (DoRA, lora_bias, or
    :func:`unsupported_reason`)."""
    return {
        name: "DoRA" if dora else reason or ("lora_bias" if lora_bias else None)
        for name, (reason, dora, lora_bias) in _adapter_facts(layer).items()
    }


def _adapter_facts(layer: nn.Module) -> dict[str, tuple[str | None, bool, bool]]:
    """Per adapter of the PEFT layer: (:func:`unsupported_reason`, DoRA, has lora_bias). Kept while the
    adapters' modules and the base weight are the same objects (checked through nn.Module's registries, no
    __getattr__ per read); while torch.compile traces, computed (once, then guarded)."""
    modules = layer._modules
    lora_a, lora_b, dropout = (modules[kind]._modules for kind in ("lora_A", "lora_B", "lora_dropout"))
    base = modules["base_layer"]
    weight = base._parameters.get("weight")
    key = (
        id(base), id(weight), None if weight is None else weight.dtype,
        *((name, id(a), id(lora_b.get(name)), id(dropout.get(name)),
           id(getattr(lora_b.get(name), "_parameters", {}).get("bias"))) for name, a in lora_a.items()),
    )  # fmt: skip
    cache = layer.__dict__.get("_fastpeft_adapter_facts")
    if cache is not None and cache[0] == key and not torch.compiler.is_compiling():
        return cache[1]
    facts = {}
    for name in lora_a:
        reason = unsupported_reason(layer, name)
        # lora_B's bias is read only where the structure is known (a supported adapter's lora_B is an nn.Linear).
        facts[name] = (reason, _is_dora(layer, name), reason is None and layer.lora_B[name].bias is not None)
    if not torch.compiler.is_compiling():
        layer.__dict__["_fastpeft_adapter_facts"] = (key, facts)
    return facts


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _active_adapters(layer: nn.Module) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _dropout_dtype(layer: nn.Module, adapter: str, x: torch.Tensor) -> torch.dtype:
    """The dtype of the tensor PEFT applies this adapter's dropout to (it casts x to lora_A's dtype first)."""
    return layer.lora_A[adapter].weight.dtype if getattr(layer, "cast_input_dtype_enabled", True) else x.dtype


def _stacked(layer: nn.Module, adapters: list[str], dtype: torch.dtype) -> tuple:
    """(lora_a, lora_b, scaling, lora_bias) running all ``adapters`` as one: ranks stacked, each B scaled."""
    lora_as = [_to(layer.lora_A[name].weight, dtype) for name in adapters]
    biases = [
        layer.scaling[name] * layer.lora_B[name].bias.to(dtype)
        for name in adapters
        if layer.lora_B[name].bias is not None
    ]
    lora_bias = sum(biases[1:], biases[0]) if biases else None
    if len(adapters) == 1:
        name = adapters[0]
        unscaled_bias = None if lora_bias is None else layer.lora_B[name].bias.to(dtype)
        return lora_as[0], _to(layer.lora_B[name].weight, dtype), float(layer.scaling[name]), unscaled_bias
    lora_bs = [layer.lora_B[name].weight.to(dtype) * layer.scaling[name] for name in adapters]
    return torch.cat(lora_as), torch.cat(lora_bs, dim=1), 1.0, lora_bias


def _cached(layer: nn.Module, slot: str, key: tuple, compute) -> torch.Tensor:
    """``compute()``, kept on the layer until ``key`` changes (tensors' storage and version counters in it).
    While torch.compile traces, what is kept is used as it is (the key's data pointers cannot be traced), or
    computed in the graph when nothing is kept: run the model once eagerly after changing its adapters."""
    cache = layer.__dict__.setdefault("_fastpeft_cache", {})
    if torch.compiler.is_compiling():
        return cache[slot][1] if slot in cache else compute()
    if slot not in cache or cache[slot][0] != key:
        cache[slot] = (key, compute())
    return cache[slot][1]


def _version_key(*tensors: torch.Tensor) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def _mode(layer: nn.Module) -> str:
    return layer.__dict__.get("_fastpeft_dropout_mode", "torch")


def _dora_forward(layer: nn.Module, name: str, x: torch.Tensor, weight, bias) -> torch.Tensor:
    """PEFT's DoRA for one adapter, fused: ||W||^2 cached while W is unchanged, the whole norm while A, B and the
    weight are unchanged and the layer is in eval (in training A and B move every step). Dropout in training
    draws PEFT's mask whatever the dropout mode (dora_linear has no in-kernel mode)."""
    lora_a = layer.lora_A[name].weight.to(x.dtype)
    lora_b = layer.lora_B[name].weight.to(x.dtype)
    scaling = float(layer.scaling[name])
    base_weight = layer.base_layer.weight
    norm_sq = _cached(
        layer, "weight_norm_sq", (*_version_key(base_weight), x.dtype), lambda: weight_row_norm_sq(weight)
    )
    norm = None
    if not layer.training:
        key = (*_version_key(base_weight, layer.lora_A[name].weight, layer.lora_B[name].weight), x.dtype, scaling)
        norm = _cached(layer, f"norm:{name}", key, lambda: dora_weight_norm(weight, lora_a, lora_b, scaling, norm_sq))
    magnitude = layer.lora_magnitude_vector[name].weight
    p = _dropout_p(layer.lora_dropout[name]) if layer.training else 0.0
    mask = draw_mask(tuple(x.shape), p, _dropout_dtype(layer, name, x), x.device) if p > 0 else None
    return dora_linear(x, weight, lora_a, lora_b, magnitude, scaling, bias, weight_norm_sq=norm_sq, weight_norm=norm,
                       dropout_p=p, dropout_mask=mask)  # fmt: skip


def _fused_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    names = kwargs.get("adapter_names")
    if not args and names is not None and len(kwargs) == 1:  # a mixed batch: one multi_lora call if it can
        from fastpeft.integrations.peft_mixed_batch import mixed_batch_forward, mixed_batch_unsupported_reason

        if mixed_batch_unsupported_reason(self, names, x) is None:
            return mixed_batch_forward(self, x, names)
    # Under torch.compile the checks are traced once and guarded: no cache (its keys read data pointers).
    plan = None if args or kwargs or torch.compiler.is_compiling() else inference_plan(self, x)
    if plan is not None:
        name, weight, lora_a, lora_b, bias = plan
        return lora_forward_no_dropout(x, weight, lora_a, lora_b, float(self.scaling[name]), bias)
    if args or kwargs or _why_not_fused(self, x.dtype, torch.is_autocast_enabled(x.device.type)) is not None:
        self.__dict__.pop("_fastpeft_cache", None)  # merged or unmerged weights may follow: cached norms go
        return type(self).forward(self, x, *args, **kwargs)  # extra arguments include adapter_names
    base = self.base_layer
    dtype = compute_dtype(x)
    weight = _to(linear_weight(base), dtype)
    bias = None if base.bias is None else _to(base.bias, dtype)
    adapters = _active_adapters(self)
    if _is_dora(self, adapters[0]):  # the only active adapter (_why_not_fused)
        return _dora_forward(self, adapters[0], x.to(dtype), weight, bias)
    ps = [_dropout_p(self.lora_dropout[name]) if self.training else 0.0 for name in adapters]
    lora_a, lora_b, scaling, lora_bias = _stacked(self, adapters, dtype)
    if not any(ps):
        return lora_linear(_to(x, dtype), weight, lora_a, lora_b, scaling, bias, lora_bias=lora_bias)
    if len(adapters) == 1 and _mode(self) == "philox":
        return lora_linear(x.to(dtype), weight, lora_a, lora_b, scaling, bias, lora_bias=lora_bias, dropout_p=ps[0],
                           dropout_mode="philox")  # fmt: skip
    # PEFT's masks: each adapter's nn.Dropout draws one, in the adapters' order, for x cast to its A's dtype.
    masks = [
        draw_mask(tuple(x.shape), p, _dropout_dtype(self, name, x), x.device)
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


def is_patched(module: nn.Module) -> bool:
    """True when ``module`` is a PEFT LoRA layer running fastpeft's forward (patch_peft_model)."""
    from fastpeft.integrations.peft_qlora import fused_forward_4bit

    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) in (_fused_forward, fused_forward_4bit)


def patch_peft_model(model: nn.Module, *, dropout_mode: str = "torch") -> nn.Module:
    """Make the LoRA layers of a PEFT model run fastpeft's fused op; returns ``model``, patched in place.

    ``dropout_mode``: ``"torch"`` draws each dropout mask as PEFT's nn.Dropout would (PEFT's numbers under the
    same seed); ``"philox"`` draws it inside the kernels (no dropped copy of x; other masks than PEFT's, so
    seeded runs no longer match PEFT's bit for bit). Patching again sets the mode anew.

    Covers PEFT ``lora.Linear`` layers directly on a floating-point ``nn.Linear`` or Conv1D, and PEFT's LoRA
    layers on bitsandbytes 4-bit bases (``lora.bnb.Linear4bit``: QLoRA models, through
    :mod:`fastpeft.integrations.peft_qlora`), plain calls and ``adapter_names`` mixed batches (one multi_lora
    launch per layer, inference). Other layers (LoRA stacked on another tuner, 8-bit or tensor-subclass bases),
    and calls the fused ops do not express (DoRA beside other adapters or in a mixed batch, merged or disabled
    adapters), keep PEFT's own forward.
    Idempotent: call it again after adding LoRA layers to cover them. :func:`explain_patch` shows what runs where.
    """
    if dropout_mode not in DROPOUT_MODES:
        raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}, got {dropout_mode!r}")
    from fastpeft.integrations.peft_qlora import fused_forward_4bit, is_peft_4bit_layer

    lora_linear_class = _peft_lora_linear_class()
    for module in model.modules():
        four_bit = is_peft_4bit_layer(module)
        if (type(module) is lora_linear_class or four_bit) and _base_unsupported_reason(module) is None:
            module.forward = types.MethodType(fused_forward_4bit if four_bit else _fused_forward, module)
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


@dataclass(frozen=True)
class LayerPath:
    """What a PEFT LoRA layer runs on a plain call in the model's current state, and why."""

    name: str
    path: str  # "fused", "PEFT" or "not patched"
    detail: str


class PatchReport(list):
    """The :class:`LayerPath` rows of :func:`explain_patch`; ``str()`` gives a table."""

    def __str__(self) -> str:
        width = max((len(row.name) for row in self), default=5)
        lines = [f"{'layer':<{width}}  {'path':<12}  detail"]
        lines += [f"{row.name:<{width}}  {row.path:<12}  {row.detail}" for row in self]
        return "\n".join(lines)


def _explain(layer: nn.Module, adapter_names: list[str] | None) -> tuple[str, str]:
    from fastpeft.integrations.peft_qlora import explain_4bit, is_peft_4bit_layer

    if is_patched(layer) and is_peft_4bit_layer(layer) and adapter_names is None:
        return explain_4bit(layer)
    if not is_patched(layer):
        if type(layer) is not _peft_lora_linear_class() and not is_peft_4bit_layer(layer):
            return "not patched", f"{type(layer).__name__} is not PEFT's lora.Linear"
        return "not patched", _base_unsupported_reason(layer) or "patch_peft_model has not run on it"
    if adapter_names is not None:
        from fastpeft.integrations.peft_mixed_batch import mixed_batch_unsupported_reason

        reason = mixed_batch_unsupported_reason(layer, adapter_names, None)
        if reason is not None:
            return "PEFT", f"mixed batch: {reason}"
        used = sorted({n for n in adapter_names if n in layer.lora_A})
        return "fused", f"mixed batch in one multi_lora call, adapters {used} on this layer"
    reason = _why_not_fused(layer, None, False)
    if reason is not None:
        return "PEFT", reason
    adapters = _active_adapters(layer)
    ps = [_dropout_p(layer.lora_dropout[name]) for name in adapters]
    detail = f"adapters {adapters} in one call" if len(adapters) > 1 else f"adapter {adapters[0]!r}"
    if _is_dora(layer, adapters[0]):
        detail += " (DoRA)"
    if layer.training and any(ps):
        in_kernel = _mode(layer) == "philox" and len(adapters) == 1 and not _is_dora(layer, adapters[0])
        how = "in-kernel (philox)" if in_kernel else "with PEFT's mask" + ("s" if len(adapters) > 1 else "")
        detail += f", dropout p={ps[0] if len(ps) == 1 else ps} {how}"
    return "fused", detail


def explain_patch(model: nn.Module, adapter_names: list[str] | None = None) -> PatchReport:
    """Per PEFT LoRA layer of ``model``: the path a plain call runs now (train/eval mode, active adapters, merged
    or disabled state as they are) and why; with ``adapter_names``, the path of that mixed batch (shapes and
    input dtype are not known here and not checked)."""
    from peft.tuners.lora.layer import LoraLayer

    report = PatchReport()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            report.append(LayerPath(name, *_explain(module, adapter_names)))
    return report
