"""LoRALinear: an ``nn.Linear`` or GPT-2 ``Conv1D`` with one LoRA adapter, computed by ``fastpeft::lora_linear``."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastpeft._autocast import compute_dtype
from fastpeft._base_layers import check_fan_in_fan_out, is_linear_like, linear_weight
from fastpeft.ops.common import FLOAT_DTYPES
from fastpeft.ops.dropout import DROPOUT_MODES, check_p
from fastpeft.ops.lora import lora_linear


class LoRALinear(nn.Module):
    """``y = base_layer(x) + scaling * (lora_B(lora_A(dropout(x))) + lora_bias)`` with PEFT's semantics, fused.

    Args:
        base_layer: the frozen ``nn.Linear`` (weight [out_features, in_features]) or GPT-2's ``Conv1D`` (weight
            [in_features, out_features]), fp16/bf16/fp32.
        r: the LoRA rank (>= 1).
        lora_alpha: ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on A's input, in training mode only.
        use_rslora: rank-stabilised scaling.
        lora_bias: give lora_B a bias (PEFT's ``lora_bias=True``), initialised to zero.
        fan_in_fan_out: the weight layout; None infers it (True for Conv1D), a value that disagrees with the base
            layer raises ValueError.
        dropout_mode: ``"torch"`` (nn.Dropout's mask, PEFT's numbers under the same seed) or ``"philox"`` (the
            mask drawn inside the kernels, no dropped copy of x): see :func:`fastpeft.lora_linear`.

    Parameters ``lora_A`` [r, in_features] (Kaiming-uniform, as PEFT), ``lora_B`` [out_features, r] (zeros, so
    the layer starts equal to the base layer) and ``lora_B_bias`` [out_features] (with ``lora_bias``) take the
    base weight's dtype and device. The base layer's parameters are frozen. Inputs are [..., in_features];
    outputs [..., out_features]. Every call runs the fused op, dropout included (its mask drawn as
    ``nn.Dropout`` would draw it, so seeded runs match PEFT's).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_bias: bool = False,
        fan_in_fan_out: bool | None = None,
        dropout_mode: str = "torch",
    ) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(
                f"base_layer must be an nn.Linear or a transformers Conv1D, got {type(base_layer).__name__}"
            )
        if base_layer.weight.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"base_layer.weight must be float16, bfloat16 or float32, got {base_layer.weight.dtype} "
                "(quantized base layers need their own module)"
            )
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        check_p(lora_dropout, "lora_dropout")
        if dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}, got {dropout_mode!r}")
        self.dropout_mode = dropout_mode
        self.fan_in_fan_out = check_fan_in_fan_out(base_layer, fan_in_fan_out)
        self.base_layer = base_layer.requires_grad_(False)
        self.out_features, self.in_features = linear_weight(base_layer).shape
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.lora_B_bias = nn.Parameter(torch.empty(self.out_features, **factory)) if lora_bias else None
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default initialisation: A Kaiming-uniform (a = sqrt(5)), B (and its bias) zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.lora_B_bias is not None:
            nn.init.zeros_(self.lora_B_bias)

    @classmethod
    def from_adapter(
        cls,
        base_layer: nn.Module,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        *,
        lora_dropout: float = 0.0,
        lora_bias: torch.Tensor | None = None,
    ) -> LoRALinear:
        """A LoRALinear on ``base_layer`` (shared, not copied) holding copies of a trained adapter: ``lora_a``
        [r, in_features], ``lora_b`` [out_features, r], ``lora_bias`` [out_features] or None, in their dtype.
        ``fastpeft.from_peft_layer`` builds one from a PEFT layer."""
        r = lora_a.shape[0]
        if lora_a.dim() != 2 or lora_b.shape != (lora_b.shape[0], r):
            raise ValueError(
                f"lora_a [r, in] and lora_b [out, r] disagree: {tuple(lora_a.shape)}, {tuple(lora_b.shape)}"
            )
        module = cls(base_layer, r=r, lora_dropout=lora_dropout, lora_bias=lora_bias is not None)
        module.scaling = scaling
        module.lora_alpha = scaling * r
        with torch.no_grad():
            module.lora_A = nn.Parameter(lora_a.detach().clone())
            module.lora_B = nn.Parameter(lora_b.detach().clone())
            if lora_bias is not None:
                module.lora_B_bias = nn.Parameter(lora_bias.detach().clone())
        return module

    def _delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, [out_features, in_features]."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Fold the adapter into the base weight (``W += scaling * B @ A``, and lora_B's bias into the base
        bias); forward then runs the base alone. With ``safe_merge`` the merged weight is checked for non-finite
        values before it is committed."""
        if self.merged:
            return
        base_bias = self.base_layer.bias
        if self.lora_B_bias is not None and base_bias is None:
            raise ValueError("cannot merge lora_bias into a base layer without a bias (as in PEFT)")
        weight = linear_weight(self.base_layer)
        merged = weight.float() + self._delta_weight()
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("merge would put non-finite values into the base weight; adapter left unmerged")
        weight.copy_(merged)
        if self.lora_B_bias is not None:
            base_bias.copy_(base_bias.float() + self.scaling * self.lora_B_bias.float())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`, up to the rounding of the weight's dtype."""
        if not self.merged:
            return
        weight = linear_weight(self.base_layer)
        weight.copy_(weight.float() - self._delta_weight())
        if self.lora_B_bias is not None:
            bias = self.base_layer.bias
            bias.copy_(bias.float() - self.scaling * self.lora_B_bias.float())
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype (autocast's under autocast)."""
        if self.merged:
            return self.base_layer(x)
        dtype = compute_dtype(x)
        bias = None if self.base_layer.bias is None else self.base_layer.bias.to(dtype)
        lora_bias = None if self.lora_B_bias is None else self.lora_B_bias.to(dtype)
        dropout_p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return lora_linear(
            x.to(dtype),
            linear_weight(self.base_layer).to(dtype),
            self.lora_A.to(dtype),
            self.lora_B.to(dtype),
            self.scaling,
            bias,
            lora_bias=lora_bias,
            dropout_p=dropout_p,
            dropout_mode=self.dropout_mode,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, lora_bias={self.lora_B_bias is not None}, merged={self.merged}"
        )
