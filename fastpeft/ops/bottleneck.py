"""The ``bottleneck`` op family: AdapterHub's bottleneck adapter (Houlsby, Pfeiffer, parallel) as one fused op.

    h = LN(x)                                  (when ln_weight is given)
    z = act(h @ down_weight.T + down_bias)     down_weight [m, d]
    y = residual + scaling * (z @ up_weight.T + up_bias)      up_weight [d, m]; residual defaults to x

``scaling`` is a float or a [d] tensor (AdapterHub's ``"channel"``; ``"learned"`` is a one-element tensor).
Several adapters in one batch: weights stacked per adapter and one id per sample (-1: no adapter, y = residual),
the fused form of AdapterHub's ``BatchSplit``.

Backends: ``triton`` (triton_kernels/bottleneck.py: one kernel per tile of rows, the bottleneck activations kept on
chip, LayerNorm folded into the down-projection; x read twice, the second read hitting L2 when the tile is still
there), ``cuda`` (csrc/bottleneck.cu: a few rows per block for decode; for fp16/bf16 prefill, a tile of up to 64
rows spread over a cluster of blocks, each owning a slice of d staged once in shared memory, both products on the
tensor cores, x read once and y written once) and ``torch`` (the composition, the CPU path and the reference's
shape). The backward recomputes z from x (nothing of size [M, m] or [M, d] is saved but x) and gives x, every
adapter parameter, the LN parameters and a tensor scaling their gradients: two Triton kernels without float atomics
(the same bits on every run; triton_kernels/bottleneck.py), or, with an add + LayerNorm after the adapter or on the
other backends, the composition differentiated by torch.func.vjp. Which backend a GPU runs, and why:
fastpeft/ops/bottleneck_plan.py. ``torch.compile`` traces the custom ops ``fastpeft::bottleneck_adapter`` and
``fastpeft::bottleneck_adapter_backward`` (each with a fake implementation); eager calls take the autograd Function,
or the backend directly without gradients.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from fastpeft.backends import select_backend
from fastpeft.ops.bottleneck_plan import TRITON_FIRST, gpu_of, preference
from fastpeft.ops.common import FLOAT_DTYPES
from fastpeft.ops.route import Route, choose_route

ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh", "leakyrelu", "sigmoid")
# The kernels' activation codes (csrc/bottleneck.cu and triton_kernels/bottleneck.py switch on them).
ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_new": 2, "silu": 3, "swish": 3, "tanh": 4, "leakyrelu": 5,
                    "sigmoid": 6}  # fmt: skip
LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU's default, which AdapterHub's "leakyrelu" uses
# Mirrors triton_kernels/bottleneck.py's BACKWARD_MAX_MB_PAD (which needs triton to import).
_BACKWARD_MAX_MB_PAD = 256


def activation_fn(name: str):
    """The activation AdapterHub's config name stands for, as a torch function."""
    fns = {
        "relu": torch.relu,
        "gelu": torch.nn.functional.gelu,
        "gelu_new": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
        "silu": torch.nn.functional.silu,
        "swish": torch.nn.functional.silu,
        "tanh": torch.tanh,
        "leakyrelu": lambda v: torch.nn.functional.leaky_relu(v, LEAKY_SLOPE),
        "sigmoid": torch.sigmoid,
    }
    if name not in fns:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return fns[name]


class Adapters(NamedTuple):
    """Bottleneck adapters' parameters. The public function takes one adapter, or several stacked on a leading
    dimension; the backends always see them stacked ([A, ...], A = 1 for a single adapter)."""

    down_weight: torch.Tensor  # [m, d] or [A, m, d]
    down_bias: torch.Tensor  # [m] or [A, m]
    up_weight: torch.Tensor  # [d, m] or [A, d, m]
    up_bias: torch.Tensor  # [d] or [A, d]
    scaling: float | torch.Tensor  # float, [1] or [d] ([A, 1] / [A, d] when stacked)
    ln_weight: torch.Tensor | None  # [d] or [A, d]
    ln_bias: torch.Tensor | None

    def stacked(self) -> Adapters:
        """One adapter as a stack of one (float scaling and absent LN parameters stay as they are)."""
        return Adapters(*(t[None] if isinstance(t, torch.Tensor) else t for t in self))

    def select(self, index: int) -> Adapters:
        """Adapter ``index`` of the stack."""
        return Adapters(*(t[index] if isinstance(t, torch.Tensor) else t for t in self))


