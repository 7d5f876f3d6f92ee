"""What every benchmarks/bench_<op>.py shares: timing, forcing a backend per variant, and turning one case's
times and failures into rows with ratios to the baselines measured in the same case."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterable

import torch

from fastpeft.backends import available_backends, use_backend

ROTATE_BYTES = 3 * 60 * 2**20  # operand sets rotated past three times an H200's L2


def case_fields(case) -> dict:
    """A bench's Case (a dataclass with a torch ``dtype``) as the plain fields of a JSON row."""
    return {**dataclasses.asdict(case), "dtype": str(case.dtype).removeprefix("torch.")}


def case_from_fields(case_class: type, fields: dict):
    """The ``case_class`` instance that :func:`case_fields` (or a target in benchmarks/targets.py) describes."""
    return case_class(**{**fields, "dtype": getattr(torch, fields["dtype"])})


def describe_layer_case(case) -> str:
    """One line for a layer benchmark's case: mode, rows, features, rank, dtype and dropout when on."""
    dropout = f" dropout={case.dropout:g}" if case.dropout else ""
    return f"{case.mode} M={case.m} {case.k}->{case.n} r={case.r} {str(case.dtype).removeprefix('torch.')}{dropout}"


def backends_for(device: torch.device) -> list[str]:
    """The fused:<backend> variants worth timing on ``device`` (the Triton interpreter is not)."""
    return [b for b in available_backends(device) if device.type == "cuda" or b == "torch"]


def with_backend(variant: str, fn: Callable[[], object]) -> Callable[[], object]:
    """Force the backend a fused:<name> variant names (the dispatcher reads FASTPEFT_BACKEND per call); a
    variant fused:<name>-<form> runs that backend in one of its forms (the bench sets the form)."""
    name = variant.partition(":")[2].partition("-")[0]
    if name in ("", "auto"):
        return fn

    def forced():
        with use_backend(name):
            return fn()

    return forced


class Timing(float):
    """Median milliseconds per call, with ``spread``: the interquartile range of the samples over the median
    (the noise a comparison between runs allows for)."""

    spread: float

    def __new__(cls, median: float, q1: float, q3: float) -> Timing:
        timing = super().__new__(cls, median)
        timing.spread = (q3 - q1) / median if median > 0 else 0.0
        return timing


def time_ms(fn: Callable[[], object], device: torch.device, rep_ms: int = 100) -> Timing:
    """Median milliseconds per call: CUDA events over about ``rep_ms`` on a GPU, wall clock on a CPU."""
    if device.type == "cuda":
        import triton.testing

        q1, median, q3 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
        return Timing(median, q1, q3)
    fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q1, median, q3 = statistics.quantiles(samples, n=4)
    return Timing(statistics.median(samples), q1, q3)


COPY_BYTES = 256 * 2**20


def copy_gbps(device: torch.device) -> float:
    """GB/s of a device-to-device copy (bytes read plus bytes written): the bandwidth ceiling rows compare with."""
    size = COPY_BYTES if device.type == "cuda" else 2**20
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / time_ms(lambda: dst.copy_(src), device) / 1e6


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def time_variants(
    steps: dict[str, Callable[[], object]],
    errors: dict[str, str],
    device: torch.device,
    rep_ms: int = 100,
    rounds: int = 1,
) -> dict[str, Timing]:
    """Median ms per variant (:func:`time_ms`). Variants that already failed are skipped, except for a wrong
    result, which is still timed; a variant that raises now gets its error recorded in ``errors``. With
    ``rounds`` > 1 the variants take turns that many times and each keeps its fastest round: on a shared CPU,
    load that comes and goes then weighs on all of them."""
    times: dict[str, Timing] = {}
    for _ in range(rounds):
        for name, step in steps.items():
            if name in errors and not errors[name].startswith("wrong result"):
                continue
            try:
                timing = time_ms(with_backend(name, step), device, rep_ms)
            except Exception as exc:  # out of memory, a broken backend: the row says so
                errors[name] = describe_error(exc)
                continue
            if name not in times or timing < times[name]:
                times[name] = timing
    return times


def case_rows(
    fields: dict,
    op: str,
    variants: Iterable[str],
    times: dict[str, float],
    errors: dict[str, str],
    *,
    ratios: dict[str, str] = {},  # noqa: B006 - read only
    speedups: dict[str, str] = {},  # noqa: B006 - read only
    extra: Callable[[float], dict] | None = None,
) -> list[dict]:
    """One row per variant: ``ms`` (and ``ms_spread`` for a :class:`Timing`), ``error`` where it failed,
    ``ratio_vs_X = ms / time[baseline]`` for each ``X: baseline`` of ``ratios``, ``speedup_vs_X = time[baseline]
    / ms`` for each of ``speedups``, and ``extra(ms)`` (GB/s, TFLOP/s)."""
    rows = []
    for name in variants:
        ms = times.get(name)
        row = {**fields, "op": op, "variant": name, "ms": None if ms is None else float(ms)}
        if name in errors:
            row["error"] = errors[name][:500]
        if ms is not None:
            if isinstance(ms, Timing):
                row["ms_spread"] = ms.spread
            row.update(extra(ms) if extra else {})
            row.update({f"ratio_vs_{k}": ms / times[b] for k, b in ratios.items() if b in times})
            row.update({f"speedup_vs_{k}": times[b] / ms for k, b in speedups.items() if b in times})
        rows.append(row)
    return rows
