"""Run the benchmarks: the cases of the speed targets first (benchmarks/targets.py), then the sweep.

``results.json`` (rows and the machine they ran on) is rewritten after every case, with ``"complete": false``
until the run ends, so a run cut short still returns what it measured; a case that fails is a row with
``error``, not the end of the run. At the end: a PNG plot per op, ``summary.md`` (every target, its measured
value, met or not) and the same table printed last; with ``--compare``, the regression table against an older
run (benchmarks/compare.py), also written to ``compare.md``.

    fastpeft bench                                    # = python benchmarks/run.py: targets + sweep on a GPU
    fastpeft bench --quick --ops lora,bottleneck      # CPU-sized shapes of two ops: a minute or two anywhere
    fastpeft bench --smoke                            # tiny shapes: does every case run (seconds; the tests')
    fastpeft bench --budget-s 300                     # start no case after 300 s
    fastpeft bench --quick --json old.json; fastpeft bench --quick --plot plots/ --compare old.json
    fastpeft bench --compare auto                     # against this GPU's committed results, if any

Exit status: 0, 1 when a row failed or regressed, 2 for bad input (an unknown op, a baseline that is corrupt
or from another device), with one line naming it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastpeft._quiet import quiet_third_party_output

if __name__ == "__main__":  # the bench's own lines only, from before the benches import peft and bitsandbytes
    quiet_third_party_output()

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # committed baselines, one folder per GPU (results_folder)
sys.path.insert(0, str(HERE))

import bench_bottleneck  # noqa: E402
import bench_dora  # noqa: E402
import bench_inference  # noqa: E402
import bench_lora  # noqa: E402
import bench_multi_lora  # noqa: E402
import bench_qlora  # noqa: E402
import bench_train  # noqa: E402
import compare  # noqa: E402
import targets  # noqa: E402

from fastpeft.cli import package_version  # noqa: E402

BENCHES = {
    "lora": bench_lora,
    "dora": bench_dora,
    "multi_lora": bench_multi_lora,
    "bottleneck": bench_bottleneck,
    "qlora": bench_qlora,
    "train": bench_train,
    "inference": bench_inference,
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


def results_folder(device: str) -> str:
    """The folder under benchmarks/results/ for a report's device: "NVIDIA H100 80GB HBM3" -> "h100"."""
    name = device.lower().replace("nvidia", "")
    model = re.search(r"[a-z]*\d+[a-z]*", name)
    return model.group(0) if model else re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def committed_baseline(device: str) -> Path:
    """Where the committed results of this device's kind live (``--compare auto`` reads them)."""
    return RESULTS / results_folder(device) / "results.json"


def ratio_fields(row: dict) -> list[str]:
    """The comparisons a row carries (``ratio_vs_*`` times, ``speedup_vs_*`` factors), in a stable order."""
    return sorted(k for k in row if k.startswith(("ratio_vs_", "speedup_vs_")))


_NOT_CASE = compare.MEASURED | {"op", "variant", "m"}
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


def is_noise(row: dict) -> bool:
    """Whether the row's timer spread (interquartile, relative) is as large as the differences its ratios claim:
    then they say nothing (tiny shapes on a CPU, where Python overhead and machine load decide)."""
    spread = (row.get("ms_spread") or 0.0) / row["ms"] if row.get("ms") else 0.0
    differences = [abs(row[key] - 1.0) for key in ratio_fields(row) if row.get(key)]
    return bool(differences) and spread >= min(differences)


def summary(rows: list[dict]) -> str:
    """The fused auto path per case: time and its comparisons with the baselines of the same case, marked as
    noise where the spread is as large as the differences."""
    lines = []
    for row in rows:
        if row["variant"] == "fused:auto" and row.get("ms") is not None:
            fields = " ".join(f"{k}={v}" for k, v in _panel(row) if v not in (None, False, 0, 0.0))
            case = f"{row['op']} M={row['m']} {fields}"
            noise = f"  (noise: spread {row['ms_spread'] / row['ms']:.0%})" if is_noise(row) else ""
            lines.append(f"{case:<90} {row['ms']:>9.4f} ms  {_ratios(row)}{noise}")
    return "\n".join(lines)


# What a CPU run's ratios are worth, by size.
CPU_NOTES = {
    "smoke": "CPU smoke pass: tiny shapes whose times are mostly Python overhead, so these ratios say nothing "
    "about the kernels; the speed targets are GPU ratios (`fastpeft bench` on a GPU).",
    "quick": "CPU run: shapes large enough that the GEMMs, not Python, take most of the time; the ratios say what "
    "the PyTorch backend gives a CPU user (fp32), not what the kernels do on a GPU, which the speed targets are "
    "about (`fastpeft bench` on a GPU). Rows marked noise moved more between rounds than their ratio says.",
}


def write_json(path: Path, report: dict) -> None:
    """Replace ``path`` atomically: a reader (or a run killed mid-write) never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def planned_cases(name: str, size: str, targets_only: bool = False) -> list:
    """The cases of ``size`` (smoke, quick or full); for full, the target cases first, then the rest of the sweep,
    each once; with ``targets_only`` the target cases alone."""
    bench = BENCHES[name]
    first = [bench.case_from_fields(fields) for fields in targets.target_cases(name)] if size == "full" else []
    if targets_only:
        return first
    return first + [case for case in bench.cases(size) if case not in first]


def run_plan(names: list[str], size: str, targets_only: bool = False) -> list[tuple[str, object]]:
    """(bench, case) in running order: every bench's target cases before any bench's sweep, then the sweeps,
    shortest first, so a budget spent on one op's long sweep starves neither another op's targets nor its few
    other cases."""
    plans = {name: planned_cases(name, size, targets_only) for name in names}
    heads = {name: len(targets.target_cases(name)) if size == "full" else 0 for name in names}
    order = [(name, case) for name in names for case in plans[name][: heads[name]]]
    by_length = sorted(names, key=lambda name: len(plans[name]) - heads[name])
    return order + [(name, case) for name in by_length for case in plans[name][heads[name] :]]


def progress(done: int, total: int, width: int = 20) -> str:
    """A text progress bar that reads in a log as well as on a terminal: ``[#####-----] 12/24``."""
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total}"