def scale_table(scaling: float | torch.Tensor, count: int) -> torch.Tensor | None:
    """A tensor scaling as the kernels read it, fp32 [A, 1] or [A, d]; None for a float."""
    return scaling.reshape(count, -1).float().contiguous() if isinstance(scaling, torch.Tensor) else None


def bottleneck_reference(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    *,
    activation: str = "relu",
    scaling: float | torch.Tensor = 1.0,
    residual: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-5,
) -> torch.Tensor:
    """The unfused computation in x's dtype, as AdapterHub's modules compute it (float64 inputs give the
    ground truth). Shapes as :func:`bottleneck_adapter`."""
    h = x if ln_weight is None else torch.nn.functional.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, ln_eps)
    z = activation_fn(activation)(torch.nn.functional.linear(h, down_weight, down_bias))
    out = torch.nn.functional.linear(z, up_weight, up_bias) * scaling
    return (x if residual is None else residual) + out


# ----------------------------------------------------------------------------------------------------------
# Backends (on rows [M, d] with a per-row adapter index; a single adapter is index 0 everywhere)
# ----------------------------------------------------------------------------------------------------------


class Post(NamedTuple):
    """What follows the adapter's sum in BERT-style placements: ``LN_out(y + out_residual)`` (either optional)."""

    out_residual: torch.Tensor | None  # like x
    out_ln_weight: torch.Tensor | None  # [d]
    out_ln_bias: torch.Tensor | None  # [d]
    out_ln_eps: float


def _rows_of(ids: torch.Tensor | None, num_adapters: int) -> list[tuple[int, torch.Tensor | None]]:
    if ids is None:
        return [(0, None)]
    present = torch.unique(ids[(ids >= 0) & (ids < num_adapters)]).tolist()
    return [(i, (ids == i).nonzero().squeeze(1)) for i in present]


def _composition(x, residual, adapters: Adapters, ids, activation, ln_eps, post: Post, dtype) -> torch.Tensor:
    """The op as PyTorch operations (differentiable), in fp32 math with the bottleneck activations and the
    pre-norm sum rounded to ``dtype`` as the fused kernels round them."""
    y = (x if residual is None else residual).float()
    for index, rows in _rows_of(ids, adapters.down_weight.shape[0]):
        a = adapters.select(index)
        xs = (x if rows is None else x[rows]).float()
        h = xs if a.ln_weight is None else torch.nn.functional.layer_norm(
            xs, xs.shape[-1:], a.ln_weight.float(), a.ln_bias.float(), ln_eps)  # fmt: skip
        z = activation_fn(activation)(torch.nn.functional.linear(h, a.down_weight.float(), a.down_bias.float()))
        if dtype != torch.float32:  # rounded like the kernels' z, with z's own gradient
            z = z + (z.to(dtype).float() - z).detach()
        out = torch.nn.functional.linear(z, a.up_weight.float(), a.up_bias.float()) * _scale(a.scaling)
        y = y + out if rows is None else y.index_add(0, rows, out)
    if post.out_residual is not None:
        y = y + post.out_residual.float()
    if post.out_ln_weight is not None:
        if dtype != torch.float32:
            y = y + (y.to(dtype).float() - y).detach()
        y = torch.nn.functional.layer_norm(y, y.shape[-1:], post.out_ln_weight.float(), post.out_ln_bias.float(),
                                           post.out_ln_eps)  # fmt: skip
    return y


def _scale(scaling) -> float | torch.Tensor:
    return scaling.float() if isinstance(scaling, torch.Tensor) else scaling


def _forward_torch(x, residual, adapters: Adapters, ids, rows_per_sample, activation, ln_eps, post: Post):
    return _composition(x, residual, adapters, ids, activation, ln_eps, post, x.dtype).to(x.dtype)


def _forward_triton(x, residual, adapters: Adapters, ids, rows_per_sample, activation, ln_eps, post: Post):
    from fastpeft.triton_kernels.bottleneck import bottleneck_forward

    return bottleneck_forward(x, residual, adapters, ids, rows_per_sample, ACTIVATION_CODES[activation], ln_eps, post)


# (rows per tile, blocks per cluster) for csrc/bottleneck.cu's prefill tile kernel, (0, 0): its own plan. The
# tests' way to run every plan on one GPU.
FORCED_CUDA_TILE_PLAN = (0, 0)


