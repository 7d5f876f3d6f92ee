"""Compare a benchmark run with an older one (``fastpeft bench --compare OLD.json``): the regression table.

A row of the new run is matched with the old row of the same op, case and variant. Only fastpeft's variants
(``fused:*``) can regress: a baseline that got slower is the machine's business, not ours. A row regresses when

    new_ms > old_ms * (1 + tolerance) + floor_ms,   tolerance = max(threshold, 2 * (old spread + new spread))

where a row's spread is the interquartile range of its timing samples over their median (rows of older runs
without one count as 0): a noisy row needs a larger change before it counts, and ``floor_ms`` keeps the few
microseconds of launch jitter on tiny cases from counting at all.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

# Row fields that are measurements, not part of what was measured.
MEASURED = {"ms", "ms_spread", "error", "gbps", "tflops", "bw_fraction", "adapter_gbps", "weight_gbps"}
DEFAULT_THRESHOLD = 0.10
DEFAULT_FLOOR_MS = 0.002


class BaselineError(ValueError):
    """The baseline cannot be compared with: unreadable, not a benchmark report, or from other hardware."""


def load_report(path: str | Path) -> dict:
    """A results.json written by benchmarks/run.py; BaselineError (one line) when it is not one."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise BaselineError(f"baseline {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineError(f"baseline {path} is not readable JSON ({type(exc).__name__})") from None
    rows = report.get("rows") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not isinstance(report.get("machine"), dict):
        raise BaselineError(f"baseline {path} is not a benchmark report (no 'machine' and 'rows')")
    for row in rows:
        if not isinstance(row, dict) or not {"op", "variant", "ms"} <= row.keys():
            raise BaselineError(f"baseline {path} has a row without op, variant and ms")
        if row["ms"] is not None and not (isinstance(row["ms"], int | float) and math.isfinite(row["ms"])):
            raise BaselineError(f"baseline {path} has a row whose ms is not a finite number")
    return report


def _case(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in MEASURED and not k.startswith(("ratio_", "speedup_"))}


def row_key(row: dict) -> str:
    """What identifies a row across runs: its op, variant and case fields."""
    return json.dumps(_case(row), sort_keys=True)


def row_label(row: dict) -> str:
    """The row in words: op, variant, then the case fields that are set."""
    case = " ".join(f"{k}={v}" for k, v in _case(row).items() if k not in ("op", "variant") and v not in (None, False))
    return f"{row['op']} {row['variant']} {case}"


def check_comparable(old: dict, device: str) -> None:
    """BaselineError unless the baseline was measured on ``device`` (a report's machine["device"])."""
    if old["machine"].get("device") != device:
        raise BaselineError(f"baseline measured on {old['machine'].get('device')!r}, this run on {device!r}")


@dataclass(frozen=True)
class Change:
    """One fastpeft row in both runs."""

    label: str
    old_ms: float
    new_ms: float
    tolerance: float
    regressed: bool

    @property
    def ratio(self) -> float:
        return self.new_ms / self.old_ms if self.old_ms > 0 else math.inf


def compare(
    old: dict, new: dict, threshold: float = DEFAULT_THRESHOLD, floor_ms: float = DEFAULT_FLOOR_MS
) -> list[Change]:
    """Every fused row timed in both reports, in the new report's order."""
    old_rows = {row_key(row): row for row in old["rows"] if row.get("ms") is not None}
    changes = []
    for row in new["rows"]:
        before = old_rows.get(row_key(row))
        if before is None or row.get("ms") is None or not str(row["variant"]).startswith("fused:"):
            continue
        tolerance = max(threshold, 2 * (before.get("ms_spread") or 0.0) + 2 * (row.get("ms_spread") or 0.0))
        regressed = row["ms"] > before["ms"] * (1 + tolerance) + floor_ms
        changes.append(Change(row_label(row), before["ms"], row["ms"], tolerance, regressed))
    return changes


def table(changes: list[Change]) -> str:
    """The regression table, regressions first, as Markdown."""
    lines = ["| row | old ms | new ms | new/old | allowed | verdict |", "|---|---:|---:|---:|---:|---|"]
    for change in sorted(changes, key=lambda c: (not c.regressed, -c.ratio)):
        verdict = "REGRESSED" if change.regressed else ("faster" if change.ratio < 1 - change.tolerance else "same")
        lines.append(f"| {change.label} | {change.old_ms:.4f} | {change.new_ms:.4f} | {change.ratio:.3f} | "
                     f"{1 + change.tolerance:.2f} | {verdict} |")  # fmt: skip
    return "\n".join(lines)
