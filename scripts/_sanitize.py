"""What every scripts/sanitize_<op>.py shares: the environment compute-sanitizer needs, one forced backend, and
the check that each call really ran on it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

# Largest relative error against float64 a small case may show, per dtype.
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}


def main(doc: str, cases: dict[str, list[tuple]], run_case: Callable[..., bool], argv: list[str] | None) -> int:
    """Run ``cases[backend]`` through ``run_case(*case, backend=backend)`` with, set before torch and triton load:
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 (each tensor its own allocation, so an out-of-bounds access is not hidden
    inside a cached block), FASTPEFT_TRITON_AUTOTUNE=0 (one fixed configuration, nothing timed under
    instrumentation) and FASTPEFT_BACKEND=<backend>. Exit status 0 when every case passed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["cuda", "triton"])
    parser.add_argument("--backends", action="store_true", help="print the backends with cases, and exit")
    args = parser.parse_args(argv)
    if args.backends:  # scripts/gpu_check.sh runs the sanitizer on these only
        print(" ".join(sorted(cases)))
        return 0
    if args.backend is None:
        parser.error("--backend is required")
    if args.backend not in cases:  # an op family without kernels on that backend yet
        print(f"{parser.prog}: no {args.backend} kernels in this op family, nothing to sanitize")
        return 0
    os.environ["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    os.environ["FASTPEFT_TRITON_AUTOTUNE"] = "0"
    os.environ["FASTPEFT_BACKEND"] = args.backend
    import torch

    if not torch.cuda.is_available():
        print(f"{parser.prog}: no GPU visible to torch", file=sys.stderr)
        return 2
    results = [run_case(*case, backend=args.backend) for case in cases[args.backend]]
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


def report(backend: str, calls: list[tuple[str, str]], label: str, err: float, ok: bool) -> bool:
    """Print one case's line; False when a call ran on another backend than the forced one."""
    wrong_backend = sorted({used for _, used in calls if used != backend})
    ok = ok and bool(calls) and not wrong_backend
    suffix = f" (ran on {wrong_backend})" if wrong_backend else ""
    print(f"{backend:<6} {label} calls={len(calls)} rel.err={err:.1e} {'ok' if ok else 'FAIL'}{suffix}", flush=True)
    return ok
