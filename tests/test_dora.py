"""fastpeft::dora_linear (PEFT's DoRA, fused) on every backend against the float64 formula with W + s B A
materialised: forward, gradients for x, A, B, the magnitude and the bias; the norm identity; bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, DTYPES, HAS_GPU, assert_close_to_reference

from fastpeft.ops.dora import dora_linear, dora_linear_reference, dora_weight_norm, weight_row_norm_sq

SHAPES = [((1,), 37, 29, 5), ((2, 35), 24, 33, 8), ((0,), 16, 8, 2), ((4,), 40, 24, 40)]
if HAS_GPU:  # the fused decode launch, shrink + decode tiles, prefill tiles
    SHAPES += [((1,), 4096, 4096, 16), ((8,), 1024, 1000, 64), ((3, 100), 512, 1000, 16)]


def make(lead, k, n, r, dtype, grad=True):
    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=DEVICE) * scale + shift).to(dtype).requires_grad_(grad)

    return dict(x=rand(*lead, k), weight=rand(n, k, scale=k**-0.5).detach(), lora_a=rand(r, k, scale=k**-0.5),
                lora_b=rand(n, r, scale=r**-0.5), magnitude=rand(n, scale=0.2, shift=1.0), bias=rand(n))  # fmt: skip


def check_against_reference(out, inputs, reference, empty: bool, backend: str) -> None:
    """out and the gradients of every input against ``reference(copy of inputs)`` in float64, bounded by the
    same in the inputs' dtype; with no rows (``empty``) every gradient but x's must be zero."""
    copies = [{k: v.detach().to(t).requires_grad_(v.requires_grad) for k, v in inputs.items()}
              for t in (torch.float64, out.dtype)]  # fmt: skip
    ref, baseline = reference(copies[0]), reference(copies[1])
    assert_close_to_reference(out, ref, baseline.detach(), f"{backend} forward")
    grad = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    out.backward(grad)
    ref.backward(grad.double())
    baseline.backward(grad)
    for name in ("x", "lora_a", "lora_b", "magnitude", "bias"):
        if empty and name != "x":
            assert torch.all(inputs[name].grad == 0), name
            continue
        assert_close_to_reference(inputs[name].grad, copies[0][name].grad, copies[1][name].grad, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dora_forward_backward_match_reference(backend, dtype, shape):
    inputs = make(*shape, dtype)
    out = dora_linear(**inputs, scaling=1.3)
    check_against_reference(out, inputs, lambda c: dora_linear_reference(**c, scaling=1.3), shape[0] == (0,), backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_dora_with_dropout_matches_peft_formula(backend, dtype, shape):
    """PEFT's DoRA in training with dropout (base product on x, the scaled one on the dropped x), given the mask
    and drawn as nn.Dropout draws it: forward and every gradient against float64."""
    inputs = make(*shape, dtype)
    p = 0.3
    mask = torch.rand(inputs["x"].shape, device=DEVICE) >= p
    out = dora_linear(**inputs, scaling=1.3, dropout_p=p, dropout_mask=mask)

    def reference(c):
        return dora_linear_reference(**c, scaling=1.3, dropped_x=c["x"] * mask / (1 - p))

    check_against_reference(out, inputs, reference, shape[0] == (0,), backend)
    torch.manual_seed(5)
    drawn = dora_linear(**inputs, scaling=1.3, dropout_p=p)
    torch.manual_seed(5)
    expected_mask = torch.nn.functional.dropout(torch.ones_like(inputs["x"]), p) != 0
    torch.testing.assert_close(drawn, dora_linear(**inputs, scaling=1.3, dropout_p=p, dropout_mask=expected_mask))


def test_norm_identity_without_materialising_the_merged_weight(backend):
    inputs = make((1,), 50, 30, 6, torch.float32, grad=False)
    w, a, b = (inputs[k].double() for k in ("weight", "lora_a", "lora_b"))
    expected = torch.linalg.vector_norm(w + 0.7 * b @ a, dim=1)
    cached = weight_row_norm_sq(inputs["weight"])
    for norm_sq in (None, cached):
        got = dora_weight_norm(inputs["weight"], inputs["lora_a"], inputs["lora_b"], 0.7, norm_sq)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    with_cache = dora_linear(**inputs, scaling=0.7, weight_norm_sq=cached)
    torch.testing.assert_close(with_cache, dora_linear(**inputs, scaling=0.7))


NORM_SHAPES = [(29, 37, 5), (16, 16, 1), (40, 130, 64), (1, 8, 16), (33, 200, 40), (20, 24, 128), (20, 24, 129)]
if HAS_GPU:
    NORM_SHAPES += [(4096, 4096, 16), (1000, 1024, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k", "r"), NORM_SHAPES, ids=str)
def test_the_weight_norm_kernel_matches_the_merged_weights_norm(monkeypatch, dtype, n, k, r):
    """On Triton the norm is one launch (W + s B A formed and squared block by block, one pass over W): against
    ||W + s B A|| in float64 with W + s B A materialised, W as stored or a transposed view (GPT-2's Conv1D),
    ||W_n||^2 cached or not (the kernel needs no cache); a rank past NORM_MAX_R_PAD runs the composition."""
    kernels = pytest.importorskip("fastpeft.triton_kernels.dora")
    from fastpeft.backends import available_backends

    if "triton" not in available_backends(DEVICE):
        pytest.skip("triton cannot run here")
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    calls = []
    real = kernels.dora_weight_norm
    monkeypatch.setattr(kernels, "dora_weight_norm", lambda *a: calls.append(1) or real(*a))
    inputs = make((1,), k, n, r, dtype, grad=False)
    w, a, b = inputs["weight"], inputs["lora_a"], inputs["lora_b"]
    expected = torch.linalg.vector_norm(w.double() + 0.7 * b.double() @ a.double(), dim=1)
    for weight in (w, w.t().contiguous().t()):
        for norm_sq in (None, weight_row_norm_sq(weight)):
            got = dora_weight_norm(weight, a, b, 0.7, norm_sq)
            assert got.dtype == torch.float32 and got.shape == (n,)
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert len(calls) == (0 if r > 128 else 4)


def test_inference_keeps_no_prescale_copy():
    inputs = make((6,), 24, 12, 4, torch.float32, grad=False)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        dora_linear(**inputs)
    assert saved == []
    inputs["lora_a"].requires_grad_()
    inputs["magnitude"].requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        dora_linear(**inputs)
    assert (6, 12) in saved  # z, the product before the magnitude scale, for the magnitude's gradient


def test_opcheck_and_compile():
    inputs = make((6,), 24, 17, 4, torch.float32)
    out_scale = torch.rand(17, device=DEVICE) + 0.5
    args = (inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"], 0.5, inputs["bias"], out_scale)
    torch.library.opcheck(torch.ops.fastpeft.dora_linear.default, args)
    compiled = torch.compile(lambda **kw: dora_linear(**kw, scaling=0.5), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**inputs), dora_linear(**inputs, scaling=0.5))


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (dict(magnitude=torch.ones(7)), ValueError, r"magnitude must be \[out_features=8\]"),
        (dict(magnitude=torch.ones(8, dtype=torch.int64)), TypeError, "magnitude must be a floating-point"),
        (dict(magnitude=[1.0] * 8), TypeError, "magnitude must be a floating-point"),
        (dict(weight_norm_sq=torch.ones(9)), ValueError, "weight_norm_sq must be"),
        (dict(lora_b=torch.randn(8, 5)), ValueError, "lora_b must be"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=0.1, dropout_mask=torch.ones(3, 15, dtype=torch.bool)), ValueError, "dropout_mask must"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_dora_input(changes, error, match):
    inputs = {k: v.detach().cpu() for k, v in make((3,), 16, 8, 4, torch.float32, grad=False).items()}
    inputs.update(changes)
    with pytest.raises(error, match=match):
        dora_linear(**inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dora_at_initialisation_is_the_base_output_bit_for_bit(dtype, bias, monkeypatch):
    """PEFT's DoRA starts with B = 0 and the magnitude equal to ||W|| (computed as PEFT computes it), so its
    output is the base layer's exactly; the torch backend composes DoRA as PEFT does and gives it bit for bit."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    torch.manual_seed(0)
    k, n, r = 37, 29, 4
    x = torch.randn(3, 5, k, device=DEVICE).to(dtype)
    weight = (torch.randn(n, k, device=DEVICE) * k**-0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    lora_a = torch.randn(r, k, device=DEVICE).to(dtype)
    lora_b = torch.zeros(n, r, device=DEVICE, dtype=dtype)
    magnitude = torch.linalg.norm(weight + 1.5 * lora_b @ lora_a, dim=1).to(dtype)  # PEFT's initialisation
    expected = torch.nn.functional.linear(x, weight, b)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = dora_linear(x, weight, lora_a, lora_b, magnitude.requires_grad_(grad), 1.5, b)
        assert torch.equal(out, expected), f"grad={grad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("m", "n"), [(0, 5), (1, 1), (7, 33), (70, 40), (37, 130)])
def test_triton_scale_gradients_in_one_pass(dtype, m, n):
    """dz = dy * c and sum_rows(dy * z) from one pass (several row blocks, odd sizes, a strided dy) against
    float64, and the same bits on a second run."""
    pytest.importorskip("triton")
    from fastpeft.backends import available_backends

    if "triton" not in available_backends(DEVICE):
        pytest.skip("triton cannot run here")
    from fastpeft.triton_kernels.dora import dora_grad_scale

    dy = torch.randn(n, m, device=DEVICE).to(dtype).t()  # column-major rows
    z, c = torch.randn(m, n, device=DEVICE).to(dtype), torch.rand(n, device=DEVICE) + 0.5
    dz, dscale = dora_grad_scale(dy, z, c)
    assert dz.dtype == dtype and dscale.dtype == torch.float32
    expected = (dy.float() * c).to(dtype)  # fp32 math, one rounding (the interpreter's rounding truncates)
    torch.testing.assert_close(dz.float(), expected.float(), rtol=0 if dtype == torch.float32 else 2**-7, atol=0)
    torch.testing.assert_close(dscale.double(), (dy.double() * z.double()).sum(0), rtol=1e-5, atol=1e-4)
    again = dora_grad_scale(dy, z, c)
    assert torch.equal(dz, again[0]) and torch.equal(dscale, again[1])


def test_training_keeps_x_a_for_the_backward(monkeypatch):
    """Past the decode rows on Triton the forward's x A^T serves the backward's dB: no shrink reads x again."""
    pytest.importorskip("triton")
    from fastpeft.backends import available_backends

    if "triton" not in available_backends(DEVICE):
        pytest.skip("triton cannot run here")
    from fastpeft.triton_kernels import lora as kernels

    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    inputs = make((70,), 24, 20, 4, torch.float32)
    out = dora_linear(**inputs, scaling=0.5)
    shrunk: list[tuple[int, ...]] = []
    real = kernels.lora_shrink
    monkeypatch.setattr(kernels, "lora_shrink", lambda t, *a: shrunk.append(tuple(t.shape)) or real(t, *a))
    out.square().sum().backward()
    assert (70, 24) not in shrunk and inputs["lora_b"].grad is not None, shrunk
