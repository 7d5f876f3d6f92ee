"""The ``dora`` op family: PEFT's DoRA linear layer as one fused op.

    y = m / ||W + s B A||_row * (x @ W.T + s (x @ A.T) @ B.T) + bias

with the row norm detached from the graph, as in PEFT (and the DoRA paper, section 4.3). The norm is never
formed from a materialised ``W + s B A``: on Triton one kernel forms it block by block in registers and sums
the squares (one pass over W); elsewhere ``||W_n||^2`` is frozen (callers cache it), the cross term comes from
``W A^T`` (one shrink over W) and the last term from the r x r Gram matrix ``A A^T``:

    ||W_n + s (BA)_n||^2 = ||W_n||^2 + 2 s sum_j B[n,j] (W A^T)[n,j] + s^2 (B (A A^T) B^T)[n,n]

The magnitude scale is applied per column in the GEMM's epilogue (Triton); the pre-scale product ``z`` is kept
for the backward only when a gradient needs it: dm = sum_rows(dy * z) / norm, and the LoRA gradients are
those of ``lora_linear`` for ``dz = dy * m / norm``. The torch and cuda backends run the LoRA product on their
kernels and apply the scale and bias after it.

With dropout (training), PEFT's DoRA runs the scaled product on the dropped input xd and adds the base product
of the undropped x outside the scale: ``y = x W^T + b + (c - 1) xd W^T + c s xd A^T B^T`` with ``c = m / norm``.
Here that is ``c (xd W^T + s xd A^T B^T) + b`` (the fused op on xd) plus one GEMM of ``x - xd``: two passes over
W, as PEFT's two base products, without PEFT's separate LoRA GEMMs and elementwise passes over the output.
"""

# No `from __future__ import annotations`: torch.library reads these annotations at runtime.
from typing import Optional

import torch

from fastpeft._autocast import without_autocast
from fastpeft.backends import select_backend
from fastpeft.ops.dropout import apply_mask, check_p, keep_scale
from fastpeft.ops.lora import IMPLS, check_lora_linear_args, lora_grads, preference, resolve_dropout_mask
from fastpeft.ops.route import Route, choose_route


def weight_row_norm_sq(weight: torch.Tensor) -> torch.Tensor:
    """``||W_n||^2`` per output row, fp32 [out_features], without an fp32 copy of W. weight: [N, K]."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()


@torch.no_grad()
def dora_weight_norm(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    weight_norm_sq: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``||W + scaling * B @ A||`` per output row, fp32 [N], detached. weight [N, K], lora_a [R, K],
    lora_b [N, R]; ``weight_norm_sq`` ([N] fp32, :func:`weight_row_norm_sq`) spares re-reading W for it.
    Eagerly on Triton one launch (triton_kernels/dora.py, ranks up to its NORM_MAX_R_PAD: W + s B A formed and
    squared block by block in registers, W read once, so ``weight_norm_sq`` is not needed there); otherwise the
    shrink's kernel for W A^T and PyTorch's ops for the identity's terms."""
    rank = lora_a.shape[0]
    if not torch.compiler.is_compiling() and _backend("dora_linear", weight, rank) == "triton":
        from fastpeft.triton_kernels import dora as kernels
        from fastpeft.triton_kernels.common import r_pad

        if r_pad(rank) <= kernels.NORM_MAX_R_PAD:
            return kernels.dora_weight_norm(weight, lora_a, lora_b, scaling)
    w_a = IMPLS["lora_shrink"][_backend("lora_shrink", weight, rank)](weight, lora_a)  # W A^T, fp32
    b, a = lora_b.float(), lora_a.float()
    sq = weight_row_norm_sq(weight) if weight_norm_sq is None else weight_norm_sq.float()
    # sum_j B[n,j] (2 s (W A^T)[n,j] + s^2 (B A A^T)[n,j]): the cross and last terms in one product and one
    # row-wise dot (a few launches: each [N]-sized op costs a launch, not bytes)
    terms = torch.addmm(w_a, b, a @ a.t(), beta=2 * scaling, alpha=scaling * scaling)
    return (sq + torch.linalg.vecdot(b, terms)).clamp_min_(0).sqrt_()


def dora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    dropped_x: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """PEFT's DoRA formula in the inputs' own dtype, ``W + s B A`` materialised: the ground truth in float64.
    ``dropped_x`` (like x): the dropout's output in training, computed as PEFT does from it."""
    norm = torch.linalg.vector_norm(weight + scaling * lora_b @ lora_a, dim=1).detach()
    lin = torch.nn.functional.linear
    scale = magnitude / norm
    if dropped_x is not None:
        base = lin(x, weight, bias)
        return base + (scale - 1) * lin(dropped_x, weight) + scale * scaling * lin(lin(dropped_x, lora_a), lora_b)
    z = lin(x, weight) + scaling * lin(lin(x, lora_a), lora_b)
    y = scale * z
    return y if bias is None else y + bias


