"""The one route decision (fastpeft/ops/route.py) and every op family that takes it: compiled calls go to the
custom op, calls without gradients to the backend with no autograd node, training off CUDA on the torch backend
to differentiable PyTorch ops, the rest to the op's autograd Function."""

from __future__ import annotations

import pytest
import torch

import fastpeft.ops.route as route_module
from fastpeft.backends import triton_interpret_enabled
from fastpeft.ops import bottleneck_adapter, dora_linear, lora_linear, qlora_linear, quantize_4bit
from fastpeft.ops.route import Route, choose_route, needs_grad

CPU = torch.device("cpu")
ORDER = ("triton", "cuda")


def leaf(*shape: int, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32).requires_grad_(grad)


def test_no_gradient_needed_runs_the_backend():
    x = leaf(3, 8, grad=True)
    assert choose_route("lora_linear", CPU, ORDER, (leaf(3, 8), None)) is Route.BACKEND
    with torch.no_grad():
        assert choose_route("lora_linear", CPU, ORDER, (x,)) is Route.BACKEND
    assert choose_route("lora_linear", CPU, ORDER, ()) is Route.BACKEND


def test_training_off_cuda_on_the_torch_backend_is_torch_autograd(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    x = leaf(3, 8, grad=True)
    assert choose_route("lora_linear", CPU, ORDER, (x, 1.0)) is Route.TORCH_AUTOGRAD
    assert choose_route("lora_linear", CPU, ORDER, (x,), torch_autograd=False) is Route.FUNCTION


def test_training_on_a_kernel_backend_is_the_function(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_route("lora_linear", CPU, ORDER, (leaf(3, 8, grad=True),)) is Route.FUNCTION


def test_compiling_comes_first(monkeypatch):
    monkeypatch.setattr(route_module.torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert choose_route("lora_linear", CPU, ORDER, (leaf(2, 2),)) is Route.CUSTOM_OP
    assert choose_route("lora_linear", CPU, ORDER, (leaf(2, 2, grad=True),)) is Route.CUSTOM_OP


def test_needs_grad_skips_what_is_not_a_tensor():
    assert not needs_grad((None, 1.0, "x"))
    assert needs_grad((None, leaf(1, grad=True)))


def graph_nodes(y: torch.Tensor) -> set[str]:
    """The class names of every autograd node behind y (empty: no autograd node)."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in seen:
            seen.add(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    return seen


def uses_function(y: torch.Tensor) -> bool:
    return any(name.endswith("FunctionBackward") for name in graph_nodes(y))


def lora_call(grad: bool) -> torch.Tensor:
    x, w = leaf(4, 8, grad=grad), leaf(6, 8)
    return lora_linear(x, w, leaf(2, 8), leaf(6, 2), 0.5)


def dora_call(grad: bool) -> torch.Tensor:
    x, w = leaf(4, 8, grad=grad), leaf(6, 8)
    return dora_linear(x, w, leaf(2, 8), leaf(6, 2), leaf(6).abs() + 0.5, 0.5)


def bottleneck_call(grad: bool) -> torch.Tensor:
    x = leaf(4, 8, grad=grad)
    return bottleneck_adapter(x, leaf(3, 8), leaf(3), leaf(8, 3), leaf(8), activation="relu")


def qlora_call(grad: bool) -> torch.Tensor:
    packed, state = quantize_4bit(torch.randn(6, 64), blocksize=64)
    return qlora_linear(leaf(4, 64, grad=grad), packed, state, leaf(2, 64), leaf(6, 2), 0.5)


CALLS = {"lora_linear": lora_call, "dora_linear": dora_call, "bottleneck_adapter": bottleneck_call,
         "qlora_linear": qlora_call}  # fmt: skip
NO_TORCH_AUTOGRAD = {"qlora_linear"}  # its torch path is not differentiable as written: the Function


@pytest.mark.parametrize("op", sorted(CALLS))
def test_every_op_family_follows_the_route_on_the_torch_backend(op, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    call = CALLS[op]
    assert not graph_nodes(call(False))  # BACKEND: no autograd node at all
    with torch.no_grad():
        assert not graph_nodes(call(True))
    assert uses_function(call(True)) == (op in NO_TORCH_AUTOGRAD)  # TORCH_AUTOGRAD: PyTorch's own nodes


@pytest.mark.parametrize("op", sorted(CALLS))
def test_every_op_family_trains_through_its_function_on_a_kernel_backend(op, monkeypatch):
    pytest.importorskip("triton")
    if not route_module.torch.cuda.is_available() and not triton_interpret_enabled():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    assert not graph_nodes(CALLS[op](False))
    assert uses_function(CALLS[op](True))
