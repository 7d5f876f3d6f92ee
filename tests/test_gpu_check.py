"""scripts/gpu_check.sh: bad input answered in one line with a non-zero exit, and (with a stand-in GPU and
Python) stages that run under their own time limits and leave their state behind."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")


def gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ((), 2, "usage: bash scripts/gpu_check.sh OUT"),
        (("{out}", "build", "tests"), 2, "unknown stage 'tests'"),
        (("{file}/out",), 2, "cannot write to OUT"),
    ],
)
def test_bad_arguments_get_one_line_and_leave_nothing(tmp_path, args, code, message):
    (tmp_path / "file").write_text("")
    out = tmp_path / "out"
    result = gpu_check(*(a.format(out=out, file=tmp_path / "file") for a in args))
    assert result.returncode == code
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert not out.exists()


def test_no_gpu_is_refused_before_any_result_is_written(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    out = tmp_path / "out"
    result = gpu_check(str(out), env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 3
    assert result.stderr.strip() == "gpu_check: no GPU visible (nvidia-smi lists none)"
    assert not out.exists()


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python3 on a GPU machine: torch sees a GPU, pip and fastpeft succeed, pytest hangs.
case "$*" in
  *"-m pytest"*) sleep 60 ;;
  *benchmarks/run.py*) mkdir -p "$OUT/bench" && echo '| target | verdict |' > "$OUT/bench/summary.md" ;;
  *sanitize_multi_lora.py*--backends*) echo triton ;;
  *--backends*) echo cuda triton ;;
  *) exit 0 ;;
esac
"""


def test_stages_run_under_their_limits_and_record_their_state(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Stand-in (UUID: GPU-0)'\n")
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "compute-sanitizer").write_text('#!/bin/sh\necho "sanitizer $*"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"), "GPU_CHECK_TEST_S": "3"}
    stages = ("build", "test", "sanitize", "bench")
    result = gpu_check(str(out), *stages, env=env)
    assert result.returncode == 1  # the test stage timed out
    status = {stage: (out / f"{stage}.status").read_text().split()[0] for stage in stages}
    assert status == {"build": "pass", "test": "TIMEOUT", "sanitize": "pass", "bench": "pass"}
    for tool in ("memcheck", "racecheck"):
        for backend in ("cuda", "triton"):
            log = (out / f"sanitize_lora-{tool}-{backend}.log").read_text()
            assert f"--tool {tool}" in log and f"sanitize_lora.py --backend {backend}" in log
        assert (out / f"sanitize_multi_lora-{tool}-triton.log").exists()
        assert not (out / f"sanitize_multi_lora-{tool}-cuda.log").exists()  # only the backends it has cases for
    assert "| target | verdict |" in result.stdout  # the bench summary, printed before the stage table
    table = [line.split()[:2] for line in result.stdout.rstrip().splitlines()[-len(stages) :]]
    assert table == [["build", "pass"], ["test", "TIMEOUT"], ["sanitize", "pass"], ["bench", "pass"]]
