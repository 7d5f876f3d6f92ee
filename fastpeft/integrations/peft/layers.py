"""The bottom layer of the PEFT integration: what a PEFT LoRA layer holds and whether the fused ops express it.

Per adapter, an allow-list read from the layer's structure (:func:`adapter_unsupported_reason`); per layer, its
base (:func:`base_unsupported_reason`) and its state now (:func:`layer_state_reason`: disabled, merged, hooked);
per call, an inference plan kept while nothing it read has changed (:func:`inference_plan`); and the active
adapters' weights stacked as one (:func:`stacked`). Nothing here runs a kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastpeft._base_layers import is_linear_like, linear_weight
from fastpeft.integrations.peft.base_4bit import base_4bit_unsupported_reason, is_peft_4bit_layer
from fastpeft.ops.common import FLOAT_DTYPES


def peft_lora_linear_class() -> type:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as exc:
        raise ImportError("patching PEFT models needs peft: pip install 'fastpeft[peft]'") from exc
    return Linear


def require_peft_model(model: object, function: str) -> None:
    """TypeError naming what ``function`` got unless ``model`` is a PEFT model: a ``peft.PeftModel``, or any module
    holding PEFT tuner layers (``peft.inject_adapter_in_model``). Patching anything else would do nothing."""
    peft_lora_linear_class()  # the ImportError naming the extra, when peft is missing
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(model, nn.Module):
        raise TypeError(f"{function} expects a PEFT model (a torch.nn.Module), got {type(model).__name__}")
    if not isinstance(model, PeftModel) and not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise TypeError(f"{function} expects a PEFT model (peft.get_peft_model, PeftModel.from_pretrained or "
                        f"inject_adapter_in_model), got a {type(model).__name__} without any PEFT layer")  # fmt: skip


@dataclass
class PeftAdapter:
    """One adapter of a PEFT LoRA layer, as the fused op sees it."""

    lora_a: torch.Tensor  # [r, in_features]
    lora_b: torch.Tensor  # [out_features, r]
    lora_bias: torch.Tensor | None  # [out_features], PEFT's lora_bias=True
    scaling: float
    r: int
    dropout: float


def dropout_p(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def _is_plain_tensor(t: torch.Tensor | None) -> bool:
    # Tensor subclasses (torchao's quantized weights, DTensor shards) carry their own matmul semantics.
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def base_unsupported_reason(layer: nn.Module) -> str | None:
    """None when the fused op can compute the direct base of the PEFT layer: a plain floating-point nn.Linear
    or Conv1D, or (for PEFT's bitsandbytes 4-bit layers) a quantized NF4/FP4 weight."""
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
    return base_unsupported_reason(layer) or adapter_unsupported_reason(layer, adapter_name)


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
    if is_dora(layer, adapter_name) and lora_b.bias is not None:
        return "DoRA with lora_bias"
    return None


def is_dora(layer: nn.Module, adapter_name: str) -> bool:
    return bool(getattr(layer, "use_dora", {}).get(adapter_name, False))


def peft_adapter(layer: nn.Module, adapter_name: str = "default") -> PeftAdapter:
    """Read one adapter of a PEFT ``lora.Linear`` layer; ValueError when it cannot run fused (or is DoRA, which
    LoRALinear does not hold)."""
    if type(layer) is not peft_lora_linear_class():
        raise TypeError(f"layer must be a PEFT lora.Linear, got {type(layer).__name__}")
    reason = "DoRA" if is_dora(layer, adapter_name) else unsupported_reason(layer, adapter_name)
    if reason is not None:
        raise ValueError(f"adapter {adapter_name!r} of this layer cannot run fused: {reason}")
    return PeftAdapter(
        lora_a=layer.lora_A[adapter_name].weight,
        lora_b=layer.lora_B[adapter_name].weight,
        lora_bias=layer.lora_B[adapter_name].bias,
        scaling=float(layer.scaling[adapter_name]),
        r=int(layer.r[adapter_name]),
        dropout=dropout_p(layer.lora_dropout[adapter_name]),
    )


def peft_4bit_adapter(layer: nn.Module, adapter_name: str = "default"):
    """One adapter of a PEFT 4-bit LoRA layer as :class:`~fastpeft.integrations.peft.PeftAdapter`; ValueError
    when the fused op does not express it."""
    if not is_peft_4bit_layer(layer):
        raise TypeError(f"layer must be PEFT's lora.bnb.Linear4bit, got {type(layer).__name__}")
    reason = "DoRA" if is_dora(layer, adapter_name) else unsupported_reason(layer, adapter_name)
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
        dropout=dropout_p(layer.lora_dropout[adapter_name]),
    )


def base_hooked(base: nn.Module) -> bool:
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
    if base_hooked(layer._modules["base_layer"]):
        return "the base layer has forward hooks or a forward of its own (e.g. accelerate's offloading)"
    return None


def why_not_fused(layer: nn.Module, x_dtype: torch.dtype | None, autocast: bool) -> str | None:
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
    key = (x.dtype, autocast, layer.disable_adapters, layer.merged, base_hooked(base), active,
           *map(id, (*adapter, base, *params, bias)), params[2].data_ptr())  # fmt: skip
    cache = layer.__dict__.get("_fastpeft_plan")
    if cache is None or cache[0] != key:
        plan = None if autocast else (build or _plan)(layer, active, x.dtype, bias)
        cache = (key, plan)
        layer.__dict__["_fastpeft_plan"] = cache
    return cache[1]


def _plan(layer: nn.Module, name: str, dtype: torch.dtype, bias) -> tuple | None:
    if why_not_fused(layer, dtype, False) is not None or is_dora(layer, name):
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
        facts[name] = (reason, is_dora(layer, name), reason is None and layer.lora_B[name].bias is not None)
    if not torch.compiler.is_compiling():
        layer.__dict__["_fastpeft_adapter_facts"] = (key, facts)
    return facts


def to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def active_adapters(layer: nn.Module) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


def dropout_dtype(layer: nn.Module, adapter: str, x: torch.Tensor) -> torch.dtype:
    """The dtype of the tensor PEFT applies this adapter's dropout to (it casts x to lora_A's dtype first)."""
    return layer.lora_A[adapter].weight.dtype if getattr(layer, "cast_input_dtype_enabled", True) else x.dtype


def stacked(layer: nn.Module, adapters: list[str], dtype: torch.dtype) -> tuple:
    """(lora_a, lora_b, scaling, lora_bias) running all ``adapters`` as one: ranks stacked, each B scaled."""
    lora_as = [to_dtype(layer.lora_A[name].weight, dtype) for name in adapters]
    biases = [
        layer.scaling[name] * layer.lora_B[name].bias.to(dtype)
        for name in adapters
        if layer.lora_B[name].bias is not None
    ]
    lora_bias = sum(biases[1:], biases[0]) if biases else None
    if len(adapters) == 1:
        name = adapters[0]
        unscaled_bias = None if lora_bias is None else layer.lora_B[name].bias.to(dtype)
        return lora_as[0], to_dtype(layer.lora_B[name].weight, dtype), float(layer.scaling[name]), unscaled_bias
    lora_bs = [layer.lora_B[name].weight.to(dtype) * layer.scaling[name] for name in adapters]
    return torch.cat(lora_as), torch.cat(lora_bs, dim=1), 1.0, lora_bias


def dropout_mode(layer: nn.Module) -> str:
    return layer.__dict__.get("_fastpeft_dropout_mode", "torch")
