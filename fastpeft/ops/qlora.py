"""The ``qlora`` op family: products with a 4-bit (NF4/FP4) weight, dequantized on chip, never in memory.

    matmul_4bit:  y = x @ dequant(W).T + bias
    qlora_linear: y = x @ dequant(W).T + bias + scaling * (dropout(x) @ A.T) @ B.T

W is bitsandbytes' layout (:mod:`fastpeft.ops.quant_4bit`); its dequantized values are bitsandbytes' exactly
(``code[q] * absmax`` in fp32, rounded to the state's dtype), then cast to x's dtype, as bitsandbytes'
``matmul_4bit`` does. Two custom ops, each with a fake implementation, on three backends:

- ``fastpeft::matmul_4bit(x, packed, <state>, n, w_dtype, bias, lora_a, xa, lora_b, scaling)``: the forward,
  LoRA optional (``lora_a``: the shrink of x is computed too, fused into the kernel for decode on Triton;
  ``xa``: a precomputed fp32 shrink, as after dropout);
- ``fastpeft::matmul_4bit_t(dy, packed, <state>, k, w_dtype, dyb, lora_a, scaling)``: ``dy @ dequant(W)``
  (+ ``scaling * dyb @ A``), the backward's ``dx`` with no dequantized copy of W.

``cuda`` (csrc/qlora.cu: a GEMV with 16-byte loads for decode, a tensor-core GEMM for 16-bit prefill),
``triton`` (triton_kernels/qlora.py) and ``torch`` (dequantize, then cuBLAS/CPU GEMM: the CPU path and the
reference's shape). Autograd (:class:`_QLoRAFunction`) gives x, A, B and bias their gradients.
"""

# No `from __future__ import annotations`: torch.library reads these annotations at runtime.
from typing import NamedTuple, Optional

import torch

from fastpeft._autocast import without_autocast
from fastpeft.backends import select_backend
from fastpeft.ops.common import check_tensor
from fastpeft.ops.dropout import apply_mask, check_p, draw_mask, keep_scale
from fastpeft.ops.lora import call_lora_op
from fastpeft.ops.quant_4bit import QuantState, check_quant_state, dequantize_4bit, dequantize_checked

# Rows at or below which the CUDA GEMV (and the Triton decode tiles with the shrink fused) run.
DECODE_MAX_M = 16
_DECODE_PREFERENCE = ("cuda", "triton")
_PREFILL_PREFERENCE = ("triton", "cuda")


class Weight4bit(NamedTuple):
    """A 4-bit weight as the kernels take it: the bytes and the state's tensors (nested ones or None)."""

    packed: torch.Tensor  # uint8 [ceil(N*K/2)]
    absmax: torch.Tensor  # fp32 [blocks], or uint8 [blocks] when nested
    code: torch.Tensor  # fp32 [16]
    absmax2: Optional[torch.Tensor]  # fp32 [ceil(blocks / nested_blocksize)]
    code2: Optional[torch.Tensor]  # fp32 [256]
    offset: Optional[torch.Tensor]  # fp32 scalar
    blocksize: int
    nested_blocksize: int
    out_features: int
    in_features: int
    dtype: torch.dtype  # the dequantized weight's dtype

    @classmethod
    def from_state(cls, packed: torch.Tensor, state: QuantState) -> "Weight4bit":
        check_quant_state(packed, state)
        nested = state.state2
        return cls(
            packed.reshape(-1).view(torch.uint8),
            state.absmax.reshape(-1),
            state.code,
            None if nested is None else nested.absmax.reshape(-1),
            None if nested is None else nested.code,
            None if nested is None else state.offset.reshape(1).float(),
            state.blocksize,
            256 if nested is None else nested.blocksize,
            int(state.shape[0]),
            int(state.shape[1]),
            state.dtype,
        )

    def state_args(self) -> tuple:
        """The state as the custom ops take it (everything between ``packed`` and the shape)."""
        return (self.absmax, self.code, self.absmax2, self.code2, self.offset, self.blocksize, self.nested_blocksize)

    def state(self) -> QuantState:
        nested = None
        if self.absmax2 is not None:
            nested = QuantState(self.absmax2, None, self.code2, self.nested_blocksize, None, torch.float32)
        quant_type = "fp4" if float(self.code[1]) > 0 else "nf4"  # FP4's code[1] is +0.0052, NF4's -0.696
        shape = torch.Size((self.out_features, self.in_features))
        offset = None if self.offset is None else self.offset.reshape(())
        return QuantState(self.absmax, shape, self.code, self.blocksize, quant_type, self.dtype, offset, nested)


