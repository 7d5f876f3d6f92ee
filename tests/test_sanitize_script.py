"""The cases and float64 references of scripts/sanitize_<op>.py, run here on the torch backend: a GPU session
then finds the sanitizer's programs working and learns only what the sanitizer has to say."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import DEVICE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import sanitize_bottleneck
import sanitize_dora
import sanitize_lora
import sanitize_multi_lora
import sanitize_qlora

SCRIPTS = (sanitize_lora, sanitize_dora, sanitize_multi_lora, sanitize_qlora, sanitize_bottleneck)
CASES = [(script, case) for script in SCRIPTS for cases in script.CASES.values() for case in cases]


@pytest.mark.parametrize(("script", "case"), CASES, ids=lambda v: v.__name__ if hasattr(v, "__name__") else str(v))
def test_sanitizer_cases_pass_on_the_torch_backend(monkeypatch, script, case):
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    assert script.run_case(*case, backend="torch", device=DEVICE.type)


def test_a_case_on_another_backend_than_forced_fails(monkeypatch, capsys):
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    assert not sanitize_lora.run_case((2,), 16, 8, 4, "float32", 0.0, backend="cuda", device=DEVICE.type)
    assert "ran on ['torch']" in capsys.readouterr().out


def test_the_combined_program_runs_every_familys_cases():
    """scripts/sanitize.py, what gpu_check.sh runs under memcheck: every family's cases, per backend."""
    import sanitize

    for backend in ("cuda", "triton"):
        expected = [case for script in SCRIPTS for case in script.CASES.get(backend, [])]
        assert [tuple(case[1:]) for case in sanitize.CASES[backend]] == [tuple(c) for c in expected]
