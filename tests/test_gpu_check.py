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
# Stands in for python3 on a GPU machine: torch sees a GPU, pip and fastpeft succeed, pytest hangs. With FRESH=1
# the machine starts without fastpeft._C until a build ran (pip install).
case "$*" in
  *"-m pytest"*) sleep 60 ;;
  *"pip install"*) touch "$OUT/built" ;;
  *"import fastpeft, fastpeft._C"*) [ "${FRESH:-0}" = 0 ] || [ -f "$OUT/built" ] || exit 1 ;;
  *benchmarks/run.py*) mkdir -p "$OUT/bench" && echo "| target | verdict | $*" > "$OUT/bench/summary.md" ;;
  *sanitize.py*--backends*) echo cuda triton ;;
  *) exit 0 ;;
esac
"""


def fake_gpu_machine(tmp_path: Path, sanitizer: str = 'echo "sanitizer $*"') -> dict:
    """PATH and PYTHON of a stand-in GPU machine: nvidia-smi lists a GPU, python and compute-sanitizer as given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Stand-in (UUID: GPU-0)'\n")
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "compute-sanitizer").write_text(f"#!/bin/sh\n{sanitizer}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python")}


def test_stages_run_in_order_under_their_limits_and_record_their_state(tmp_path):
    out = tmp_path / "out"
    env = fake_gpu_machine(tmp_path) | {"GPU_CHECK_TEST_S": "3"}
    result = gpu_check(str(out), env=env)  # the default stages
    assert result.returncode == 1  # the test stage timed out
    stages = ("build", "test", "bench", "sanitize")
    status = {stage: (out / f"{stage}.status").read_text().split()[0] for stage in stages}
    assert status == {"build": "pass", "test": "TIMEOUT", "bench": "pass", "sanitize": "pass"}
    assert not (out / "tune.status").exists()  # opt-in only
    for backend in ("cuda", "triton"):  # memcheck, every family in one process per backend
        log = (out / f"sanitize-memcheck-{backend}.log").read_text()
        assert "--tool memcheck" in log and f"scripts/sanitize.py --backend {backend}" in log
    assert "benchmarks/run.py --targets" in result.stdout  # the bench summary, printed before the stage table
    table = [line.split()[:2] for line in result.stdout.rstrip().splitlines()[-len(stages) :]]
    assert table == [["build", "pass"], ["test", "TIMEOUT"], ["bench", "pass"], ["sanitize", "pass"]]
    order = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("=== ")]
    assert order == list(stages)


def test_a_second_call_on_a_fresh_machine_builds_first(tmp_path):
    out = tmp_path / "out"
    result = gpu_check(str(out), "bench", "sanitize", env=fake_gpu_machine(tmp_path) | {"FRESH": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    order = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("=== ")]
    assert order == ["build", "bench", "sanitize"]


def test_a_machine_whose_runtime_refuses_the_sanitizer_skips_it_in_one_line(tmp_path):
    out = tmp_path / "out"
    refusing = 'echo "========= Error: Device not supported"; exit 1'
    result = gpu_check(str(out), "sanitize", env=fake_gpu_machine(tmp_path, refusing))
    assert result.returncode == 0, result.stdout + result.stderr
    status = (out / "sanitize.status").read_text().strip()
    assert status.startswith("skipped (compute-sanitizer refuses this machine:") and "Device not supported" in status
    assert not list(out.glob("sanitize-memcheck-*.log"))