def _forward_cuda(x, residual, adapters: Adapters, ids, rows_per_sample, activation, ln_eps, post: Post):
    def dense(t):
        return None if t is None else t.contiguous()

    def rows(t):
        return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())

    scaling = adapters.scaling
    scale = scale_table(scaling, adapters.down_weight.shape[0])
    up_t = adapters.up_weight.transpose(-1, -2).contiguous()  # [A, m, d]: coalesced reads per feature
    return torch.ops.fastpeft.bottleneck_forward_cuda(
        rows(x), rows(residual), dense(adapters.down_weight), dense(adapters.down_bias), up_t,
        dense(adapters.up_bias), scale, float(scaling) if scale is None else 1.0, dense(adapters.ln_weight),
        dense(adapters.ln_bias), ln_eps, dense(ids), ACTIVATION_CODES[activation],
        rows(post.out_residual), post.out_ln_weight, post.out_ln_bias, post.out_ln_eps, *FORCED_CUDA_TILE_PLAN,
    )  # fmt: skip


IMPLS = {"torch": _forward_torch, "triton": _forward_triton, "cuda": _forward_cuda}


def _run(x, residual, adapters: Adapters, *args):
    order = TRITON_FIRST
    if x.device.type == "cuda":
        order = preference(x.shape[0], x.shape[1], adapters.down_weight.shape[-2], x.dtype, gpu_of(x.device))
    backend = select_backend("bottleneck_adapter", x.device, order)
    return IMPLS[backend](x, residual, adapters, *args)


# ----------------------------------------------------------------------------------------------------------
# Autograd: forward fused, backward recomputing the composition from x
# ----------------------------------------------------------------------------------------------------------

_INPUTS = ("x", "residual", "out_residual", "out_ln_weight", "out_ln_bias", *Adapters._fields)


class _BottleneckFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, rows_per_sample, activation, ln_eps, out_ln_eps, *tensors):
        named = dict(zip(_INPUTS, tensors, strict=True))
        adapters = Adapters(*(named[f] for f in Adapters._fields))
        post = Post(named["out_residual"], named["out_ln_weight"], named["out_ln_bias"], out_ln_eps)
        y = _run(named["x"], named["residual"], adapters, ids, rows_per_sample, activation, ln_eps, post)
        ctx.save_for_backward(ids, *(t if isinstance(t, torch.Tensor) else None for t in tensors))
        constants = {n: t for n, t in named.items() if not isinstance(t, torch.Tensor)}
        ctx.constants = (activation, ln_eps, out_ln_eps, constants, rows_per_sample)
        return y

    @staticmethod
    def backward(ctx, dy):
        ids, *saved = ctx.saved_tensors
        return (None, None, None, None, None, *_grads(ids, saved, ctx.constants, dy, ctx.needs_input_grad[5:]))


def _grads(ids, saved, constants, dy, needs) -> list[Optional[torch.Tensor]]:
    """Gradients of every input of _INPUTS (None where it has none or ``needs`` says no): the Triton backward
    kernel where it applies, else the composition recomputed from the saved inputs, in fp32, differentiated by
    torch.func.vjp (which also works inside a custom op's implementation, where autograd does not record)."""
    activation, ln_eps, out_ln_eps, constants, rows_per_sample = constants
    fused = _fused_backward(ids, saved, constants, dy, rows_per_sample, activation, ln_eps)
    if fused is not None:
        return fused
    named = {name: constants.get(name) if t is None else t.detach().float() for name, t in zip(_INPUTS, saved,
                                                                                             strict=True)}  # fmt: skip
    wanted = [name for name, t, need in zip(_INPUTS, saved, needs, strict=True) if t is not None and need]
    if not wanted:
        return [None] * len(_INPUTS)

    def composition(*values: torch.Tensor) -> torch.Tensor:
        inputs = named | dict(zip(wanted, values, strict=True))
        adapters = Adapters(*(inputs[f] for f in Adapters._fields))
        post = Post(inputs["out_residual"], inputs["out_ln_weight"], inputs["out_ln_bias"], out_ln_eps)
        return _composition(inputs["x"], inputs["residual"], adapters, ids, activation, ln_eps, post, dy.dtype)

    y, vjp = torch.func.vjp(composition, *(named[name] for name in wanted))
    grads = dict(zip(wanted, vjp(dy.to(y.dtype).reshape(y.shape)), strict=True))
    return [None if name not in grads else grads[name].to(t.dtype) for name, t in zip(_INPUTS, saved, strict=True)]