# ----------------------------------------------------------------------------------------------------------
# The torch backend
# ----------------------------------------------------------------------------------------------------------


def _dequantized(packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, shape, w_dtype):
    """W [N, K] in ``w_dtype`` (bitsandbytes' values), from the ops' flat arguments (checked by Weight4bit)."""
    nested = None if absmax2 is None else QuantState(absmax2, None, code2, nested_blocksize, None, torch.float32)
    quant_type = "nf4"  # only the code's values matter here, and the code is given
    state = QuantState(absmax, torch.Size(shape), code, blocksize, quant_type, w_dtype,
                       None if offset is None else offset.reshape(()), nested)  # fmt: skip
    return dequantize_checked(packed, state)


@without_autocast
def _matmul_4bit_torch(x, packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, n, w_dtype,
                       bias, lora_a, xa, lora_b, scaling):  # fmt: skip
    shape = (n, x.shape[1])
    w = _dequantized(packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, shape, w_dtype)
    w = w.to(x.dtype).t()
    if lora_b is None:
        return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
    xa = torch.mm(x.float(), lora_a.float().t()) if xa is None else xa
    if x.dtype == torch.float32:  # as lora's torch path: three GEMM calls, the LoRA term added in place
        out = torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
        return out.addmm_(xa, lora_b.t(), alpha=scaling)
    out = torch.mm(x, w).float().addmm_(xa, lora_b.float().t(), alpha=scaling)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


@without_autocast
def _matmul_4bit_t_torch(dy, packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, k, w_dtype,
                         dyb, lora_a, scaling):  # fmt: skip
    shape = (dy.shape[1], k)
    w = _dequantized(packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, shape, w_dtype)
    dx = torch.mm(dy, w.to(dy.dtype))
    if dyb is None:
        return dx
    return torch.addmm(dx.float(), dyb, lora_a.float(), alpha=scaling).to(dy.dtype)


# ----------------------------------------------------------------------------------------------------------
# The triton and cuda backends (imported on first use: triton and fastpeft._C are optional)
# ----------------------------------------------------------------------------------------------------------


def _matmul_4bit_triton(x, packed, *rest):
    from fastpeft.triton_kernels import qlora
    from fastpeft.triton_kernels.lora import lora_shrink

    *state_and_shape, bias, lora_a, xa, lora_b, scaling = rest
    if lora_a is not None and x.shape[0] > qlora.DECODE_MAX_M:  # prefill: the shrink once, not per tile
        xa, lora_a = lora_shrink(x, lora_a), None
    return qlora.matmul_4bit(x, packed, *state_and_shape, bias, lora_a, xa, lora_b, scaling)


def _matmul_4bit_t_triton(dy, packed, *rest):
    from fastpeft.triton_kernels.qlora import matmul_4bit_t

    return matmul_4bit_t(dy, packed, *rest)


def _matmul_4bit_cuda(x, packed, *rest):
    *state_and_shape, bias, lora_a, xa, lora_b, scaling = rest
    if lora_a is not None:
        xa = torch.ops.fastpeft.lora_shrink_cuda(x, lora_a)
    bias = None if bias is None else bias.contiguous()  # the kernels index bias and xa's rows densely
    xa = None if xa is None else xa.contiguous()
    return torch.ops.fastpeft.matmul_4bit_cuda(x, packed, *state_and_shape, bias, xa, lora_b, scaling)


