"""The qlora ops (matmul_4bit, qlora_linear) on every backend against the float64 reference: forward, gradients,
dropout, odd shapes, both 4-bit types, with and without double quantization; every tier forced (the on-chip
tiles and dequantize-once, whose kernels write bitsandbytes' values bit for bit); bad input; bitsandbytes."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_GPU, assert_close_to_reference

import fastpeft.ops.qlora as qlora_ops
from fastpeft.backends import available_backends, record_backends
from fastpeft.ops.qlora import Weight4bit, matmul_4bit, qlora_linear, qlora_linear_reference
from fastpeft.ops.quant_4bit import QuantState, dequantize_4bit, quantize_4bit

# (M, K, N): decode, odd K (the per-element path), prefill tiles (the interpreter's decode limit is 16 rows),
# no rows, a K that is not a multiple of the block.
SHAPES = [(1, 64, 40), (3, 33, 17), (20, 96, 24), (0, 64, 8), (5, 160, 9)]
FORMATS = [("nf4", 32, False), ("nf4", 64, True), ("fp4", 128, True), ("fp4", 64, False)]
if HAS_GPU:  # every Triton specialisation compiles once per GPU run: the subset that covers each code path
    SHAPES, FORMATS = SHAPES[:4], [FORMATS[1], FORMATS[3]]
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if HAS_GPU else [])
KERNEL_BACKENDS = [b for b in available_backends(DEVICE) if b != "torch"]  # the torch backend is the reference


def make(m, k, n, dtype, fmt, r=4, seed=0):
    quant_type, blocksize, double_quant = fmt
    g = torch.Generator().manual_seed(seed)
    packed, state = quantize_4bit(torch.randn(n, k, generator=g) * 0.1, quant_type, blocksize, double_quant)
    packed, state = packed.to(DEVICE), state.to(DEVICE)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)

    return rand(m, k), packed, state, rand(r, k, scale=0.3), rand(n, r, scale=0.3), rand(n)


def f64(*tensors):
    return [None if t is None else t.double() for t in tensors]


@pytest.fixture(params=["tiles", "dequantize_once"])
def tier(request, monkeypatch) -> str:
    """Every tier of the triton and cuda backends, forced for every row count: the on-chip tiles (decode and
    prefill by rows, as shipped) or dequantize-once (W written dense, then the LoRA layer's GEMM)."""
    if request.param == "dequantize_once":
        monkeypatch.setattr(qlora_ops, "DEQUANTIZE_ONCE_MIN_M", 1)
    return request.param


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_forward_matches_reference(backend, tier, dtype, fmt, m, k, n):
    x, packed, state, a, b, bias = make(m, k, n, dtype, fmt)
    for lora in (False, True):
        args = (a, b, 0.7) if lora else (None, None, 1.0)
        y = qlora_linear(x, packed, state, *args, bias=bias)
        ref = qlora_linear_reference(*f64(x), packed, state, *f64(*args[:2]), args[2], bias.double())
        baseline = qlora_linear_reference(x, packed, state, *args, bias=bias)
        assert_close_to_reference(y, ref, baseline, f"{backend} lora={lora}")
    y = matmul_4bit(x, packed, state)
    assert_close_to_reference(y, qlora_linear_reference(x.double(), packed, state),
                              qlora_linear_reference(x, packed, state), "matmul_4bit")  # fmt: skip


def test_3d_and_non_contiguous_x(backend, tier):
    _, packed, state, a, b, bias = make(1, 48, 20, torch.float32, FORMATS[1])
    x = torch.randn(2, 48, 7, device=DEVICE).transpose(1, 2)  # [2, 7, 48], K not the unit stride
    y = qlora_linear(x, packed, state, a, b, 0.5, bias)
    ref = qlora_linear_reference(x.double(), packed, state, a.double(), b.double(), 0.5, bias.double())
    assert y.shape == (2, 7, 20)
    assert_close_to_reference(y, ref, qlora_linear_reference(x, packed, state, a, b, 0.5, bias))


@pytest.mark.parametrize("fmt", FORMATS[:2])
@pytest.mark.parametrize("m, k, n", [(2, 64, 24), (19, 33, 17)])
def test_gradients_match_reference(backend, tier, fmt, m, k, n):
    dtype = torch.float32
    x, packed, state, a, b, bias = make(m, k, n, dtype, fmt)
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    qlora_linear(leaves[0], packed, state, leaves[1], leaves[2], 0.7, leaves[3]).backward(dy)
    ref_leaves = [t.double().requires_grad_() for t in (x, a, b, bias)]
    qlora_linear_reference(ref_leaves[0], packed, state, ref_leaves[1], ref_leaves[2], 0.7,
                           ref_leaves[3]).backward(dy.double())  # fmt: skip
    base_leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    qlora_linear_reference(base_leaves[0], packed, state, base_leaves[1], base_leaves[2], 0.7,
                           base_leaves[3]).backward(dy)  # fmt: skip
    for name, leaf, ref, base in zip(["x", "a", "b", "bias"], leaves, ref_leaves, base_leaves, strict=True):
        assert_close_to_reference(leaf.grad, ref.grad, base.grad, f"d{name}")


def test_gradient_of_x_through_the_4bit_weight_alone(backend, tier):
    x, packed, state, *_ = make(6, 64, 30, torch.float32, FORMATS[1])
    x.requires_grad_()
    matmul_4bit(x, packed, state).sum().backward()
    xr = x.detach().double().requires_grad_()
    qlora_linear_reference(xr, packed, state).sum().backward()
    assert_close_to_reference(x.grad, xr.grad, xr.grad.float())


def test_dropout_uses_the_mask_in_both_passes(backend, tier):
    x, packed, state, a, b, bias = make(5, 64, 24, torch.float32, FORMATS[0])
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.3
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    y = qlora_linear(leaves[0], packed, state, leaves[1], leaves[2], 0.5, bias, dropout_p=0.3, dropout_mask=mask)
    y.square().sum().backward()

    ref_leaves = [t.double().requires_grad_() for t in (x, a, b)]
    xr, ar, br = ref_leaves
    dropped = xr * mask / 0.7
    ref = qlora_linear_reference(xr, packed, state, bias=bias.double()) + 0.5 * (dropped @ ar.t()) @ br.t()
    ref.square().sum().backward()
    assert_close_to_reference(y, ref, ref.float())
    for leaf, r in zip(leaves, ref_leaves, strict=True):
        assert_close_to_reference(leaf.grad, r.grad, r.grad.float())


def test_dropout_draws_what_nn_dropout_draws():
    x, packed, state, a, b, _ = make(4, 32, 8, torch.float32, FORMATS[0])
    torch.manual_seed(5)
    y = qlora_linear(x, packed, state, a, b, 1.0, dropout_p=0.5)
    torch.manual_seed(5)
    dropped = torch.nn.Dropout(0.5)(x)
    ref = qlora_linear_reference(x, packed, state) + (dropped @ a.t()) @ b.t()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_weight4bit_skips_the_state_and_round_trips():
    x, packed, state, a, b, bias = make(3, 64, 16, torch.float32, FORMATS[1])
    weight = Weight4bit.from_state(packed, state)
    torch.testing.assert_close(qlora_linear(x, weight, None, a, b, 0.3, bias),
                               qlora_linear(x, packed, state, a, b, 0.3, bias), rtol=0, atol=0)  # fmt: skip
    back = weight.state()
    assert back.quant_type == state.quant_type and back.nested and back.blocksize == state.blocksize


@pytest.mark.parametrize(("m", "lora", "on_gpu"), [(1, False, "cuda"), (2, False, "cuda"), (3, False, "triton"),
                                                 (1, True, "triton"), (40, False, "triton")])  # fmt: skip
def test_each_tier_picks_its_backend(m, lora, on_gpu, monkeypatch):
    monkeypatch.setattr(qlora_ops, "GEMV_MAX_M", 2)  # the rule, whatever the GPU run sets the crossover to
    x, packed, state, a, b, _ = make(m, 64, 16, torch.float32, FORMATS[0])
    with record_backends() as calls:
        qlora_linear(x, packed, state, *((a, b) if lora else (None, None)))
    assert calls == [("matmul_4bit", on_gpu if HAS_GPU else "torch")]
    assert qlora_ops.preference("matmul_4bit", m, lora)[0] == on_gpu
    assert qlora_ops.preference("matmul_4bit_t", m, lora)[0] == "triton"


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [*FORMATS, ("fp4", 4096, True)])
@pytest.mark.parametrize("n, k", [(7, 33), (3, 1), (21, 77), (16, 64)])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dequantize_kernels_write_bitsandbytes_values_exactly(backend, fmt, w_dtype, out_dtype, n, k):
    quant_type, blocksize, double_quant = fmt
    g = torch.Generator().manual_seed(n * 1000 + k)
    weight = (torch.randn(n, k, generator=g) * 3).to(w_dtype)
    packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant)
    packed, state = packed.to(DEVICE), state.to(DEVICE)
    wider = torch.full((n, k + 9), float("nan"), device=DEVICE, dtype=out_dtype)  # rows 16-byte misaligned
    for out in (torch.full((n, k), float("nan"), device=DEVICE, dtype=out_dtype), wider[:, 3 : 3 + k]):
        qlora_ops.DEQUANTIZE[backend](Weight4bit.from_state(packed, state), out)
        assert torch.equal(out, dequantize_4bit(packed, state).to(out_dtype))
    assert wider[:, :3].isnan().all() and wider[:, 3 + k :].isnan().all()  # nothing written outside the view


