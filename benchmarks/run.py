"""Run the benchmarks, write ``results.json`` (rows and the machine they ran on) and a PNG plot per op,
print a short table.

    python benchmarks/run.py --out bench_out            # full sweep on a GPU, smoke pass on a CPU
    python benchmarks/run.py --out bench_out --quick    # smoke pass anywhere
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_lora  # noqa: E402

from fastpeft.cli import package_version  # noqa: E402

BENCHES = {"lora": bench_lora}


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


def plot(rows: list[dict], path: Path) -> bool:
    """Time relative to the base GEMM against M, one panel per (mode, features, dtype) at the median rank."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ranks = sorted({row["r"] for row in rows})
    rank = ranks[len(ranks) // 2]
    panels = sorted({(row["mode"], row["k"], row["n"], row["dtype"]) for row in rows if row["r"] == rank})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (mode, k, n, dtype) in zip(axes[0], panels, strict=True):
        selected = [r for r in rows if (r["mode"], r["k"], r["n"], r["dtype"], r["r"]) == (mode, k, n, dtype, rank)]
        for variant in sorted({r["variant"] for r in selected}):
            points = sorted((r["m"], r["ratio_vs_base"]) for r in selected if r["variant"] == variant)
            ax.plot(*zip(*points, strict=True), marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(f"{mode}\n{k}->{n} r={rank} {dtype}", fontsize=9)
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("time / base GEMM")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary(rows: list[dict]) -> str:
    """The fused auto path per case: time, ratio to the base GEMM, speed-up over unfused."""
    lines = [f"{'mode':<17} {'M':>6} {'K->N':>11} {'r':>3} {'dtype':<8} {'ms':>9} {'/base':>6} {'vs unfused':>10}"]
    for row in rows:
        if row["variant"] == "fused:auto":
            lines.append(
                f"{row['mode']:<17} {row['m']:>6} {str(row['k']) + '->' + str(row['n']):>11} {row['r']:>3} "
                f"{row['dtype']:<8} {row['ms']:>9.4f} {row['ratio_vs_base']:>6.2f} {row['speedup_vs_unfused']:>9.2f}x"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out", help="folder for results.json and the plots")
    parser.add_argument("--quick", action="store_true", help="smoke pass on tiny shapes")
    parser.add_argument("--ops", default=",".join(BENCHES), help=f"comma list of {sorted(BENCHES)}")
    args = parser.parse_args(argv)
    quick = args.quick or not torch.cuda.is_available()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "quick": quick, "rows": []}
    for name in args.ops.split(","):
        rows = BENCHES[name].run(quick=quick)
        report["rows"].extend(rows)
        if plot(rows, out / f"{name}.png"):
            print(f"wrote {out / f'{name}.png'}")
        print(summary(rows))
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'results.json'} ({len(report['rows'])} rows, {report['machine']['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
