"""LoRALinear: an ``nn.Linear`` with one LoRA adapter, computed by the fused ``fastpeft::lora_linear`` op."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastpeft._autocast import compute_dtype
from fastpeft.ops.lora import FLOAT_DTYPES, lora_linear


class LoRALinear(nn.Module):
    """``y = base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` with PEFT's semantics, fused.

    Args:
        base_layer: the frozen ``nn.Linear`` (weight [out_features, in_features], fp16/bf16/fp32).
        r: the LoRA rank (>= 1).
        lora_alpha: ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on A's input, in training mode only.
        use_rslora: rank-stabilised scaling.

    Parameters ``lora_A`` [r, in_features] (Kaiming-uniform, as PEFT) and ``lora_B`` [out_features, r] (zeros,
    so the layer starts equal to the base layer) take the base weight's dtype and device. The base layer's
    parameters are frozen. Inputs are [..., in_features]; outputs [..., out_features].

    The fused op runs whenever dropout is inactive (``lora_dropout == 0`` or eval mode); with active dropout
    the LoRA branch reads a different input than the base GEMM and runs unfused.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        if base_layer.weight.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"base_layer.weight must be float16, bfloat16 or float32, got {base_layer.weight.dtype} "
                "(quantized base layers need their own module)"
            )
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default initialisation: A Kaiming-uniform (a = sqrt(5)), B zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_peft(cls, layer: nn.Module, adapter_name: str = "default") -> LoRALinear:
        """A LoRALinear holding a copy of one adapter of a PEFT ``lora.Linear`` layer built on ``nn.Linear``.

        Keeps PEFT's scaling, dropout and adapter dtype; the base layer is shared, not copied. Raises
        ValueError for what this module does not express (DoRA, lora_bias, other base layers).
        """
        from fastpeft.integrations.peft import peft_adapter

        adapter = peft_adapter(layer, adapter_name)
        module = cls(layer.base_layer, r=adapter.r, lora_dropout=adapter.dropout)
        module.scaling = adapter.scaling
        module.lora_alpha = adapter.scaling * adapter.r
        with torch.no_grad():
            module.lora_A = nn.Parameter(adapter.lora_a.detach().clone())
            module.lora_B = nn.Parameter(adapter.lora_b.detach().clone())
        return module

    def _delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, [out_features, in_features]."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Fold the adapter into the base weight (``W += scaling * B @ A``); forward then runs the base alone.

        With ``safe_merge`` the merged weight is checked for non-finite values before it is committed.
        """
        if self.merged:
            return
        weight = self.base_layer.weight
        merged = weight.float() + self._delta_weight()
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("merge would put non-finite values into the base weight; adapter left unmerged")
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (``W -= scaling * B @ A``), up to the rounding of the weight's dtype."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_(weight.float() - self._delta_weight())
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        dtype = compute_dtype(x)
        weight = self.base_layer.weight.to(dtype)
        bias = None if self.base_layer.bias is None else self.base_layer.bias.to(dtype)
        lora_a, lora_b = self.lora_A.to(dtype), self.lora_B.to(dtype)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            base = nn.functional.linear(x.to(dtype), weight, bias)
            lora = nn.functional.linear(nn.functional.linear(self.lora_dropout(x.to(dtype)), lora_a), lora_b)
            return base + self.scaling * lora
        return lora_linear(x.to(dtype), weight, lora_a, lora_b, self.scaling, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, merged={self.merged}"
        )