@pytest.mark.parametrize("m, tier_taken", [(15, "tiles"), (16, "tiles"), (17, "tiles"), (255, "tiles"),
                                           (256, "tiles"), (257, "tiles"), (511, "tiles"), (512, "dequantize_once"),
                                           (513, "dequantize_once")])  # fmt: skip
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_the_tier_follows_the_row_count(backend, m, tier_taken, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    dense_calls = []
    real = qlora_ops.DEQUANTIZE[backend]
    monkeypatch.setitem(qlora_ops.DEQUANTIZE, backend, lambda *a: dense_calls.append(1) or real(*a))
    x, packed, state, a, b, bias = make(m, 32, 8, torch.float32, FORMATS[1], r=2)
    y = qlora_linear(x, packed, state, a, b, 0.5, bias)
    assert len(dense_calls) == (tier_taken == "dequantize_once")
    ref = qlora_linear_reference(x.double(), packed, state, a.double(), b.double(), 0.5, bias.double())
    assert_close_to_reference(y, ref, qlora_linear_reference(x, packed, state, a, b, 0.5, bias))


@pytest.mark.parametrize("join", [True, False], ids=["joined", "lora-product"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_both_forms_of_the_dequantized_product(backend, join, monkeypatch):
    """The dequantize-once tier with the adapter as r more columns of one cuBLAS GEMM (x, or dy, copied beside
    s xa), or as the plain LoRA layer's product on the dense W (joins_adapter picks by shape; forced here both
    ways): forward and every gradient against the float64 reference, with bias, in both dtypes."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    monkeypatch.setattr(qlora_ops, "DEQUANTIZE_ONCE_MIN_M", 1)
    monkeypatch.setattr(qlora_ops, "joins_adapter", lambda reduce, out: join)
    for dtype in DTYPES:
        x, packed, state, a, b, bias = make(21, 64, 40, dtype, FORMATS[1], r=8)
        dy = torch.randn(21, 40, device=DEVICE).to(dtype)
        leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
        y = qlora_linear(leaves[0], packed, state, leaves[1], leaves[2], 0.6, leaves[3])
        y.backward(dy)
        ref = [t.double().requires_grad_() for t in (x, a, b, bias)]
        y_ref = qlora_linear_reference(ref[0], packed, state, ref[1], ref[2], 0.6, ref[3])
        y_ref.backward(dy.double())
        base = [t.clone().requires_grad_() for t in (x, a, b, bias)]
        y_base = qlora_linear_reference(base[0], packed, state, base[1], base[2], 0.6, base[3])
        y_base.backward(dy)
        assert_close_to_reference(y, y_ref, y_base, f"{dtype} y")
        for name, leaf, want, plain in zip(["x", "a", "b", "bias"], leaves, ref, base, strict=True):
            assert_close_to_reference(leaf.grad, want.grad, plain.grad, f"{dtype} d{name}")


def test_the_adapter_joins_the_gemm_where_the_output_is_wide():
    assert qlora_ops.joins_adapter(4096, 14336)  # an up-projection's forward: copying x beats writing y twice
    assert not qlora_ops.joins_adapter(14336, 4096)  # its dx, and a down-projection's forward
    assert not qlora_ops.joins_adapter(4096, 4096)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda c: c.update(x=c["x"][:, :-1]), ValueError, "x must be"),
        (lambda c: c.update(x=c["x"].to(torch.int32)), TypeError, "x must be"),
        (lambda c: c.update(a=c["a"][:, :-1]), ValueError, "lora_a"),
        (lambda c: c.update(b=c["b"][:, :-1]), ValueError, "disagree on r"),
        (lambda c: c.update(b=None), ValueError, "both lora_a and lora_b"),
        (lambda c: c.update(a=c["a"].double()), TypeError, "lora_a"),
        (lambda c: c.update(bias=c["bias"][:-1]), ValueError, "bias"),
        (lambda c: c.update(scaling="2"), TypeError, "scaling"),
        (lambda c: c.update(state=object()), TypeError, "QuantState"),
    ],
)
def test_bad_input(change, error, match):
    x, packed, state, a, b, bias = make(3, 64, 16, torch.float32, FORMATS[0])
    call = {"x": x, "state": state, "a": a, "b": b, "scaling": 1.0, "bias": bias}
    change(call)
    with pytest.raises(error, match=match):
        qlora_linear(call["x"], packed, call["state"], call["a"], call["b"], call["scaling"], call["bias"])


def test_opcheck():
    x, packed, state, a, b, bias = make(3, 64, 16, torch.float32, FORMATS[1])
    w = Weight4bit.from_state(packed, state)
    xa = (x @ a.t()).float()
    args = (x, w.packed, *w.state_args(), 16, w.dtype, bias, None, xa, b, 0.5)
    torch.library.opcheck(torch.ops.fastpeft.matmul_4bit.default, args)
    dy = torch.randn(3, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.fastpeft.matmul_4bit_t.default,
                          (dy, w.packed, *w.state_args(), 64, w.dtype, (dy @ b).float(), a, 0.5))  # fmt: skip


def test_weights_quantized_by_bitsandbytes_multiply_as_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(24, 128) * 0.1
    packed, bnb_state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    x = torch.randn(5, 128)
    theirs = bnb.matmul_4bit(x, packed.t(), quant_state=bnb_state)
    ours = matmul_4bit(x.to(DEVICE), packed.to(DEVICE), QuantState.from_bnb(bnb_state).to(DEVICE))
    torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 16, 300, 600])  # decode, tiles, dequantize once
def test_large_shapes_on_gpu(backend, dtype, m):
    x, packed, state, a, b, bias = make(m, 4096, 1000, dtype, ("nf4", 64, True), r=16)
    y = qlora_linear(x, packed, state, a, b, 0.5, bias)
    ref = qlora_linear_reference(x.double(), packed, state, a.double(), b.double(), 0.5, bias.double())
    assert_close_to_reference(y, ref, qlora_linear_reference(x, packed, state, a, b, 0.5, bias))


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "r", "shrink_launches"), [(3, 16, 0), (11, 32, 0), (3, 48, 1)])
def test_the_cuda_decode_takes_the_adapter_in_its_own_launch(monkeypatch, m, r, shrink_launches):
    """On sm_90 the CUDA GEMV computes x A^T inside its own launch (a cluster of blocks shares it, the partial
    sums meeting through distributed shared memory) up to rank 32, past it the shrink is a launch before; both
    against the float64 reference, N leaving idle blocks in the last cluster, and the same bits on a second call
    (the partials are added in a fixed order)."""
    if "cuda" not in available_backends(DEVICE) or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need the CUDA extension on sm_90 or later")
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    x, packed, state, a, b, bias = make(m, 1024, 1000, torch.bfloat16, ("nf4", 64, True), r=r)
    qlora_linear(x, packed, state, a, b, 0.5, bias)  # first-call work (the extension's setup) outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        y = qlora_linear(x, packed, state, a, b, 0.5, bias)
        torch.cuda.synchronize()
    names = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not names:
        pytest.skip("the profiler sees no CUDA kernels here (no CUPTI)")
    assert sum("gemv_4bit_vector_kernel" in name for name in names) == 1, names
    assert sum("lora_shrink" in name for name in names) == shrink_launches, names
    ref = qlora_linear_reference(x.double(), packed, state, a.double(), b.double(), 0.5, bias.double())
    assert_close_to_reference(y, ref, qlora_linear_reference(x, packed, state, a, b, 0.5, bias))
    assert torch.equal(y, qlora_linear(x, packed, state, a, b, 0.5, bias))
