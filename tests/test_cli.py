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


def test_demo_runs_every_scenario_and_passes(capsys, recwarn):
    pytest.importorskip("peft")
    from fastpeft.demo import run_demo

    result = run_demo(steps=1, batch=4, seq=16)
    assert not [w for w in recwarn if "should not be contained in the prefix" in str(w.message)]  # adapter names
    layers = {s.name.split(" (")[0]: s.layers for s in result.scenarios if not s.skipped}
    assert layers == {"LoRA": 14, "mixed batch": 14, "QLoRA": 14, "bottleneck": 2}
    assert result.passed, result
    table = capsys.readouterr().out
    assert "| LoRA (PEFT, 1 of 3 adapters)" in table and "PASS" in table
    assert all(len(s.round_speedups) == 3 for s in result.scenarios if not s.skipped)  # the spread is reported
    assert "rounds: the range of the rounds' own speed-ups" in table


def test_demo_on_a_local_checkpoint(tmp_path, capsys):
    pytest.importorskip("peft")
    from fastpeft.demo import tiny_llama_checkpoint

    path = tiny_llama_checkpoint(tmp_path / "my-llama", hidden=64, layers=1, vocab=97)
    assert main(["demo", "--model", str(path), "--steps", "1"]) == 0
    assert "fastpeft demo: my-llama" in capsys.readouterr().out


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no such folder"),
        (lambda p: p.mkdir(), "not a transformers checkpoint (no config.json)"),
        (lambda p: p.mkdir() or (p / "config.json").write_text("{broken"), "cannot read its config"),
    ],
)
def test_demo_refuses_a_model_path_that_is_not_a_checkpoint(tmp_path, capsys, setup, message):
    setup(tmp_path / "model")
    assert main(["demo", "--model", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_the_demo_command_prints_only_its_own_output():
    pytest.importorskip("peft")
    result = subprocess.run([sys.executable, "-m", "fastpeft.cli", "demo", "--steps", "1"], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""  # no progress bars, third-party notices or warnings
    assert result.stdout.startswith("fastpeft demo:")