# ----------------------------------------------------------------------------------------------------------
# Custom ops: what torch.compile traces (fake implementations give it shapes; the real ones run the backends)
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpeft::bottleneck_adapter", mutates_args=())
def _bottleneck_op(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    out_residual: Optional[torch.Tensor],
    out_ln_weight: Optional[torch.Tensor],
    out_ln_bias: Optional[torch.Tensor],
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    scaling: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    scaling_value: float,
    ids: Optional[torch.Tensor],
    rows_per_sample: int,
    activation: str,
    ln_eps: float,
    out_ln_eps: float,
) -> torch.Tensor:
    """The fused op on 2-D rows: the tensors of _INPUTS in order (``scaling`` None for a float scaling, which is
    ``scaling_value``), then the per-row adapter ids and the constants."""
    adapters = Adapters(down_weight, down_bias, up_weight, up_bias, scaling_value if scaling is None else scaling,
                        ln_weight, ln_bias)  # fmt: skip
    post = Post(out_residual, out_ln_weight, out_ln_bias, out_ln_eps)
    return _run(x, residual, adapters, ids, rows_per_sample, activation, ln_eps, post)


@_bottleneck_op.register_fake
def _(x, *_args):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastpeft::bottleneck_adapter_backward", mutates_args=())
def _bottleneck_backward_op(
    dy: torch.Tensor,
    tensors: list[Optional[torch.Tensor]],
    needs: list[bool],
    scaling_value: float,
    ids: Optional[torch.Tensor],
    rows_per_sample: int,
    activation: str,
    ln_eps: float,
    out_ln_eps: float,
) -> list[torch.Tensor]:
    """The gradients of fastpeft::bottleneck_adapter's tensors (``tensors``, in its order) for ``dy``: one per
    tensor, an empty tensor where ``needs`` says none is wanted or the input is absent."""
    constants = {"scaling": scaling_value} if tensors[_INPUTS.index("scaling")] is None else {}
    grads = _grads(ids, tensors, (activation, ln_eps, out_ln_eps, constants, rows_per_sample), dy, needs)
    return [dy.new_empty(0) if g is None else g for g in grads]


@_bottleneck_backward_op.register_fake
def _(dy, tensors, needs, *_args):
    return [
        t.new_empty(t.shape) if t is not None and need else dy.new_empty(0)
        for t, need in zip(tensors, needs, strict=True)
    ]


def _setup_op_context(ctx, inputs, output):
    tensors = inputs[: len(_INPUTS)]
    ctx.save_for_backward(*tensors, inputs[len(_INPUTS) + 1])  # the adapter ids last
    ctx.constants = inputs[len(_INPUTS)], *inputs[len(_INPUTS) + 2 :]


def _op_backward(ctx, dy):
    *tensors, ids = ctx.saved_tensors
    needs = [bool(n) and t is not None for n, t in zip(ctx.needs_input_grad[: len(_INPUTS)], tensors, strict=True)]
    scaling_value, rows_per_sample, activation, ln_eps, out_ln_eps = ctx.constants
    grads = torch.ops.fastpeft.bottleneck_adapter_backward(
        dy, tensors, needs, scaling_value, ids, rows_per_sample, activation, ln_eps, out_ln_eps
    )
    tensor_grads = [g if need else None for g, need in zip(grads, needs, strict=True)]
    return (*tensor_grads, *(None for _ in range(len(ctx.needs_input_grad) - len(_INPUTS))))


_bottleneck_op.register_autograd(_op_backward, setup_context=_setup_op_context)


def _fused_backward(ids, saved, constants, dy, rows_per_sample, activation, ln_eps):
    """The gradients from the Triton backward kernel (every input's, None where it has none), or None where it
    does not apply (recomputed as PyTorch ops then): another backend, an add + LayerNorm after the adapter, or a
    bottleneck wider than the kernel holds in registers (BACKWARD_MAX_MB_PAD)."""
    named = {name: t if t is not None else constants.get(name) for name, t in zip(_INPUTS, saved, strict=True)}
    x = named["x"]
    if named["out_residual"] is not None or named["out_ln_weight"] is not None:
        return None
    if named["down_weight"].shape[-2] > _BACKWARD_MAX_MB_PAD:  # its padded width passes too (a power of two)
        return None
    if select_backend("bottleneck_adapter_backward", x.device, ("triton",)) != "triton":
        return None
    from fastpeft.triton_kernels.bottleneck import bottleneck_backward

    adapters = Adapters(*(named[f] for f in Adapters._fields))
    identity = named["residual"] is None
    dx, grads = bottleneck_backward(
        x, dy, adapters, ids, rows_per_sample, ACTIVATION_CODES[activation], ln_eps, identity
    )
    grads |= {"x": dx, "residual": None if identity else dy}
    return [None if t is None or grads.get(name) is None else grads[name].to(t.dtype).reshape(t.shape)
            for name, t in zip(_INPUTS, saved, strict=True)]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


