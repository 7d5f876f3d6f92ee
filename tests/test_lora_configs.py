"""How the lora slice routes calls and which Triton tiles it offers: properties a GPU would only show as lost
speed, checked here on the CPU from the configuration tables and the interpreter."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

pytest.importorskip("triton")

from fastpeft.triton_kernels import lora as kernels

from fastpeft.ops import lora as ops

FEATURES = (4096, 14336)  # the out_features of TARGETS.md's decode cases
DECODE_ROWS = range(1, kernels.DECODE_MAX_M + 1)


def programs(config, m: int, n: int) -> tuple[int, int]:
    """(row tiles, total programs) of the lora kernel's grid for m rows and n outputs."""
    row_tiles = -(-m // config.kwargs["BLOCK_M"])
    return row_tiles, row_tiles * -(-n // config.kwargs["BLOCK_N"])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
@pytest.mark.parametrize("n", FEATURES)
def test_every_decode_row_count_has_a_tile_reading_w_once_with_a_full_wave(n, fused):
    """For M = 1..64 the autotuner can pick tiles that hold all rows (W read once) and still launch at least
    about 128 programs on a 132-SM GPU."""
    for m in DECODE_ROWS:
        candidates = kernels.prune_decode_configs(kernels.DECODE_CONFIGS, {"M": m}, FUSE_SHRINK=fused, R_PAD=16)
        fits = [c for c in candidates if programs(c, m, n)[0] == 1 and programs(c, m, n)[1] >= 128]
        assert fits, f"M={m}, N={n}: no decode tile reads W once with >= 128 programs"


def test_fused_decode_tiles_are_no_narrower_than_the_rank():
    """The fused kernel re-reads A per output tile; pruning keeps that at most W's bytes (R_PAD <= BLOCK_N)."""
    for r_pad in (16, 32):
        kept = kernels.prune_decode_configs(kernels.DECODE_CONFIGS, {"M": 8}, FUSE_SHRINK=True, R_PAD=r_pad)
        assert kept and all(c.kwargs["BLOCK_N"] >= r_pad for c in kept)
    kept = kernels.prune_decode_configs(kernels.DECODE_CONFIGS, {"M": 1}, FUSE_SHRINK=False, R_PAD=64)
    assert {c.kwargs["BLOCK_M"] for c in kept} == {16}  # no taller tiles than one row needs


def test_launch_plans():
    assert kernels.launch_plan(1, 16) == ("decode+shrink",)  # decode at M = 1: one launch
    assert kernels.launch_plan(64, 32) == ("decode+shrink",)
    assert kernels.launch_plan(1, 64) == ("shrink", "decode")  # rank 64: A read once, not once per tile
    assert kernels.launch_plan(65, 16) == ("shrink", "lora_term", "cublas")  # cuBLAS adds x W^T: CUBLAS_BASE_MIN_M
    assert kernels.launch_plan(65, 16, scaled=True) == ("shrink", "cublas", "epilogue")  # DoRA's scale after the sum


def test_the_tiles_run_the_k_loop_where_cublas_does_not(monkeypatch):
    monkeypatch.setattr(kernels, "CUBLAS_BASE_MIN_M", 10**9)
    assert kernels.launch_plan(65, 16) == ("shrink", "prefill")
    assert kernels.launch_plan(4096, 64) == ("shrink", "prefill")


def test_backend_preference_routes_small_rank_decode_to_the_one_launch_kernel():
    for r in range(1, 129):
        assert kernels.fuses_shrink(1, r) == (r <= ops._TRITON_FUSED_MAX_R), r  # the two constants agree
    assert ops.preference("lora_linear", 1, 16)[0] == "triton"
    assert ops.preference("lora_linear", 8, 64)[0] == "cuda"
    assert ops.preference("lora_linear", 9, 64)[0] == "triton"
    assert ops.preference("lora_shrink", 1, 0)[0] == "triton"


class _LaunchSpy:
    """Stands in for an autotuned kernel and records each launch."""

    def __init__(self, name: str, kernel, launches: list[str]) -> None:
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        self.launches.append(self.name)
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch) -> list[str]:
    found: list[str] = []
    for name in ("_decode_kernel", "_prefill_kernel", "_shrink_kernel", "_epilogue_kernel", "_lora_term_kernel"):
        monkeypatch.setattr(
            kernels, name, _LaunchSpy(name.strip("_").removesuffix("_kernel"), getattr(kernels, name), found)
        )
    # the one-launch decode on its other schedule
    monkeypatch.setattr(kernels, "_stream_k_kernel", _LaunchSpy("decode", kernels._stream_k_kernel, found))
    return found


@pytest.mark.parametrize(
    ("m", "r", "cublas_min_m", "expected"),
    [(3, 4, 65, "decode"), (3, 40, 65, "decode"), (70, 4, 65, "lora_term"), (70, 4, 10**9, "prefill")],
)
def test_forward_and_backward_launch_tiles_for_their_row_count(monkeypatch, launches, m, r, cublas_min_m, expected):
    """Forward and the backward's dx both run decode tiles for few rows; for many, the LoRA term on the tiles and
    cuBLAS adding x W^T into it, or the prefill tiles with their K loop."""
    monkeypatch.setattr(kernels, "CUBLAS_BASE_MIN_M", cublas_min_m)
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(m, 24, device=DEVICE, requires_grad=True)
    weight = torch.randn(20, 24, device=DEVICE)
    lora_a = torch.randn(r, 24, device=DEVICE, requires_grad=True)
    lora_b = torch.randn(20, r, device=DEVICE, requires_grad=True)
    y = ops.lora_linear(x, weight, lora_a, lora_b, 0.5)
    forward = list(launches)
    assert forward == [{"decode+shrink": "decode"}.get(p, p) for p in kernels.launch_plan(m, r) if p != "cublas"]
    y.sum().backward()
    linear_launches = {name for name in launches[len(forward) :] if name != "shrink"}
    assert linear_launches == {expected}  # dx = dy W + s (dy B) A on the same tiles as the forward


def test_triton_host_refuses_tensors_on_other_devices():
    x = torch.randn(3, 8, device=DEVICE)
    weight, lora_b = torch.randn(5, 8, device=DEVICE), torch.randn(5, 2, device=DEVICE)
    with pytest.raises(ValueError, match="xa is on meta"):
        kernels.lora_linear(x, weight, None, lora_b, 1.0, None, xa=torch.empty(3, 2, device="meta"))
    with pytest.raises(ValueError, match="lora_a is on meta"):
        kernels.lora_shrink(x, torch.empty(2, 8, device="meta"))


def test_pinned_decode_tiles_hold_every_row_and_fill_a_wave():
    """FASTPEFT_TRITON_AUTOTUNE=0's decode tile (the GPU check's target rows use it) reads W once for every row
    count up to 64 and launches at least 128 programs at the TARGETS shapes; fp32 gets smaller K steps."""
    for n in FEATURES:
        for m in DECODE_ROWS:
            config = kernels.pinned_config("decode", m, n, 16, torch.bfloat16, interpreter=False)
            assert programs(config, m, n) == (1, programs(config, m, n)[1]) and programs(config, m, n)[1] >= 128
            assert config.kwargs["BLOCK_N"] >= 16  # the fused shrink's padded rank
    fp32 = kernels.pinned_config("decode", 8, 4096, 16, torch.float32, interpreter=False)
    assert (
        fp32.kwargs["BLOCK_K"]
        < kernels.pinned_config("decode", 8, 4096, 16, torch.bfloat16, interpreter=False).kwargs["BLOCK_K"]
    )
    epilogue = kernels.pinned_config("epilogue", 4096, 4096, 16, torch.bfloat16, interpreter=False)
    assert (epilogue.kwargs["BLOCK_M"], epilogue.kwargs["BLOCK_N"], epilogue.num_warps) == (64, 64, 4)
    prefill = kernels.pinned_config("prefill", 4096, 4096, 16, torch.bfloat16, interpreter=False)
    assert (prefill.kwargs["BLOCK_M"], prefill.kwargs["BLOCK_N"], prefill.num_warps) == (128, 128, 8)
