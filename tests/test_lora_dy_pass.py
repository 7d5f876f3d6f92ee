"""fastpeft::lora_dy_pass (the LoRA backward's dy B and dB from one read of dy) on every backend against the
float64 reference, bitwise reproducible on Triton; the layer's backward runs it and reuses the forward's xa."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, DTYPES, HAS_GPU, assert_close_to_reference

from fastpeft.ops import lora as ops

# (M, N, r): odd sizes, M = 0 and 1, one column, ranks below and above 16 and past 32; on the CPU (the
# interpreter's 16 x 16 tiles) several row tiles by several splits of N, and splits of more than one step.
CPU_SHAPES = [(1, 8, 3), (0, 16, 4), (37, 45, 5), (70, 33, 16), (5, 1, 2), (20, 70, 40), (300, 300, 8)]
GPU_SHAPES = [(1, 4096, 16), (0, 64, 4), (37, 45, 5), (333, 997, 13), (4096, 4096, 16), (2048, 14336, 64)]
SHAPES = GPU_SHAPES if HAS_GPU else CPU_SHAPES


def _inputs(m: int, n: int, r: int, dtype: torch.dtype, transposed_dy: bool = False):
    dy = torch.randn(n, m, device=DEVICE).to(dtype).t() if transposed_dy else torch.randn(m, n, device=DEVICE).to(dtype)
    lora_b = (torch.randn(n, r, device=DEVICE) * r**-0.5).to(dtype)
    xa = torch.randn(m, r, device=DEVICE)
    return dy, lora_b, xa


def _check(dyb, db, dy, lora_b, xa, scaling, what):
    ref_dyb = dy.double() @ lora_b.double()
    ref_db = scaling * dy.double().t() @ xa.double()
    assert dyb.dtype == torch.float32 and db.dtype == dy.dtype, what
    assert_close_to_reference(dyb, ref_dyb, dy.float() @ lora_b.float(), f"{what} dy B")
    assert_close_to_reference(db, ref_db, dy.t() @ (xa * scaling).to(dy.dtype), f"{what} dB")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dy_pass_matches_the_reference(backend, dtype, shape):
    m, n, r = shape
    dy, lora_b, xa = _inputs(m, n, r, dtype)
    dyb, db = ops._run("lora_dy_pass", dy, lora_b, xa, 0.6)
    _check(dyb, db, dy, lora_b, xa, 0.6, f"{backend} {dtype} {shape}")


def test_triton_reads_dy_twice_where_one_pass_does_not_pay(monkeypatch):
    from fastpeft.backends import available_backends

    if "triton" not in available_backends(DEVICE):
        pytest.skip("triton cannot run here")
    from fastpeft.triton_kernels import lora_dy_pass as kernels

    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    monkeypatch.setattr(kernels, "SMALL_PARTIALS", 0)
    monkeypatch.setattr(kernels, "lora_dy_pass", None)  # the one pass must not run
    dy, lora_b, xa = _inputs(37, 45, 5, torch.bfloat16)
    _check(*ops._run("lora_dy_pass", dy, lora_b, xa, 0.6), dy, lora_b, xa, 0.6, "two products")


def test_dy_pass_takes_strided_dy_and_b(backend):
    dy, lora_b, xa = _inputs(37, 45, 5, torch.float32, transposed_dy=True)
    lora_b = torch.randn(5, 45, device=DEVICE).t()  # [N, r] with column stride N
    assert not dy.is_contiguous() and not lora_b.is_contiguous()
    _check(*ops._run("lora_dy_pass", dy, lora_b, xa, 1.3), dy, lora_b, xa, 1.3, backend)


def test_triton_dy_pass_is_bitwise_reproducible():
    pytest.importorskip("fastpeft.triton_kernels.lora_dy_pass")
    from fastpeft.triton_kernels.lora_dy_pass import lora_dy_pass

    from fastpeft.backends import available_backends

    if "triton" not in available_backends(DEVICE):
        pytest.skip("triton cannot run here")
    m, n, r = (4096, 4096, 16) if HAS_GPU else (300, 300, 8)
    dy, lora_b, xa = _inputs(m, n, r, torch.float32)
    first, second = lora_dy_pass(dy, lora_b, xa, 0.5), lora_dy_pass(dy, lora_b, xa, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_tiles_cover_dy_once_about_once_per_sm():
    """Every column of dy belongs to exactly one split, and at the training shapes there is about one program
    per SM; one pass is taken where its partial sums cost less than the second read of dy they save."""
    from fastpeft.triton_kernels import lora_dy_pass as kernels

    for m, n, r in [(4096, 4096, 16), (4096, 14336, 16), (16384, 4096, 64), (70, 33, 16), (1, 5, 1)]:
        tile = kernels.tile_options(m, n, max(16, r), torch.bfloat16, 132, interpreter=False)
        steps = -(-n // tile["BLOCK_N"])
        per_split, splits = tile["STEPS_PER_SPLIT"], tile["SPLITS"]
        assert (splits - 1) * per_split < steps <= splits * per_split, (m, n, r, tile)
        if m >= 4096:
            assert 100 <= -(-m // tile["BLOCK_M"]) * splits <= 2 * 132, (m, n, r, tile)
    pays = lambda m, n, r: kernels.one_pass_pays(m, n, r, torch.bfloat16, 132, interpreter=False)
    assert pays(4096, 4096, 16) and pays(4096, 14336, 16) and pays(16384, 4096, 16) and pays(70, 33, 16)
    assert 4 * kernels.partial_bytes(4096, 4096, 16, torch.bfloat16, 132, interpreter=False) < 2 * 4096 * 4096
    assert not pays(16384, 4096, 64)  # 80 MB of partials: dy read twice instead


def test_opcheck():
    dy, lora_b, xa = _inputs(6, 17, 4, torch.float32)
    torch.library.opcheck(torch.ops.fastpeft.lora_dy_pass.default, (dy, lora_b, xa, 0.5))


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_the_backward_reads_x_once_past_the_decode_rows(monkeypatch, backend, dropout):
    """Past the decode rows the training forward keeps xa, so the backward runs no shrink of x (nor of dy: dy B
    comes from the dy pass), and its gradients stay the reference's."""
    if backend == "torch" and DEVICE.type != "cuda":
        pytest.skip("off CUDA the torch backend trains through PyTorch's own autograd (fastpeft.ops.route)")
    m = ops.SHRINK_KEPT_MIN_M + 5
    x = torch.randn(m, 24, device=DEVICE, requires_grad=True)
    weight = torch.randn(20, 24, device=DEVICE) * 0.2
    lora_a = (torch.randn(4, 24, device=DEVICE) * 0.2).requires_grad_()
    lora_b = torch.randn(20, 4, device=DEVICE).requires_grad_()
    mask = torch.rand(m, 24, device=DEVICE) > dropout if dropout else None
    y = ops.lora_linear(x, weight, lora_a, lora_b, 0.5, dropout_p=dropout, dropout_mask=mask)
    shrunk: list[tuple[int, ...]] = []  # the shapes shrinks read: x's [m, 24] and dy's [m, 20] must not be there
    passes: list[str] = []
    real_run = ops._run

    def run(op, *args):
        shrunk.extend([tuple(args[0].shape)] if op == "lora_shrink" else [])
        passes.extend([op] if op == "lora_dy_pass" and backend != "triton" else [])
        return real_run(op, *args)

    monkeypatch.setattr(ops, "_run", run)
    if backend == "triton":  # with dropout the backward calls the Triton kernels directly
        from fastpeft.triton_kernels import lora as shrinks
        from fastpeft.triton_kernels import lora_dy_pass as dy_passes

        real_shrink, real_pass = shrinks.lora_shrink, dy_passes.lora_dy_pass
        monkeypatch.setattr(shrinks, "lora_shrink", lambda t, *a: shrunk.append(tuple(t.shape)) or real_shrink(t, *a))
        monkeypatch.setattr(dy_passes, "lora_dy_pass", lambda *a: passes.append("triton") or real_pass(*a))
    grad = torch.randn(m, 20, device=DEVICE)
    y.backward(grad)
    assert len(passes) == 1 and (m, 24) not in shrunk and (m, 20) not in shrunk, (passes, shrunk)
    xd = x.detach().double() if mask is None else x.detach().double() * mask / (1 - dropout)
    g, a, b = grad.double(), lora_a.detach().double(), lora_b.detach().double()
    torch.testing.assert_close(lora_b.grad.double(), 0.5 * g.t() @ (xd @ a.t()), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lora_a.grad.double(), 0.5 * (g @ b).t() @ xd, rtol=1e-4, atol=1e-5)
