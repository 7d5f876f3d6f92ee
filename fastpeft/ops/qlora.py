"""The ``qlora`` op family: products with a 4-bit (NF4/FP4) weight, dequantized on chip below 512 rows of x and
once per call (a transient dense W) above, by the tiers below.

    matmul_4bit:  y = x @ dequant(W).T + bias
    qlora_linear: y = x @ dequant(W).T + bias + scaling * (dropout(x) @ A.T) @ B.T

W is bitsandbytes' layout (:mod:`fastpeft.ops.quant_4bit`); its dequantized values are bitsandbytes' exactly
(``code[q] * absmax`` in fp32, rounded to the state's dtype), then cast to x's dtype, as bitsandbytes'
``matmul_4bit`` does. Two custom ops, each with a fake implementation, on three backends:

- ``fastpeft::matmul_4bit(x, packed, <state>, n, w_dtype, bias, lora_a, xa, lora_b, scaling)``: the forward,
  LoRA optional (``lora_a``: the shrink of x is computed too, fused into the kernel for decode on Triton;
  ``xa``: a precomputed fp32 shrink, as after dropout);
- ``fastpeft::matmul_4bit_t(dy, packed, <state>, k, w_dtype, dyb, lora_a, scaling)``: ``dy @ dequant(W)``
  (+ ``scaling * dyb @ A``), the backward's ``dx`` (W dequantized on chip, or once per call from 512 rows).

``cuda`` (csrc/qlora.cu: a GEMV with 16-byte loads for decode, a tensor-core GEMM for 16-bit prefill, the
dequantize pass),
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
from fastpeft.ops.lora import IMPLS as LORA_IMPLS
from fastpeft.ops.lora import call_lora_op
from fastpeft.ops.quant_4bit import QuantState, check_quant_state, dequantize_4bit, dequantize_checked
from fastpeft.ops.route import Route, choose_route

# The tiers, by rows M of x (the torch backend dequantizes at every M; benchmarks/roofline.py models each tier):
#   M <= GEMV_MAX_M, no adapter shrink to fuse   the CUDA GEMV: W's bytes read once, the products on the CUDA cores
#                                                (where it runs with an adapter, forced or without Triton, it computes
#                                                the shrink in its own launch on sm_90: csrc/qlora.cu).
#   M <= DECODE_MAX_M otherwise                  Triton's decode tiles: W read once, the products on the tensor cores
#                                                (only the decoding on the CUDA cores), the LoRA shrink x A^T in the
#                                                same K loop: one launch per QLoRA layer call.
#   DECODE_MAX_M < M < DEQUANTIZE_ONCE_MIN_M     tiles that dequantize W on chip per row tile (tensor cores): W's
#                                                4-bit bytes read ceil(M / BLOCK_M) times, never written dense.
#   M >= DEQUANTIZE_ONCE_MIN_M                   dequantize once: one pass writes W in x's dtype (N*K/2 bytes read,
#                                                2*N*K written), then one cuBLAS GEMM with the adapter as r more
#                                                columns of its K loop, or the plain LoRA layer's product on W
#                                                (joins_adapter: whichever moves fewer bytes beside the GEMM).
# Why 0 (the GEMV only where Triton cannot run, or forced): both decode kernels are bound by W's bytes at one row
# (~7.8 us for 4096 x 14336 on an H200), the model puts Triton's tiles ~10% ahead there (the GEMV's 448 blocks
# fill 1.7 waves of two per SM, and it reads x back from shared memory), and every further row costs the GEMV one
# FMA per weight (~1.8 us) that the tensor cores take for free; the first GPU run's fused:cuda and fused:triton
# rows decide. Why 512: the dense pass costs about 2.5 bytes per weight (~38 us for 4096 x 14336), fixed in M,
# while decoding on chip costs the decode once per row tile beside the tile's 2*BLOCK_M tensor-core FLOPs; the
# GEMM (2*M*N*K at 790 TFLOP/s) passes 3 x 38 us near M = 512. Predicted, not measured: the first GPU run
# measures both crossovers (benchmarks/bench_qlora.py) and these constants follow it.
GEMV_MAX_M = 0
DECODE_MAX_M = 16
DEQUANTIZE_ONCE_MIN_M = 512


def preference(op: str, m: int, fuses_shrink: bool) -> tuple[str, ...]:
    """The backend order for ``op`` (matmul_4bit or matmul_4bit_t) on ``m`` rows on a CUDA device, by the tiers
    above; ``fuses_shrink``: the call carries lora_a for its kernel to compute x A^T in the same launch."""
    if op == "matmul_4bit" and m <= GEMV_MAX_M and not fuses_shrink:
        return ("cuda", "triton")
    return ("triton", "cuda")


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
        """The state as the custom ops' schema takes it (everything between ``packed`` and the shape): a schema
        holds tensors and scalars only, so the object travels flat across the op boundary and nowhere else."""
        return (self.absmax, self.code, self.absmax2, self.code2, self.offset, self.blocksize, self.nested_blocksize)

    def forward_args(self) -> tuple:
        """The weight as matmul_4bit's schema (and its kernels) take it: bytes, state, out_features, dtype."""
        return (self.packed, *self.state_args(), self.out_features, self.dtype)

    def backward_args(self) -> tuple:
        """The weight as matmul_4bit_t's schema (and its kernels) take it: bytes, state, in_features, dtype."""
        return (self.packed, *self.state_args(), self.in_features, self.dtype)

    @classmethod
    def from_op_args(cls, packed, state_args: tuple, out_features: int, in_features: int, dtype) -> "Weight4bit":
        """The inverse of :meth:`state_args`, inside a custom op (its arguments were checked when the object was
        built)."""
        return cls(packed, *state_args, out_features, in_features, dtype)

    def state(self) -> QuantState:
        """bitsandbytes' QuantState for this weight (its quant_type read from the code: one host sync)."""
        quant_type = "fp4" if float(self.code[1]) > 0 else "nf4"  # FP4's code[1] is +0.0052, NF4's -0.696
        return self._quant_state(quant_type)

    def dequantized(self) -> torch.Tensor:
        """W [out_features, in_features] in ``dtype``, bitsandbytes' values (no host sync)."""
        return dequantize_checked(self.packed, self._quant_state("nf4"))  # only the code's values matter here

    def _quant_state(self, quant_type: str) -> QuantState:
        nested = None
        if self.absmax2 is not None:
            nested = QuantState(self.absmax2, None, self.code2, self.nested_blocksize, None, torch.float32)
        shape = torch.Size((self.out_features, self.in_features))
        offset = None if self.offset is None else self.offset.reshape(())
        return QuantState(self.absmax, shape, self.code, self.blocksize, quant_type, self.dtype, offset, nested)


