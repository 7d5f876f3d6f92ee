"""BottleneckAdapter: AdapterHub's parameter names and initialisations, the fused op against the module's own
unfused composition, gradients for every parameter."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close_to_reference

from fastpeft.modules.bottleneck import BottleneckAdapter


def randomized(module: BottleneckAdapter) -> BottleneckAdapter:
    """Random weights: an adapter at its (near-)identity initialisation would test nothing."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3).add_(1.0 if p.dim() == 1 and p.shape[0] == module.hidden_size else 0.0)
    return module.to(DEVICE)


def unfused(module: BottleneckAdapter, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """AdapterHub's Adapter.forward: residual + adapter_up(adapter_down(x)) * scaling."""
    return (x if residual is None else residual) + module.adapter_up(module.adapter_down(x)) * module.scaling


@pytest.mark.parametrize("scaling", [2.0, "learned", "channel"])
@pytest.mark.parametrize("ln_before", [False, True])
def test_matches_the_unfused_module(backend, ln_before, scaling):
    module = randomized(BottleneckAdapter(40, 12, activation="swish", scaling=scaling, ln_before=ln_before))
    x = torch.randn(2, 5, 40, device=DEVICE, requires_grad=True)
    y = module(x)
    y.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    dx = x.grad.clone()
    module.zero_grad()
    x.grad = None
    ref_module = module.double()
    ref = unfused(ref_module, x.double())
    ref.square().sum().backward()
    assert_close_to_reference(y, ref, ref.float())
    assert_close_to_reference(dx, x.grad, x.grad.float(), "dx")
    for name, p in ref_module.named_parameters():
        assert_close_to_reference(grads[name], p.grad, p.grad.float(), name)


def test_parameter_names_are_adapterhubs():
    names = set(BottleneckAdapter(16, 4, scaling="channel", ln_before=True).state_dict())
    assert names == {"adapter_norm_before.weight", "adapter_norm_before.bias", "adapter_down.0.weight",
                     "adapter_down.0.bias", "adapter_down.1.weight", "adapter_down.1.bias", "adapter_up.weight",
                     "adapter_up.bias", "scaling"}  # fmt: skip
    assert set(BottleneckAdapter(16, 4).state_dict()) == {"adapter_down.0.weight", "adapter_down.0.bias",
                                                           "adapter_up.weight", "adapter_up.bias"}  # fmt: skip


@pytest.mark.parametrize("init", ["bert", "mam_adapter", "houlsby"])
def test_starts_at_or_near_the_identity(init):
    module = BottleneckAdapter(64, reduction_factor=16, init_weights=init).to(DEVICE)
    assert module.bottleneck_size == 4
    x = torch.randn(3, 64, device=DEVICE)
    change = (module(x) - x).norm() / x.norm()
    assert change < (1e-12 if init == "mam_adapter" else 2e-2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        BottleneckAdapter(8, 2, activation="mish")
    with pytest.raises(ValueError, match="scaling"):
        BottleneckAdapter(8, 2, scaling="vector")
    with pytest.raises(ValueError, match="init_weights"):
        BottleneckAdapter(8, 2, init_weights="xavier")