def _check(x, residual, adapters: Adapters, ids, activation, ln_eps) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a float16, bfloat16 or float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1:
        raise ValueError("x must be [..., d]")
    activation_fn(activation)
    if isinstance(ln_eps, bool) or not isinstance(ln_eps, (int, float)) or not ln_eps > 0:
        raise ValueError(f"ln_eps must be a positive float, got {ln_eps!r}")
    d = x.shape[-1]
    stacked = ids is not None
    lead = (adapters.down_weight.shape[0],) if stacked and adapters.down_weight.dim() == 3 else ()
    if stacked and not lead:
        raise ValueError("with adapter_ids, the weights must be stacked: down_weight [adapters, m, d]")
    m = adapters.down_weight.shape[-2] if adapters.down_weight.dim() >= 2 else 0
    expected = {
        "down_weight": (*lead, m, d),
        "down_bias": (*lead, m),
        "up_weight": (*lead, d, m),
        "up_bias": (*lead, d),
        "ln_weight": (*lead, d),
        "ln_bias": (*lead, d),
    }
    if m < 1:
        raise ValueError(f"down_weight must be [{'adapters, ' if stacked else ''}m, d={d}], got "
                         f"{tuple(adapters.down_weight.shape)}")  # fmt: skip
    if (adapters.ln_weight is None) != (adapters.ln_bias is None):
        raise ValueError("give both ln_weight and ln_bias, or neither")
    for name, shape in expected.items():
        t = getattr(adapters, name)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape}, got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    s = adapters.scaling
    if isinstance(s, torch.Tensor):
        if tuple(s.shape) not in ((*lead, 1), (*lead, d)) or s.device != x.device or not s.is_floating_point():
            raise ValueError(f"scaling must be a float or a tensor {(*lead, 1)} or {(*lead, d)} on {x.device}, got "
                             f"{tuple(s.shape)} on {s.device}")  # fmt: skip
    elif isinstance(s, bool) or not isinstance(s, (int, float)):
        raise TypeError(f"scaling must be a float or a tensor, got {type(s).__name__}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"residual must be like x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} "
                         f"{residual.dtype}")  # fmt: skip


def _row_ids(x: torch.Tensor, adapter_ids: torch.Tensor | None, count: int) -> torch.Tensor | None:
    if adapter_ids is None:
        return None
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("adapter_ids must be an int32 or int64 tensor")
    if adapter_ids.dim() != 1 or x.dim() < 2 or adapter_ids.shape[0] != x.shape[0]:
        raise ValueError(f"adapter_ids must be one id per sample [{x.shape[0] if x.dim() else '?'}], got "
                         f"{tuple(adapter_ids.shape)}")  # fmt: skip
    # While compiling, no host check (a sync the graph cannot hold): the kernels and the composition give an id
    # outside [0, count) no adapter, never reading outside the stack.
    if adapter_ids.numel() and not torch.compiler.is_compiling():
        low, high = int(adapter_ids.min()), int(adapter_ids.max())
        if low < -1 or high >= count:
            raise IndexError(f"adapter_ids holds {low if low < -1 else high}, outside [-1, {count})")
    return adapter_ids.to(torch.int32).repeat_interleave(math.prod(x.shape[1:-1]))