def _matmul_4bit_t_cuda(dy, packed, *rest):
    *state_and_shape, dyb, lora_a, scaling = rest
    dyb = None if dyb is None else dyb.contiguous()
    return torch.ops.fastpeft.matmul_4bit_t_cuda(dy, packed, *state_and_shape, dyb, lora_a, scaling)


IMPLS = {
    "matmul_4bit": {"torch": _matmul_4bit_torch, "triton": _matmul_4bit_triton, "cuda": _matmul_4bit_cuda},
    "matmul_4bit_t": {"torch": _matmul_4bit_t_torch, "triton": _matmul_4bit_t_triton, "cuda": _matmul_4bit_t_cuda},
}


def _run(op: str, x: torch.Tensor, *args) -> torch.Tensor:
    decode = x.shape[0] <= DECODE_MAX_M and op == "matmul_4bit"
    backend = select_backend(op, x.device, _DECODE_PREFERENCE if decode else _PREFILL_PREFERENCE)
    return IMPLS[op][backend](x, *args)


@torch.library.custom_op("fastpeft::matmul_4bit", mutates_args=())
def _matmul_4bit_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: Optional[torch.Tensor],
    code2: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    nested_blocksize: int,
    n: int,
    w_dtype: torch.dtype,
    bias: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    xa: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    scaling: float,
) -> torch.Tensor:
    return _run("matmul_4bit", x, packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, n,
                w_dtype, bias, lora_a, xa, lora_b, scaling)  # fmt: skip


@_matmul_4bit_op.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, n, w_dtype, bias, lora_a, xa,
      lora_b, scaling):  # fmt: skip
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("fastpeft::matmul_4bit_t", mutates_args=())
def _matmul_4bit_t_op(
    dy: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: Optional[torch.Tensor],
    code2: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    nested_blocksize: int,
    k: int,
    w_dtype: torch.dtype,
    dyb: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    scaling: float,
) -> torch.Tensor:
    return _run("matmul_4bit_t", dy, packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, k,
                w_dtype, dyb, lora_a, scaling)  # fmt: skip


@_matmul_4bit_t_op.register_fake
def _(dy, packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, k, w_dtype, dyb, lora_a,
      scaling):  # fmt: skip
    return dy.new_empty((dy.shape[0], k))


def _forward_op(x, w: Weight4bit, bias, lora_a, xa, lora_b, scaling):
    args = (x, w.packed, *w.state_args(), w.out_features, w.dtype, bias, lora_a, xa, lora_b, scaling)
    return _matmul_4bit_op(*args) if torch.compiler.is_compiling() else _run("matmul_4bit", *args)


def _backward_op(dy, w: Weight4bit, dyb, lora_a, scaling):
    args = (dy, w.packed, *w.state_args(), w.in_features, w.dtype, dyb, lora_a, scaling)
    return _matmul_4bit_t_op(*args) if torch.compiler.is_compiling() else _run("matmul_4bit_t", *args)


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------


def _qlora_forward(x, weight: Weight4bit, bias, lora_a, lora_b, scaling, mask, mask_scale) -> torch.Tensor:
    """The layer on 2-D rows, no autograd: the LoRA shrink of the dropped x first when there is a mask."""
    lora = lora_b is not None
    xa = None
    if lora and mask is not None:
        xa = call_lora_op("lora_shrink", apply_mask(x, mask, mask_scale), lora_a)
    return _forward_op(x, weight, bias, lora_a if lora and xa is None else None, xa, lora_b, scaling)