# ----------------------------------------------------------------------------------------------------------
# The backends: each takes the weight as one Weight4bit
# ----------------------------------------------------------------------------------------------------------


@without_autocast
def _matmul_4bit_torch(x, w: Weight4bit, bias, lora_a, xa, lora_b, scaling):
    wt = w.dequantized().to(x.dtype).t()
    if lora_b is None:
        return torch.mm(x, wt) if bias is None else torch.addmm(bias, x, wt)
    xa = torch.mm(x.float(), lora_a.float().t()) if xa is None else xa
    if x.dtype == torch.float32:  # as lora's torch path: three GEMM calls, the LoRA term added in place
        out = torch.mm(x, wt) if bias is None else torch.addmm(bias, x, wt)
        return out.addmm_(xa, lora_b.t(), alpha=scaling)
    out = torch.mm(x, wt).float().addmm_(xa, lora_b.float().t(), alpha=scaling)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


@without_autocast
def _matmul_4bit_t_torch(dy, w: Weight4bit, dyb, lora_a, scaling):
    dx = torch.mm(dy, w.dequantized().to(dy.dtype))
    if dyb is None:
        return dx
    return torch.addmm(dx.float(), dyb, lora_a.float(), alpha=scaling).to(dy.dtype)


# The triton and cuda backends are imported on first use: triton and fastpeft._C are optional.


def _dequantize_triton(w: Weight4bit, out: torch.Tensor) -> torch.Tensor:
    from fastpeft.triton_kernels.qlora import dequantize_4bit

    return dequantize_4bit(w.packed, *w.state_args(), w.out_features, w.in_features, w.dtype, out)


def _dequantize_cuda(w: Weight4bit, out: torch.Tensor) -> torch.Tensor:
    torch.ops.fastpeft.dequantize_4bit_cuda(w.packed, *w.state_args(), w.out_features, w.in_features, w.dtype, out)
    return out


