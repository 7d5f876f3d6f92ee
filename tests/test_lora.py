"""fastpeft::lora_linear on every backend against the float64 reference: forward, backward, compile, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, DTYPES, HAS_GPU, assert_close_to_reference, force_persistent

from fastpeft.ops.lora import lora_linear, lora_linear_reference

# (leading shape of x, in_features K, out_features N, rank r). On the CPU (Triton in the interpreter): odd sizes,
# M = 1, M = 0, 3-D, both sides of DECODE_MAX_M = 64, K past several K blocks, a rank above FUSED_MAX_R_PAD.
CPU_SHAPES = [
    ((1,), 37, 29, 5),
    ((0,), 16, 24, 4),
    ((7,), 33, 65, 8),
    ((2, 3), 40, 19, 3),
    ((70,), 45, 31, 16),
    ((3,), 300, 17, 7),
    ((5,), 24, 40, 17),
    ((4,), 40, 24, 40),
]
# On a GPU: a chosen subset, not every CPU case again, that reaches every kernel and path of both backends
# (test_gpu_shapes_reach_every_path checks it). Triton: the fused decode launch, shrink + decode tiles, split-K
# shrink, shrink + prefill tiles. CUDA: the GEMV with 16-byte and scalar loads, at its row limit, the shrink
# kernel, the tiled shrink (M > 64) and the tiled expand after cuBLAS.
GPU_SHAPES = [
    ((1,), 4096, 4096, 16),  # decode, one launch; CUDA GEMV, 16-byte loads
    ((0,), 64, 48, 4),  # no rows
    ((7,), 33, 65, 8),  # odd sizes; CUDA scalar loads
    ((8,), 512, 1000, 64),  # rank 64: shrink + decode tiles; CUDA GEMV at its row limit
    ((5,), 4096, 200, 40),  # split-K shrink (fp32 atomics) + decode tiles
    ((2, 32), 2048, 1376, 32),  # M = 64, rank 32: the fused launch at both limits; CUDA shrink kernel + tiled expand
    ((65,), 1024, 1030, 16),  # just past decode: shrink + prefill tiles; CUDA tiled shrink + tiled expand
    ((3, 333), 1111, 997, 13),  # odd and 3-D, prefill
    ((1024,), 4096, 1024, 8),  # many rows
]
SHAPES = GPU_SHAPES if HAS_GPU else CPU_SHAPES
BACKWARD_SHAPES = [((3,), 37, 29, 5), ((2, 35), 24, 33, 8), ((0,), 16, 8, 2)]
if HAS_GPU:  # the backward's dx on decode tiles (small M, rank 64) and on prefill tiles, at real sizes
    BACKWARD_SHAPES += [((4,), 1024, 768, 64), ((3, 100), 512, 1000, 16)]


def make_inputs(lead, k, n, r, dtype, *, bias=True, device=DEVICE, requires_grad=False):
    """Random inputs (B random: B = 0 would test nothing), scaled so outputs are O(1)."""

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, device=device) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    return dict(
        x=rand(*lead, k),
        weight=rand(n, k, scale=k**-0.5),
        lora_a=rand(r, k, scale=k**-0.5),
        lora_b=rand(n, r, scale=r**-0.5),
        scaling=1.7,
        bias=rand(n) if bias else None,
    )


def as64(inputs):
    return {k: v.detach().double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_matches_reference(backend, dtype, shape, bias):
    inputs = make_inputs(*shape, dtype, bias=bias)
    out = lora_linear(**inputs)
    ref = lora_linear_reference(**as64(inputs))
    assert_close_to_reference(out, ref, lora_linear_reference(**inputs), f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_operands(backend, dtype):
    """Transposed and strided views of every operand, without copies by the caller."""
    k, n, r, m = 41, 27, 6, 9
    base = make_inputs((m,), k, n, r, dtype)
    inputs = dict(
        x=base["x"].t().contiguous().t(),  # column-major x
        weight=base["weight"].t().contiguous().t(),  # column-major W, as W.T in the backward pass
        lora_a=torch.cat([base["lora_a"], base["lora_a"]], dim=1)[:, ::2],  # stride 2 along K
        lora_b=base["lora_b"].t().contiguous().t(),
        scaling=base["scaling"],
        bias=torch.stack([base["bias"], base["bias"]], dim=1)[:, 0],  # stride 2
    )
    assert not any(t.is_contiguous() for t in (inputs["x"], inputs["weight"], inputs["lora_a"], inputs["bias"]))
    out = lora_linear(**inputs)
    ref = lora_linear_reference(**as64(inputs))
    assert_close_to_reference(out, ref, lora_linear_reference(**inputs), f"{backend} {dtype}")


def test_gpu_shapes_reach_every_path():
    """The GPU subset reaches every launch plan of the Triton backend and every path of the CUDA backend."""
    kernels = pytest.importorskip("fastpeft.triton_kernels.lora")
    rows = [(math.prod(lead), k, r) for lead, k, _n, r in GPU_SHAPES]
    plans = {kernels.launch_plan(m, r) for m, _k, r in rows if m > 0}
    assert plans == {("decode+shrink",), ("shrink", "decode"), ("shrink", "lora_term", "cublas")}
    fused = [(math.prod(lead), n, k, r) for lead, k, n, r in GPU_SHAPES if kernels.fuses_shrink(math.prod(lead), r)]
    schedules = {kernels.uses_stream_k(m, n, k, r, torch.bfloat16, 132, interpreter=False) for m, n, k, r in fused}
    assert schedules == {True, False}  # the one-launch decode on column tiles and on the stream-K schedule
    assert any(m <= 16 and k >= 2048 and not kernels.fuses_shrink(m, r) for m, k, r in rows)  # split-K shrink
    assert {0, 1} <= {m for m, _k, _r in rows} and any(len(lead) > 1 for lead, *_ in GPU_SHAPES)
    gemv = [(m, k) for m, k, _r in rows if 0 < m <= 8]  # CUDA: GEMV with 16-byte and with scalar loads
    assert any(k % 8 == 0 for _m, k in gemv) and any(k % 8 for _m, k in gemv) and any(m == 8 for m, _k in gemv)
    assert any(8 < m <= 64 for m, _k, _r in rows) and any(m > 64 for m, _k, _r in rows)


def test_3d_noncontiguous_x(backend):
    inputs = make_inputs((4, 5), 32, 23, 4, torch.float32)
    inputs["x"] = inputs["x"].transpose(0, 1)  # [5, 4, 32], not viewable as rows
    out = lora_linear(**inputs)
    assert out.shape == (5, 4, 23)
    ref = lora_linear_reference(**as64(inputs))
    assert_close_to_reference(out, ref, lora_linear_reference(**inputs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=str)
def test_backward_matches_reference(backend, dtype, shape):
    """Gradients of x, weight, lora_a, lora_b and bias against float64 autograd of the reference."""
    inputs = make_inputs(*shape, dtype, requires_grad=True)
    inputs64 = {k: v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v
                for k, v in inputs.items()}  # fmt: skip
    plain = {k: v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v
             for k, v in inputs.items()}  # fmt: skip
    grad = torch.randn(*shape[0], shape[2], device=DEVICE).to(dtype)

    lora_linear(**inputs).backward(grad)
    lora_linear_reference(**inputs64).backward(grad.double())
    lora_linear_reference(**plain).backward(grad)
    for name in ("x", "weight", "lora_a", "lora_b", "bias"):
        if shape[0] == (0,) and name != "x":
            assert torch.all(inputs[name].grad == 0), name  # no rows: zero gradients, not garbage
            continue
        assert_close_to_reference(inputs[name].grad, inputs64[name].grad, plain[name].grad, f"grad {name}")


@pytest.mark.parametrize("rows", [63, 64, 65, 4097])
def test_the_row_counts_at_every_boundary(backend, rows):
    """Both sides of the decode tiles' limit (DECODE_MAX_M = 64: the one-launch form up to it, the shrink and
    cuBLAS past it) and a row past a prefill tile's edge (one dtype there in the interpreter, whose programs run
    one by one): forward and every gradient against float64."""
    for dtype in (torch.float32, torch.bfloat16) if rows < 4096 or HAS_GPU else (torch.bfloat16,):
        inputs = make_inputs((rows,), 24, 20, 8, dtype, requires_grad=True)
        inputs64 = {k: v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v
                    for k, v in inputs.items()}  # fmt: skip
        plain = {k: v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v
                 for k, v in inputs.items()}  # fmt: skip
        grad = torch.randn(rows, 20, device=DEVICE).to(dtype)
        out = lora_linear(**inputs)
        ref, base = lora_linear_reference(**inputs64), lora_linear_reference(**plain)
        assert_close_to_reference(out, ref, base, f"{dtype} y")
        out.backward(grad)
        ref.backward(grad.double())
        base.backward(grad)
        for name in ("x", "weight", "lora_a", "lora_b", "bias"):
            assert_close_to_reference(inputs[name].grad, inputs64[name].grad, plain[name].grad, f"{dtype} d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("cublas_min_m", "accumulates"), [(65, True), (65, False), (10**9, True)],
    ids=["lora_term+cublas", "cublas+epilogue", "tiles"],
)  # fmt: skip
def test_every_prefill_form_matches_the_reference(monkeypatch, dtype, cublas_min_m, accumulates):
    """Past the decode rows the Triton backend writes the LoRA term and lets cuBLAS add x W^T into it, or runs
    cuBLAS first and its tiles as the epilogue (CUBLAS_ACCUMULATES), or the tiles with their K loop
    (CUBLAS_BASE_MIN_M); forward and backward (dx on the same form) on each."""
    kernels = pytest.importorskip("fastpeft.triton_kernels.lora")
    from fastpeft.backends import available_backends

    if "triton" not in available_backends(DEVICE):
        pytest.skip("triton cannot run here")
    monkeypatch.setattr(kernels, "CUBLAS_BASE_MIN_M", cublas_min_m)
    monkeypatch.setattr(kernels, "CUBLAS_ACCUMULATES", accumulates)
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    lead, k, n, r = ((3, 100), 512, 1000, 16) if HAS_GPU else ((70,), 45, 31, 16)
    inputs = make_inputs(lead, k, n, r, dtype, requires_grad=True)
    inputs64 = {k: v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v
                for k, v in inputs.items()}  # fmt: skip
    plain = {k: v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v
             for k, v in inputs.items()}  # fmt: skip
    out = lora_linear(**inputs)
    assert_close_to_reference(out, lora_linear_reference(**inputs64), lora_linear_reference(**plain))
    grad = torch.randn(*lead, n, device=DEVICE).to(dtype)
    out.backward(grad)
    lora_linear_reference(**inputs64).backward(grad.double())
    lora_linear_reference(**plain).backward(grad)
    for name in ("x", "lora_a", "lora_b", "weight", "bias"):
        assert_close_to_reference(inputs[name].grad, inputs64[name].grad, plain[name].grad, f"grad {name}")


# The persistent kernel's module and its row threshold, forced to 0 (conftest.force_persistent).
PERSISTENT = ("lora_persistent", "PERSISTENT_PREFILL_MIN_M")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape", [((70,), 48, 40, 16), ((3, 33), 64, 24, 8), ((1,), 16, 16, 8), ((0,), 16, 8, 8), ((37,), 40, 56, 32)],
    ids=str,
)  # fmt: skip
def test_the_persistent_prefill_kernel_matches_the_reference(monkeypatch, dtype, shape):
    """The persistent TMA kernel (off by default: PERSISTENT_PREFILL_MIN_M) forced on past the decode rows: tiles
    past the edges of M and N, K over several steps, the adapter as one more K step, with and without bias; and
    a call it does not take (an odd K: rows not 16-byte aligned) runs the other forms."""
    persistent = force_persistent(monkeypatch, *PERSISTENT, dtype)
    calls = []
    real = persistent.lora_linear_persistent
    monkeypatch.setattr(persistent, "lora_linear_persistent", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    lead, k, n, r = shape
    for bias in (True, False):
        inputs = make_inputs(lead, k, n, r, dtype, bias=bias)
        out = lora_linear(**inputs)
        assert_close_to_reference(out, lora_linear_reference(**as64(inputs)), lora_linear_reference(**inputs))
    assert len(calls) == (2 if math.prod(lead) > 64 else 0)  # decode rows run the one-launch form
    calls.clear()
    odd = make_inputs(lead, k + 1, n, r, dtype)
    assert_close_to_reference(lora_linear(**odd), lora_linear_reference(**as64(odd)), lora_linear_reference(**odd))
    assert not calls


# On a GPU (128 x 128 tiles, a program per SM) the last shape has 144 tiles: past the first round of 132, tiles
# find their row block's x A^T published and read it.
OWN_PASS_SHAPES = [((70,), 48, 40, 16), ((3, 33), 64, 24, 8), ((130,), 32, 16, 32)]
if HAS_GPU:
    OWN_PASS_SHAPES += [((2048,), 256, 1096, 16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", OWN_PASS_SHAPES, ids=str)
def test_the_persistent_kernel_computes_x_a_in_its_own_pass(monkeypatch, dtype, shape):
    """Inference past the decode rows with the persistent kernel on: one launch and no shrink kernel, x A^T
    computed by the first tile to reach each row block and read by the others (or computed again by one that
    finds it unpublished, as some do in the interpreter's one-program-after-another order; the last shape has one
    column tile per row block): y against float64, the same bits on a second call, every count back to zero."""
    persistent = force_persistent(monkeypatch, *PERSISTENT, dtype)
    kernels = pytest.importorskip("fastpeft.triton_kernels.lora")
    calls, shrinks = [], []
    real, real_shrink = persistent.lora_linear_persistent, kernels.lora_shrink
    monkeypatch.setattr(persistent, "lora_linear_persistent", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(kernels, "lora_shrink", lambda *a, **kw: shrinks.append(1) or real_shrink(*a, **kw))
    lead, k, n, r = shape
    inputs = make_inputs(lead, k, n, r, dtype)
    out = lora_linear(**inputs)
    assert_close_to_reference(out, lora_linear_reference(**as64(inputs)), lora_linear_reference(**inputs))
    assert torch.equal(lora_linear(**inputs), out)
    assert len(calls) == 2 and all(kw.get("lora_a") is not None for kw in calls) and not shrinks
    assert not kernels.arrival_counts(out.device, 1).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [((70,), 48, 40, 16), ((3, 33), 64, 24, 8), ((66,), 40, 56, 32)], ids=str)
def test_the_backward_dx_runs_on_the_persistent_kernel(monkeypatch, dtype, shape):
    """With the persistent kernel forced on, the backward's dx = dy W + s (dy B) A is one call of it too, W and A
    read through descriptors of their stored layout (transposed views, no copies): every gradient against the
    float64 reference; and where W's stored rows are not 16-byte aligned (odd K), dx runs the other forms."""
    persistent = force_persistent(monkeypatch, *PERSISTENT, dtype)
    transposed = []
    real = persistent.lora_linear_persistent

    def spy(x, weight, xa, lora_b, *rest):
        transposed.append((weight.stride(0) == 1, lora_b.stride(0) == 1))
        return real(x, weight, xa, lora_b, *rest)

    monkeypatch.setattr(persistent, "lora_linear_persistent", spy)
    lead, k, n, r = shape
    for odd in (0, 1):
        inputs = make_inputs(lead, k + odd, n, r, dtype, requires_grad=True)
        reference = {name: v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v
                     for name, v in inputs.items()}  # fmt: skip
        plain = {name: v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v
                 for name, v in inputs.items()}  # fmt: skip
        grad = torch.randn(*lead, n, device=DEVICE).to(dtype)
        lora_linear(**inputs).backward(grad)
        lora_linear_reference(**reference).backward(grad.double())
        lora_linear_reference(**plain).backward(grad)
        for name in ("x", "lora_a", "lora_b", "weight", "bias"):
            assert_close_to_reference(inputs[name].grad, reference[name].grad, plain[name].grad, f"grad {name}")
        # The forward on the kernel as stored; dx with W and A transposed, unless K's rows are misaligned.
        assert transposed == ([(False, False), (True, True)] if not odd else [])
        transposed.clear()


