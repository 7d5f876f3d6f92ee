"""BottleneckAdapter: AdapterHub's bottleneck adapter module (same parameter names, so its weights load as they
are), computed by the fused :func:`fastpeft.ops.bottleneck.bottleneck_adapter`."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastpeft.ops.bottleneck import ACTIVATIONS, activation_fn, bottleneck_adapter

INIT_SCHEMES = ("bert", "mam_adapter", "houlsby")


class Activation(nn.Module):
    """The activation by AdapterHub's name, a module without parameters (it holds AdapterHub's place in
    ``adapter_down``, so that the state-dict keys match)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name.lower()
        self.fn = activation_fn(self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class BottleneckAdapter(nn.Module):
    """``y = residual + scaling * adapter_up(act(adapter_down(LN(x))))``, residual defaulting to x, fused.

    Args:
        hidden_size: d.
        bottleneck_size: m (AdapterHub's ``down_sample``); default ``hidden_size // reduction_factor``.
        reduction_factor: used when bottleneck_size is None (default 16).
        activation: relu, gelu, gelu_new, silu/swish, tanh, leakyrelu, sigmoid (AdapterHub's ``non_linearity``).
        scaling: a float, ``"learned"`` (one trained scalar) or ``"channel"`` (one per feature).
        ln_before: a LayerNorm on the adapter's input (AdapterHub's ``ln_before``).
        init_weights: ``"bert"`` (AdapterHub's default: normal(0, 0.02) weights, zero biases), ``"mam_adapter"``
            (up-projection zero: exactly the identity) or ``"houlsby"`` (truncated normal(0, 0.01)). Each starts
            at or near the identity.

    Parameters are named as AdapterHub's: ``adapter_down.{0|1}`` (after ``adapter_norm_before`` when
    ``ln_before``), ``adapter_up``, ``scaling``. ``forward(x, residual=None)`` takes [..., d] inputs.
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck_size: int | None = None,
        *,
        reduction_factor: float = 16,
        activation: str = "relu",
        scaling: float | str = 1.0,
        ln_before: bool = False,
        init_weights: str = "bert",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation.lower() not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if init_weights not in INIT_SCHEMES:
            raise ValueError(f"init_weights must be one of {INIT_SCHEMES}, got {init_weights!r}")
        if bottleneck_size is None:
            bottleneck_size = max(1, int(hidden_size // reduction_factor))
        if hidden_size < 1 or bottleneck_size < 1:
            raise ValueError(f"hidden_size and bottleneck_size must be >= 1, got {hidden_size}, {bottleneck_size}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.bottleneck_size, self.activation = hidden_size, bottleneck_size, activation.lower()
        layers: list[nn.Module] = []
        self.adapter_norm_before = nn.LayerNorm(hidden_size, **factory) if ln_before else None
        if ln_before:
            layers.append(self.adapter_norm_before)
        layers += [nn.Linear(hidden_size, bottleneck_size, **factory), Activation(self.activation)]
        self.adapter_down = nn.Sequential(*layers)
        self.adapter_up = nn.Linear(bottleneck_size, hidden_size, **factory)
        if scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1, **factory))
        elif scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden_size, **factory))
        elif isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
            self.scaling = float(scaling)
        else:
            raise ValueError(f"scaling must be a float, 'learned' or 'channel', got {scaling!r}")
        self.reset_parameters(init_weights)

    @property
    def down(self) -> nn.Linear:
        return self.adapter_down[1 if self.adapter_norm_before is not None else 0]

    @torch.no_grad()
    def reset_parameters(self, init_weights: str = "bert") -> None:
        """AdapterHub's initialisation schemes (see the class docstring)."""
        for linear in (self.down, self.adapter_up):
            nn.init.zeros_(linear.bias)
            if init_weights == "bert":
                linear.weight.normal_(0.0, 0.02)
            elif init_weights == "houlsby":
                nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
            elif linear is self.down:  # mam_adapter: Kaiming-uniform down, zero up
                nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(linear.weight)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        out_residual: torch.Tensor | None = None,
        out_norm: nn.LayerNorm | None = None,
    ) -> torch.Tensor:
        """x [..., d] -> ``out_norm(residual + adapter(x) + out_residual)`` (residual defaults to x; out_residual
        and out_norm, a model's own LayerNorm after the adapter, are optional and fused into the same op)."""
        return bottleneck_adapter(x, *self.weights(), activation=self.activation, residual=residual,
                                  **out_args(out_residual, out_norm), **self.norm_args())  # fmt: skip

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(down_weight [m, d], down_bias [m], up_weight [d, m], up_bias [d])."""
        return self.down.weight, self.down.bias, self.adapter_up.weight, self.adapter_up.bias

    def norm_args(self) -> dict:
        """The op's scaling and ln_before arguments for this adapter."""
        norm = self.adapter_norm_before
        if norm is None:
            return {"scaling": self.scaling}
        return {"scaling": self.scaling, "ln_weight": norm.weight, "ln_bias": norm.bias, "ln_eps": norm.eps}


def out_args(out_residual: torch.Tensor | None, out_norm: nn.LayerNorm | None) -> dict:
    args = {"out_residual": out_residual}
    if out_norm is not None:
        args |= {"out_ln_weight": out_norm.weight, "out_ln_bias": out_norm.bias, "out_ln_eps": out_norm.eps}
    return args

    def extra_repr(self) -> str:
        scaling = self.scaling if isinstance(self.scaling, float) else f"tensor{tuple(self.scaling.shape)}"
        return f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, scaling={scaling}"
