"""The GPU benchmark CI workflow runs gpu_check's stages in order, compares with the committed results and
uploads everything; ``--compare auto`` finds the committed results of the GPU it runs on."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run as runner

ROOT = Path(__file__).resolve().parents[1]


def test_the_workflow_runs_gpu_check_stage_by_stage_on_a_gpu_runner():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "gpu-benchmarks.yml").read_text())
    (job,) = workflow["jobs"].values()
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    commands = [step.get("run", "") for step in job["steps"]]
    stages = [c.split('"$OUT"')[1].split() for c in commands if "scripts/gpu_check.sh" in c]
    assert stages == [["build"], ["test"], ["bench"], ["sanitize"]]  # gpu_check.sh's own order
    upload = next(step for step in job["steps"] if str(step.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "${{ env.OUT }}"
    assert "--compare auto" in (ROOT / "scripts" / "gpu_check.sh").read_text()


def test_results_folders_are_named_after_the_gpu_model():
    assert runner.results_folder("NVIDIA H100 80GB HBM3") == "h100"
    assert runner.results_folder("NVIDIA H200") == "h200"
    assert runner.results_folder("NVIDIA A100-SXM4-80GB") == "a100"
    assert runner.results_folder("NVIDIA GeForce RTX 4090") == "4090"
    assert runner.committed_baseline("NVIDIA H100 PCIe") == ROOT / "benchmarks" / "results" / "h100" / "results.json"


def test_compare_auto_without_committed_results_runs_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "RESULTS", tmp_path / "results")
    assert runner.main(["--out", str(tmp_path), "--quick", "--budget-s", "0", "--compare", "auto"]) == 0
    assert "no committed baseline at" in capsys.readouterr().out
