"""What every Triton kernel module shares: the interpreter and autotune switches, the launch device, the dot
precision and the padded rank. Nothing here imports fastpeft (the kernels stand on their own)."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

try:  # grid dependency control for programmatic dependent launch: newer Triton (3.6, the GPU machine's, has it)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# Read once at import, as Triton reads TRITON_INTERPRET itself: set both before fastpeft is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
AUTOTUNE = os.environ.get("FASTPEFT_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET
# SMs of the reference GPUs (H100, H200): pinned tiles are chosen so that one wave has about this many programs.
REFERENCE_SMS = 132


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device, not the tensor's: make the tensor's device current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: fp32 operands follow torch's matmul precision setting; 16-bit operands are
    exact in any mode."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def r_pad(r: int) -> int:
    """A LoRA rank padded for ``tl.dot``, which needs every dimension >= 16 and a power of two."""
    return max(16, triton.next_power_of_2(r))


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The SMs of ``device``; the reference GPU's off a GPU (scripts/compile_triton.py launches on meta tensors
    what a GPU would)."""
    if device.type != "cuda":
        return REFERENCE_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def programmatic_launch(device: torch.device) -> bool:
    """Whether a kernel may be launched to start while the one before it in the stream still runs (programmatic
    dependent launch, ``launch_pdl=True``; it waits with ``gdc_wait`` where it needs that kernel's output): from
    sm_90 on; never under the interpreter, which runs no PTX; on meta tensors (scripts/compile_triton.py) the
    reference GPU's answer."""
    if INTERPRET or gdc_wait is None:
        return False
    if device.type == "meta":
        return True
    if device.type != "cuda":
        return False
    return _cuda_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


_ARRIVALS: dict[tuple, torch.Tensor] = {}


def arrival_counts(device: torch.device, count: int) -> torch.Tensor:
    """int32 counters, zero between launches, for kernels whose last program to arrive at a tile sums its
    partial results in a fixed order (the kernel resets each count it used): kept per device and stream, so a
    launch needs no memset of its own and two streams never share them. Launches on one stream run one after
    another, so the kernels that use them share one buffer."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    counts = _ARRIVALS.get((device, stream))
    if counts is None or counts.numel() < count:
        counts = _ARRIVALS[(device, stream)] = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
    return counts


def rows_for_tma(t: torch.Tensor) -> bool:
    """Contiguous rows whose length and base are 16-byte aligned, as a tensor descriptor (TMA) reads them."""
    aligned = (t.shape[1] * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) == t.shape[1] and aligned


def descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the tensor descriptors a kernel builds on the device (Triton asks for it through
    ``triton.set_allocator``)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


@triton.jit
def grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile ``tile`` in grouped order: GROUP_M row tiles sweep the same column
    tiles together, so the programs running at once share W's column tiles and x's row tiles in L2."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_m, (tile % per_group) // group_m


@triton.jit
def first_columns_first(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile ``tile`` when every row tile's first column tile comes first (the
    persistent kernels' tiles that compute x A^T for their row block, so the rest find it published), then the
    other columns in :func:`grouped_tile` order."""
    if tile < num_m:
        pid_m, pid_n = tile, 0
    else:
        pid_m, pid_n = grouped_tile(tile - num_m, num_m, num_n - 1, GROUP_M)
        pid_n += 1
    return pid_m, pid_n
