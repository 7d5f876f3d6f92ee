"""Every Triton kernel compiles for an H100 (sm_90) and fits its shared memory, on this machine without a GPU:
scripts/compile_triton.py, in a process of its own (the tests run kernels under the interpreter, which compiles
nothing)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_triton.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_every_triton_kernel_compiles_for_h100():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "all compiled" in done.stdout
    assert "multi_lora expand/tile" in done.stdout and "lora prefill dora fixed" in done.stdout
    assert "qlora forward decode lora fused shrink fixed" in done.stdout and "qlora dx prefill odd K" in done.stdout
    assert "bottleneck add + layernorm after m_pad=256" in done.stdout
    assert "bottleneck backward ln ids channel m_pad=256" in done.stdout
