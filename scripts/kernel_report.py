"""Write benchmarks/kernel_report.md: every kernel of fastpeft as it launches on an H100/H200 (sm_90), read from the
compilers on a machine without a GPU, and check that the committed report is current.

    python scripts/kernel_report.py --write [--triton-path DIR ...]      # make kernel-report
    python scripts/kernel_report.py --check                              # CI: exit 1 when the report is stale

Triton: scripts/compile_triton.py's rows (the TARGETS shapes in bf16 through the ops' dispatch, and every variant
the host code launches), once with the environment's Triton (CI's) and once per ``--triton-path`` folder holding
another (``make kernel-report`` installs triton 3.6, the GPU machine's, into .triton36/). CUDA: ``cuobjdump
-res-usage`` and ``-sass`` of the built extension's sm_90 code (build it with FASTPEFT_CUDA_ARCHS including 9.0),
and the launches the dispatcher sends to CUDA at the TARGETS shapes, their grids mirrored from csrc/'s host code.

Nothing here is measured: registers, spills, shared memory, occupancy and waves are what the compilers and the
launch code say; speeds come from a GPU run of ``scripts/gpu_check.sh``, and the cost model's predictions
(benchmarks/roofline.py) stand beside each target until then. The report records a fingerprint of its inputs
(csrc/, triton_kernels/, this script, compile_triton.py, kernel_facts.py, benchmarks/targets.py and roofline.py,
the 4-bit and LoRA dispatch in fastpeft/ops/qlora.py and lora.py); ``--check`` compares it with the sources.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "kernel_report.md"
INPUTS = ("csrc", "triton_kernels", "scripts/kernel_report.py", "scripts/compile_triton.py", "scripts/kernel_facts.py",
          "benchmarks/targets.py", "benchmarks/roofline.py", "fastpeft/ops/qlora.py",
          "fastpeft/ops/lora.py", "fastpeft/ops/bottleneck_plan.py")  # fmt: skip
FINGERPRINT = re.compile(r"Fingerprint of the inputs: `([0-9a-f]{16})`")
sys.path.insert(0, str(ROOT / "scripts"))

from kernel_facts import REFERENCE_SMS, cuobjdump, occupancy, sass_features  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from roofline import design_table, prediction_table  # noqa: E402

from fastpeft.ops import bottleneck_plan  # noqa: E402


def fingerprint() -> str:
    """sha256 over the report's inputs (path and bytes of every file, in order): changes when a kernel does."""
    digest = hashlib.sha256()
    for entry in INPUTS:
        path = ROOT / entry
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------------------


