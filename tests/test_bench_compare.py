"""fastpeft bench --compare (benchmarks/compare.py): the regression verdicts, noise and floor, a corrupt or
mismatched baseline refused with one line and exit status 2 before anything runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare
import run as runner

from fastpeft import cli

MACHINE = {"device": "NVIDIA H100 80GB HBM3"}


def row(variant: str, ms: float, m: int = 1024, spread: float = 0.0) -> dict:
    return {"op": "lora_linear", "m": m, "k": 4096, "dtype": "bfloat16", "variant": variant, "ms": ms,
            "ms_spread": spread, "ratio_vs_base": 1.0, "gbps": 100.0}  # fmt: skip


def report(*rows: dict) -> dict:
    return {"machine": MACHINE, "rows": list(rows)}


def verdicts(old: dict, new: dict, **kwargs) -> dict[str, bool]:
    return {change.label: change.regressed for change in compare.compare(old, new, **kwargs)}


def test_a_slower_fused_row_regresses_and_a_slower_baseline_does_not():
    old = report(row("fused:auto", 1.0), row("fused:triton", 1.0, m=1), row("base", 1.0))
    new = report(row("fused:auto", 1.5), row("fused:triton", 1.05, m=1), row("base", 3.0))
    result = verdicts(old, new)
    assert list(result.values()) == [True, False]  # the baseline variant "base" is not compared
    assert all(label.startswith("lora_linear fused:") for label in result)
    assert "REGRESSED" in compare.table(compare.compare(old, new)).splitlines()[2]  # regressions first


def test_noise_and_the_floor_widen_what_counts():
    old, new = report(row("fused:auto", 1.0, spread=0.2)), report(row("fused:auto", 1.5, spread=0.1))
    assert verdicts(old, new) == {compare.row_label(new["rows"][0]): False}  # allowed: 1 + 2 * (0.2 + 0.1)
    assert list(verdicts(old, report(row("fused:auto", 1.7, spread=0.1))).values()) == [True]
    tiny_old, tiny_new = report(row("fused:auto", 0.001)), report(row("fused:auto", 0.0025))
    assert list(verdicts(tiny_old, tiny_new).values()) == [False]  # 2.5x, but 1.5 us: launch jitter
    assert list(verdicts(tiny_old, tiny_new, floor_ms=0.0).values()) == [True]


def test_rows_match_on_every_case_field():
    old = report(row("fused:auto", 1.0, m=1024))
    assert compare.compare(old, report(row("fused:auto", 9.0, m=2048))) == []
    assert compare.compare(old, report({**row("fused:auto", 9.0), "dtype": "float16"})) == []


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("{not json", "not readable JSON"),
        (json.dumps([1, 2]), "not a benchmark report"),
        (json.dumps({"machine": MACHINE, "rows": [{"op": "x", "variant": "fused:auto"}]}), "without op, variant"),
        (json.dumps({"machine": MACHINE, "rows": [row("fused:auto", float("nan"))]}), "not a finite number"),
        (json.dumps({"machine": {"device": "cpu (x86_64)"}, "rows": []}), "this run on"),
    ],
)
def test_a_bad_baseline_is_refused_in_one_line_before_running(tmp_path, capsys, monkeypatch, content, message):
    path = tmp_path / "old.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setattr(runner, "machine", lambda: {"device": MACHINE["device"]})
    monkeypatch.setattr(runner, "run_plan", lambda *a: pytest.fail("ran cases with a bad baseline"))
    assert runner.main(["--out", str(tmp_path), "--compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_compare_against_a_real_run(tmp_path, capsys):
    """A real smoke run compared with an earlier one: the report's shape only (a row per fused case in
    compare.md, the count printed), never its verdicts, which a loaded machine's timings would decide."""
    first = tmp_path / "first.json"
    assert runner.main(["--out", str(tmp_path), "--smoke", "--ops", "lora", "--json", str(first)]) == 0
    fused = [r for r in json.loads(first.read_text())["rows"] if r["variant"].startswith("fused:") and r.get("ms")]
    status = runner.main(["--out", str(tmp_path), "--smoke", "--ops", "lora", "--compare", str(first),
                          "--json", str(tmp_path / "second.json")])  # fmt: skip
    assert status in (0, 1)
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert len([line for line in table if line.startswith("| lora_linear fused:")]) == len(fused)
    assert f"of {len(fused)} rows slower than" in capsys.readouterr().out


def test_the_exit_status_follows_the_comparison_of_recorded_rows(tmp_path, monkeypatch):
    """The same run (recorded rows, no timing) against a baseline twice as fast (regressions: exit 1, the table
    in compare.md) and one ten times slower (no regression: exit 0)."""
    recorded = [row("fused:auto", 2.0), row("fused:triton", 3.0, m=1), row("base", 1.0)]
    bench = runner.BENCHES["lora"]
    monkeypatch.setattr(runner, "machine", lambda: {"device": MACHINE["device"]})
    monkeypatch.setattr(runner, "run_plan", lambda names, size, targets_only=False: [("lora", "case")])
    monkeypatch.setattr(bench, "run_case", lambda case, device, backends: [dict(r) for r in recorded])
    monkeypatch.setattr(bench, "describe", lambda case: "recorded")
    for factor, expected in [(0.5, 1), (10.0, 0)]:
        baseline = tmp_path / f"baseline_{factor}.json"
        baseline.write_text(json.dumps(report(*({**r, "ms": r["ms"] * factor} for r in recorded))))
        args = ["--out", str(tmp_path), "--ops", "lora", "--compare", str(baseline), "--plot", str(tmp_path / "p")]
        assert runner.main(args) == expected
        assert ("REGRESSED" in (tmp_path / "compare.md").read_text()) == (expected == 1)


def test_cli_bench_passes_its_arguments_through(capfd):
    assert cli.main(["bench", "--ops", "nope"]) == 2
    err = capfd.readouterr().err
    assert err.strip() == "fastpeft bench: unknown op nope (expected some of " + ", ".join(runner.BENCHES) + ")"


def test_rows_whose_spread_covers_their_difference_are_marked_as_noise():
    steady = {**row("fused:auto", 1.0, spread=0.01), "ratio_vs_base": 1.3}
    noisy = {**row("fused:auto", 1.0, spread=0.5), "ratio_vs_base": 1.3}
    assert not runner.is_noise(steady) and runner.is_noise(noisy)
    assert "noise" not in runner.summary([steady]) and "(noise: spread 50%)" in runner.summary([noisy])
