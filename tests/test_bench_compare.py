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
    """A quick run, then the same run against its own report made twice as fast (regressions: exit 1, the
    table in compare.md) and made ten times slower (no regression: exit 0)."""
    first = tmp_path / "first.json"
    assert runner.main(["--out", str(tmp_path), "--quick", "--ops", "lora", "--json", str(first)]) == 0
    baseline = json.loads(first.read_text())
    for factor, expected in [(0.01, 1), (100.0, 0)]:
        scaled = {**baseline, "rows": [{**r, "ms": r["ms"] * factor} for r in baseline["rows"] if r["ms"]]}
        path = tmp_path / f"scaled_{factor}.json"
        path.write_text(json.dumps(scaled))
        plots = tmp_path / f"plots_{factor}"
        args = ["--out", str(tmp_path), "--quick", "--ops", "lora", "--compare", str(path), "--plot", str(plots)]
        assert runner.main([*args, "--json", str(tmp_path / "new.json")]) == expected
        table = (tmp_path / "compare.md").read_text()
        assert ("REGRESSED" in table) == (expected == 1)
    assert "rows slower than" in capsys.readouterr().out


def test_cli_bench_passes_its_arguments_through(capfd):
    assert cli.main(["bench", "--ops", "nope"]) == 2
    err = capfd.readouterr().err
    assert err.strip() == "fastpeft bench: unknown op nope (expected some of " + ", ".join(runner.BENCHES) + ")"