# K of at least two 128-wide steps (a GPU's 16-bit decode tile): stream-K needs two to share out. The
# interpreter's tiles are 16 wide on 5 "SMs": ((3,), 256, 24, 8) has two tiles, each cut in two equal shares
# (stream_k_programs' multiple of the tiles); on a GPU, 79 tiles on 132 SMs straddle programs.
STREAM_K_SHAPES = [((1,), 300, 40, 8), ((5,), 260, 50, 8), ((2, 8), 333, 65, 16), ((3,), 256, 24, 8)]
if HAS_GPU:
    STREAM_K_SHAPES += [((1,), 256, 2500, 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fill", [0.0, 1.01], ids=["column-tiles", "stream-K"])
@pytest.mark.parametrize("shape", STREAM_K_SHAPES, ids=str)
def test_both_decode_schedules_match_the_reference(monkeypatch, dtype, fill, shape):
    """The one-launch decode on its column tiles, or on the stream-K schedule (tiles cut between programs meet
    in fp32 partial sums, the last to arrive finishes them): y, and DoRA's scale and pre-scale z, against the
    float64 reference; the same bits on a second call (the partial sums are added in a fixed order)."""
    kernels = pytest.importorskip("fastpeft.triton_kernels.lora")
    from fastpeft.backends import available_backends

    if "triton" not in available_backends(DEVICE):
        pytest.skip("triton cannot run here")
    monkeypatch.setattr(kernels, "STREAM_K_BELOW_WAVE_FILL", fill)
    lead, k, n, r = shape
    inputs = make_inputs(lead, k, n, r, dtype)
    x = inputs["x"].reshape(-1, k)
    m = x.shape[0]
    assert kernels.uses_stream_k(m, n, k, r, dtype, kernels.sm_count(DEVICE)) == (fill > 1)
    scale = torch.rand(n, device=DEVICE) + 0.5
    z = torch.empty(m, n, device=DEVICE, dtype=dtype)
    args = (x, inputs["weight"], inputs["lora_a"], inputs["lora_b"], inputs["scaling"], inputs["bias"])
    y = kernels.lora_linear(*args, out_scale=scale, z=z)
    plain = {**inputs, "x": x, "bias": None}
    ref_z = lora_linear_reference(**as64(plain))
    assert_close_to_reference(z, ref_z, lora_linear_reference(**plain), f"z {dtype}")
    ref_y = ref_z * scale.double() + inputs["bias"].double()
    assert_close_to_reference(y, ref_y, (z.float() * scale + inputs["bias"].float()).to(dtype), f"y {dtype}")
    assert torch.equal(kernels.lora_linear(*args, out_scale=scale, z=z), y)
    assert not kernels.arrival_counts(x.device, 1).any()  # every count back to zero for the next launch


def test_stream_k_programs_cut_every_tile_alike_where_the_tiles_fit_twice():
    """One program per SM, unless the tiles fit at least twice: then each tile's K in the same number of shares,
    so no program straddles two tiles (none writes two partial sums)."""
    kernels = pytest.importorskip("fastpeft.triton_kernels.lora")
    assert kernels.stream_k_programs(224, 32, 132) == 132  # more tiles than SMs
    assert kernels.stream_k_programs(128, 32, 132) == 132
    assert kernels.stream_k_programs(64, 32, 132) == 128  # M = 64, N = 4096: 64 tiles, each K in two halves
    assert kernels.stream_k_programs(20, 32, 132) == 120
    assert kernels.stream_k_programs(20, 3, 132) == 60  # no share shorter than one K step
    assert kernels.stream_k_programs(2, 1, 5) == 2
    for tiles, k_iters in [(64, 32), (20, 32), (20, 3), (3, 7)]:
        programs = kernels.stream_k_programs(tiles, k_iters, 132)
        assert programs % tiles == 0 and kernels.stream_k_segments(tiles, k_iters, programs) == programs // tiles


def test_stream_k_shares_cover_every_iteration_once():
    """Program p takes iterations [p T / P, (p + 1) T / P); a tile's segments are the programs between the
    owners of its first and last iteration, and the workspace holds the most any tile has."""
    kernels = pytest.importorskip("fastpeft.triton_kernels.lora")
    for tiles, k_iters, programs in [(224, 32, 132), (4, 7, 5), (3, 2, 5), (128, 32, 132), (7, 1, 3)]:
        total = tiles * k_iters
        bounds = [p * total // programs for p in range(programs + 1)]
        owners = [next(p for p in range(programs) if bounds[p] <= i < bounds[p + 1]) for i in range(total)]
        segments = [len(set(owners[t * k_iters : (t + 1) * k_iters])) for t in range(tiles)]
        assert kernels.stream_k_segments(tiles, k_iters, programs) == max(segments)


def test_backward_only_lora_params(backend):
    """The usual training case: frozen x-independent base weight, grads for A and B only."""
    inputs = make_inputs((6,), 20, 12, 4, torch.float32)
    inputs["lora_a"].requires_grad_()
    inputs["lora_b"].requires_grad_()
    lora_linear(**inputs).sum().backward()
    assert inputs["weight"].grad is None and inputs["x"].grad is None
    inputs64 = as64(inputs)
    for name in ("lora_a", "lora_b"):
        inputs64[name].requires_grad_()
    lora_linear_reference(**inputs64).sum().backward()
    for name in ("lora_a", "lora_b"):
        torch.testing.assert_close(inputs[name].grad.double(), inputs64[name].grad, rtol=1e-5, atol=1e-6)


def test_opcheck():
    """torch's own checks of the custom op: schema, fake implementation, autograd registration."""
    inputs = make_inputs((6,), 24, 17, 4, torch.float32, requires_grad=True)
    args = (inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"], 0.5, inputs["bias"])
    torch.library.opcheck(torch.ops.fastpeft.lora_linear.default, (*args, None, [1.0], [], -1, 0.0))
    mask = torch.rand(6, 24, device=DEVICE) > 0.3
    torch.library.opcheck(torch.ops.fastpeft.lora_linear.default, (*args, mask, [1 / 0.7], [], -1, 0.3))


def test_custom_op_takes_rows_only():
    """The op torch.compile sees works on 2-D rows (fastpeft.lora_linear does the reshapes), and says so."""
    inputs = make_inputs((3, 2), 24, 17, 4, torch.float32)
    with pytest.raises(ValueError, match=r"2-D rows \[M, in_features\]"):
        torch.ops.fastpeft.lora_linear(*inputs.values(), None, [1.0], [], -1, 0.0)


def test_compile_fullgraph_forward_backward():
    """torch.compile(fullgraph=True) traces a module using the op (fake impl + autograd), no graph break."""
    from fastpeft import LoRALinear

    layer = LoRALinear(torch.nn.Linear(24, 18, device=DEVICE), r=4, lora_alpha=8)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, layer(x))
    out.sum().backward()
    grad_compiled = layer.lora_A.grad.clone()
    layer.lora_A.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(grad_compiled, layer.lora_A.grad)


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear TypeError / ValueError naming the argument, before any kernel runs
# ---------------------------------------------------------------------------------------------------------


def _bad(**changes):
    # On the CPU, like the replacements below, so that each case fails for its own reason only.
    inputs = make_inputs((3,), 16, 8, 4, torch.float32, device="cpu")
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (dict(x=torch.randn(3, 15)), ValueError, "x's last dimension 15"),
        (dict(weight=torch.randn(8, 16, 1)), ValueError, "weight must be 2-D"),
        (dict(lora_a=torch.randn(4, 15)), ValueError, "lora_a must be"),
        (dict(lora_b=torch.randn(8, 5)), ValueError, "lora_b must be"),
        (dict(lora_b=torch.randn(7, 4)), ValueError, "lora_b must be"),
        (dict(bias=torch.randn(9)), ValueError, "bias must be"),
        (dict(lora_a=torch.randn(0, 16), lora_b=torch.randn(8, 0)), ValueError, "lora_a must be"),
        (dict(x=torch.randn(3, 16, dtype=torch.float16)), TypeError, "one dtype"),
        (dict(x=torch.ones(3, 16, dtype=torch.int64)), TypeError, "x must be float16"),
        (dict(weight=torch.ones(8, 16, dtype=torch.int32)), TypeError, "weight must be float16"),
        (dict(x=[[1.0] * 16]), TypeError, "x must be a torch.Tensor"),
        (dict(scaling=torch.tensor(1.0)), TypeError, "scaling"),
        (dict(scaling="2"), TypeError, "scaling"),
        (dict(x=torch.randn(3, 16, device="meta")), ValueError, "one device"),
        (dict(x=torch.tensor(1.0)), ValueError, "at least 1 dimension"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input_is_refused(changes, error, match):
    with pytest.raises(error, match=match):
        lora_linear(**_bad(**changes))


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    inputs = make_inputs((2,), 16, 8, 4, torch.float32, device="cpu")
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="FASTPEFT_BACKEND=cuda cannot run"):
        lora_linear(**inputs)
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="FASTPEFT_BACKEND=triton cannot run"):
        lora_linear(**inputs)
    monkeypatch.setenv("FASTPEFT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="not a backend"):
        lora_linear(**inputs)


@pytest.mark.gpu
def test_cuda_device_picks_a_gpu_backend(monkeypatch):
    from fastpeft.backends import select_backend
    from fastpeft.ops.lora import preference

    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    for m in (1, 8, 9, 4096):
        assert select_backend("lora_linear", DEVICE, preference("lora_linear", m, 16)) in ("cuda", "triton")


def test_custom_op_gives_the_eager_numbers(backend):
    """Eager calls skip the custom-op wrapper (overhead); the op torch.compile sees must compute the same."""
    inputs = make_inputs((6,), 24, 17, 4, torch.float32, requires_grad=True)
    args = (inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"], inputs["scaling"], inputs["bias"])
    via_op = torch.ops.fastpeft.lora_linear(*args, None, [1.0], [], -1, 0.0)
    eager = lora_linear(**inputs)
    torch.testing.assert_close(via_op, eager)
    grads_op = torch.autograd.grad(via_op.sum(), [inputs["x"], inputs["lora_a"]])
    grads_eager = torch.autograd.grad(eager.sum(), [inputs["x"], inputs["lora_a"]])
    for got, expected in zip(grads_op, grads_eager, strict=True):
        torch.testing.assert_close(got, expected)
