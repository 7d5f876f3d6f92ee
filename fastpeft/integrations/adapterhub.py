"""``patch_adapterhub_model``: the bottleneck adapters of a model prepared by AdapterHub's ``adapters`` run as
fastpeft's fused op, with AdapterHub's numbers.

AdapterHub's own layer logic (where each adapter sits, the residuals and layer norms around it, compositions
such as ``Stack``, ``Fuse`` and ``BatchSplit``) stays as it is; each ``Adapter`` / ``ParallelAdapter`` module's
forward, ``residual + scaling * up(act(down(LN(x))))``, becomes one fused call. Decided in two steps, as the PEFT
patch does:

- at patch time, from the adapter's structure: gating, ``ln_after``, PHM layers, stochastic depth,
  ``adapter_residual_before_ln`` and activations the op does not compute keep AdapterHub's forward (an activation
  is recognised by what it computes on a probe, not by its class: transformers' ``SiLUActivation`` is "silu");
- on every call, from the model's state then: AdapterHub's forward runs where the caller reads more than the
  adapter's output (an active ``Fuse`` holding the adapter reads its up-projection; ``output_adapter_gating_scores``
  reads the last element AdapterHub returns) and for dropout in training. So fusion layers added, or compositions
  activated, after patching are covered on the next call.

:func:`explain_adapterhub_patch` says per adapter which path a plain call runs now, and why.
"""

from __future__ import annotations

import functools
import types
import weakref

import torch
from torch import nn

from fastpeft.integrations.report import LayerPath, PatchReport
from fastpeft.ops.bottleneck import ACTIVATIONS, activation_fn, bottleneck_adapter

# Values where every activation the op knows differs from every other by far more than rounding (gelu and its
# tanh approximation differ by up to 5e-4 here); float64 so that a match means the same function.
_PROBE = torch.linspace(-12.0, 12.0, 481, dtype=torch.float64)
_PROBE_ATOL = 1e-9


@functools.cache  # called on every adapter call (call_reason); a failed import is not cached
def _adapterhub() -> types.SimpleNamespace:
    try:
        from adapters.composition import AdapterCompositionBlock, Fuse
        from adapters.methods.modeling import Adapter, ParallelAdapter
    except ImportError as exc:
        raise ImportError("patching AdapterHub models needs AdapterHub's adapters package: pip install adapters "
                          "(adapters 1.3 needs transformers ~4.57)") from exc  # fmt: skip
    return types.SimpleNamespace(adapter_classes=(Adapter, ParallelAdapter), block=AdapterCompositionBlock, fuse=Fuse)


def activation_name(f) -> str | None:
    """The name in :data:`fastpeft.ops.bottleneck.ACTIVATIONS` of the function ``f`` computes (a module or a
    function of one tensor), or None when it computes none of them or has parameters of its own."""
    if isinstance(f, nn.Module) and next(f.parameters(), None) is not None:
        return None
    try:
        y = f(_PROBE.clone())  # a clone: in-place activations (nn.ReLU(inplace=True)) must not change the probe
    except Exception:  # an activation that refuses float64 or a 1-D input is not one the op knows
        return None
    if not isinstance(y, torch.Tensor) or y.shape != _PROBE.shape or y.dtype != _PROBE.dtype:
        return None
    for name in ACTIVATIONS:
        if torch.allclose(y, activation_fn(name)(_PROBE), rtol=0.0, atol=_PROBE_ATOL):
            return name
    return None


def unsupported_reason(adapter: nn.Module) -> str | None:
    """None when the fused op computes this AdapterHub adapter module's forward exactly (its structure only; a
    call may still run AdapterHub's forward, :func:`call_reason`)."""
    if adapter.use_gating:
        return "gating"
    if adapter.add_layer_norm_after:
        return "ln_after"
    if adapter.adapter_residual_before_ln:
        return "adapter_residual_before_ln"
    if hasattr(adapter, "DropPath"):
        return "stochastic depth"
    layers = list(adapter.adapter_down)  # [LayerNorm if ln_before, down-projection, activation]
    expected = [nn.LayerNorm] * bool(adapter.add_layer_norm_before) + [nn.Linear, type(adapter.non_linearity)]
    if [type(m) for m in layers] != expected or type(adapter.adapter_up) is not nn.Linear:
        return "PHM layers" if any(type(m).__name__ == "PHMLayer" for m in adapter.modules()) else "structure"
    if activation_name(adapter.non_linearity.f) is None:
        return f"activation {type(adapter.non_linearity.f).__name__} computes none of {ACTIVATIONS}"
    return None


def _fused_names(setup, hub: types.SimpleNamespace) -> set[str]:
    """The adapters under any ``Fuse`` block of an active setup: the fusion layer reads their up-projections."""
    if isinstance(setup, hub.fuse):
        return set(setup.flatten())
    if isinstance(setup, hub.block):
        return set().union(*(_fused_names(child, hub) for child in setup))
    return set()


