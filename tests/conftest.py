"""Shared test setup: the Triton interpreter on CPU, backend selection, poisoned outputs, error metrics."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before fastpeft imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from fastpeft.backends import available_backends

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Error allowed beyond twice that of plain PyTorch in the same dtype (DESIGN.md, correctness).
ERROR_FLOOR = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3, torch.float64: 1e-12}


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(params=available_backends(DEVICE))
def backend(request, monkeypatch) -> str:
    """Every backend that can run on this machine's device, forced through FASTPEFT_BACKEND."""
    monkeypatch.setenv("FASTPEFT_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Tensors torch allocates uninitialised (Python or C++ at::empty) come filled with NaN, so an output
    element a kernel forgot to write fails the test instead of holding leftover memory."""
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous, warn_only=warn_only)


@pytest.fixture
def fused_calls(monkeypatch) -> list[str]:
    """Records the calls patched PEFT layers make to the fused ops (``lora_linear``, its unchecked inference
    entry ``lora_forward_no_dropout``, or ``dora_linear``)."""
    import fastpeft.integrations.peft.lora as integration

    calls: list[str] = []

    def spy(name, real):
        def call(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        return call

    for name in ("lora_linear", "lora_forward_no_dropout", "dora_linear"):
        monkeypatch.setattr(integration, name, spy(name, getattr(integration, name)))
    return calls


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    diff = out.double() - ref.double()
    if not torch.isfinite(diff).all():
        return float("inf")
    denom = ref.double().norm().item()
    return diff.norm().item() / denom if denom > 0 else diff.norm().item()


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor, what: str = "") -> None:
    """out's error against the float64 ``ref`` is at most twice that of ``baseline`` (plain PyTorch in the
    same dtype) plus the dtype's floor."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == baseline.dtype, f"{what}: dtype {out.dtype} != {baseline.dtype}"
    err, base_err = rel_error(out, ref), rel_error(baseline, ref)
    bound = 2 * base_err + ERROR_FLOOR[out.dtype]
    assert err <= bound, f"{what}: rel. error {err:.3e} > {bound:.3e} (plain PyTorch {base_err:.3e})"


def force_persistent(monkeypatch, module: str, threshold: str, dtype: torch.dtype):
    """A persistent TMA kernel's module (``fastpeft.triton_kernels.<module>``), forced on (its row ``threshold``
    at 0) on the Triton backend; skips where Triton cannot run or dtype's dots would run on a CPU."""
    persistent = pytest.importorskip(f"fastpeft.triton_kernels.{module}")
    if "triton" not in available_backends(DEVICE) or (dtype == torch.float16 and not HAS_GPU):
        pytest.skip("triton cannot run here, or fp16 dots on a CPU")
    monkeypatch.setattr(persistent, threshold, 0)
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    return persistent