def _backend(op: str, x: torch.Tensor, rank: int) -> str:
    return select_backend(op, x.device, preference("lora_linear", x.shape[0], rank))


def _dora_rows(x, weight, lora_a, lora_b, scaling, bias, out_scale, keep_z, shrinks: Optional[list] = None):
    """(y, z) on 2-D rows; z is an empty tensor unless ``keep_z``. ``shrinks``, when a list, receives the fp32
    x A^T where the Triton path computes it apart (past the decode rows), for the backward's dB."""
    backend = _backend("dora_linear", x, lora_a.shape[0])
    if backend == "triton":
        from fastpeft.triton_kernels import lora as kernels

        z = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype) if keep_z else None
        xa = None if kernels.fuses_shrink(x.shape[0], lora_a.shape[0]) else kernels.lora_shrink(x, lora_a)
        if shrinks is not None and xa is not None:
            shrinks.append(xa)
        y = kernels.lora_linear(x, weight, lora_a, lora_b, scaling, bias, xa=xa, out_scale=out_scale, z=z)
    elif backend == "torch":
        return _dora_rows_torch(x, weight, lora_a, lora_b, scaling, bias, out_scale, keep_z)
    else:
        z = IMPLS["lora_linear"][backend](x, weight, lora_a, lora_b, scaling, None)
        scaled = z.float() * out_scale
        y = (scaled if bias is None else scaled + bias.float()).to(x.dtype)
    return y, (z if keep_z else x.new_empty(0))


@without_autocast
def _dora_rows_torch(x, weight, lora_a, lora_b, scaling, bias, out_scale, keep_z):
    """The torch backend, composed as PEFT composes DoRA: the base layer's output ``x W^T + b`` and on top of it
    ``(c - 1) (x W^T) + c s (x A^T) B^T`` (the bias-free product taken as that output minus b, as PEFT takes it),
    in fp32, rounded once. At initialisation (c = 1, B = 0) the addition is exactly zero and the result is the
    base layer's output bit for bit, as PEFT's is."""
    base = torch.nn.functional.linear(x, weight, bias)
    product = base.float() if bias is None else base.float() - bias.float()
    lora = torch.mm(torch.mm(x.float(), lora_a.float().t()), lora_b.float().t())
    y = (base.float() + ((out_scale - 1) * product + (out_scale * scaling) * lora)).to(x.dtype)
    return y, ((product + scaling * lora).to(x.dtype) if keep_z else x.new_empty(0))


@torch.library.custom_op("fastpeft::dora_linear", mutates_args=())
def _dora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
    out_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _dora_rows(x, weight, lora_a, lora_b, scaling, bias, out_scale, True)


@_dora_linear_op.register_fake
def _(x, weight, lora_a, lora_b, scaling, bias, out_scale):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


def _setup_context(ctx, inputs, output, xa: Optional[torch.Tensor] = None):
    x, weight, lora_a, lora_b, scaling, _bias, out_scale, *_ = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, out_scale, output[1], xa)
    ctx.scaling = scaling
    ctx.mark_non_differentiable(output[1])


