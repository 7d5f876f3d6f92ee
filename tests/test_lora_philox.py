"""The Triton kernels' in-kernel Philox dropout (groundwork for lora_linear's opt-in dropout mode): the mask
keeps 1 - p of the elements, differs across seeds, and every kernel that applies it (the shrink, the fused
decode shrink, the dx epilogue, the shrink over x transposed for dA) regenerates the same mask."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

pytest.importorskip("triton")

from fastpeft.triton_kernels import lora as kernels
from fastpeft.triton_kernels.common import INTERPRET

from fastpeft.ops.dropout import apply_mask

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and not INTERPRET, reason="Triton needs a GPU or TRITON_INTERPRET=1"
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


# ---------------------------------------------------------------------------------------------------------
# lora_linear(..., dropout_mode="philox"): the op on every backend
# ---------------------------------------------------------------------------------------------------------

from conftest import DTYPES, HAS_GPU, assert_close_to_reference  # noqa: E402

from fastpeft.ops.dropout import draw_seed, seeded_mask  # noqa: E402
from fastpeft.ops.lora import lora_linear  # noqa: E402

OP_SHAPES = [((1,), 37, 29, 5), ((2, 35), 24, 33, 8), ((4,), 40, 24, 40), ((0,), 16, 8, 2)]
if HAS_GPU:
    OP_SHAPES += [((1,), 4096, 4096, 16), ((2, 70), 1024, 1000, 64)]


def inputs(lead, k, n, r, dtype):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_()

    return dict(x=rand(*lead, k), weight=rand(n, k, scale=k**-0.5), lora_a=rand(r, k, scale=k**-0.5),
                lora_b=rand(n, r, scale=r**-0.5), bias=rand(n))  # fmt: skip


def reference(t, mask, p):
    x = t["x"]
    dropped = torch.where(mask.reshape(x.shape), x / (1 - p), 0)
    lin = torch.nn.functional.linear
    return lin(x, t["weight"], t["bias"]) + 0.8 * lin(lin(dropped, t["lora_a"]), t["lora_b"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", OP_SHAPES, ids=str)
def test_philox_mode_forward_backward(backend, dtype, shape):
    p = 0.3
    t = inputs(*shape, dtype)
    torch.manual_seed(9)
    out = lora_linear(**t, scaling=0.8, dropout_p=p, dropout_mode="philox")
    torch.manual_seed(9)
    mask = seeded_mask(draw_seed(), p, out.numel() // shape[2], shape[1], DEVICE)  # the op's seed and mask
    grad = torch.randn(out.shape, device=DEVICE).to(dtype)
    out.backward(grad)
    t64 = {k: v.detach().double().requires_grad_() for k, v in t.items()}
    plain = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
    ref, baseline = reference(t64, mask, p), reference(plain, mask, p)
    assert_close_to_reference(out, ref, baseline.detach(), f"{backend} forward")
    ref.backward(grad.double())
    baseline.backward(grad)
    for name in t:
        if shape[0] == (0,) and name != "x":
            continue
        assert_close_to_reference(t[name].grad, t64[name].grad, plain[name].grad, f"grad {name}")


def test_philox_mode_saves_no_mask_and_no_dropped_copy(backend):
    t = inputs((6,), 40, 12, 4, torch.float32)
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append((tuple(s.shape), s.dtype)) or s, lambda s: s):
        out = lora_linear(**t, dropout_p=0.2, dropout_mode="philox")
    inputs_saved = sorted((tuple(v.shape), v.dtype) for k, v in t.items() if k != "bias")  # x, W, A, B
    shrink = ((6, 4), torch.float32)  # xa = dropout(x) A^T, kept for dB where the forward computes it apart
    assert sorted(saved) in (inputs_saved, sorted([*inputs_saved, shrink]))
    out.sum().backward()


def test_philox_mode_is_reproducible_and_fresh_per_call(backend):
    t = {k: v.detach() for k, v in inputs((8,), 32, 16, 4, torch.float32).items()}
    torch.manual_seed(1)
    first, second = (lora_linear(**t, dropout_p=0.5, dropout_mode="philox") for _ in range(2))
    torch.manual_seed(1)
    again = lora_linear(**t, dropout_p=0.5, dropout_mode="philox")
    assert torch.equal(first, again) and not torch.allclose(first, second)


def test_bad_dropout_mode_input(monkeypatch):
    t = {k: v.detach().cpu() for k, v in inputs((3,), 16, 8, 4, torch.float32).items()}
    with pytest.raises(ValueError, match="dropout_mode must be one of"):
        lora_linear(**t, dropout_p=0.1, dropout_mode="cuRAND")
    with pytest.raises(ValueError, match="takes neither dropout_mask nor rank_groups"):
        lora_linear(**t, dropout_p=0.1, dropout_mode="philox", dropout_mask=torch.ones(3, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="takes neither dropout_mask nor rank_groups"):
        lora_linear(**t, dropout_p=[0.1, 0.2], dropout_mode="philox", rank_groups=[1, 3])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(ValueError, match="runs eagerly"):
        lora_linear(**t, dropout_p=0.1, dropout_mode="philox")


def _philox_uniform(seed: int, counters: list[int]) -> list[float]:
    """Philox4x32-10 (Triton's constants) of each 64-bit counter as (low word, high word, 0, 0) under the
    seed's two key words, its first output word made a uniform float32 in [0, 1) as Triton makes it."""
    import numpy as np

    mask = 0xFFFFFFFF
    out = []
    for counter in counters:
        c0, c1, c2, c3 = counter & mask, counter >> 32, 0, 0
        k0, k1 = seed & mask, (seed >> 32) & mask
        for _ in range(10):
            hi_b, lo_b = divmod(0xCD9E8D57 * c2, 1 << 32)
            hi_a, lo_a = divmod(0xD2511F53 * c0, 1 << 32)
            c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
            k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
        signed = c0 - (1 << 32) if c0 >= 1 << 31 else c0
        signed = -signed - 1 if signed < 0 else signed
        out.append(float(np.float32(signed) * np.float32(4.6566127342e-10)))
    return out


def test_counters_are_64_bit_past_two_to_the_31():
    """The mask of an activation with more than 2**31 (and 2**32) elements: its counters, row * K + column,
    are formed in 64 bits and fed to Philox as two words, so the pattern never wraps around. Checked on rows far
    out (row_start) against a Python Philox of the exact counters, and against the rows 2**32 elements back."""
    seed, p, k = 7, 0.5, 4096
    dropout = spec(seed, p, k)
    for row_start in ((1 << 31) // k + 3, (1 << 32) // k + 5):
        got = kernels.keep_mask(dropout, 2, 40, DEVICE, row_start=row_start).cpu()
        counters = [(row_start + i) * k + j for i in range(2) for j in range(40)]
        expected = torch.tensor([u >= p for u in _philox_uniform(seed, counters)]).view(2, 40)
        assert torch.equal(got, expected), row_start
    far = kernels.keep_mask(dropout, 2, 40, DEVICE, row_start=(1 << 32) // k + 5)
    wrapped = kernels.keep_mask(dropout, 2, 40, DEVICE, row_start=5)  # the same counters modulo 2**32
    assert not torch.equal(far, wrapped)
    near = kernels.keep_mask(dropout, 6, 40, DEVICE)[3:]  # below 2**31: rows continue where row_start says
    assert torch.equal(kernels.keep_mask(dropout, 3, 40, DEVICE, row_start=3), near)
    assert torch.equal(near.cpu(), torch.tensor([u >= p for u in _philox_uniform(seed, [
        (3 + i) * k + j for i in range(3) for j in range(40)])]).view(3, 40))  # fmt: skip
