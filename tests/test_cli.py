"""The `fastpeft` console script and the demo."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastpeft.cli import main


def test_env_reports_versions_and_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for field in ("fastpeft", "python", "torch", "triton", "nvcc", "extension", "gpu", "lora_linear"):
        assert field in out
    assert "torch   yes" in out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "fastpeft.cli", "env"], capture_output=True, text=True, check=True)
    assert "lora_linear" in result.stdout


def test_demo_passes_on_this_device():
    pytest.importorskip("transformers")
    from fastpeft.demo import run_demo

    result = run_demo(steps=1, batch=2, seq=16)
    assert result.lora_layers == 14
    assert result.passed, result
