"""`make test` runs every part (lint, the test suite, the AdapterHub tests) whatever failed before it, then names
the parts that failed in one line: checked with a stand-in interpreter that records its calls."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def run_make_test(tmp_path: Path, failing: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``make test`` with PY a script that logs its arguments and fails when they contain ``failing``."""
    log = tmp_path / "calls.log"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *"{failing}"*) exit 1;; esac\nexit 0\n')
    python.chmod(0o755)
    hub = tmp_path / "hub"
    hub.mkdir()
    stamp = tmp_path / "installed"
    for done in (stamp, hub / ".installed"):  # newer than the Makefile and the sources: nothing to install
        done.touch()
        os.utime(done, (4e9, 4e9))
    result = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "test", f"PY={python}",
                             f"STAMP={stamp}", f"ADAPTERHUB_ENV={hub}"], capture_output=True, text=True)  # fmt: skip
    return result, log.read_text().splitlines() if log.exists() else []


def test_a_failing_part_does_not_stop_the_others(tmp_path):
    result, calls = run_make_test(tmp_path, "-m pytest -q tests")
    assert result.returncode != 0
    assert "make test: FAILED: pytest" in result.stdout
    assert [c.split()[1] for c in calls] == ["ruff", "ruff", "pytest", "pytest"]  # lint, tests, AdapterHub tests
    assert "test_integration_adapterhub.py" in calls[-1]


def test_every_failing_part_is_named(tmp_path):
    result, _ = run_make_test(tmp_path, "-m")
    assert result.returncode != 0 and "make test: FAILED: lint pytest test-adapterhub" in result.stdout


def test_all_parts_passing(tmp_path):
    result, calls = run_make_test(tmp_path, "nothing fails")
    assert result.returncode == 0 and "make test: every part passed" in result.stdout and len(calls) == 4
