"""lora_linear with dropout on A's input (nn.Dropout's mask under the same seed) and with PEFT's lora_bias:
forward and backward against float64, the mask kept as bits, bad input refused."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, DTYPES, HAS_GPU, assert_close_to_reference

from fastpeft.backends import record_backends
from fastpeft.ops.dropout import apply_mask, draw_mask, keep_scale, pack_bits, unpack_bits
from fastpeft.ops.lora import lora_linear


@pytest.mark.parametrize(("m", "k"), [(0, 5), (1, 1), (3, 7), (4, 8), (5, 37)])
def test_bits_round_trip(m, k):
    mask = torch.rand(m, k, device=DEVICE) > 0.4
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (m, -(-k // 8))
    assert torch.equal(unpack_bits(bits, k), mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_is_the_one_nn_dropout_draws(dtype):
    x = torch.randn(6, 37, device=DEVICE).to(dtype)
    torch.manual_seed(11)
    expected = torch.nn.functional.dropout(x, 0.3, training=True)
    after_dropout = torch.rand(3, device=DEVICE)
    torch.manual_seed(11)
    mask = draw_mask(tuple(x.shape), 0.3, dtype, x.device)
    assert torch.equal(torch.rand(3, device=DEVICE), after_dropout)  # the generator advanced the same
    assert torch.equal(apply_mask(x, mask, keep_scale(0.3, dtype, x.device)), expected)


def make(lead, k, n, r, dtype, *, grad=True):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_(grad)

    return dict(x=rand(*lead, k), weight=rand(n, k, scale=k**-0.5), lora_a=rand(r, k, scale=k**-0.5),
                lora_b=rand(n, r, scale=r**-0.5), bias=rand(n), lora_bias=rand(n))  # fmt: skip


def reference(inputs, scaling, mask, p):
    """The PEFT formula in the inputs' dtype (float64 for the ground truth), with a given keep-mask."""
    x = inputs["x"]
    dropped = x if mask is None else torch.where(mask, x / (1 - p), 0)
    base = torch.nn.functional.linear(x, inputs["weight"], inputs["bias"])
    lora = torch.nn.functional.linear(torch.nn.functional.linear(dropped, inputs["lora_a"]), inputs["lora_b"])
    return base + scaling * (lora + inputs["lora_bias"])