# backend -> write W [N, K] into a given view ([N, K], unit column stride, any row stride) in the view's dtype
DEQUANTIZE = {"triton": _dequantize_triton, "cuda": _dequantize_cuda}


def joins_adapter(reduce: int, out: int) -> bool:
    """Whether the dequantize-once tier folds the adapter into cuBLAS's K loop as r more columns (``[x | s xa]`` by
    ``[W | B]^T``: x copied beside s xa, about 4 bytes per element of x read and written) rather than running the
    plain LoRA layer's product on the dense W (its LoRA term written first, 2 bytes per element of y, then cuBLAS
    adding x W^T into it within the GEMM). ``reduce``: the product's reduction (K forward, N for dx); ``out``: its
    width (N forward, K for dx). The copy where the output is more than twice as wide as the reduction (an
    up-projection's forward), the term elsewhere (square layers, a down-projection, an up-projection's dx)."""
    return out > 2 * reduce


def _dequantized_forward(backend: str, x, w: Weight4bit, bias, lora_a, xa, lora_b, scaling):
    """The dequantize-once tier's forward: one bandwidth pass writes W in x's dtype (a transient, freed when the
    call returns), then either one cuBLAS GEMM ``[x | s xa] @ [W | B]^T`` (W written straight into the wider
    buffer, B copied beside it, s xa rounded to x's dtype as PEFT's lora_A output is) or the plain LoRA layer's
    product on W (fastpeft.ops.lora's ``lora_expand_linear`` on the same backend), by :func:`joins_adapter`; the
    shrink first where xa is not given."""
    n, k = w.out_features, w.in_features
    r = 0 if lora_b is None else lora_b.shape[1]
    join = r > 0 and joins_adapter(k, n)
    dense = torch.empty((n, k + r if join else k), device=x.device, dtype=x.dtype)
    DEQUANTIZE[backend](w, dense[:, :k])
    if r and xa is None:
        xa = LORA_IMPLS["lora_shrink"][backend](x, lora_a)
    if r and not join:
        return LORA_IMPLS["lora_expand_linear"][backend](x, dense, xa, lora_b, scaling, bias)
    if join:
        dense[:, k:] = lora_b
        joined = torch.empty((x.shape[0], k + r), device=x.device, dtype=x.dtype)
        joined[:, :k] = x
        joined[:, k:] = xa * scaling
        x = joined
    return torch.mm(x, dense.t()) if bias is None else torch.addmm(bias, x, dense.t())


def _dequantized_backward(backend: str, dy, w: Weight4bit, dyb, lora_a, scaling):
    """The dequantize-once tier's ``dx = dy W (+ s dyb A)``: W dequantized again (the forward's copy is gone:
    keeping it would hold 2*N*K bytes per layer between the passes, the memory QLoRA saves), then, by
    :func:`joins_adapter`, ``[dy | s dyb] @ [W ; A]`` in one cuBLAS GEMM (A copied below W) or the plain LoRA
    layer's dx product on W (``lora_expand_linear`` with W^T and A^T, as fastpeft.ops.lora's backward runs it)."""
    n, k = w.out_features, w.in_features
    r = 0 if dyb is None else dyb.shape[1]
    join = r > 0 and joins_adapter(n, k)
    dense = torch.empty((n + r if join else n, k), device=dy.device, dtype=dy.dtype)
    DEQUANTIZE[backend](w, dense[:n])
    if r and not join:
        return LORA_IMPLS["lora_expand_linear"][backend](dy, dense.t(), dyb, lora_a.t(), scaling, None)
    if not r:
        return torch.mm(dy, dense)
    dense[n:] = lora_a
    joined = torch.empty((dy.shape[0], n + r), device=dy.device, dtype=dy.dtype)
    joined[:, :n] = dy
    joined[:, n:] = dyb * scaling
    return torch.mm(joined, dense)


def _matmul_4bit_triton(x, w: Weight4bit, bias, lora_a, xa, lora_b, scaling):
    from fastpeft.triton_kernels import qlora
    from fastpeft.triton_kernels.lora import lora_shrink

    if x.shape[0] >= DEQUANTIZE_ONCE_MIN_M:
        return _dequantized_forward("triton", x, w, bias, lora_a, xa, lora_b, scaling)
    if lora_a is not None and x.shape[0] > qlora.DECODE_MAX_M:  # prefill: the shrink once, not per tile
        xa, lora_a = lora_shrink(x, lora_a), None
    return qlora.matmul_4bit(x, *w.forward_args(), bias, lora_a, xa, lora_b, scaling)