def call_reason(adapter: nn.Module, output_gating: bool = False) -> str | None:
    """Why this call of a patched adapter runs AdapterHub's forward (its caller reads more than the output, or
    dropout in training), or None when it runs fused. Read from the model's state on every call."""
    if output_gating:
        return "output_adapter_gating_scores reads the last element AdapterHub's forward returns"
    if adapter.training and adapter.dropout.p > 0:
        return "dropout in training (AdapterHub drops the adapter's output)"
    layer_ref = adapter.__dict__.get("_fastpeft_layer")
    layer = None if layer_ref is None else layer_ref()
    if layer is not None and len(getattr(layer, "adapter_fusion_layer", ())):
        hub = _adapterhub()
        if adapter.name in _fused_names(layer.get_active_setup(), hub):
            return "an active AdapterFusion reads its up-projection"
    return None


def _fused_forward(self: nn.Module, x: torch.Tensor, residual_input: torch.Tensor, output_gating: bool = False):
    if call_reason(self, output_gating) is not None:
        return type(self).forward(self, x, residual_input, output_gating)
    norm = self.adapter_down[0] if self.add_layer_norm_before else None
    down = self.adapter_down[-2]
    parallel = type(self).__name__ == "ParallelAdapter"
    # A parallel adapter returns its output alone; its residual comes later, in post_forward.
    residual = torch.zeros_like(x) if parallel else residual_input
    output = bottleneck_adapter(
        x, down.weight, down.bias, self.adapter_up.weight, self.adapter_up.bias,
        activation=self.__dict__["_fastpeft_activation"], scaling=self.scaling, residual=residual,
        ln_weight=None if norm is None else norm.weight, ln_bias=None if norm is None else norm.bias,
        ln_eps=1e-5 if norm is None else norm.eps,
    )  # fmt: skip
    # AdapterHub also returns the bottleneck activations and the up-projection; only a fusion layer reads them
    # (and gating scores the last one), and call_reason sends those calls to AdapterHub's forward.
    return output, None, None


def _require_adapterhub_model(model: object, function: str) -> None:
    """TypeError naming what ``function`` got unless ``model`` was prepared by AdapterHub (``adapters.init`` or an
    ``AutoAdapterModel``: it carries ``adapters_config``)."""
    if not isinstance(model, nn.Module) or getattr(model, "adapters_config", None) is None:
        raise TypeError(f"{function} expects an AdapterHub model (adapters.init(model) or an AutoAdapterModel), got "
                        f"a {type(model).__name__} that AdapterHub has not prepared")  # fmt: skip


def _adapter_layers(model: nn.Module, hub: types.SimpleNamespace) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """(name, adapter module, the layer holding it) for every bottleneck adapter module of ``model``."""
    owner = {}
    for module in model.modules():
        children = getattr(module, "adapters", None)
        if isinstance(children, nn.ModuleDict) and hasattr(module, "get_active_setup"):
            owner.update({id(child): module for child in children.values()})
    return [
        (name, module, owner.get(id(module)))
        for name, module in model.named_modules()
        if type(module) in hub.adapter_classes
    ]


def _is_patched(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _fused_forward


def patch_adapterhub_model(model: nn.Module) -> int:
    """Make every bottleneck adapter module of an AdapterHub model (``adapters.init(model)`` or an
    ``AutoAdapterModel``) whose structure the fused op expresses run it; returns how many run fastpeft's forward.
    Idempotent: call it again after adding adapters to cover them. Fusion layers, compositions and gating-score
    outputs may change after patching (:func:`call_reason` decides per call). TypeError when ``model`` is not an
    AdapterHub model (patching it would do nothing)."""
    hub = _adapterhub()
    _require_adapterhub_model(model, "patch_adapterhub_model")
    for _, module, layer in _adapter_layers(model, hub):
        if unsupported_reason(module) is None:
            module._fastpeft_activation = activation_name(module.non_linearity.f)
            module.__dict__["_fastpeft_layer"] = None if layer is None else weakref.ref(layer)
            module.forward = types.MethodType(_fused_forward, module)
    return sum(_is_patched(module) for module in model.modules())


def unpatch_adapterhub_model(model: nn.Module) -> nn.Module:
    """Restore AdapterHub's forward on every adapter :func:`patch_adapterhub_model` patched; returns ``model``."""
    for module in model.modules():
        if _is_patched(module):
            del module.forward
            for key in ("_fastpeft_activation", "_fastpeft_layer"):
                module.__dict__.pop(key, None)
    return model


def explain_adapterhub_patch(model: nn.Module) -> PatchReport:
    """Per bottleneck adapter module of an AdapterHub model: the path a plain call (no gating scores requested)
    runs now, in the model's current mode and active setup, and why. TypeError when ``model`` is not an
    AdapterHub model."""
    hub = _adapterhub()
    _require_adapterhub_model(model, "explain_adapterhub_patch")
    report = PatchReport()
    for name, module, _ in _adapter_layers(model, hub):
        if not _is_patched(module):
            reason = unsupported_reason(module) or "patch_adapterhub_model has not run on it"
            report.append(LayerPath(name, "not patched", reason))
            continue
        reason = call_reason(module)
        detail = f"fused bottleneck op, activation {module.__dict__['_fastpeft_activation']}"
        report.append(LayerPath(name, "AdapterHub", reason) if reason else LayerPath(name, "fused", detail))
    return report
