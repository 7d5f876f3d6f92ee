"""Linear4bit (a 4-bit NF4/FP4 linear layer, bitsandbytes' format) and QLoRALinear (a 4-bit base with a LoRA
adapter, one fused op), computed by :mod:`fastpeft.ops.qlora`."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from fastpeft._autocast import compute_dtype
from fastpeft.ops.common import FLOAT_DTYPES
from fastpeft.ops.dropout import check_p
from fastpeft.ops.qlora import Weight4bit, qlora_linear
from fastpeft.ops.quant_4bit import QuantState, check_quant_state, dequantize_4bit, quantize_4bit, restore_bnb_layout

REQUANTIZE_WARNING = (
    "re-quantizing a merged weight to 4 bits is lossy: the adapter's delta is rounded to the 4-bit grid, so the "
    "result differs from the unmerged layer (merged_linear() keeps it exact in 16/32 bits)"
)


class Linear4bit(nn.Module):
    """``y = x @ dequantize_4bit(weight).T + bias`` with the weight in bitsandbytes' 4-bit layout, never
    dequantized in memory (:func:`fastpeft.ops.qlora.matmul_4bit`).

    Args:
        packed: the 4-bit bytes of W [out_features, in_features] (uint8, or another dtype viewing the bytes).
        quant_state: its :class:`~fastpeft.ops.quant_4bit.QuantState`.
        bias: [out_features] or None (kept as a frozen parameter).
        compute_dtype: the dtype x is cast to for the product (bitsandbytes' ``compute_dtype``; the output is
            cast back to x's dtype); None computes in x's dtype (autocast's, under autocast).

    ``state_dict()`` holds transformers' 4-bit keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
    ``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__<type>``), so a
    bitsandbytes layer's state dict loads here and this one's into bitsandbytes. ``.to(device)`` moves the
    state; ``.half()`` and friends leave the 4-bit weight and its fp32 absmax as they are.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        quant_state: QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_quant_state(packed, quant_state)
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise TypeError(f"compute_dtype must be float16, bfloat16, float32 or None, got {compute_dtype}")
        self.out_features, self.in_features = (int(s) for s in quant_state.shape)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        self.register_buffer("weight", packed.detach().reshape(-1, 1))
        self.quant_state = quant_state
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype
        self._weight4bit: Weight4bit | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        """Quantize an ``nn.Linear`` (fp16/bf16/fp32 weight [out, in]) as bitsandbytes would, byte for byte."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        packed, state = quantize_4bit(linear.weight.detach(), quant_type, blocksize, double_quant)
        return cls(packed, state, linear.bias, compute_dtype)

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> Linear4bit:
        """The same layer from a ``bitsandbytes.nn.Linear4bit`` (its bytes and state shared, not copied)."""
        weight = getattr(layer, "weight", None)
        if getattr(weight, "quant_state", None) is None:
            raise TypeError(f"layer must be a quantized bitsandbytes Linear4bit, got {type(layer).__name__} "
                            "(bitsandbytes quantizes on the first .to(device) or forward)")  # fmt: skip
        restore_bnb_layout(weight)  # bitsandbytes' CPU inference may have repacked it into its private layout
        state = QuantState.from_bnb(weight.quant_state)
        return cls(weight.data, state, layer.bias, getattr(layer, "compute_dtype", None))

    def kernel_weight(self) -> Weight4bit:
        """The weight as the kernels take it (state checked once, then cached until the module moves)."""
        if self._weight4bit is None:
            self._weight4bit = Weight4bit.from_state(self.weight, self.quant_state)
        return self._weight4bit

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [out_features, in_features], bitsandbytes' dequantized values (in ``dtype`` when given)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` holding the dequantized weight (in the state's dtype) and the bias."""
        weight = self.dequantize()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)  # fmt: skip
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def dtype_for(self, x: torch.Tensor) -> torch.dtype:
        """The dtype this layer computes ``x`` in: compute_dtype, else what nn.Linear would (autocast-aware)."""
        return self.compute_dtype or compute_dtype(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features], computed in compute_dtype, returned in x's dtype."""
        dtype = self.dtype_for(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return qlora_linear(x.to(dtype), self.kernel_weight(), None, None, None, bias=bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # The state is not a buffer: .half() must not cast the fp32 absmax. Move it to wherever the bytes went.
        super()._apply(fn, recurse)
        self.quant_state = self.quant_state.to(self.weight.device)
        self._weight4bit = None
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        for key, value in self.quant_state.as_dict().items():
            destination[prefix + "weight." + key] = value
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            return
        items = {k[len(prefix) + 7 :]: v for k, v in state_dict.items() if k.startswith(prefix + "weight.")}
        packed = state_dict[prefix + "weight"].to(self.weight.device)
        try:
            state = QuantState.from_dict(items, self.weight.device)
            check_quant_state(packed, state)
            if tuple(state.shape) != (self.out_features, self.in_features):
                raise ValueError(f"the checkpoint's weight is {tuple(state.shape)}, this layer "
                                 f"{(self.out_features, self.in_features)}")  # fmt: skip
        except (TypeError, ValueError) as exc:
            error_msgs.append(f"{prefix}weight: {exc}")
            return
        self.weight = packed.reshape(-1, 1)
        self.quant_state = state
        self._weight4bit = None
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")
        elif prefix + "bias" in state_dict:
            unexpected_keys.append(prefix + "bias")

    def extra_repr(self) -> str:
        s = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={s.quant_type}, blocksize={s.blocksize}, double_quant={s.nested}, "
                f"compute_dtype={self.compute_dtype}")  # fmt: skip


class QLoRALinear(nn.Module):
    """``y = base(x) + scaling * lora_B(lora_A(dropout(x)))`` on a 4-bit :class:`Linear4bit` base, in one fused
    op (:func:`fastpeft.ops.qlora.qlora_linear`): for decode the shrink rides the 4-bit kernel's pass over x and
    the expand its epilogue; the backward computes ``dx`` through the 4-bit weight without dequantizing it.

    Args:
        base_layer: the frozen :class:`Linear4bit` (``Linear4bit.from_linear`` / ``from_bnb`` make one).
        r, lora_alpha, lora_dropout, use_rslora: PEFT's LoRA hyper-parameters (``scaling = lora_alpha / r``,
            ``/ sqrt(r)`` with rsLoRA).
        adapter_dtype: the dtype of lora_A [r, in_features] and lora_B [out_features, r]; float32 by default, as
            PEFT keeps adapters on quantized layers. The product runs in the base's compute dtype.

    A starts Kaiming-uniform, B zero (the layer starts equal to its base). Only A and B train.
    """

    def __init__(
        self,
        base_layer: Linear4bit,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, Linear4bit):
            raise TypeError(f"base_layer must be a fastpeft Linear4bit, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        check_p(lora_dropout, "lora_dropout")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        factory = {"device": base_layer.weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    @classmethod
    def from_adapter(
        cls,
        base_layer: Linear4bit,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        *,
        lora_dropout: float = 0.0,
    ) -> QLoRALinear:
        """A QLoRALinear on ``base_layer`` (its 4-bit bytes shared) holding copies of a trained adapter: ``lora_a``
        [r, in_features], ``lora_b`` [out_features, r], in their dtype. ``fastpeft.from_peft_layer`` builds one
        from a PEFT 4-bit layer."""
        r = lora_a.shape[0]
        if lora_a.dim() != 2 or lora_b.shape != (lora_b.shape[0], r):
            raise ValueError(
                f"lora_a [r, in] and lora_b [out, r] disagree: {tuple(lora_a.shape)}, {tuple(lora_b.shape)}"
            )
        module = cls(base_layer, r=r, lora_dropout=lora_dropout, adapter_dtype=lora_a.dtype)
        module.scaling = scaling
        module.lora_alpha = scaling * r
        with torch.no_grad():
            module.lora_A.copy_(lora_a)
            module.lora_B.copy_(lora_b)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]: the 4-bit product and the adapter in one op."""
        base = self.base_layer
        dtype = base.dtype_for(x)
        bias = None if base.bias is None else base.bias.to(dtype)
        p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
        y = qlora_linear(x.to(dtype), base.kernel_weight(), None, self.lora_A.to(dtype), self.lora_B.to(dtype),
                         self.scaling, bias, dropout_p=p)  # fmt: skip
        return y.to(x.dtype)

    @torch.no_grad()
    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An ``nn.Linear`` computing this layer exactly (no dropout): the dequantized base weight plus
        ``scaling * B @ A``, in ``dtype`` (default: the base's dequantized dtype). The merge goes into a
        dequantized copy: the 4-bit layer is left as it is (see :meth:`merged_4bit` for the lossy way back)."""
        linear = self.base_layer.to_linear()
        merged = self.base_layer.dequantize(torch.float32) + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        dtype = dtype or linear.weight.dtype
        linear = linear.to(dtype)
        linear.weight.copy_(merged)
        return linear

    @torch.no_grad()
    def merged_4bit(self, quant_type: str | None = None, blocksize: int | None = None) -> Linear4bit:
        """The merged layer re-quantized to 4 bits. Lossy, and says so (UserWarning): the adapter's delta is
        rounded to the 4-bit grid. ``quant_type`` and ``blocksize`` default to the base's."""
        warnings.warn(REQUANTIZE_WARNING, UserWarning, stacklevel=2)
        state = self.base_layer.quant_state
        linear = self.merged_linear()
        return Linear4bit.from_linear(linear, quant_type or state.quant_type, blocksize or state.blocksize,
                                      state.nested, self.base_layer.compute_dtype)  # fmt: skip

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"