def _matmul_4bit_t_triton(dy, w: Weight4bit, dyb, lora_a, scaling):
    from fastpeft.triton_kernels.qlora import matmul_4bit_t

    if dy.shape[0] >= DEQUANTIZE_ONCE_MIN_M:
        return _dequantized_backward("triton", dy, w, dyb, lora_a, scaling)
    return matmul_4bit_t(dy, *w.backward_args(), dyb, lora_a, scaling)


def _matmul_4bit_cuda(x, w: Weight4bit, bias, lora_a, xa, lora_b, scaling):
    if x.shape[0] >= DEQUANTIZE_ONCE_MIN_M:
        return _dequantized_forward("cuda", x, w, bias, lora_a, xa, lora_b, scaling)
    # Given lora_a, the extension computes the shrink itself: inside the decode GEMV's launch on sm_90 (a cluster
    # of blocks shares it), else as a launch before the product.
    bias = None if bias is None else bias.contiguous()  # the kernels index bias and xa's rows densely
    xa = None if xa is None else xa.contiguous()
    return torch.ops.fastpeft.matmul_4bit_cuda(x, *w.forward_args(), bias, xa, lora_a, lora_b, scaling)


def _matmul_4bit_t_cuda(dy, w: Weight4bit, dyb, lora_a, scaling):
    if dy.shape[0] >= DEQUANTIZE_ONCE_MIN_M:
        return _dequantized_backward("cuda", dy, w, dyb, lora_a, scaling)
    dyb = None if dyb is None else dyb.contiguous()
    return torch.ops.fastpeft.matmul_4bit_t_cuda(dy, *w.backward_args(), dyb, lora_a, scaling)


IMPLS = {
    "matmul_4bit": {"torch": _matmul_4bit_torch, "triton": _matmul_4bit_triton, "cuda": _matmul_4bit_cuda},
    "matmul_4bit_t": {"torch": _matmul_4bit_t_torch, "triton": _matmul_4bit_t_triton, "cuda": _matmul_4bit_t_cuda},
}


def _run(op: str, x: torch.Tensor, w: Weight4bit, *args) -> torch.Tensor:
    fuses_shrink = op == "matmul_4bit" and args[1] is not None  # matmul_4bit's args: bias, lora_a, ...
    backend = select_backend(op, x.device, preference(op, x.shape[0], fuses_shrink))
    return IMPLS[op][backend](x, w, *args)


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
    state = (absmax, code, absmax2, code2, offset, blocksize, nested_blocksize)
    w = Weight4bit.from_op_args(packed, state, n, x.shape[1], w_dtype)
    return _run("matmul_4bit", x, w, bias, lora_a, xa, lora_b, scaling)


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
    state = (absmax, code, absmax2, code2, offset, blocksize, nested_blocksize)
    w = Weight4bit.from_op_args(packed, state, dy.shape[1], k, w_dtype)
    return _run("matmul_4bit_t", dy, w, dyb, lora_a, scaling)


@_matmul_4bit_t_op.register_fake
def _(dy, packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, k, w_dtype, dyb, lora_a,
      scaling):  # fmt: skip
    return dy.new_empty((dy.shape[0], k))


def _forward_op(x, w: Weight4bit, bias, lora_a, xa, lora_b, scaling):
    if torch.compiler.is_compiling():
        return _matmul_4bit_op(x, *w.forward_args(), bias, lora_a, xa, lora_b, scaling)
    return _run("matmul_4bit", x, w, bias, lora_a, xa, lora_b, scaling)


def _backward_op(dy, w: Weight4bit, dyb, lora_a, scaling):
    if torch.compiler.is_compiling():
        return _matmul_4bit_t_op(dy, *w.backward_args(), dyb, lora_a, scaling)
    return _run("matmul_4bit_t", dy, w, dyb, lora_a, scaling)


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------


