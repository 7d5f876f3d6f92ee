"""The ``lora`` op family: ``y = x @ W.T + bias + scaling * (x @ A.T) @ B.T`` as one fused op.

Four torch custom ops, each with a fake (meta) implementation so ``torch.compile`` traces them:

- ``fastpeft::lora_linear(x, weight, lora_a, lora_b, scaling, bias)``: the layer on 2-D rows, with autograd.
- ``fastpeft::lora_shrink(x, lora_a)``: ``x @ lora_a.T`` in fp32 (used by the backward pass).
- ``fastpeft::lora_expand_linear(x, weight, xa, lora_b, scaling, bias)``: ``x @ weight.T + bias +
  scaling * xa @ lora_b.T`` for a precomputed fp32 ``xa`` (used by the backward pass for ``dx``).
- ``fastpeft::lora_dy_pass(dy, lora_b, xa, scaling)``: ``(dy @ lora_b`` in fp32, ``scaling * dy.T @ xa)``, the
  backward's two products over dy (on Triton from one read of dy: triton_kernels/lora_dy_pass.py).

Each runs on one of three backends (fastpeft.backends): ``cuda`` (csrc/lora.cu), ``triton``
(triton_kernels/lora.py) or ``torch`` (below: native-dtype base GEMM, LoRA term and sum in fp32).
"""

# No `from __future__ import annotations`: torch.library reads these annotations at runtime.
import itertools
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from fastpeft._autocast import without_autocast
from fastpeft.backends import record_choice, select_backend
from fastpeft.ops.common import FLOAT_DTYPES, check_tensor
from fastpeft.ops.dropout import (
    DROPOUT_MODES,
    apply_mask,
    check_p,
    draw_mask,
    draw_seed,
    keep_scale,
    pack_bits,
    philox_keep_scale,
    seeded_mask,
    unpack_bits,
)
from fastpeft.ops.route import Route, choose_route

# The CUDA extension's GEMV path (csrc/lora.cu) handles at most this many rows without re-reading W.
_CUDA_DECODE_MAX_M = 8
# Rows from which the eager training forward keeps xa = dropout(x) A^T for the backward's dB (x is then not read
# again for it): past the decode rows, where every backend runs the shrink as a launch of its own anyway; below,
# Triton's decode kernel fuses it and the backward recomputes the small shrink.
SHRINK_KEPT_MIN_M = 65
# Ranks up to this run the Triton decode kernel with the shrink fused: one launch (mirrors
# triton_kernels/lora.py's FUSED_MAX_R_PAD, which needs triton to import).
_TRITON_FUSED_MAX_R = 32


def preference(op: str, m: int, r: int) -> tuple[str, ...]:
    """The backend order for ``op`` on ``m`` rows at rank ``r`` on a CUDA device.

    Decode at small rank goes to Triton's one-launch fused kernel (the CUDA path is a shrink launch plus a
    GEMV launch); decode at larger rank to the CUDA GEMV, which reads W, A and B once each; the rest to Triton.
    Provisional until a GPU benchmark run ranks the backends (scripts/gpu_check.sh, the fused:<backend> rows).
    """
    if op == "lora_linear" and m <= _CUDA_DECODE_MAX_M and r > _TRITON_FUSED_MAX_R:
        return ("cuda", "triton")
    return ("triton", "cuda")


