"""LoRALinear: PEFT's initialisation and scaling, forward against the reference, merge/unmerge, dropout."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, DTYPES, assert_close_to_reference
from torch import nn

from fastpeft import LoRALinear
from fastpeft.ops.lora import lora_linear_reference


def make_layer(in_features=37, out_features=29, r=5, dtype=torch.float32, bias=True, **kwargs) -> LoRALinear:
    base = nn.Linear(in_features, out_features, bias=bias, device=DEVICE, dtype=dtype)
    layer = LoRALinear(base, r=r, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)  # B = 0 would test nothing
    return layer


def reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.base_layer.bias is None else layer.base_layer.bias.double()
    return lora_linear_reference(x.double(), layer.base_layer.weight.double(), layer.lora_A.double(),
                                 layer.lora_B.double(), layer.scaling, bias)  # fmt: skip


def test_initialisation_follows_peft():
    layer = LoRALinear(nn.Linear(64, 32), r=8, lora_alpha=16)
    assert layer.lora_A.shape == (8, 64) and layer.lora_B.shape == (32, 8)
    assert torch.all(layer.lora_B == 0)
    bound = 1 / math.sqrt(64)  # kaiming_uniform_ with a = sqrt(5) on fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert layer.scaling == 2.0
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # B = 0: the layer starts as the base layer


def test_rslora_scaling():
    assert LoRALinear(nn.Linear(8, 8), r=16, lora_alpha=8, use_rslora=True).scaling == 8 / 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(backend, dtype, bias):
    layer = make_layer(dtype=dtype, bias=bias, lora_alpha=10)
    x = torch.randn(2, 3, 37, device=DEVICE, dtype=dtype)
    out = layer(x)
    assert out.shape == (2, 3, 29) and out.dtype == dtype
    baseline = lora_linear_reference(x, layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.scaling,
                                     layer.base_layer.bias)  # fmt: skip
    assert_close_to_reference(out, reference(layer, x), baseline.detach())


def test_training_step_reaches_lora_params_only(backend):
    layer = make_layer()
    x = torch.randn(4, 37, device=DEVICE)
    layer(x).square().mean().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.base_layer.weight.grad is None
    assert torch.isfinite(layer.lora_A.grad).all() and layer.lora_A.grad.abs().sum() > 0


def test_merge_unmerge_round_trip():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(5, 37, device=DEVICE)
    weight_before = layer.base_layer.weight.detach().clone()
    fused = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), fused, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, weight_before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), fused)


def test_safe_merge_refuses_non_finite():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    weight_before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, weight_before)


def test_dropout_acts_in_training_only():
    layer = make_layer(lora_dropout=0.5)
    x = torch.randn(64, 37, device=DEVICE)
    layer.eval()
    eval_out = layer(x)
    torch.testing.assert_close(eval_out, reference(layer, x).float(), rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(0)
    train_out = layer(x)
    assert not torch.allclose(train_out, eval_out)
    # Dropout hits the LoRA branch only: what it changes lies in the span of B's columns.
    torch.manual_seed(0)
    mask_x = nn.functional.dropout(x, 0.5, training=True)
    expected = layer.base_layer(x) + layer.scaling * (mask_x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(train_out, expected, rtol=1e-5, atol=1e-5)


def test_autocast_computes_in_autocast_dtype():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(4, 37, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = layer(x)
        expected_dtype = layer.base_layer(x).dtype
    assert out.dtype == expected_dtype == torch.bfloat16
    x16, w16, a16, b16, bias16 = (
        t.to(torch.bfloat16) for t in (x, layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.base_layer.bias)
    )
    baseline = lora_linear_reference(x16, w16, a16, b16, layer.scaling, bias16)
    assert_close_to_reference(out, reference(layer, x), baseline.detach())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(base_layer=nn.Conv1d(3, 3, 1)), TypeError, "base_layer must be an nn.Linear or a transformers Conv1D"),
        (dict(base_layer=nn.Linear(4, 4).to(torch.float64)), TypeError, "base_layer.weight must be"),
        (dict(r=0), ValueError, "r must be"),
        (dict(r=2.5), ValueError, "r must be"),
        (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
        (dict(lora_dropout=-0.5), ValueError, "lora_dropout"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs = {"base_layer": nn.Linear(4, 4), **kwargs}
    with pytest.raises(error, match=match):
        LoRALinear(**kwargs)


def conv1d_layer(lora_bias=False, **kwargs) -> LoRALinear:
    transformers = pytest.importorskip("transformers")
    base = transformers.pytorch_utils.Conv1D(29, 37).to(DEVICE)  # weight [in=37, out=29]
    nn.init.normal_(base.bias)
    layer = LoRALinear(base, r=5, lora_alpha=10, lora_bias=lora_bias, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
        if lora_bias:
            layer.lora_B_bias.normal_()
    return layer


@pytest.mark.parametrize("lora_bias", [False, True])
def test_conv1d_base_and_lora_bias(backend, lora_bias):
    layer = conv1d_layer(lora_bias)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (37, 29)
    x = torch.randn(2, 3, 37, device=DEVICE, requires_grad=True)
    out = layer(x)
    lora = (x @ layer.lora_A.T) @ layer.lora_B.T + (0 if layer.lora_B_bias is None else layer.lora_B_bias)
    expected = layer.base_layer(x) + layer.scaling * lora
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.lora_B_bias) if p is not None]
    layer.zero_grad()
    expected.square().sum().backward()
    for got, want in zip(grads, [p.grad for p in (layer.lora_A, layer.lora_B, layer.lora_B_bias) if p is not None],
                         strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        fused = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), fused, rtol=1e-5, atol=1e-5)  # merged through the [in, out] layout
        layer.unmerge()
        torch.testing.assert_close(layer(x), fused, rtol=1e-5, atol=1e-5)


def test_fan_in_fan_out_that_disagrees_with_the_base_layer_is_refused():
    with pytest.raises(ValueError, match="fan_in_fan_out=False disagrees"):
        conv1d_layer(fan_in_fan_out=False)
    with pytest.raises(ValueError, match="fan_in_fan_out=True disagrees"):
        LoRALinear(nn.Linear(4, 6), r=2, fan_in_fan_out=True)


def test_lora_bias_without_a_base_bias_cannot_merge():
    layer = LoRALinear(nn.Linear(8, 6, bias=False), r=2, lora_bias=True)
    with pytest.raises(ValueError, match="without a bias"):
        layer.merge()
    assert not layer.merged


def test_philox_dropout_mode(backend):
    layer = make_layer(lora_dropout=0.5, dropout_mode="philox").train()
    x = torch.randn(16, 37, device=DEVICE)
    torch.manual_seed(4)
    first = layer(x)
    torch.manual_seed(4)
    assert torch.equal(layer(x), first) and not torch.allclose(layer(x), first)
    with pytest.raises(ValueError, match="dropout_mode must be one of"):
        LoRALinear(nn.Linear(4, 4), dropout_mode="bits")