def _qlora_forward(
    x, weight: Weight4bit, bias, lora_a, lora_b, scaling, mask, mask_scale, keep_xa: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The layer on 2-D rows, no autograd, and its xa = D(x) A^T where computed apart: the LoRA shrink of the
    dropped x first when there is a mask, and with ``keep_xa`` (training) past the decode rows, where every tier
    runs the shrink as a launch of its own anyway (the backward's dB then reads neither x nor a second shrink)."""
    lora = lora_b is not None
    xa = None
    if lora and mask is not None:
        xa = call_lora_op("lora_shrink", apply_mask(x, mask, mask_scale), lora_a)
    elif lora and keep_xa and x.shape[0] > DECODE_MAX_M:
        xa = call_lora_op("lora_shrink", x, lora_a)
    return _forward_op(x, weight, bias, lora_a if lora and xa is None else None, xa, lora_b, scaling), xa


class _QLoRAFunction(torch.autograd.Function):
    """y = x W^T + bias + s D(x) A^T B^T for the 4-bit W (frozen: no gradient), D the dropout with keep-mask
    ``mask`` (identity when None). Backward: dx = dy W + s D((dy B) A), fused in matmul_4bit_t without a mask;
    dA = s (dy B)^T D(x); dy B and dB = s dy^T (D(x) A^T) from one pass over dy (fastpeft::lora_dy_pass), on the
    forward's xa where it kept one; dbias = sum(dy)."""

    @staticmethod
    def forward(ctx, x, weight: Weight4bit, bias, lora_a, lora_b, scaling, mask, mask_scale):
        y, xa = _qlora_forward(x, weight, bias, lora_a, lora_b, scaling, mask, mask_scale, keep_xa=True)
        lora = lora_b is not None
        ctx.save_for_backward(x if lora else None, lora_a, lora_b, mask, xa)  # dx alone needs only W
        ctx.weight, ctx.scaling, ctx.mask_scale, ctx.lora = weight, scaling, mask_scale, lora
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_a, lora_b, mask, xa = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        weight, scaling = ctx.weight, ctx.scaling
        dx = da = db = dbias = dyb = None
        dy = dy.contiguous() if dy.stride(-1) != 1 else dy
        xd = None  # the dropped x, built once where dA or a recomputed shrink needs it
        if ctx.lora and (need_a or (need_b and xa is None)):
            xd = x if mask is None else apply_mask(x, mask, ctx.mask_scale)
        if ctx.lora and need_b:
            xa = call_lora_op("lora_shrink", xd, lora_a) if xa is None else xa
            dyb, db = call_lora_op("lora_dy_pass", dy, lora_b, xa, scaling)
        elif ctx.lora and (need_x or need_a):
            dyb = call_lora_op("lora_shrink", dy, lora_b.t())
        if need_x:
            fused_lora = dyb is not None and mask is None
            dx = _backward_op(dy, weight, dyb if fused_lora else None, lora_a if fused_lora else None, scaling)
            if dyb is not None and mask is not None:
                dx = dx + apply_mask((dyb * scaling).to(dy.dtype) @ lora_a, mask, ctx.mask_scale)
        if need_a:
            da = (dyb * scaling).to(x.dtype).t() @ xd
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
    """The layer on x's rows by its route (:mod:`fastpeft.ops.route`). The Function's forward and backward call
    the custom ops while compiling, so compiled calls take it too; the torch backend has no autograd form of its
    own (its weight is dequantized per call, which autograd would keep alive for the backward)."""
    rows = x.reshape(-1, x.shape[-1])
    pref = preference("matmul_4bit", rows.shape[0], lora_a is not None)
    route = choose_route("matmul_4bit", x.device, pref, (x, bias, lora_a, lora_b), torch_autograd=False)
    if route is Route.BACKEND:
        y, _ = _qlora_forward(rows, weight, bias, lora_a, lora_b, scaling, mask, mask_scale)
    else:
        y = _QLoRAFunction.apply(rows, weight, bias, lora_a, lora_b, scaling, mask, mask_scale)
    return y.reshape(*x.shape[:-1], weight.out_features)


def qlora_linear_reference(x, packed, state, lora_a=None, lora_b=None, scaling=1.0, bias=None) -> torch.Tensor:
    """The unfused computation in x's dtype (float64 inputs give the ground truth): bitsandbytes' dequantized
    weight, cast to x's dtype, then PEFT's LoRA."""
    y = torch.nn.functional.linear(x, dequantize_4bit(packed, state, x.dtype), bias)
    if lora_a is None:
        return y
    return y + scaling * torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b)