# ----------------------------------------------------------------------------------------------------------
# Reference and the torch backend
# ----------------------------------------------------------------------------------------------------------


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The unfused PEFT computation, in the inputs' own dtype: the ground truth when given float64 inputs.

    x: [..., K]; weight: [N, K]; lora_a: [R, K]; lora_b: [N, R]; bias: [N] or None. Returns [..., N].
    """
    y = torch.nn.functional.linear(x, weight, bias)
    return y + scaling * torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b)


@without_autocast
def _shrink_torch(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    return torch.mm(x.float(), lora_a.float().t())


def _expand_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    xa: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    # The LoRA term is added in place to the fp32 output, which is always a fresh tensor here: on a CPU, with
    # the bias taken by the base GEMM in fp32, the layer is three GEMM calls and nothing else.
    if x.dtype == torch.float32:
        out = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        return out.addmm_(xa, lora_b.t(), alpha=scaling)
    out = torch.mm(x, weight.t()).float()  # native-dtype GEMM: no fp32 copy of the weight
    out.addmm_(xa, lora_b.float().t(), alpha=scaling)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


_expand_linear_torch = without_autocast(_expand_linear)


@without_autocast
def _lora_linear_torch(x, weight, lora_a, lora_b, scaling, bias):
    return _expand_linear(x, weight, torch.mm(x.float(), lora_a.float().t()), lora_b, scaling, bias)


# ----------------------------------------------------------------------------------------------------------
# The triton and cuda backends (imported on first use: triton and fastpeft._C are optional)
# ----------------------------------------------------------------------------------------------------------


def _triton_lora():
    from fastpeft.triton_kernels import lora

    return lora


def _lora_linear_triton(x, weight, lora_a, lora_b, scaling, bias):
    kernels = _triton_lora()
    if kernels.fuses_shrink(x.shape[0], lora_a.shape[0]) or kernels.shrinks_in_persistent_pass(
        x, weight, lora_a, lora_b
    ):
        return kernels.lora_linear(x, weight, lora_a, lora_b, scaling, bias)
    xa = kernels.lora_shrink(x, lora_a)
    return kernels.lora_linear(x, weight, None, lora_b, scaling, bias, xa=xa)


def _shrink_triton(x, lora_a):
    return _triton_lora().lora_shrink(x, lora_a)


def _expand_linear_triton(x, weight, xa, lora_b, scaling, bias):
    return _triton_lora().lora_linear(x, weight, None, lora_b, scaling, bias, xa=xa)


def _lora_linear_cuda(x, weight, lora_a, lora_b, scaling, bias):
    return torch.ops.fastpeft.lora_linear_cuda(x, weight, lora_a, lora_b, scaling, bias)


def _shrink_cuda(x, lora_a):
    return torch.ops.fastpeft.lora_shrink_cuda(x, lora_a)


def _expand_linear_cuda(x, weight, xa, lora_b, scaling, bias):
    return torch.ops.fastpeft.lora_expand_linear_cuda(x, weight, xa, lora_b, scaling, bias)


def _dy_pass(shrink: Callable, dy, lora_b, xa, scaling):
    """dy B (``shrink``: a backend's lora_shrink) and s dy^T xa as two products, each reading dy."""
    return shrink(dy, lora_b.t()), dy.t() @ (xa * scaling).to(dy.dtype)


def _dy_pass_torch(dy, lora_b, xa, scaling):
    return _dy_pass(_shrink_torch, dy, lora_b, xa, scaling)


def _dy_pass_cuda(dy, lora_b, xa, scaling):
    return _dy_pass(_shrink_cuda, dy, lora_b, xa, scaling)


def _dy_pass_triton(dy, lora_b, xa, scaling):
    from fastpeft.triton_kernels import lora_dy_pass as kernels
    from fastpeft.triton_kernels.common import sm_count

    if kernels.one_pass_pays(*dy.shape, lora_b.shape[1], dy.dtype, sm_count(dy.device)):
        return kernels.lora_dy_pass(dy, lora_b, xa, scaling)
    return _dy_pass(_shrink_triton, dy, lora_b, xa, scaling)


IMPLS: dict[str, dict[str, Callable[..., torch.Tensor]]] = {
    "lora_linear": {"torch": _lora_linear_torch, "triton": _lora_linear_triton, "cuda": _lora_linear_cuda},
    "lora_shrink": {"torch": _shrink_torch, "triton": _shrink_triton, "cuda": _shrink_cuda},
    "lora_expand_linear": {"torch": _expand_linear_torch, "triton": _expand_linear_triton, "cuda": _expand_linear_cuda},
    "lora_dy_pass": {"torch": _dy_pass_torch, "triton": _dy_pass_triton, "cuda": _dy_pass_cuda},
}


def _run(op: str, x: torch.Tensor, *args) -> torch.Tensor:
    """Run ``op`` on the backend the dispatcher picks; x is already [M, K]."""
    rank = args[1].shape[0] if op == "lora_linear" else 0  # lora_linear's args: weight, lora_a, ...
    backend = select_backend(op, x.device, preference(op, x.shape[0], rank))
    return IMPLS[op][backend](x, *args)


# ----------------------------------------------------------------------------------------------------------
# Custom ops: schema, implementation, fake implementation, autograd
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpeft::lora_shrink", mutates_args=())
def _lora_shrink_op(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    return _run("lora_shrink", x, lora_a)


@_lora_shrink_op.register_fake
def _(x, lora_a):
    return x.new_empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastpeft::lora_expand_linear", mutates_args=())
def _lora_expand_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    xa: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    return _run("lora_expand_linear", x, weight, xa, lora_b, scaling, bias)


@_lora_expand_linear_op.register_fake
def _(x, weight, xa, lora_b, scaling, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("fastpeft::lora_dy_pass", mutates_args=())
def _lora_dy_pass_op(
    dy: torch.Tensor, lora_b: torch.Tensor, xa: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("lora_dy_pass", dy, lora_b, xa, scaling)


@_lora_dy_pass_op.register_fake
def _(dy, lora_b, xa, scaling):
    r = lora_b.shape[1]
    return dy.new_empty((dy.shape[0], r), dtype=torch.float32), dy.new_empty((dy.shape[1], r))


def _check_rows(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(
            f"fastpeft::lora_linear takes x as 2-D rows [M, in_features], got shape {tuple(x.shape)}; "
            "fastpeft.lora_linear takes any leading shape"
        )


def _in_kernel_dropout(
    x: torch.Tensor, rank: int, seed: int, p: float, scale: float, rank_groups: Sequence[int],
    mask: Optional[torch.Tensor] = None, bits: Optional[torch.Tensor] = None,
):  # fmt: skip
    """The Triton kernels and their in-kernel dropout spec when the op runs there with dropout, else None (the
    other backends apply the mask materialised). The mask: Philox's for ``seed`` (dropout_mode='philox'; the
    other backends materialise it with seeded_mask), or one mask over x (one group of adapters), given as bool
    ``mask`` (packed here) or as its ``bits`` (fastpeft.ops.dropout.pack_bits), read by the kernels as bits:
    neither pass writes a dropped copy of x."""
    if seed < 0 and ((mask is None and bits is None) or rank_groups or torch.compiler.is_compiling()):
        return None  # while tracing, the backward keeps to the custom ops (the mask unpacked)
    if select_backend("lora_linear", x.device, preference("lora_linear", x.shape[0], rank), record=False) != "triton":
        return None
    record_choice("lora_linear", "triton")  # the layer runs on Triton's kernels
    kernels = _triton_lora()
    if seed >= 0:
        return kernels, kernels.PhiloxDropout(seed, p, scale, x.shape[1], 1)
    bits = kernels.pack_bits(mask.reshape(-1, x.shape[1])) if bits is None else bits
    return kernels, kernels.BitsDropout(bits, scale)


def _dropout_groups(
    mask: Optional[torch.Tensor], scales: Sequence[float], rank_groups: Sequence[int], rank: int
) -> list[tuple[slice, Optional[torch.Tensor], float]]:
    """(rows of lora_a, keep-mask [M, K] or None, keep scale) per group of stacked adapters: one group over all
    ``rank`` rows unless ``rank_groups`` splits them, each group then with its own mask (``mask`` [G, M, K])."""
    if not rank_groups:
        return [(slice(0, rank), mask, scales[0] if scales else 1.0)]
    starts = list(itertools.accumulate(rank_groups, initial=0))
    return [(slice(starts[g], starts[g + 1]), mask[g], scales[g]) for g in range(len(rank_groups))]


def _dropped(x: torch.Tensor, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    return x if mask is None else apply_mask(x, mask, scale)


def _columns(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _lora_linear_rows(
    x, weight, lora_a, lora_b, scaling, bias, dropout_mask, dropout_scales, rank_groups, dropout_seed, dropout_p,
    kept: Optional[list] = None, shrinks: Optional[list] = None, packed: Optional[list] = None,
):  # fmt: skip
    """The layer on 2-D rows; ``kept``, when a list, receives the dropped copies of x the shrinks read,
    ``shrinks`` the fp32 xa = dropout(x) A^T where it is computed by a launch of its own (past the decode rows),
    for the backward's dB, and ``packed`` the mask's bits where the kernels read them."""
    in_kernel = _in_kernel_dropout(x, lora_a.shape[0], dropout_seed, dropout_p, dropout_scales[0], rank_groups,
                                   dropout_mask)  # fmt: skip
    if in_kernel is not None:  # the mask applied inside the kernels: no dropped copy of x
        kernels, spec = in_kernel
        if packed is not None and isinstance(spec, kernels.BitsDropout):
            packed.append(spec.bits)
        if kernels.fuses_shrink(x.shape[0], lora_a.shape[0]):
            return kernels.lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_x=spec)
        xa = _kept_shrink(kernels.lora_shrink(x, lora_a, spec), shrinks)
        return kernels.lora_linear(x, weight, None, lora_b, scaling, bias, xa=xa)
    if dropout_seed >= 0:
        dropout_mask = seeded_mask(dropout_seed, dropout_p, x.shape[0], x.shape[1], x.device)
    if dropout_mask is None and (shrinks is None or x.shape[0] < SHRINK_KEPT_MIN_M):
        return _run("lora_linear", x, weight, lora_a, lora_b, scaling, bias)
    if dropout_mask is None:  # the shrink as its own launch, as lora_linear runs it on every backend past decode
        xa = _kept_shrink(_run("lora_shrink", x, lora_a), shrinks)
        return _run("lora_expand_linear", x, weight, xa, lora_b, scaling, bias)
    # Dropout reaches A's input only: the shrink reads the dropped x (each stacked adapter its own mask), the
    # base GEMM (fused with the expand over all adapters) the undropped one.
    groups = _dropout_groups(dropout_mask, dropout_scales, rank_groups, lora_a.shape[0])
    dropped = [_dropped(x, m, s) for _, m, s in groups]
    if kept is not None:
        kept.extend(dropped)
    xa = _columns([_run("lora_shrink", xd, lora_a[rows]) for (rows, _, _), xd in zip(groups, dropped, strict=True)])
    return _run("lora_expand_linear", x, weight, _kept_shrink(xa, shrinks), lora_b, scaling, bias)


def _kept_shrink(xa: torch.Tensor, shrinks: Optional[list]) -> torch.Tensor:
    if shrinks is not None:
        shrinks.append(xa)
    return xa


@torch.library.custom_op("fastpeft::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
    dropout_mask: Optional[torch.Tensor],
    dropout_scales: list[float],
    rank_groups: list[int],
    dropout_seed: int,
    dropout_p: float,
) -> torch.Tensor:
    _check_rows(x)
    return _lora_linear_rows(
        x, weight, lora_a, lora_b, scaling, bias, dropout_mask, dropout_scales, rank_groups, dropout_seed, dropout_p
    )


@_lora_linear_op.register_fake
def _(x, weight, lora_a, lora_b, scaling, bias, dropout_mask, dropout_scales, rank_groups, dropout_seed, dropout_p):
    _check_rows(x)
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup_context(
    ctx, inputs, output, kept: Optional[list] = None, xa: Optional[torch.Tensor] = None,
    bits: Optional[torch.Tensor] = None,
):  # fmt: skip
    """Saves the inputs, the dropout mask (or the dropped x, ``kept``) and the forward's xa when it has one;
    ``bits``: the mask already packed by the forward."""
    x, weight, lora_a, lora_b, scaling, _bias, mask, dropout_scales, rank_groups, dropout_seed, dropout_p = inputs
    ctx.kept_dropped = bool(kept)
    if kept:  # the dropped copies of x the forward made, and the masks as they are (see _keeps_dropped)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa, mask, *kept)
    else:  # the masks, 1 bit per element (one [M, K] mask per group of stacked adapters)
        if bits is None and mask is not None:
            bits = pack_bits(mask.reshape(-1, x.shape[1]))
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa, bits)
    ctx.scaling = scaling
    # A seed >= 0 regenerates the mask (philox).
    ctx.dropout = (list(dropout_scales), list(rank_groups), dropout_seed, dropout_p)


def lora_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    mask: Optional[torch.Tensor],
    dropout_scales: Sequence[float],
    needs: tuple[bool, bool, bool, bool],
    dropout_seed: int = -1,
    dropout_p: float = 0.0,
    rank_groups: Sequence[int] = (),
    dropped: Optional[Sequence[torch.Tensor]] = None,
    xa: Optional[torch.Tensor] = None,
    mask_bits: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], ...]:
    """Gradients (dx, dweight, dlora_a, dlora_b) of ``x W^T + s D(x) A^T B^T`` for the output gradient ``dy``,
    each only where ``needs`` says so. D is the dropout with keep-``mask`` (identity when None): a diagonal, so
    its own adjoint. With xd = D(x):
    dx = dy W + s D((dy B) A);  dA = s (dy B)^T xd;  dB = s dy^T (xd A^T);  dW = dy^T x.
    With ``rank_groups`` (stacked adapters, ``mask`` [G, M, K], a scale each) every group has its own D.

    x and dy are 2-D rows. ``dy @ B`` is computed once, in fp32, and serves both dx and dA; with dB it comes from
    one pass over dy (fastpeft::lora_dy_pass), whose xa is the forward's (``xa``, fp32 [M, R]) when it kept one,
    else recomputed. The dropped x is ``dropped`` (one per group) when the forward kept it, else rebuilt from the
    mask where dA and dB need it. With ``dropout_seed >= 0`` (dropout_mode='philox') the mask comes from the
    seed: inside the Triton kernels, or materialised by seeded_mask on other backends. ``mask_bits``: the mask
    as packed bits (``mask`` None), read as such by the Triton kernels or unpacked for the other backends.
    """
    need_x, need_weight, need_a, need_b = needs
    in_kernel = _in_kernel_dropout(x, lora_a.shape[0], dropout_seed, dropout_p, dropout_scales[0], rank_groups,
                                   mask, mask_bits)  # fmt: skip
    if in_kernel is not None:
        return _in_kernel_grads(*in_kernel, dy, x, weight, lora_a, lora_b, scaling, needs, xa)
    if dropout_seed >= 0:
        mask = seeded_mask(dropout_seed, dropout_p, x.shape[0], x.shape[1], x.device)
    elif mask is None and mask_bits is not None:
        mask = unpack_bits(mask_bits, x.shape[1])
        mask = mask.view(len(rank_groups), *x.shape) if rank_groups else mask
    groups = _dropout_groups(mask, dropout_scales, rank_groups, lora_a.shape[0])
    if dropped is not None:
        x_lora = list(dropped)
    else:
        x_lora = [_dropped(x, m, s) for _, m, s in groups] if need_a or (need_b and xa is None) else []
    dx = dweight = da = db = None
    if need_b:
        if xa is None:
            xa = _columns([call_lora_op("lora_shrink", xd, lora_a[rows])
                           for (rows, _, _), xd in zip(groups, x_lora, strict=True)])  # fmt: skip
        dy_b, db = call_lora_op("lora_dy_pass", dy, lora_b, xa, scaling)
    elif need_x or need_a:
        dy_b = call_lora_op("lora_shrink", dy, lora_b.t())
    if need_x or need_a:
        if need_x and mask is None:
            dx = call_lora_op("lora_expand_linear", dy, weight.t(), dy_b, lora_a.t(), scaling, None)
        elif need_x:
            lora_dx = [_dropped((dy_b[:, rows] * scaling).to(dy.dtype) @ lora_a[rows], m, s) for rows, m, s in groups]
            dx = sum(lora_dx[1:], lora_dx[0]).addmm_(dy, weight)  # a fresh tensor: cuBLAS adds into it in place
        if need_a:
            dy_b_scaled = (dy_b * scaling).to(x.dtype)
            da = torch.cat([dy_b_scaled[:, rows].t() @ xd for (rows, _, _), xd in zip(groups, x_lora, strict=True)])
    if need_weight:
        dweight = dy.t() @ x
    return dx, dweight, da, db


def _in_kernel_grads(kernels, spec, dy, x, weight, lora_a, lora_b, scaling, needs, xa):
    """lora_grads on the Triton kernels with the mask applied inside them (``spec``: Philox's, regenerated, or
    packed bits): dx's LoRA term masked in the epilogue, dA a shrink over x transposed (the mask read
    transposed), dB with dy B from one pass over dy, on the dropped shrink (the forward's ``xa``, or
    recomputed)."""
    need_x, need_weight, need_a, need_b = needs
    dx = dweight = da = db = None
    if need_b:
        dy_b, db = _dy_pass_triton(dy, lora_b, kernels.lora_shrink(x, lora_a, spec) if xa is None else xa, scaling)
    elif need_x or need_a:
        dy_b = kernels.lora_shrink(dy, lora_b.t())
    if need_x or need_a:
        if need_x:
            dx = kernels.lora_linear(dy, weight.t(), None, lora_a.t(), scaling, None, xa=dy_b, dropout_out=spec)
        if need_a:
            da = kernels.lora_shrink(x.t(), (dy_b * scaling).to(x.dtype).t(), spec.transposed()).t().to(x.dtype)
    if need_weight:
        dweight = dy.t() @ x
    return dx, dweight, da, db


def _backward(ctx, dy):
    """lora_grads for the saved inputs; dbias = sum(dy). The dropout mask comes back from the bits the forward
    saved or from its seed (a GPU: no dropped copy of x kept), or as the forward kept it with the dropped x (a
    CPU, :func:`_keeps_dropped`)."""
    x, weight, lora_a, lora_b, xa, saved_mask, *dropped = ctx.saved_tensors
    scales, rank_groups, seed, p = ctx.dropout
    bits = None
    if getattr(ctx, "kept_dropped", False):
        mask = saved_mask.reshape(-1, *x.shape) if rank_groups else saved_mask
    else:  # bits: read by the Triton kernels as they are, unpacked for the other backends (lora_grads)
        mask, bits, dropped = None, saved_mask, None
    needs = ctx.needs_input_grad
    grads = lora_grads(dy, x, weight, lora_a, lora_b, ctx.scaling, mask, scales, needs[:4], seed, p, rank_groups,
                       dropped, xa, bits)  # fmt: skip
    dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if needs[5] else None
    return (*grads, None, dbias, None, None, None, None, None)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# Eager mode skips the custom-op machinery, whose Python overhead per call is comparable to a decode GEMV;
# torch.compile sees the custom op (with its fake implementation) instead. Both share one autograd formula.
# Both take and return 2-D rows, and lora_linear reshapes outside them: a view made inside an autograd.Function
# or a custom op cannot be modified in place (PEFT's `result += ...`, `nn.ReLU(inplace=True)`).
# forward(ctx, ...) saves for the backward itself: with a separate setup_context, Function.apply binds forward's
# arguments through inspect.signature on every call, which costs more than a small layer's GEMMs on a CPU.
class _LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        kept = [] if _keeps_dropped(inputs[0], inputs[6], inputs[9]) else None
        shrinks: list[torch.Tensor] = []
        packed: list[torch.Tensor] = []
        output = _lora_linear_rows(*inputs, kept=kept, shrinks=shrinks, packed=packed)
        _setup_context(ctx, inputs, output, kept, shrinks[0] if shrinks else None, packed[0] if packed else None)
        return output

    backward = staticmethod(_backward)


def _keeps_dropped(x: torch.Tensor, mask: Optional[torch.Tensor], seed: int) -> bool:
    """Whether the eager forward keeps the dropped x (and the mask as bools) for the backward, as PEFT's
    autograd does: off CUDA, where memory is plentiful and rebuilding x from packed bits costs more time than
    the layer's GEMMs. On a GPU the bits (1/16 of a bf16 x) and a rebuild in the backward."""
    return mask is not None and seed < 0 and x.device.type != "cuda"


def call_lora_op(op: str, x: torch.Tensor, *args) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A backward-pass op: through the custom op while compiling, straight to its backend otherwise."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.fastpeft, op)(x, *args)
    return _run(op, x, *args)


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


def _args_fit(x, weight, lora_a, lora_b, scaling, bias, lora_bias) -> bool:
    """True only when every check of :func:`check_lora_linear_args` passes (False may still pass: those
    checks then decide, and word the error)."""
    try:
        dtype, device = x.dtype, x.device
        out_features, in_features = weight.shape
        rank, a_in = lora_a.shape
        return (
            isinstance(x, torch.Tensor)
            and dtype in FLOAT_DTYPES
            and type(scaling) in (float, int)
            and x.dim() >= 1
            and x.shape[-1] == in_features == a_in
            and rank >= 1
            and lora_b.shape == (out_features, rank)
            and weight.dtype == dtype == lora_a.dtype == lora_b.dtype
            and weight.device == device == lora_a.device == lora_b.device
            and all(isinstance(t, torch.Tensor) for t in (weight, lora_a, lora_b))
            and all(t is None or (isinstance(t, torch.Tensor) and t.dtype == dtype and t.device == device
                                  and t.shape == (out_features,)) for t in (bias, lora_bias))
        )  # fmt: skip
    except (AttributeError, TypeError, ValueError):
        return False


def check_lora_linear_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
    lora_bias: Optional[torch.Tensor] = None,
) -> None:
    """Raise TypeError/ValueError naming the argument when the inputs of lora_linear do not fit together."""
    if _args_fit(x, weight, lora_a, lora_b, scaling, bias, lora_bias):
        return  # the common case, in a few attribute reads (per call, it weighs on a CPU layer)
    named = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b, "bias": bias, "lora_bias": lora_bias}
    named = {name: t for name, t in named.items() if t is not None or name not in ("bias", "lora_bias")}
    for name, t in named.items():
        check_tensor(name, t, dims=None if name == "x" else (1 if name.endswith("bias") else 2))
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., in_features], got a 0-D tensor")
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"lora_linear needs one dtype for all tensors, got {dtypes}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"lora_linear needs all tensors on one device, got {devices}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")
    out_features, in_features = weight.shape
    r = lora_a.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension {x.shape[-1]} != weight's in_features {in_features} "
                         f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})")  # fmt: skip
    if r < 1 or lora_a.shape[1] != in_features:
        raise ValueError(f"lora_a must be [r >= 1, in_features={in_features}], got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (out_features, r):
        raise ValueError(f"lora_b must be [out_features={out_features}, r={r}], got {tuple(lora_b.shape)}")
    for name in ("bias", "lora_bias"):
        if name in named and tuple(named[name].shape) != (out_features,):
            raise ValueError(f"{name} must be [out_features={out_features}], got {tuple(named[name].shape)}")


def _check_given_mask(mask: object, dropping: bool, expected: tuple, device: torch.device, layout: str) -> None:
    """TypeError/ValueError naming dropout_mask unless it is None, or (with some dropout_p > 0) a bool tensor of
    shape ``expected`` on ``device``; ``layout`` says that shape in words."""
    if not dropping:
        if mask is not None:
            raise ValueError("dropout_mask needs dropout_p > 0 (the kept elements are scaled by 1 / (1 - p))")
        return
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"dropout_mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != expected or mask.device != device:
        raise ValueError(f"dropout_mask must {layout}: shape {expected} on {device}, "
                         f"got {tuple(mask.shape)} on {mask.device}")  # fmt: skip


def resolve_dropout_mask(x: torch.Tensor, p: float, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The keep-mask for A's input as 2-D rows: ``mask`` checked, or drawn as nn.Dropout(p) would draw it."""
    _check_given_mask(mask, p > 0, tuple(x.shape), x.device, "match x")
    if p == 0.0:
        return None
    if mask is None:
        mask = draw_mask(tuple(x.shape), p, x.dtype, x.device)
    return mask.reshape(-1, x.shape[-1])


def _check_rank_groups(rank_groups: object, rank: int) -> list[int]:
    if rank_groups is None:
        return []
    groups = list(rank_groups) if isinstance(rank_groups, (list, tuple)) else None
    if not groups or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in groups):
        raise ValueError(f"rank_groups must be a list of ranks >= 1, got {rank_groups!r}")
    if sum(groups) != rank:
        raise ValueError(f"rank_groups must add up to lora_a's rank {rank}, got {groups} (sum {sum(groups)})")
    return groups


def _group_masks(
    x: torch.Tensor, ps: list[float], mask: Optional[torch.Tensor], groups: list[int]
) -> Optional[torch.Tensor]:
    """[G, M, K] keep-masks of stacked adapters, drawn in order as each adapter's nn.Dropout would draw them (a
    group with p = 0 draws nothing and keeps everything), or ``mask`` [G, ..., K] checked; None when no p > 0."""
    expected = (len(groups), *x.shape)
    _check_given_mask(mask, any(ps), expected, x.device, "be [groups, *x.shape] with rank_groups")
    if not any(ps):
        return None
    if mask is None:
        keep_all = torch.ones(x.shape, dtype=torch.bool, device=x.device)
        mask = torch.stack([draw_mask(tuple(x.shape), p, x.dtype, x.device) if p else keep_all for p in ps])
    return mask.reshape(len(groups), -1, x.shape[-1])


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    *,
    lora_bias: Optional[torch.Tensor] = None,
    dropout_p: float | Sequence[float] = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
    dropout_mode: str = "torch",
    rank_groups: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Fused LoRA linear layer: ``x @ weight.T + bias + scaling * (dropout(x) @ lora_a.T @ lora_b.T + lora_bias)``.

    Args:
        x: [..., in_features], any leading shape (zero rows allowed), any strides.
        weight: [out_features, in_features], the frozen base weight (PyTorch's nn.Linear layout; pass
            ``conv1d.weight.t()``, a view, for GPT-2's Conv1D, which stores [in_features, out_features]).
        lora_a: [r, in_features].
        lora_b: [out_features, r].
        scaling: the LoRA scale (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA).
        bias: [out_features] or None.
        lora_bias: [out_features] or None: the bias of PEFT's lora_B (``lora_bias=True``), scaled with it.
        dropout_p: in [0, 1). When > 0 the LoRA branch reads x with elements zeroed with probability p and the
            rest scaled by 1 / (1 - p), as ``nn.Dropout(p)`` in training; the base product reads x unchanged.
            The caller decides when dropout is on (training). The mask is drawn from torch's generator exactly
            as ``nn.Dropout(p)`` would draw it for x (same state consumed), so a seeded run gives PEFT's
            numbers; the backward keeps it as bits, not as a dropped copy of x.
        dropout_mask: bool [..., in_features] like x, the keep-mask to use instead of drawing one (with
            dropout_p > 0).
        dropout_mode: ``"torch"`` (default) draws nn.Dropout's mask as above; ``"philox"`` (opt-in) draws the
            mask inside the Triton kernels from a seed taken from torch's generator (reproducible under
            ``torch.manual_seed``), so neither pass materialises a dropped copy of x or a mask, and the backward
            regenerates it from the seed. Other backends apply the same mask, materialised (seeded_mask).
            Eager only: under torch.compile use the default mode.
        rank_groups: the ranks of several adapters stacked in lora_a's rows and lora_b's columns (which then
            carry each adapter's scale, with ``scaling`` = 1), when each adapter draws its own dropout mask, as
            PEFT's several active adapters do: ``dropout_p`` is then a list (one p per adapter, 0 allowed),
            the masks are drawn in the adapters' order, ``dropout_mask`` is bool [groups, ..., in_features],
            and the base GEMM and the expand still run once for all of them. Default mode only.

    All tensors share one dtype (float16, bfloat16 or float32) and one device; accumulation is fp32.
    Returns [..., out_features] in that dtype. Differentiable in x, weight, lora_a, lora_b, bias, lora_bias.
    """
    check_lora_linear_args(x, weight, lora_a, lora_b, scaling, bias, lora_bias)
    no_dropout = type(dropout_p) in (float, int) and dropout_p == 0 and dropout_mask is None
    if no_dropout and rank_groups is None and dropout_mode in DROPOUT_MODES:
        if lora_bias is not None:
            bias = scaling * lora_bias if bias is None else bias + scaling * lora_bias
        return lora_forward_no_dropout(x, weight, lora_a, lora_b, float(scaling), bias)
    groups = _check_rank_groups(rank_groups, lora_a.shape[0])
    if groups and isinstance(dropout_p, (list, tuple)):
        if len(dropout_p) != len(groups):
            raise ValueError(f"dropout_p must give one p per rank group ({len(groups)}), got {list(dropout_p)}")
        ps = [check_p(p) for p in dropout_p]
    else:
        ps = [check_p(dropout_p)] * max(1, len(groups))
    if dropout_mode not in DROPOUT_MODES:
        raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}, got {dropout_mode!r}")
    p = max(ps)
    philox = dropout_mode == "philox" and p > 0
    if philox and (dropout_mask is not None or groups):
        raise ValueError("dropout_mode='philox' draws one mask in-kernel: it takes neither dropout_mask nor "
                         "rank_groups; use dropout_mode='torch'")  # fmt: skip
    if philox and torch.compiler.is_compiling():
        raise ValueError("dropout_mode='philox' runs eagerly; under torch.compile use dropout_mode='torch'")
    if lora_bias is not None:  # folded into the bias, outside the op: autograd gives it scaling * sum(dy)
        bias = scaling * lora_bias if bias is None else bias + scaling * lora_bias
    rows = x.reshape(-1, x.shape[-1])
    if philox:
        mask, scales, seed = None, [philox_keep_scale(p)], draw_seed()
    elif groups:
        mask, seed = _group_masks(x, ps, dropout_mask, groups), -1
        scales = [keep_scale(q, x.dtype, x.device) if q else 1.0 for q in ps]
    else:
        mask, seed = resolve_dropout_mask(x, p, dropout_mask), -1
        scales = [keep_scale(p, x.dtype, x.device) if mask is not None else 1.0]
    groups = groups if mask is not None else []  # without dropout the stacked adapters run as one
    y = _fused_rows(rows, weight, lora_a, lora_b, float(scaling), bias, mask, scales, groups, seed, p)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _fused_rows(x, weight, lora_a, lora_b, scaling, bias, mask, scales, groups, seed, p) -> torch.Tensor:
    """The op on 2-D rows by its route (:mod:`fastpeft.ops.route`); the torch backend's autograd form
    (:func:`_lora_linear_torch_autograd`) has one mask and no in-kernel dropout."""
    pref = preference("lora_linear", x.shape[0], 1)
    tensors = (x, weight, lora_a, lora_b, bias)
    route = choose_route("lora_linear", x.device, pref, tensors, torch_autograd=seed < 0 and not groups)
    if route is Route.CUSTOM_OP:
        return _lora_linear_op(x, weight, lora_a, lora_b, scaling, bias, mask, scales, groups, seed, p)
    if route is Route.BACKEND:
        return _lora_linear_rows(x, weight, lora_a, lora_b, scaling, bias, mask, scales, groups, seed, p)
    if route is Route.TORCH_AUTOGRAD:
        select_backend("lora_linear", x.device, pref)  # reported: the op runs on the torch backend
        return _lora_linear_torch_autograd(x, weight, lora_a, lora_b, scaling, bias, mask, scales[0])
    return _LoRALinearFunction.apply(x, weight, lora_a, lora_b, scaling, bias, mask, scales, groups, seed, p)


def _lora_linear_torch_autograd(x, weight, lora_a, lora_b, scaling, bias, mask, scale) -> torch.Tensor:
    """The torch backend's formula as differentiable PyTorch ops, for training off CUDA
    (:func:`~fastpeft.backends.differentiable_as_is`): autograd records three GEMMs (PEFT's path has five ops)
    and keeps the dropped x, as PEFT's."""
    dropped = x if mask is None else apply_mask(x, mask, scale)
    return _expand_linear_torch(x, weight, _shrink_torch(dropped, lora_a), lora_b, scaling, bias)


def lora_forward_no_dropout(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """:func:`lora_linear` without dropout, for arguments already known to fit (no checks: a patched PEFT layer's
    own tensors), by the same routes (:func:`_fused_rows`). x [..., K]; returns [..., N] in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    y = _fused_rows(rows, weight, lora_a, lora_b, scaling, bias, None, [1.0], [], -1, 0.0)
    return y.reshape(*x.shape[:-1], weight.shape[0])