class _QLoRAFunction(torch.autograd.Function):
    """y = x W^T + bias + s D(x) A^T B^T for the 4-bit W (frozen: no gradient), D the dropout with keep-mask
    ``mask`` (identity when None). Backward: dx = dy W + s D((dy B) A), fused in matmul_4bit_t without a mask;
    dA = s (dy B)^T D(x); dB = s dy^T (D(x) A^T); dbias = sum(dy)."""

    @staticmethod
    def forward(ctx, x, weight: Weight4bit, bias, lora_a, lora_b, scaling, mask, mask_scale):
        y = _qlora_forward(x, weight, bias, lora_a, lora_b, scaling, mask, mask_scale)
        lora = lora_b is not None
        ctx.save_for_backward(x if lora else None, lora_a, lora_b, mask)  # dx alone needs only W
        ctx.weight, ctx.scaling, ctx.mask_scale, ctx.lora = weight, scaling, mask_scale, lora
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_a, lora_b, mask = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        weight, scaling = ctx.weight, ctx.scaling
        dx = da = db = dbias = None
        dy = dy.contiguous() if dy.stride(-1) != 1 else dy
        dyb = call_lora_op("lora_shrink", dy, lora_b.t()) if ctx.lora and (need_x or need_a) else None
        if need_x:
            fused_lora = dyb is not None and mask is None
            dx = _backward_op(dy, weight, dyb if fused_lora else None, lora_a if fused_lora else None, scaling)
            if dyb is not None and mask is not None:
                dx = dx + apply_mask((dyb * scaling).to(dy.dtype) @ lora_a, mask, ctx.mask_scale)
        if need_a or need_b:
            xd = x if mask is None else apply_mask(x, mask, ctx.mask_scale)
            if need_a:
                da = (dyb * scaling).to(x.dtype).t() @ xd
            if need_b:
                db = dy.t() @ (call_lora_op("lora_shrink", xd, lora_a) * scaling).to(x.dtype)
        if need_bias:
            dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        return dx, None, dbias, da, db, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


