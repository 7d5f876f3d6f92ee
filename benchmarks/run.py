"""Run the benchmarks: the cases of ../shared/TARGETS.md first (benchmarks/targets.py), then the sweep.

``results.json`` (rows and the machine they ran on) is rewritten after every case, with ``"complete": false``
until the run ends, so a run cut short still returns what it measured; a case that fails is a row with
``error``, not the end of the run. At the end: a PNG plot per op, ``summary.md`` (every target, its measured
value, met or not) and the same table printed last.

    python benchmarks/run.py --out bench_out                  # targets + sweep on a GPU, smoke pass on a CPU
    python benchmarks/run.py --out bench_out --budget-s 300   # start no case after 300 s
    python benchmarks/run.py --out bench_out --quick          # smoke pass anywhere
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_bottleneck  # noqa: E402
import bench_dora  # noqa: E402
import bench_lora  # noqa: E402
import bench_multi_lora  # noqa: E402
import bench_qlora  # noqa: E402
import bench_train  # noqa: E402
import targets  # noqa: E402

from fastpeft.cli import package_version  # noqa: E402

BENCHES = {
    "lora": bench_lora,
    "dora": bench_dora,
    "multi_lora": bench_multi_lora,
    "bottleneck": bench_bottleneck,
    "qlora": bench_qlora,
    "train": bench_train,
}


def machine() -> dict:
    """Where the numbers came from: device, library versions, commit."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": gpu or f"cpu ({platform.processor() or platform.machine()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "fastpeft": package_version("fastpeft"),
        "commit": commit,
    }


def ratio_fields(row: dict) -> list[str]:
    """The comparisons a row carries (``ratio_vs_*`` times, ``speedup_vs_*`` factors), in a stable order."""
    return sorted(k for k in row if k.startswith(("ratio_vs_", "speedup_vs_")))


_NOT_CASE = {"op", "variant", "ms", "error", "m", "gbps", "bw_fraction", "adapter_gbps", "weight_gbps"}
MAX_PANELS = 6


def _panel(row: dict) -> tuple:
    """The case fields but M: one panel per value (features, rank, dtype, mode, ...)."""
    return tuple(
        (k, v) for k, v in sorted(row.items()) if k not in _NOT_CASE and not k.startswith(("ratio_", "speedup_"))
    )


def plot(rows: list[dict], path: Path) -> bool:
    """The first comparison of the rows against M, one panel per case but M (the first MAX_PANELS of them)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metric = ratio_fields(rows[0])[0]
    panels = sorted({_panel(row) for row in rows}, key=str)[:MAX_PANELS]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        selected = [r for r in rows if _panel(r) == panel]
        for variant in sorted({r["variant"] for r in selected}):
            points = sorted((r["m"], r[metric]) for r in selected if r["variant"] == variant and metric in r)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(" ".join(f"{k}={v}" for k, v in panel), fontsize=7, wrap=True)
        ax.set_xlabel("M (rows)")
        ax.set_ylabel(metric)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _ratios(row: dict) -> str:
    return ", ".join(f"{key} {row[key]:.3f}" for key in ratio_fields(row)) or "no ratio"


def summary(rows: list[dict]) -> str:
    """The fused auto path per case: time and its comparisons with the baselines of the same case."""
    lines = []
    for row in rows:
        if row["variant"] == "fused:auto" and row.get("ms") is not None:
            fields = " ".join(f"{k}={v}" for k, v in _panel(row) if v not in (None, False, 0, 0.0))
            case = f"{row['op']} M={row['m']} {fields}"
            lines.append(f"{case:<90} {row['ms']:>9.4f} ms  {_ratios(row)}")
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> None:
    """Replace ``path`` atomically: a reader (or a run killed mid-write) never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def planned_cases(name: str, quick: bool) -> list:
    """Target cases first (unless quick: they are GPU shapes), then the rest of the sweep, each once."""
    bench = BENCHES[name]
    first = [] if quick else [bench.case_from_fields(fields) for fields in targets.target_cases(name)]
    return first + [case for case in bench.cases(quick) if case not in first]


def run_plan(names: list[str], quick: bool) -> list[tuple[str, object]]:
    """(bench, case) in running order: every bench's target cases before any bench's sweep, then the sweeps,
    shortest first, so a budget spent on one op's long sweep starves neither another op's targets nor its few
    other cases."""
    plans = {name: planned_cases(name, quick) for name in names}
    heads = {name: 0 if quick else len(targets.target_cases(name)) for name in names}
    order = [(name, case) for name in names for case in plans[name][: heads[name]]]
    by_length = sorted(names, key=lambda name: len(plans[name]) - heads[name])
    return order + [(name, case) for name in by_length for case in plans[name][heads[name] :]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out", help="folder for results.json, summary.md and the plots")
    parser.add_argument("--quick", action="store_true", help="smoke pass on tiny shapes")
    parser.add_argument("--ops", default=",".join(BENCHES), help=f"comma list of {sorted(BENCHES)}")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.ops.split(",")) - set(BENCHES))
    if unknown:
        parser.error(f"unknown op(s) {unknown}; expected some of {sorted(BENCHES)}")
    quick = args.quick or not torch.cuda.is_available()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"machine": machine(), "quick": quick, "complete": False, "skipped_cases": 0, "rows": []}
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    names = args.ops.split(",")
    plan = run_plan(names, quick)
    backends = {name: BENCHES[name].backends_for(device) for name in names}
    for index, (name, case) in enumerate(plan, 1):
        if deadline is not None and time.monotonic() > deadline:
            report["skipped_cases"] += len(plan) - index + 1
            print(f"budget spent, {len(plan) - index + 1} cases not run", flush=True)
            break
        bench = BENCHES[name]
        rows = bench.run_case(case, device, backends[name])
        report["rows"].extend(rows)
        write_json(out / "results.json", report)
        auto = next(r for r in rows if r["variant"] == "fused:auto")
        failed = [r["variant"] for r in rows if r.get("error")]
        failures = f"  FAILED {failed}" if failed else ""
        print(f"[{index}/{len(plan)} {name}] {bench.describe(case)}: fused:auto {_ratios(auto)}{failures}", flush=True)
    for name in names:
        op_rows = [r for r in report["rows"] if r["op"] == BENCHES[name].OP]
        timed = [r for r in op_rows if ratio_fields(r)]
        if timed and plot(timed, out / f"{name}.png"):
            print(f"wrote {out / f'{name}.png'}")
        print(summary(op_rows))
    report["complete"] = True
    write_json(out / "results.json", report)
    table = targets.summary_table(report["rows"])
    (out / "summary.md").write_text(f"# Targets ({report['machine']['device']})\n\n{table}\n")
    print(f"wrote {out / 'results.json'} ({len(report['rows'])} rows, {report['machine']['device']})")
    print()
    print(table)
    failures = sum(bool(r.get("error")) for r in report["rows"])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
