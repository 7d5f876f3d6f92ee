"""The Triton kernels' in-kernel Philox dropout (groundwork for lora_linear's opt-in dropout mode): the mask
keeps 1 - p of the elements, differs across seeds, and every kernel that applies it (the shrink, the fused
decode shrink, the dx epilogue, the shrink over x transposed for dA) regenerates the same mask."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

pytest.importorskip("triton")

from fastpeft.triton_kernels import lora as kernels

from fastpeft.ops.dropout import apply_mask

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and not kernels._INTERPRET, reason="Triton needs a GPU or TRITON_INTERPRET=1"
)


def spec(seed: int, p: float, k: int) -> kernels.PhiloxDropout:
    return kernels.PhiloxDropout(seed=seed, p=p, keep_scale=1 / (1 - p), stride_r=k, stride_c=1)


def test_mask_rate_and_independence():
    masks = [kernels.keep_mask(spec(seed, 0.3, 200), 64, 200, DEVICE) for seed in (1, 2)]
    for mask in masks:
        assert abs(mask.float().mean().item() - 0.7) < 0.02  # 12800 draws: 4 standard deviations
    agreement = (masks[0] == masks[1]).float().mean().item()
    assert abs(agreement - (0.7**2 + 0.3**2)) < 0.02  # independent seeds agree as two coin flips would
    assert torch.equal(masks[0], kernels.keep_mask(spec(1, 0.3, 200), 64, 200, DEVICE))  # reproducible


@pytest.mark.parametrize(("m", "k", "r"), [(5, 40, 4), (3, 37, 16), (70, 24, 8)])
def test_every_kernel_applies_the_same_mask(m, k, r):
    torch.manual_seed(0)
    x = torch.randn(m, k, device=DEVICE)
    weight, lora_a, lora_b = torch.randn(12, k, device=DEVICE), torch.randn(r, k, device=DEVICE), torch.randn(12, r)
    lora_b = lora_b.to(DEVICE)
    dropout = spec(7, 0.25, k)
    dropped = apply_mask(x, kernels.keep_mask(dropout, m, k, DEVICE), dropout.keep_scale)
    xa = dropped @ lora_a.t()
    torch.testing.assert_close(kernels.lora_shrink(x, lora_a, dropout=dropout), xa, rtol=1e-4, atol=1e-4)
    expected = x @ weight.t() + 0.5 * xa @ lora_b.t()
    if kernels.fuses_shrink(m, r):  # the fused decode launch drops x for the shrink only
        fused = kernels.lora_linear(x, weight, lora_a, lora_b, 0.5, None, dropout_x=dropout)
        torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)
    # dx = dy W + D(s (dy B) A): the LoRA term of output (m, k) takes x's mask.
    dy = torch.randn(m, 12, device=DEVICE)
    dy_b = dy @ lora_b
    dx = kernels.lora_linear(dy, weight.t(), None, lora_a.t(), 0.5, None, xa=dy_b, dropout_out=dropout)
    lora_dx = apply_mask(0.5 * dy_b @ lora_a, kernels.keep_mask(dropout, m, k, DEVICE), dropout.keep_scale)
    torch.testing.assert_close(dx, dy @ weight + lora_dx, rtol=1e-4, atol=1e-4)
    # dA = s (dy B)^T D(x): a shrink over x transposed, the mask read through swapped strides.
    da_t = kernels.lora_shrink(x.t(), (0.5 * dy_b).t(), dropout=dropout.transposed())
    torch.testing.assert_close(da_t.t(), 0.5 * dy_b.t() @ dropped, rtol=1e-4, atol=1e-4)


def test_dropout_x_needs_the_fused_shrink():
    x, weight, lora_b = torch.randn(3, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE), torch.randn(4, 2)
    xa = torch.randn(3, 2, device=DEVICE)
    with pytest.raises(ValueError, match="dropout_x applies to the fused shrink only"):
        kernels.lora_linear(x, weight, None, lora_b.to(DEVICE), 1.0, None, xa=xa, dropout_x=spec(1, 0.1, 8))
