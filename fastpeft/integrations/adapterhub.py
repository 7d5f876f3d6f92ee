"""``patch_adapterhub_model``: the bottleneck adapters of a model prepared by AdapterHub's ``adapters`` run as
fastpeft's fused op, with AdapterHub's numbers.

AdapterHub's own layer logic (where each adapter sits, the residuals and layer norms around it, compositions
such as ``Stack`` and ``BatchSplit``) stays as it is; each ``Adapter`` / ``ParallelAdapter`` module's forward,
``residual + scaling * up(act(down(LN(x))))``, becomes one fused call. Adapters with options the op does not
express (gating, ``ln_after``, PHM layers, stochastic depth, dropout in training, ``adapter_residual_before_ln``)
keep AdapterHub's forward; :func:`patch_adapterhub_model` returns how many it patched.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from fastpeft.ops.bottleneck import bottleneck_adapter


def _adapter_classes() -> tuple[type, type]:
    try:
        from adapters.methods.modeling import Adapter, ParallelAdapter
    except ImportError as exc:
        raise ImportError("patch_adapterhub_model needs AdapterHub's adapters package: pip install adapters") from exc
    return Adapter, ParallelAdapter


def unsupported_reason(adapter: nn.Module) -> str | None:
    """None when the fused op computes this AdapterHub adapter module's forward exactly."""
    if adapter.use_gating:
        return "gating"
    if adapter.add_layer_norm_after:
        return "ln_after"
    if adapter.adapter_residual_before_ln:
        return "adapter_residual_before_ln"
    if hasattr(adapter, "DropPath"):
        return "stochastic depth"
    down = adapter.adapter_down
    linears = [m for m in down if isinstance(m, nn.Linear)]
    if len(linears) != 1 or not isinstance(adapter.adapter_up, nn.Linear):
        return "PHM layers"
    if adapter.non_linearity.f is None or _activation_name(adapter) is None:
        return "activation"
    return None


def _activation_name(adapter: nn.Module) -> str | None:
    from transformers import activations

    f = adapter.non_linearity.f
    if f is nn.functional.leaky_relu:
        return "leakyrelu"
    by_class = {activations.GELUActivation: "gelu", activations.NewGELUActivation: "gelu_new", nn.ReLU: "relu",
                nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}  # fmt: skip
    return by_class.get(type(f))


def _fused_forward(self: nn.Module, x: torch.Tensor, residual_input: torch.Tensor, output_gating: bool = False):
    if self.training and self.dropout.p > 0:  # AdapterHub drops the adapter's output: its own forward runs
        return type(self).forward(self, x, residual_input, output_gating)
    norm = getattr(self, "adapter_norm_before", None) if self.add_layer_norm_before else None
    down = next(m for m in self.adapter_down if isinstance(m, nn.Linear))
    scaling = self.scaling
    parallel = type(self).__name__ == "ParallelAdapter"
    # A parallel adapter returns its output alone; its residual comes later, in post_forward.
    residual = torch.zeros_like(x) if parallel else residual_input
    output = bottleneck_adapter(
        x, down.weight, down.bias, self.adapter_up.weight, self.adapter_up.bias, activation=_activation_name(self),
        scaling=scaling, residual=residual, ln_weight=None if norm is None else norm.weight,
        ln_bias=None if norm is None else norm.bias, ln_eps=1e-5 if norm is None else norm.eps,
    )  # fmt: skip
    # AdapterHub also returns the bottleneck activations and the up-projection; only AdapterFusion reads them,
    # and patch_adapterhub_model refuses models with fusion layers.
    return output, None, None


def patch_adapterhub_model(model: nn.Module) -> int:
    """Make every bottleneck adapter module of an AdapterHub model (``adapters.init(model)`` or an
    ``AutoAdapterModel``) run fastpeft's fused op; returns how many were patched. Idempotent."""
    adapter_cls, parallel_cls = _adapter_classes()
    if any(len(getattr(m, "adapter_fusion_layer", ())) for m in model.modules()):
        raise ValueError("AdapterFusion reads each adapter's up-projection, which the fused op does not return: "
                         "patch a model without fusion layers")  # fmt: skip
    patched = 0
    for module in model.modules():
        if type(module) in (adapter_cls, parallel_cls) and unsupported_reason(module) is None:
            module.forward = types.MethodType(_fused_forward, module)
            patched += 1
    return patched


def unpatch_adapterhub_model(model: nn.Module) -> None:
    """Restore AdapterHub's forward on every adapter :func:`patch_adapterhub_model` patched."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) is _fused_forward:
            del module.forward
