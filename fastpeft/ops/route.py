"""Which way a call goes through an op: the one place that decides it, for every op family.

Four routes, in the order they are tried:

1. ``CUSTOM_OP``: while ``torch.compile`` traces, the registered ``torch.library`` op (its fake implementation
   gives shapes to the tracer; the compiled graph calls the real one).
2. ``BACKEND``: nothing needs a gradient (inference, ``no_grad``, frozen everything): the chosen backend runs
   directly and builds no autograd node.
3. ``TORCH_AUTOGRAD``: a gradient is needed, the tensors are off CUDA and the op runs on the torch backend: its
   PyTorch ops are differentiated as they stand. Autograd's C++ backward beats an ``autograd.Function``'s
   Python one, which on a CPU costs more than a small layer's GEMMs.
4. ``FUNCTION``: otherwise the op's ``autograd.Function`` (the fused kernels' own backward).

An op that lacks a route says so (``torch_autograd=False``: its torch path is not differentiable as written) and
maps the rest onto what it has; an inference-only op passes no tensors, so it never takes the gradient routes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import torch

from fastpeft.backends import differentiable_as_is


class Route(enum.Enum):
    CUSTOM_OP = "custom_op"
    BACKEND = "backend"
    TORCH_AUTOGRAD = "torch_autograd"
    FUNCTION = "function"


def needs_grad(tensors: Iterable[object]) -> bool:
    """Whether autograd must record this call: grad mode is on and a tensor among ``tensors`` requires grad
    (non-tensors and None are skipped)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def choose_route(
    op: str,
    device: torch.device,
    preference: tuple[str, ...],
    tensors: Iterable[object],
    *,
    torch_autograd: bool = True,
) -> Route:
    """The route of one call of ``op`` on ``device``. ``preference``: the op's backend order for this shape (as
    given to :func:`~fastpeft.backends.select_backend`); ``tensors``: the call's differentiable inputs;
    ``torch_autograd``: whether the op's torch backend is differentiable as it stands for this call."""
    if torch.compiler.is_compiling():
        return Route.CUSTOM_OP
    if not needs_grad(tensors):
        return Route.BACKEND
    if torch_autograd and differentiable_as_is(op, device, preference):
        return Route.TORCH_AUTOGRAD
    return Route.FUNCTION
