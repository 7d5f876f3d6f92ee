"""benchmarks/run.py and benchmarks/targets.py: rows written as they are measured, failures as rows, a time
budget, and the target summary (met, not met, not measured, failed, no op yet)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_lora
import run as runner
import targets

CPU = torch.device("cpu")
DECODE = targets.TARGETS[0]  # lora_linear decode: ratio_vs_base <= 1.10 over six cases


def rows_for(target: targets.Target, value: float, **extra) -> list[dict]:
    return [{**case, "variant": "fused:auto", target.metric: value, **extra} for case in target.cases]


def test_target_verdicts():
    assert targets.evaluate(DECODE, rows_for(DECODE, 1.04))[1] == "met"
    rows = rows_for(DECODE, 1.04)
    rows[3][DECODE.metric] = 1.3  # the worst case decides
    measured, verdict = targets.evaluate(DECODE, rows)
    assert verdict == "NOT met" and measured.startswith("1.300")
    assert targets.evaluate(DECODE, rows[:-1])[1].startswith("not measured")
    assert targets.evaluate(DECODE, rows_for(DECODE, 1.0, error="boom"))[1].startswith("FAILED")
    speedup = targets.TARGETS[1]
    assert targets.evaluate(speedup, rows_for(speedup, 1.6))[1] == "met"
    assert targets.evaluate(speedup, rows_for(speedup, 1.4))[1] == "NOT met"
    missing = targets.Target("an op still to come", None)  # every target of TARGETS.md has its bench now
    assert targets.evaluate(missing, [])[1] == "no op yet"
    table = targets.summary_table(rows_for(DECODE, 1.04))
    assert len(table.splitlines()) == 2 + len(targets.TARGETS)


def test_target_cases_come_first_and_once():
    plan = runner.planned_cases("lora", size="full")
    first = [bench_lora.case_from_fields(fields) for fields in targets.target_cases("lora")]
    assert plan[: len(first)] == first and len(plan) == len(set(plan))
    order = runner.run_plan(list(runner.BENCHES), size="full")
    every_target = sum(len(targets.target_cases(name)) for name in runner.BENCHES)
    assert len(order) == sum(len(runner.planned_cases(name, size="full")) for name in runner.BENCHES)
    assert [bench for bench, _ in order[:every_target]] == [
        name for name in runner.BENCHES for _ in targets.target_cases(name)
    ]  # every op's targets before any sweep
    assert order[-1][0] == "lora"  # the longest sweep last: it does not starve the others


def test_a_raising_variant_is_a_failure_row_and_the_rest_still_run(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench_lora, "lora_linear", broken)
    rows = bench_lora.run_case(bench_lora.cases("smoke")[0], CPU, ["torch"])
    by_variant = {row["variant"]: row for row in rows}
    assert "kernel exploded" in by_variant["fused:auto"]["error"] and by_variant["fused:auto"]["ms"] is None
    assert by_variant["base"]["ms"] > 0 and "error" not in by_variant["unfused"]


def test_a_wrong_result_is_a_failure_row(monkeypatch):
    real = bench_lora.lora_linear
    monkeypatch.setattr(bench_lora, "lora_linear", lambda *a, **k: real(*a, **k) * 1.01)
    rows = bench_lora.run_case(bench_lora.cases("smoke")[0], CPU, ["torch"])
    fused = [row for row in rows if row["variant"].startswith("fused")]
    assert fused and all(row["error"].startswith("wrong result") for row in fused)
    assert all(row["ms"] > 0 for row in fused)  # still timed, so the row says how fast the wrong answer was


def test_rows_are_written_as_they_are_measured(tmp_path, monkeypatch):
    seen: list[dict] = []
    real = bench_lora.run_case

    def spy(case, device, backends):
        path = tmp_path / "results.json"
        seen.append(json.loads(path.read_text()) if path.exists() else {})
        return real(case, device, backends)

    monkeypatch.setattr(bench_lora, "run_case", spy)
    assert runner.main(["--out", str(tmp_path), "--smoke", "--ops", "lora"]) == 0
    assert (
        seen[0] == {}
        and seen[1]["complete"] is False
        and len(seen[1]["rows"]) == len(bench_lora._forward_fns(["torch"]))
    )
    final = json.loads((tmp_path / "results.json").read_text())
    assert final["complete"] is True and final["skipped_cases"] == 0
    assert "| target" in (tmp_path / "summary.md").read_text()


def test_every_bench_smoke_pass_runs_without_a_failure_row(tmp_path):
    assert runner.main(["--out", str(tmp_path), "--smoke"]) == 0  # non-zero when any row has an error
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {row["op"] for row in rows} == {bench.OP for bench in runner.BENCHES.values()}
    assert all(row["ms"] > 0 for row in rows)


def test_budget_stops_starting_cases(tmp_path, capsys):
    assert runner.main(["--out", str(tmp_path), "--quick", "--budget-s", "0"]) == 0
    if not runner.torch.cuda.is_available():  # a CPU run says what its ratios are worth
        assert runner.CPU_NOTES["quick"] in capsys.readouterr().out
    final = json.loads((tmp_path / "results.json").read_text())
    every_case = sum(len(bench.cases("quick")) for bench in runner.BENCHES.values())
    assert final["complete"] is True and final["rows"] == [] and final["skipped_cases"] == every_case


def test_unknown_op_is_refused(capsys):
    assert runner.main(["--ops", "lora,nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown op nope" in err


def test_targets_only_plans_the_target_cases_alone(capsys, tmp_path):
    """gpu_check.sh's bench stage: the TARGETS rows and nothing else, each once, every op's in order."""
    order = runner.run_plan(list(runner.BENCHES), size="full", targets_only=True)
    assert order == [(name, case) for name in runner.BENCHES for case in runner.planned_cases(name, "full", True)]
    assert len(order) == sum(len(targets.target_cases(name)) for name in runner.BENCHES)
    if not runner.torch.cuda.is_available():  # the target shapes need a GPU: refused in one line
        assert runner.main(["--out", str(tmp_path), "--targets"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--targets" in err


def test_the_bench_prints_only_its_own_lines(tmp_path):
    """transformers' progress bars, bitsandbytes' note about an optional CPU kernel package and PEFT's
    deprecation warning are not the bench's output (`fastpeft bench` as a user runs it)."""
    command = [sys.executable, "-m", "fastpeft.cli", "bench", "--smoke", "--ops", "qlora,inference", "--out",
               str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr == ""
    for noise in ("Loading weights", "Writing model shards", "kernels-community", "Warning"):
        assert noise not in result.stdout


def test_quick_shapes_are_large_enough_for_a_cpu_timer():
    """--quick (a CPU run's default) times layers whose GEMMs take longer than Python's overhead; --smoke keeps
    the tiny shapes that only check that every case runs."""
    for name, bench in runner.BENCHES.items():
        for case in bench.cases("quick") if name not in ("train", "inference") else ():  # whole models: ms a step
            features = getattr(case, "k", None) or case.d
            assert (features >= 256 and case.m >= 16) or (case.m == 1 and features >= 1024), (name, case)
        assert bench.cases("smoke") and bench.cases("full")


def test_prefill_cases_also_time_the_triton_tiles_with_their_k_loop(monkeypatch):
    """Past the decode rows the Triton backend has three forms; the GPU run times each (fused:triton-tiles,
    fused:triton-epilogue beside fused:triton)."""
    import common
    from fastpeft.triton_kernels import lora as kernels

    assert "fused:triton-tiles" in bench_lora._forward_fns(["triton"], m=65)
    assert "fused:triton-tiles" not in bench_lora._forward_fns(["triton"], m=64)
    assert "fused:triton-tiles" not in bench_lora._forward_fns(["torch"], m=4096)
    seen = []
    monkeypatch.setattr(common, "use_backend", lambda name: seen.append(name) or contextlib.nullcontext())
    probe = bench_lora.on_tiles(lambda: kernels.CUBLAS_BASE_MIN_M)
    assert common.with_backend("fused:triton-tiles", probe)() > 2**40 and seen == ["triton"]
    assert kernels.CUBLAS_BASE_MIN_M == kernels.DECODE_MAX_M + 1  # restored
    assert "fused:triton-epilogue" in bench_lora._forward_fns(["triton"], m=65)
    assert bench_lora.on_epilogue(lambda: kernels.CUBLAS_ACCUMULATES)() is False
    assert kernels.CUBLAS_ACCUMULATES is True


def test_a_large_pool_is_timed_against_a_pool_of_32_on_the_same_tokens(monkeypatch):
    """Decode from a pool of more than 32 adapters also times pool32 (the same tokens over 32 of the adapters),
    and fused:auto's row carries its extra time over the extra adapters' bytes at the copy's speed."""
    import bench_multi_lora as bench

    monkeypatch.setattr(bench, "copy_gbps", lambda device: 10.0)
    case = bench.Case(48, 64, 40, 8, 40, 0, torch.float32)  # 40 adapters used, 8 more than pool32's
    rows = {row["variant"]: row for row in bench.run_case(case, CPU, ["torch"])}
    assert "pool32" in rows and not rows["pool32"].get("error") and not rows["fused:auto"].get("error")
    extra_bytes = 8 * 8 * (64 + 40) * 4
    expected = (rows["fused:auto"]["ms"] - rows["pool32"]["ms"]) / (extra_bytes / 10.0 / 1e6)
    assert rows["fused:auto"]["extra_over_bytes"] == expected
    small = {row["variant"] for row in bench.run_case(bench.Case(48, 64, 40, 8, 32, 0, torch.float32), CPU, ["torch"])}
    assert "pool32" not in small


def test_a_multi_adapter_prefill_also_times_its_other_triton_forms():
    """Prefill (segments) times the base-first and persistent forms beside what ships; decode has one form. The
    persistent form sets its threshold past the decode rows for the call only."""
    import bench_multi_lora as bench
    from fastpeft.triton_kernels import multi_lora_persistent

    assert {"fused:triton-base-first", "fused:triton-persistent"} <= set(bench._variants(["triton"], prefill=True))
    assert not {"fused:triton-base-first", "fused:triton-persistent"} & set(bench._variants(["triton"], prefill=False))
    assert bench._on_persistent(lambda ops: multi_lora_persistent.MULTI_PERSISTENT_PREFILL_MIN_M)({}) == 65
    assert multi_lora_persistent.MULTI_PERSISTENT_PREFILL_MIN_M == 2**62


def test_bottleneck_prefill_also_times_the_cuda_tiles_without_clusters(monkeypatch):
    """Where the CUDA backend runs, 16-bit prefill also times the tile kernel planned as for a GPU without
    clusters (fused:cuda-noclusters), so the GPU says what the clusters buy; the plan is restored after."""
    import bench_bottleneck as bench

    from fastpeft.ops import bottleneck

    prefill = bench.Case(8192, 4096, 64, 1, torch.bfloat16)
    assert "fused:cuda-noclusters" in bench._variants(prefill, ["cuda", "triton"])
    assert "fused:cuda-noclusters" not in bench._variants(prefill, ["triton"])
    assert "fused:cuda-noclusters" not in bench._variants(bench.Case(64, 4096, 64, 1, torch.bfloat16), ["cuda"])
    monkeypatch.setattr(bench, "_fused", lambda ops: bottleneck.FORCED_CUDA_TILE_PLAN)
    assert bench.FORMS["fused:cuda-noclusters"]({"plan_without_clusters": (16, 1)}) == (16, 1)
    assert bottleneck.FORCED_CUDA_TILE_PLAN == (0, 0)