def _check_x(x: torch.Tensor, weight: Weight4bit, bias: Optional[torch.Tensor]) -> None:
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] != weight.in_features:
        raise ValueError(f"x must be [..., in_features={weight.in_features}], got {tuple(x.shape)}")
    if x.device != weight.packed.device:
        raise ValueError(f"x is on {x.device}, the 4-bit weight on {weight.packed.device}")
    if bias is not None:
        check_tensor("bias", bias, dims=1)
        if tuple(bias.shape) != (weight.out_features,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must be [{weight.out_features}] in x's dtype {x.dtype} on {x.device}, got "
                             f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")  # fmt: skip


def _as_weight(packed: torch.Tensor, state: QuantState) -> Weight4bit:
    return packed if isinstance(packed, Weight4bit) else Weight4bit.from_state(packed, state)


def matmul_4bit(
    x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``x @ dequantize_4bit(packed, state).T + bias`` without materialising the dequantized weight.

    Args:
        x: [..., K] float16/bfloat16/float32, any leading shape (zero rows allowed), any strides.
        packed: the 4-bit bytes of W [N, K] (:func:`~fastpeft.ops.quant_4bit.quantize_4bit`'s, or
            bitsandbytes' ``Params4bit`` data).
        state: its :class:`QuantState` (``QuantState.from_bnb`` converts bitsandbytes' state).
        bias: [N] in x's dtype, or None.

    Returns [..., N] in x's dtype, accumulated in fp32. Differentiable in x and bias (W is frozen); the
    backward computes ``dy @ W`` with W dequantized on chip.
    """
    return qlora_linear(x, packed, state, None, None, bias=bias)


def qlora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: Optional[QuantState],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    *,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """QLoRA's layer in one op: ``x @ dequant(W).T + bias + scaling * dropout(x) @ lora_a.T @ lora_b.T``.

    Args:
        x: [..., K] float16/bfloat16/float32, any leading shape, any strides.
        packed, state: the 4-bit base weight W [N, K] (see :func:`matmul_4bit`); ``packed`` may also be a
            :class:`Weight4bit` (state then None), which skips re-checking the state on every call.
        lora_a: [r, K] and lora_b: [N, r] in x's dtype, or both None (the plain 4-bit product).
        scaling: the LoRA scale.
        bias: [N] in x's dtype, or None.
        dropout_p: dropout on the LoRA branch's input, drawn as ``nn.Dropout(p)`` would draw it (training).
        dropout_mask: bool [..., K] like x: the keep-mask to use instead of drawing one.

    Returns [..., N] in x's dtype. Differentiable in x, lora_a, lora_b and bias. For decode (at most 16 rows)
    on Triton the shrink runs inside the 4-bit kernel's K loop and the expand in its epilogue: one launch.
    """
    weight = _as_weight(packed, state)
    _check_x(x, weight, bias)
    if (lora_a is None) != (lora_b is None):
        raise ValueError("give both lora_a and lora_b, or neither")
    if lora_a is not None:
        for name, t, shape in (
            ("lora_a", lora_a, (None, weight.in_features)),
            ("lora_b", lora_b, (weight.out_features, None)),
        ):
            check_tensor(name, t, dims=2)
            if t.dtype != x.dtype or t.device != x.device:
                raise ValueError(f"{name} must be {x.dtype} on {x.device} like x, got {t.dtype} on {t.device}")
            if any(want is not None and got != want for got, want in zip(t.shape, shape, strict=True)):
                raise ValueError(f"{name} must be {tuple('r' if s is None else s for s in shape)}, got "
                                 f"{tuple(t.shape)}")  # fmt: skip
        if lora_a.shape[0] != lora_b.shape[1] or lora_a.shape[0] < 1:
            raise ValueError(f"lora_a [r, K] and lora_b [N, r] disagree on r: {lora_a.shape[0]} vs {lora_b.shape[1]}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")
    p = check_p(dropout_p)
    mask, mask_scale = None, 1.0
    if lora_a is not None and p > 0:
        if dropout_mask is None:
            dropout_mask = draw_mask(tuple(x.shape), p, x.dtype, x.device)
        elif dropout_mask.dtype != torch.bool or dropout_mask.shape != x.shape:
            raise ValueError(f"dropout_mask must be bool {tuple(x.shape)} like x")
        mask, mask_scale = dropout_mask.reshape(-1, x.shape[-1]), keep_scale(p, x.dtype, x.device)
    elif dropout_mask is not None:
        raise ValueError("dropout_mask needs lora weights and dropout_p > 0")
    return _apply(x, weight, bias, lora_a, lora_b, float(scaling), mask, mask_scale)


def qlora_forward_unchecked(
    x: torch.Tensor,
    weight: Weight4bit,
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    scaling: float,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """:func:`qlora_linear` without dropout for arguments already known to fit (a patched PEFT 4-bit layer's own
    tensors, in x's dtype): no checks per call. x [..., K]; returns [..., N] in x's dtype."""
    return _apply(x, weight, bias, lora_a, lora_b, scaling, None, 1.0)


def _apply(x, weight: Weight4bit, bias, lora_a, lora_b, scaling: float, mask, mask_scale) -> torch.Tensor:
    """The layer on x's rows: through autograd when something needs a gradient, else straight to the kernels."""
    rows = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lora_a, lora_b)):
        y = _QLoRAFunction.apply(rows, weight, bias, lora_a, lora_b, scaling, mask, mask_scale)
    else:  # inference: no autograd node to build
        y = _qlora_forward(rows, weight, bias, lora_a, lora_b, scaling, mask, mask_scale)
    return y.reshape(*x.shape[:-1], weight.out_features)


def qlora_linear_reference(x, packed, state, lora_a=None, lora_b=None, scaling=1.0, bias=None) -> torch.Tensor:
    """The unfused computation in x's dtype (float64 inputs give the ground truth): bitsandbytes' dequantized
    weight, cast to x's dtype, then PEFT's LoRA."""
    y = torch.nn.functional.linear(x, dequantize_4bit(packed, state, x.dtype), bias)
    if lora_a is None:
        return y
    return y + scaling * torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b)