def bottleneck_adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    *,
    activation: str = "relu",
    scaling: float | torch.Tensor = 1.0,
    residual: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-5,
    adapter_ids: torch.Tensor | None = None,
    out_residual: torch.Tensor | None = None,
    out_ln_weight: torch.Tensor | None = None,
    out_ln_bias: torch.Tensor | None = None,
    out_ln_eps: float = 1e-5,
) -> torch.Tensor:
    """A bottleneck adapter in one op: ``residual + scaling * (act(LN(x) @ down_weight.T + down_bias) @
    up_weight.T + up_bias)``.

    Args:
        x: [..., d] float16/bfloat16/float32, any leading shape (zero rows allowed).
        down_weight: [m, d]; down_bias: [m]; up_weight: [d, m]; up_bias: [d] (x's dtype and device). With
            ``adapter_ids``, each stacked over adapters: [A, m, d], [A, m], [A, d, m], [A, d].
        activation: relu, gelu (erf), gelu_new (tanh), silu/swish, tanh, leakyrelu (slope 0.01), sigmoid.
        scaling: a float, or a tensor [1] (AdapterHub's "learned") or [d] ("channel"); [A, 1] / [A, d] stacked.
        residual: like x, added to the adapter's output; default x itself.
        ln_weight, ln_bias: [d] (or [A, d]): a LayerNorm on x before the down-projection (AdapterHub's
            ``ln_before``), ``ln_eps`` its epsilon.
        adapter_ids: int [batch], one adapter per sample of x (dim 0), -1 for none (y = residual there).
        out_residual, out_ln_weight, out_ln_bias, out_ln_eps: the fused add + LayerNorm after the adapter that
            BERT-style placements need: ``y = LN_out(residual + adapter + out_residual)`` (out_residual like x,
            the LN parameters [d]; either part optional). Applied to every row, with or without an adapter.

    Returns a tensor like x. Differentiable in every tensor argument.
    """
    adapters = Adapters(down_weight, down_bias, up_weight, up_bias, scaling, ln_weight, ln_bias)
    _check(x, residual, adapters, adapter_ids, activation, ln_eps)
    if adapter_ids is None:
        adapters = adapters.stacked()
    ids = _row_ids(x, adapter_ids, adapters.down_weight.shape[0])
    rows = x.reshape(-1, x.shape[-1])
    res = None if residual is None else residual.reshape(rows.shape)
    _check_post(x, out_residual, out_ln_weight, out_ln_bias, out_ln_eps)
    per_sample = math.prod(x.shape[1:-1]) if x.dim() >= 2 else 1
    out_res = None if out_residual is None else out_residual.reshape(rows.shape)
    tensors = (rows, res, out_res, out_ln_weight, out_ln_bias, *adapters)
    route = choose_route("bottleneck_adapter", rows.device, TRITON_FIRST, tensors)
    if route is Route.CUSTOM_OP:
        scaling = adapters.scaling if isinstance(adapters.scaling, torch.Tensor) else None
        scaling_value = 0.0 if scaling is not None else float(adapters.scaling)
        y = torch.ops.fastpeft.bottleneck_adapter(*tensors[:9], scaling, *tensors[10:], scaling_value, ids, per_sample,
                                                  activation, float(ln_eps), float(out_ln_eps))  # fmt: skip
    elif route is Route.FUNCTION:
        y = _BottleneckFunction.apply(ids, per_sample, activation, float(ln_eps), float(out_ln_eps), *tensors)
    else:
        post = Post(out_res, out_ln_weight, out_ln_bias, float(out_ln_eps))
        y = _run(rows, res, adapters, ids, per_sample, activation, float(ln_eps), post)
    return y.reshape(x.shape)


def _check_post(x, out_residual, out_ln_weight, out_ln_bias, out_ln_eps) -> None:
    if out_residual is not None and (out_residual.shape != x.shape or out_residual.dtype != x.dtype
                                     or out_residual.device != x.device):  # fmt: skip
        raise ValueError(f"out_residual must be like x {tuple(x.shape)} {x.dtype}, got {tuple(out_residual.shape)} "
                         f"{out_residual.dtype}")  # fmt: skip
    if (out_ln_weight is None) != (out_ln_bias is None):
        raise ValueError("give both out_ln_weight and out_ln_bias, or neither")
    for name, t in (("out_ln_weight", out_ln_weight), ("out_ln_bias", out_ln_bias)):
        if t is not None and (tuple(t.shape) != (x.shape[-1],) or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(
                f"{name} must be [{x.shape[-1]}] in x's dtype on its device, got {tuple(t.shape)} {t.dtype}"
            )
    if isinstance(out_ln_eps, bool) or not isinstance(out_ln_eps, (int, float)) or not out_ln_eps > 0:
        raise ValueError(f"out_ln_eps must be a positive float, got {out_ln_eps!r}")