def _scale_grads(dy, z, out_scale, need_scale: bool, rank: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dz = dy * out_scale in dy's dtype, d out_scale = sum_rows(dy * z) or None), in fp32 math. Eagerly on
    Triton one pass over dy and z (triton_kernels/dora.py); otherwise PyTorch's ops (which torch.compile fuses)."""
    if need_scale and not torch.compiler.is_compiling() and _backend("dora_linear", dy, rank) == "triton":
        from fastpeft.triton_kernels.dora import dora_grad_scale

        return dora_grad_scale(dy, z, out_scale)
    dz = (dy.float() * out_scale).to(dy.dtype)
    return dz, (dy.float() * z.float()).sum(0) if need_scale else None


def _backward(ctx, dy, _dz):
    """dz = dy * out_scale feeds lora_grads; d out_scale = sum_rows(dy * z); dbias = sum(dy)."""
    x, weight, lora_a, lora_b, out_scale, z, xa = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dz, dscale = _scale_grads(dy, z, out_scale, needs[6], lora_a.shape[0])
    grads = lora_grads(dz, x, weight, lora_a, lora_b, ctx.scaling, None, [1.0], needs[:4], xa=xa)
    dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if needs[5] else None
    return (*grads, None, dbias, dscale, *([None] * (len(needs) - 7)))


_dora_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _DoRALinearFunction(torch.autograd.Function):
    """The eager path (no custom-op overhead), one formula with the custom op; z kept only for a backward.
    forward(ctx, ...) saves itself, as lora's Function does (no per-call signature binding)."""

    @staticmethod
    def forward(ctx, *inputs):
        shrinks: list[torch.Tensor] = []
        output = _dora_rows(*inputs, shrinks=shrinks)
        _setup_context(ctx, inputs, output, shrinks[0] if shrinks else None)
        return output

    backward = staticmethod(_backward)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    *,
    weight_norm_sq: Optional[torch.Tensor] = None,
    weight_norm: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused DoRA linear layer: ``magnitude / ||W + s B A||_row * (x W^T + s x A^T B^T) + bias`` (PEFT's DoRA).

    Args:
        x: [..., in_features], any leading shape, any strides.
        weight: [out_features, in_features] (a transposed view for GPT-2's Conv1D).
        lora_a: [r, in_features]; lora_b: [out_features, r].
        magnitude: [out_features], DoRA's learned magnitude m (PEFT's ``lora_magnitude_vector``), any float dtype.
        scaling: the LoRA scale.
        bias: [out_features] or None.
        weight_norm_sq: [out_features] fp32 ``||W_n||^2`` (:func:`weight_row_norm_sq`), cached by the caller
            since W is frozen; computed when None.
        weight_norm: [out_features] fp32, the whole detached norm ``||W + s B A||_row``
            (:func:`dora_weight_norm`), for a caller that caches it while A and B do not change (inference).
        dropout_p: in [0, 1); > 0 applies PEFT's DoRA with dropout (training): with c = magnitude / norm and xd
            the dropped x, ``y = x W^T + bias + (c - 1) xd W^T + c s xd A^T B^T``. The mask is drawn as
            ``nn.Dropout(p)`` would draw it (:func:`fastpeft.lora_linear`'s default mode).
        dropout_mask: bool, like x: the keep-mask to use instead of drawing one (with dropout_p > 0).

    x, weight, lora_a, lora_b and bias share one dtype and device. The row norm is detached (PEFT). Returns
    [..., out_features] in x's dtype; differentiable in x, lora_a, lora_b, magnitude, bias (and weight).
    """
    check_lora_linear_args(x, weight, lora_a, lora_b, scaling, bias)
    out_features = weight.shape[0]
    for name, t in (("magnitude", magnitude), ("weight_norm_sq", weight_norm_sq), ("weight_norm", weight_norm)):
        if t is None and name != "magnitude":
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != (out_features,) or t.device != x.device:
            raise ValueError(f"{name} must be [out_features={out_features}] on {x.device}, "
                             f"got {tuple(t.shape)} on {t.device}")  # fmt: skip
    mask = resolve_dropout_mask(x, check_p(dropout_p), dropout_mask)
    norm = weight_norm if weight_norm is not None else dora_weight_norm(weight, lora_a, lora_b, scaling, weight_norm_sq)
    # PEFT rounds the norm to the weight's dtype before dividing: c = 1 exactly at initialisation (m = ||W||).
    out_scale = magnitude.float() / norm.to(weight.dtype).float()
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None:
        y = _dropped_dora_rows(rows, weight, lora_a, lora_b, float(scaling), bias, out_scale, mask, dropout_p)
        return y.reshape(*x.shape[:-1], out_features)
    return _scaled_rows(rows, weight, lora_a, lora_b, float(scaling), bias, out_scale).reshape(
        *x.shape[:-1], out_features
    )


def _scaled_rows(rows, weight, lora_a, lora_b, scaling, bias, out_scale):
    """``out_scale * (rows W^T + s rows A^T B^T) + bias`` by its route (:mod:`fastpeft.ops.route`): the
    backend and the torch backend's autograd form are both :func:`_dora_rows` (PyTorch ops on the torch path)."""
    pref = preference("lora_linear", rows.shape[0], lora_a.shape[0])
    tensors = (rows, weight, lora_a, lora_b, bias, out_scale)
    route = choose_route("dora_linear", rows.device, pref, tensors)
    if route is Route.CUSTOM_OP:
        return _dora_linear_op(rows, weight, lora_a, lora_b, scaling, bias, out_scale)[0]
    if route in (Route.BACKEND, Route.TORCH_AUTOGRAD):
        return _dora_rows(rows, weight, lora_a, lora_b, scaling, bias, out_scale, False)[0]
    return _DoRALinearFunction.apply(rows, weight, lora_a, lora_b, scaling, bias, out_scale, True)[0]


@without_autocast
def _dropped_dora_rows(rows, weight, lora_a, lora_b, scaling, bias, out_scale, mask, p):
    """PEFT's DoRA with dropout: ``c (xd W^T + s xd A^T B^T) + bias + (x - xd) W^T``; autograd composes the
    fused op's gradients with the mask's (dx = dy W + D(dxd - dy W), D the dropout)."""
    scale = keep_scale(p, rows.dtype, rows.device)
    dropped = apply_mask(rows, mask, scale)
    rest = torch.where(mask, rows.float() * (1.0 - scale), rows.float()).to(rows.dtype)  # x - xd, rounded once
    y = _scaled_rows(dropped, weight, lora_a, lora_b, scaling, bias, out_scale)
    return torch.addmm(y, rest, weight.t())
