"""fastpeft.warmup: every layer shape runs once per row count, gradients stay untouched; on a GPU, a patched
layer then captures in a CUDA graph and replays with the eager numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_GPU, rel_error
from torch import nn

from fastpeft import LoRALinear, patch_peft_model, warmup
from fastpeft.backends import available_backends, record_backends


def lora_layer(in_features=24, out_features=20, r=4, dtype=torch.float32) -> LoRALinear:
    layer = LoRALinear(nn.Linear(in_features, out_features, device=DEVICE, dtype=dtype), r=r, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    return layer


def test_warmup_runs_each_layer_shape_once_per_row_count(backend):
    model = nn.Sequential(lora_layer(), lora_layer(), lora_layer(in_features=20, out_features=24, r=8)).eval()
    with record_backends() as calls:
        count = warmup(model, [1, 4, 4, 9])
    assert count == 2 * 3  # two distinct layer shapes (the first two are alike), three distinct row counts
    assert calls == [("lora_linear", backend)] * 6


def test_training_warmup_runs_the_backward_and_leaves_grads_alone(backend):
    model = nn.Sequential(lora_layer(), lora_layer(in_features=20, out_features=24)).train()
    with record_backends() as calls:
        warmup(model, [3], training=True)
    ops = [op for op, _ in calls]
    # Per layer: the forward; x @ A (a shrink: three rows keep no xa), dy @ B with dB (the dy pass) and dx (expand)
    # of the backward. Off CUDA the torch backend trains through differentiable PyTorch ops: autograd's own
    # backward, no fastpeft op.
    backward_ops = (0, 0, 0) if backend == "torch" and DEVICE.type != "cuda" else (2, 2, 2)
    counts = [ops.count(op) for op in ("lora_linear", "lora_shrink", "lora_dy_pass", "lora_expand_linear")]
    assert counts == [2, *backward_ops]
    assert all(p.grad is None for p in model.parameters())


def test_warmup_in_autocast_dtype():
    model = lora_layer().eval()
    with record_backends() as calls:
        assert warmup(model, [2], dtype=torch.bfloat16) == 1
    assert [op for op, _ in calls] == ["lora_linear"]


def test_warmup_covers_patched_peft_layers():
    from peft_models import peft_model

    model = patch_peft_model(peft_model().eval())
    with record_backends() as calls:
        count = warmup(model, [1, 5])
    assert count == 2 * 4  # q/o (40->40), k/v (40->20), gate/up (40->72), down (72->40): 4 shapes x 2 counts
    assert len(calls) == count


def test_warmup_refuses_negative_row_counts():
    with pytest.raises(ValueError, match="token_counts"):
        warmup(lora_layer(), [-1])


@pytest.mark.gpu
@pytest.mark.parametrize("forced", ["cuda", "triton", None], ids=["cuda", "triton", "auto"])
def test_patched_layer_captures_in_a_cuda_graph_after_warmup(monkeypatch, forced):
    if forced is not None and forced not in available_backends("cuda"):
        pytest.skip(f"{forced} backend unavailable")
    if forced is not None:
        monkeypatch.setenv("FASTPEFT_BACKEND", forced)
    from peft_models import peft_model

    model = patch_peft_model(peft_model(torch.bfloat16).eval())
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    warmup(layer, [4])
    static_x = torch.randn(4, layer.in_features, device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = layer(static_x)
    for seed in range(3):
        static_x.copy_(torch.randn(static_x.shape, generator=torch.Generator("cuda").manual_seed(seed), device="cuda"))
        graph.replay()
        with torch.no_grad():
            expected = layer(static_x)
        assert rel_error(static_y, expected) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("forced", ["cuda", "triton"])
def test_tensors_on_a_second_gpu_run_there(monkeypatch, forced):
    """Triton launches on the current device unless told otherwise: cuda:1 tensors while cuda:0 is current."""
    if forced not in available_backends("cuda:1"):
        pytest.skip(f"{forced} backend unavailable")
    monkeypatch.setenv("FASTPEFT_BACKEND", forced)
    torch.cuda.set_device(0)
    layer = LoRALinear(nn.Linear(256, 192, device="cuda:1", dtype=torch.bfloat16), r=16)
    nn.init.normal_(layer.lora_B)
    for rows in (1, 40, 300):
        x = torch.randn(rows, 256, device="cuda:1", dtype=torch.bfloat16, requires_grad=True)
        y = layer(x)
        y.float().square().sum().backward()
        expected = layer.base_layer(x) + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
        assert y.device == torch.device("cuda:1")
        assert rel_error(y, expected) < 2e-2
        assert torch.isfinite(x.grad).all()