def triton_rows(triton_path: str | None) -> tuple[str, list[dict]]:
    """(triton version, compile_triton.py's rows) with the Triton found at ``triton_path`` (None: this one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(triton_path).resolve()), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_triton.py"), "--json", str(out)],
                              env=env, capture_output=True, text=True)  # fmt: skip
        if not out.exists():
            raise SystemExit(f"kernel_report: compile_triton.py failed\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        rows = json.loads(out.read_text())
    return rows[0]["triton"] if rows else "?", rows


def _mma(row: dict) -> str:
    return "HGMMA" if row.get("hgmma") else "HMMA" if row.get("hmma") else "-"


def _mma_and_pdl(row: dict) -> str:
    """The MMA, and the programmatic-launch instructions: the kernel starts the next early, or waits for the one
    before (it was launched while that one ran)."""
    marks = [_mma(row)] + ["starts the next (PDL)"] * bool(row.get("gdc_trigger"))
    return ", ".join(marks + ["waits for the one before (PDL)"] * bool(row.get("gdc_wait")))


def _spill(row: dict) -> str:
    return f"{row.get('stack', 0)} B" if row.get("stack") or row.get("local") else "0"


def targets_table(rows: list[dict]) -> list[str]:
    """One line per launch at the TARGETS shapes (bf16, pinned configuration)."""
    lines = [
        "| case | kernel | tile (BLOCK_*, warps, stages) | CTAs | regs | spill | shared KB | blocks/SM | waves "
        "| 16-B loads | MMA, PDL |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    seen = set()
    for row in rows:
        if not row["case"].startswith("TARGET ") or "error" in row:
            continue
        key = (row["case"], row["kernel"], row["config"], tuple(row["grid"]))
        if key in seen:  # a backward re-launches the forward's shrink: listed once
            continue
        seen.add(key)
        lines.append(
            f"| {row['case'].removeprefix('TARGET ')} | `{row['kernel']}` | {row['config']} | {row['ctas']} "
            f"| {row['reg']} | {_spill(row)} | {row['shared'] / 1024:.0f} | {row['blocks_per_sm']} "
            f"| {row['waves']:.2f} | {row['ldg128']} | {_mma_and_pdl(row)} |"
        )
    return lines


def coverage_table(rows: list[dict]) -> list[str]:
    """Per kernel and dtype over every coverage launch: registers, spills, shared memory, occupancy."""
    groups: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for row in rows:
        if not row["case"].startswith("TARGET ") and "error" not in row:
            groups[row["kernel"], row["dtype"]].append(row)
    lines = [
        "| kernel | dtype | launches | regs (max) | spills (launches, max) | shared KB (max) | blocks/SM (min) | MMA |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    for (kernel, dtype), group in sorted(groups.items()):
        spills = [r for r in group if r.get("stack") or r.get("local")]
        spill = f"{len(spills)}, {max(r['stack'] for r in spills)} B" if spills else "none"
        mma = ", ".join(sorted({_mma(r) for r in group} - {"-"})) or "-"
        lines.append(
            f"| `{kernel}` | {dtype} | {len(group)} | {max(r['reg'] for r in group)} | {spill} "
            f"| {max(r['shared'] for r in group) / 1024:.0f} | {min(r['blocks_per_sm'] for r in group)} | {mma} |"
        )
    return lines


def spilling_launches(rows: list[dict]) -> list[str]:
    return [f"- {r['dtype']} {r['case']}: `{r['kernel']}` [{r['config']}], {r['stack']} B of stack"
            for r in rows if r.get("stack") or r.get("local")]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------------------


def extension_path() -> Path | None:
    found = sorted((ROOT / "fastpeft").glob("_C*.so"))
    return found[0] if found else None


def _demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return done.stdout.splitlines() if done.returncode == 0 else names


def _short(signature: str) -> str:
    """``fastpeft::(anonymous namespace)::lora_gemv_expand_kernel<c10::BFloat16, true>(...)`` -> the name and
    template arguments, with c10's dtypes by their short names."""
    name = signature.replace("(anonymous namespace)::", "").replace("fastpeft::", "").removeprefix("void ")
    name = name.split("(", 1)[0]
    return name.replace("c10::BFloat16", "bf16").replace("c10::Half", "fp16").replace("float", "fp32")


def cuda_kernels(library: Path) -> list[dict]:
    """Every sm_90 kernel of the extension: registers, stack, local and static shared bytes, SASS features."""
    tool = cuobjdump()
    if tool is None:
        return []
    usage = subprocess.run([tool, "-res-usage", "-arch", "sm_90", str(library)], capture_output=True, text=True)
    sass = subprocess.run([tool, "-sass", "-arch", "sm_90", str(library)], capture_output=True, text=True)
    kernels = {}
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", usage.stdout):
        values = dict(re.findall(r"(\w+):(\d+)", fields))
        kernels[name] = {"reg": int(values.get("REG", 0)), "stack": int(values.get("STACK", 0)),
                         "local": int(values.get("LOCAL", 0)), "shared": int(values.get("SHARED", 0))}  # fmt: skip
    for name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass.stdout, re.S):
        if name in kernels:
            kernels[name] |= sass_features(body)
    names = sorted(kernels)
    return [kernels[name] | {"kernel": _short(pretty)} for name, pretty in zip(names, _demangle(names), strict=True)]