SHAPES = [((1,), 37, 29, 5), ((2, 35), 24, 33, 8), ((0,), 16, 8, 2)]
if HAS_GPU:  # decode and prefill tiles, and the CUDA kernels on either side of their row limits, at real sizes
    SHAPES += [((1,), 4096, 4096, 16), ((2, 70), 1024, 1000, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dropout_and_lora_bias_forward_backward(backend, dtype, shape):
    p, scaling = 0.25, 1.7
    inputs = make(*shape, dtype)
    torch.manual_seed(5)
    out = lora_linear(**inputs, scaling=scaling, dropout_p=p)
    torch.manual_seed(5)
    mask = draw_mask(tuple(inputs["x"].shape), p, dtype, DEVICE)  # the mask the op drew
    grad = torch.randn(out.shape, device=DEVICE).to(dtype)
    out.backward(grad)

    inputs64 = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    plain = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    ref = reference(inputs64, scaling, mask, p)
    baseline = reference(plain, scaling, mask, p)
    assert_close_to_reference(out, ref, baseline.detach(), f"{backend} forward")
    ref.backward(grad.double())
    baseline.backward(grad)
    for name in inputs:
        if shape[0] == (0,) and name != "x":
            assert torch.all(inputs[name].grad == 0), name
            continue
        assert_close_to_reference(inputs[name].grad, inputs64[name].grad, plain[name].grad, f"grad {name}")


def test_given_mask_is_used_and_no_dropout_keeps_the_one_launch_path(backend):
    inputs = make((4,), 16, 12, 3, torch.float32, grad=False)
    mask = torch.rand(4, 16, device=DEVICE) > 0.5
    out = lora_linear(**inputs, scaling=0.5, dropout_p=0.5, dropout_mask=mask)
    assert_close_to_reference(out, reference({k: v.double() for k, v in inputs.items()}, 0.5, mask, 0.5),
                              reference(inputs, 0.5, mask, 0.5))  # fmt: skip
    with record_backends() as calls:
        lora_linear(**inputs, dropout_p=0.0)
    assert [op for op, _ in calls] == ["lora_linear"]
    with record_backends() as calls:
        lora_linear(**inputs, dropout_p=0.1)
    # Triton reads the mask as bits in its kernels (no dropped x); the others shrink the dropped x
    expected = ["lora_linear"] if backend == "triton" else ["lora_shrink", "lora_expand_linear"]
    assert [op for op, _ in calls] == expected


def test_what_the_backward_keeps_per_device():
    """On a GPU the masks as bits (1/16 of a bf16 x), no dropped copy of x; off CUDA the dropped copy, as PEFT's
    autograd keeps it (rebuilding it there costs more time than its memory)."""
    inputs = make((6,), 40, 12, 4, torch.float32)
    on_gpu = inputs["x"].device.type == "cuda"
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lora_linear(**{k: v for k, v in inputs.items() if k != "lora_bias"}, dropout_p=0.2)
    assert (((6, 5), torch.uint8) in saved) == on_gpu  # 40 columns -> 5 bytes per row
    copies_of_x = saved.count(((6, 40), torch.float32))
    assert copies_of_x == (1 if on_gpu else 2)  # x itself (GPU); off CUDA the dropped x too (x: not needed)
    out.sum().backward()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear(**{k: v for k, v in inputs.items() if k != "lora_bias"}, dropout_p=[0.2, 0.1], rank_groups=[1, 3])
    if on_gpu:
        assert ((12, 5), torch.uint8) in saved and saved.count(((6, 40), torch.float32)) == 1  # two masks as bits
    else:  # x, and each adapter's dropped copy; the two masks as bools
        assert saved.count(((6, 40), torch.float32)) == 3 and ((2, 6, 40), torch.bool) in saved


def grouped_reference(inputs, masks, ps, ranks):
    """Several adapters stacked in lora_a/lora_b (scales folded into B), each with its own dropout mask."""
    x, lin = inputs["x"], torch.nn.functional.linear
    y = lin(x, inputs["weight"], inputs["bias"])
    start = 0
    for mask, p, r in zip(masks, ps, ranks, strict=True):
        dropped = torch.where(mask, x / (1 - p), 0)
        y = y + lin(lin(dropped, inputs["lora_a"][start : start + r]), inputs["lora_b"][:, start : start + r])
        start += r
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_stacked_adapters_each_with_its_own_mask(backend, dtype, shape):
    """rank_groups: each adapter's mask drawn in order as its nn.Dropout would (none for p = 0), one base GEMM
    and one expand for all; forward and every gradient against float64."""
    ranks, ps = [2, 1, 2], [0.3, 0.0, 0.5]
    lead, k, n, _ = shape
    inputs = make(lead, k, n, sum(ranks), dtype)
    inputs.pop("lora_bias")
    torch.manual_seed(9)
    with record_backends() as calls:
        out = lora_linear(**inputs, dropout_p=ps, rank_groups=ranks)
    assert [op for op, _ in calls].count("lora_expand_linear") == 1
    torch.manual_seed(9)
    x = inputs["x"]
    masks = [torch.nn.functional.dropout(torch.ones_like(x), p) != 0 if p else torch.ones_like(x, dtype=torch.bool)
             for p in ps]  # fmt: skip
    inputs64 = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    plain = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    ref, baseline = (grouped_reference(c, masks, ps, ranks) for c in (inputs64, plain))
    assert_close_to_reference(out, ref, baseline.detach(), f"{backend} forward")
    grad = torch.randn(out.shape, device=DEVICE).to(dtype)
    out.backward(grad)
    ref.backward(grad.double())
    baseline.backward(grad)
    for name in inputs:
        assert_close_to_reference(inputs[name].grad, inputs64[name].grad, plain[name].grad, f"grad {name}")
    given = lora_linear(**inputs, dropout_p=ps, rank_groups=ranks, dropout_mask=torch.stack(masks))
    torch.testing.assert_close(given, out)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(rank_groups=[2, 1]), "rank_groups must add up to lora_a's rank 4"),
        (dict(rank_groups=[4, 0]), "rank_groups must be a list of ranks >= 1"),
        (dict(rank_groups=[2, 2], dropout_p=[0.1]), "one p per rank group"),
        (dict(rank_groups=[2, 2], dropout_p=[0.1, 1.5]), r"dropout_p must be in \[0, 1\)"),
        (dict(rank_groups=[2, 2], dropout_p=0.1, dropout_mask=torch.ones(3, 16, dtype=torch.bool)), r"\[groups"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_rank_groups(changes, match):
    inputs = {k: v.detach().cpu() for k, v in make((3,), 16, 8, 4, torch.float32, grad=False).items()}
    with pytest.raises(ValueError, match=match):
        lora_linear(**inputs, **changes)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
        (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
        (dict(dropout_p=0.1, dropout_mask=torch.ones(3, 15, dtype=torch.bool)), ValueError, "dropout_mask must match"),
        (dict(dropout_p=0.1, dropout_mask=torch.ones(3, 16)), TypeError, "dropout_mask must be a bool tensor"),
        (dict(dropout_mask=torch.ones(3, 16, dtype=torch.bool)), ValueError, "dropout_mask needs dropout_p > 0"),
        (dict(lora_bias=torch.randn(7)), ValueError, "lora_bias must be"),
        (dict(lora_bias=torch.randn(8, dtype=torch.float16)), TypeError, "one dtype"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_dropout_and_lora_bias_input(changes, error, match):
    inputs = {k: v.detach().cpu() for k, v in make((3,), 16, 8, 4, torch.float32, grad=False).items()}
    inputs.pop("lora_bias")
    with pytest.raises(error, match=match):
        lora_linear(**inputs, **changes)


def test_compiled_dropout_backward_matches_eager(backend):
    """Under torch.compile the op runs as its custom op (the mask read as bits inside Triton's kernels when it runs
    there) and the traced backward unpacks the bits onto the custom ops: the gradients are eager's."""
    base = make((70,), 24, 20, 4, torch.float32)
    mask = torch.rand(70, 24, device=DEVICE) > 0.3

    def step(fn):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in base.items()}
        out = fn(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"])
        out.backward(torch.linspace(-1, 1, out.numel(), device=DEVICE).reshape(out.shape))
        return out, {k: v.grad for k, v in leaves.items() if k in ("x", "lora_a", "lora_b")}

    def layer(x, w, a, b):
        return lora_linear(x, w, a, b, 0.5, dropout_p=0.3, dropout_mask=mask)

    eager, eager_grads = step(layer)
    compiled, compiled_grads = step(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled, eager)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, msg=name)
