"""What every Triton kernel module shares: the interpreter and autotune switches, the launch device, the dot
precision and the padded rank. Nothing here imports fastpeft (the kernels stand on their own)."""

from __future__ import annotations

import contextlib
import os

import torch
import triton

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