def cuda_table(kernels: list[dict]) -> list[str]:
    lines = [
        "| kernel (template arguments) | regs | stack B | local B | static shared B | 16-B loads | narrower loads "
        "| MMA |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k in sorted(kernels, key=lambda k: k["kernel"]):
        lines.append(f"| `{k['kernel']}` | {k['reg']} | {k['stack']} | {k['local']} | {k['shared']} "
                     f"| {k.get('ldg128', 0)} | {k.get('ldg_narrow', 0)} | {_mma(k)} |")  # fmt: skip
    return lines


# The launches the dispatcher sends to the CUDA extension at the TARGETS shapes (bf16), their grids as csrc/'s host
# code computes them: (case, kernel name prefix, block threads, dynamic shared bytes, CTAs or 0 for one resident
# wave).
def _bottleneck_tile_launch(m: int, d: int, mb: int) -> tuple[str, str, int, int, int]:
    """The bottleneck tile kernel's launch as csrc/bottleneck.cu plans it on an H200 (bottleneck_plan mirrors it)."""
    plan = bottleneck_plan.cuda_tile_plan(d, mb, bottleneck_plan.H200)
    name = f"bottleneck_tile_kernel<bf16, false, {plan.rows // 16}>"
    case = f"bottleneck forward M={m} d={d} m={mb} ({plan.rows} rows, clusters of {plan.cluster})"
    shared = bottleneck_plan.tile_layout_bytes(d // plan.cluster, mb, plan.rows)
    return case, name, 256, shared, math.ceil(m / plan.rows) * plan.cluster


def _gemv_launch(m: int, n: int, r: int = 0) -> tuple[str, str, int, int, int]:
    """csrc/qlora.cu's vector GEMV for m rows of bf16 x on a bf16 NF4 weight (one rounding) with n outputs, the
    adapter's shrink of rank r in its launch (clusters of 8 on sm_90) when r > 0: its kernel, dynamic shared
    memory (x's slab of 1024 columns, the byte-pair table, the partial and whole xa) and grid (a warp per 4
    features up to 4 rows, per 2 beyond; whole clusters)."""
    rows, features = (4, 4) if m <= 4 else (16, 2)
    blocks = math.ceil(n / (8 * features))
    case = f"matmul_4bit M={m} 4096->{n} (GEMV{f', r={r} shrink in the launch' if r else ''})"
    name = f"gemv_4bit_vector_kernel<bf16, true, {rows}, {'true' if r else 'false'}>"
    return case, name, 256, m * 1024 * 2 + 256 * 8 + 2 * m * r * 4, math.ceil(blocks / 8) * 8 if r else blocks


CUDA_TARGET_LAUNCHES = [
    ("multi_lora decode, 64 tokens, 4096->4096, r=16", "multi_lora_shrink_kernel<bf16, true>", 256, 0, 64),
    ("multi_lora decode, 64 tokens, 4096->4096, r=16", "multi_lora_expand_kernel<bf16>", 256, 0, 64 * 16),
    _gemv_launch(1, 14336),
    _gemv_launch(16, 14336),
    _gemv_launch(1, 14336, r=16),
    ("matmul_4bit M=4096 4096->14336 (dequantize once)", "dequantize_4bit_kernel<bf16, true>", 256, 0, 0),
    _bottleneck_tile_launch(8192, 4096, 64),
    _bottleneck_tile_launch(8192, 16384, 64),
]  # fmt: skip


def cuda_targets_table(kernels: list[dict]) -> list[str]:
    by_name = {k["kernel"].split("<")[0] + "<" + k["kernel"].split("<", 1)[1]: k for k in kernels if "<" in k["kernel"]}
    lines = [
        "| case | kernel | threads | dynamic shared KB | CTAs | regs | blocks/SM | waves |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case, name, threads, dynamic, ctas in CUDA_TARGET_LAUNCHES:
        k = by_name.get(name)
        if k is None:
            lines.append(f"| {case} | `{name}` | {threads} | {dynamic / 1024:.0f} | {ctas} | ? | ? | ? |")
            continue
        blocks = occupancy(90, threads // 32, k["reg"], k["shared"] + dynamic)
        ctas = ctas or REFERENCE_SMS * blocks  # 0: a grid of one resident wave (sized by the occupancy API)
        waves = ctas / (REFERENCE_SMS * blocks) if blocks else float("inf")
        lines.append(f"| {case} | `{name}` | {threads} | {dynamic / 1024:.0f} | {ctas} | {k['reg']} | {blocks} "
                     f"| {waves:.2f} |")  # fmt: skip
    return lines


# ------------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------------


def nvcc_version() -> str:
    if shutil.which("nvcc") is None:
        return "nvcc not found"
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release ([\d.]+)", out)
    return f"nvcc {found.group(1)}" if found else "nvcc ?"


def render(triton_runs: list[tuple[str, list[dict]]], kernels: list[dict]) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    versions = ", ".join(version for version, _ in triton_runs)
    out = [
        "# Kernel report: sm_90 (H100, H200), as the kernels launch",
        "",
        f"Written by `scripts/kernel_report.py` on {date} with Triton {versions} and {nvcc_version()}, on a machine "
        "without a GPU. Fingerprint of the inputs: "
        f"`{fingerprint()}` (csrc/, triton_kernels/, the three scripts, benchmarks/targets.py and roofline.py, "
        "fastpeft/ops/qlora.py, lora.py and bottleneck_plan.py). CI fails when the sources change and this file "
        "does not (`make kernel-report` writes it).",
        "",
        "**Nothing here is measured.** Registers, spills, shared memory and machine instructions come from the "
        "compilers; blocks per SM from those against an SM's 64K registers, 228 KB of shared memory and 64 warps; "
        f"waves are CTAs / ({REFERENCE_SMS} SMs x blocks per SM). Speeds come only from a GPU run of "
        "`scripts/gpu_check.sh` (benchmarks/results/). Triton launches use the pinned tiles "
        "(`FASTPEFT_TRITON_AUTOTUNE=0`, which the GPU check's target rows use); autotuning may pick others.",
        "",
    ]
    out += [
        "## Predicted: the cost model at every target row",
        "",
        "`benchmarks/roofline.py`: each kernel pass's bytes at 4.3 TB/s, tensor-core FLOPs at 790 TFLOP/s, CUDA-core "
        "work and shared-memory traffic at 128 per SM per clock, waves on 132 SMs, 1 µs per launch; its efficiencies "
        "are named assumptions. A prediction, not a measurement: the GPU bench prints measured beside it "
        "(`python benchmarks/roofline.py --compare results.json`). Rows of ops the model does not cover yet say so. "
        '"Best any design": the row with fastpeft\'s op replaced by its ideal (its compulsory bytes at the copy '
        "ceiling itself and its FLOPs at the tensor ceiling, one launch per direction), the baseline as it is; "
        'a target even that misses is "beyond any design".',
        "",
        *prediction_table(),
        "",
        "## Predicted: the LoRA designs compared on paper",
        "",
        "The same model for each way of building the LoRA layer's prefill, its one-launch decode, its training "
        "step and the multi-adapter prefill (`python benchmarks/roofline.py --designs`); `(ships)` marks what the "
        "dispatch runs.",
        "",
        *design_table(),
        "",
    ]
    for version, rows in triton_runs:
        out += [
            f"## Triton {version}: the TARGETS shapes (bf16)",
            "",
            "Each launch of each target case, through the ops' dispatch with the Triton backend forced.",
            "",
            *targets_table(rows),
            "",
            f"## Triton {version}: every launch variant (odd shapes, fp16, bf16, fp32)",
            "",
            *coverage_table(rows),
            "",
        ]
        spills = spilling_launches(rows)
        out += ["Launches that spill (fp32 only: CI fails a 16-bit one):", "", *(spills or ["- none"]), ""]
    out += ["## CUDA extension (csrc/), sm_90", ""]
    if kernels:
        out += [
            "Every kernel instantiation (fp16, bf16, fp32; no fp64), from `cuobjdump -res-usage` and `-sass`. Static "
            "shared memory only: the bottleneck kernels add dynamic shared memory at launch.",
            "",
            *cuda_table(kernels),
            "",
            "At the TARGETS shapes where the dispatcher prefers CUDA (grids as csrc/'s host code computes them):",
            "",
            *cuda_targets_table(kernels),
            "",
        ]
    else:
        out += ["The extension was not built (or no cuobjdump was found): no rows.", ""]
    return "\n".join(out)


def cuda_spills(kernels: list[dict]) -> list[str]:
    """16-bit CUDA kernels that spill (local memory instructions in their SASS)."""
    return [k["kernel"] for k in kernels if k.get("local") and ("bf16" in k["kernel"] or "fp16" in k["kernel"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help=f"write {REPORT.relative_to(ROOT)}")
    action.add_argument("--check", action="store_true", help="exit 1 when the committed report is stale")
    parser.add_argument("--triton-path", action="append", default=[], help="a folder holding another triton")
    args = parser.parse_args(argv)
    if args.check:
        committed = FINGERPRINT.search(REPORT.read_text()) if REPORT.exists() else None
        if committed is None or committed.group(1) != fingerprint():
            print(f"kernel_report: {REPORT.relative_to(ROOT)} is stale (the kernels changed since it was written): "
                  "run `make kernel-report`", file=sys.stderr)  # fmt: skip
            return 1
        print(f"kernel_report: {REPORT.relative_to(ROOT)} is current ({fingerprint()})")
        return 0
    runs = [triton_rows(None), *(triton_rows(path) for path in args.triton_path)]
    library = extension_path()
    kernels = cuda_kernels(library) if library else []
    REPORT.write_text(render(runs, kernels))
    print(f"wrote {REPORT.relative_to(ROOT)}: Triton {', '.join(v for v, _ in runs)}, {len(kernels)} CUDA kernels")
    bad = cuda_spills(kernels)
    if bad:
        print(f"kernel_report: 16-bit CUDA kernels spill: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
