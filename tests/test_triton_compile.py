"""Every Triton kernel compiles for an H100/H200 (sm_90) as the host code launches it, on this machine without a
GPU: scripts/compile_triton.py, in a process of its own (the tests run kernels under the interpreter, which
compiles nothing). It fails when a launch does not compile, exceeds the GPU's shared memory, spills in a 16-bit
pinned configuration or forms a 32-bit offset product; this test also checks that the cases reach the launches
the issues named (packed multi_lora pools of v width 512 and 1024, the TARGETS shapes) and reads the rows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compile_triton.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_every_triton_kernel_compiles_for_sm90_as_launched(tmp_path):
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows_file = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", "--json", str(rows_file)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    assert "all compiled and checked" in done.stdout
    rows = json.loads(rows_file.read_text())
    cases = {row["case"] for row in rows}
    for needed in (
        "multi_lora expand/tile v=1024",  # a packed q/k/v pool of rank 256 per slice: within shared memory
        "multi_lora shrink/tile v=512",
        "lora decode fused+dropout-x m=37",
        "qlora forward decode m=5 K=203 lora fused shrink",
        "bottleneck m=256 adapters=3 + add & LayerNorm",
        "bottleneck backward m=256 adapters=3",
        "lora persistent r=16 m=4096 4096->4096",
        "lora persistent dx r=16 m=4096 4096->4096",
        "multi_lora sgmv linear v=64",
        "TARGET lora m=4096 4096->14336 forward r=16",
        "TARGET qlora m=1 4096->14336 matmul r=0",
        "TARGET multi_lora m=64 4096->4096  r=16 32 adapters",
        "TARGET bottleneck m=8192 d=4096 forward+backward r=-",
    ):
        assert needed in cases, needed
    for row in rows:
        assert row["reg"] > 0 and row["blocks_per_sm"] >= 1 and not row["narrow_products"], row["case"]
        if row["dtype"] != "float32":
            assert row["stack"] == 0 and row["local"] == 0, row["case"]
        if "bottleneck" in row["case"]:  # the backward's sums meet in a fixed order: the same bits every run
            assert row["float_atomics"] == 0, row["case"]
    # The persistent prefill, and the backward's dx on it, load through TMA and multiply on wgmma.
    persistent = [r for r in rows if r["case"].startswith("lora persistent") and "4096->4096" in r["case"]]
    assert len(persistent) >= 2 and all(r["tma"] and r["hgmma"] for r in persistent)
    # Hopper's own instructions where the tiles allow them: wgmma in the prefill GEMMs, 16-byte loads of W.
    prefill = [r for r in rows if r["case"] == "TARGET lora m=4096 4096->4096 forward r=16"]
    assert any(r["hgmma"] for r in prefill) and all(r["ldg128"] for r in prefill)