def _fail(message: str) -> int:
    print(f"fastpeft bench: {message}", file=sys.stderr)
    return 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastpeft bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench_out", help="folder for summary.md (and, by default, the rest)")
    parser.add_argument("--json", default=None, help="where the JSON report goes (default OUT/results.json)")
    parser.add_argument("--plot", default=None, help="folder for the PNG plots (default OUT)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU-sized shapes, where times are the GEMMs' (a few minutes on a CPU; the default there)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks that every case runs (seconds)")
    parser.add_argument("--targets", action="store_true",
                        help="the cases of benchmarks/targets.py only (gpu_check.sh's bench stage)")  # fmt: skip
    parser.add_argument("--ops", default=",".join(BENCHES), help=f"comma list of {', '.join(BENCHES)}")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    parser.add_argument("--compare", default=None,
                        help="an older results.json, or 'auto' (benchmarks/results/<gpu>/results.json)")  # fmt: skip
    parser.add_argument("--threshold", type=float, default=compare.DEFAULT_THRESHOLD,
                        help="slowdown allowed before noise is counted (default %(default)s)")  # fmt: skip
    parser.add_argument("--floor-ms", type=float, default=compare.DEFAULT_FLOOR_MS,
                        help="changes below this many ms never regress (default %(default)s)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [name for name in args.ops.split(",") if name]
    unknown = [name for name in names if name not in BENCHES]
    if unknown or not names:
        return _fail(f"unknown op {', '.join(unknown) or repr(args.ops)} (expected some of {', '.join(BENCHES)})")
    info = machine()
    baseline = None
    if args.compare == "auto":
        path = committed_baseline(info["device"])
        args.compare = str(path) if path.exists() else None
        print(f"comparing with {path}" if args.compare else f"no committed baseline at {path}: nothing to compare")
    if args.compare is not None:
        try:
            baseline = compare.load_report(args.compare)
            compare.check_comparable(baseline, info["device"])
        except compare.BaselineError as exc:
            return _fail(str(exc))
    size = "smoke" if args.smoke else "quick" if args.quick or not torch.cuda.is_available() else "full"
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out / "results.json"
    plot_dir = Path(args.plot) if args.plot else out
    for folder in (out, json_path.parent, plot_dir):
        folder.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"machine": info, "size": size, "complete": False, "skipped_cases": 0, "rows": []}
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    if args.targets and size != "full":
        return _fail("--targets measures the TARGETS shapes, which need a GPU (use --quick on a CPU)")
    plan = run_plan(names, size, args.targets)
    backends = {name: BENCHES[name].backends_for(device) for name in names}
    for index, (name, case) in enumerate(plan, 1):
        if deadline is not None and time.monotonic() > deadline:
            report["skipped_cases"] += len(plan) - index + 1
            print(f"budget spent, {len(plan) - index + 1} cases not run", flush=True)
            break
        bench = BENCHES[name]
        rows = bench.run_case(case, device, backends[name])
        report["rows"].extend(rows)
        write_json(json_path, report)
        auto = next(r for r in rows if r["variant"] == "fused:auto")
        failed = [r["variant"] for r in rows if r.get("error")]
        failures = f"  FAILED {failed}" if failed else ""
        print(f"{progress(index, len(plan))} {name} {bench.describe(case)}: fused:auto {_ratios(auto)}{failures}",
              flush=True)  # fmt: skip
    for name in names:
        op_rows = [r for r in report["rows"] if r["op"] == BENCHES[name].OP]
        timed = [r for r in op_rows if ratio_fields(r)]
        if timed and plot(timed, plot_dir / f"{name}.png"):
            print(f"wrote {plot_dir / f'{name}.png'}")
        print(summary(op_rows))
    report["complete"] = True
    write_json(json_path, report)
    table = targets.summary_table(report["rows"])
    (out / "summary.md").write_text(f"# Targets ({report['machine']['device']})\n\n{table}\n")
    print(f"wrote {json_path} ({len(report['rows'])} rows, {report['machine']['device']})")
    print()
    print(table)
    if device.type == "cpu":
        print(f"\n{CPU_NOTES[size]}")
    failures = sum(bool(r.get("error")) for r in report["rows"])
    regressions = 0
    if baseline is not None:
        changes = compare.compare(baseline, report, args.threshold, args.floor_ms)
        if not changes:
            return _fail(f"baseline {args.compare} shares no timed fastpeft rows with this run")
        regression_table = compare.table(changes)
        (out / "compare.md").write_text(f"# Against {args.compare}\n\n{regression_table}\n")
        regressions = sum(change.regressed for change in changes)
        print(f"\n{regression_table}\n\n{regressions} of {len(changes)} rows slower than {args.compare}")
    return 1 if failures or regressions else 0


if __name__ == "__main__":
    sys.exit(main())
