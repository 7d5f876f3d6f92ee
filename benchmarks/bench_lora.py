"""Benchmark of fastpeft::lora_linear against what users run today.

Variants, all timed in the same run on the same operands:
    base           x @ W.T through torch (cuBLAS): the floor the fused layer is measured against
    unfused        PEFT's path: base + lora_B(lora_A(dropout(x))) * scaling (three GEMMs, a scale and an add;
                   the dropout only in the training cases that name one)
    fused:<name>   fastpeft.lora_linear forced to one backend (cuda, triton, torch), and fused:auto
    fused:triton-tiles  past the decode rows, the Triton backend on its tiles with their K loop instead of cuBLAS
                   (triton_kernels/lora.py's CUBLAS_BASE_MIN_M): the GPU decides
    fused:triton-epilogue  past the decode rows, cuBLAS first and the tiles as its epilogue, instead of the LoRA
                   term first and cuBLAS adding x W^T into it (CUBLAS_ACCUMULATES)
    fused:triton-persistent  past the decode rows, the forward and the backward's dx on the persistent TMA kernel
                   with the adapter as a K step (triton_kernels/lora_persistent.py, off by default); the forward
                   of an inference call with x A^T in the kernel's own pass over x (no shrink launch)

Modes: ``forward``, and ``forward+backward`` as in LoRA training (x, A and B need gradients, W is frozen).
On a GPU: CUDA-event timing (triton.testing.do_bench, median) after warm-up, operand sets rotated so that
their total exceeds the L2 cache. On a CPU: wall-clock timing of CPU-sized shapes (quick) or tiny ones (smoke).
Before timing, each fused variant's output is checked against the layer computed in fp32 on the same
operands; a variant that raises or strays is recorded as a failure row (``error``), not the end of the run.
Also collected by pytest-benchmark: ``pytest benchmarks/``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from common import (
    ROTATE_BYTES,
    backends_for,
    case_fields,
    case_rows,
    describe_error,
    describe_layer_case,
    time_variants,
    with_backend,
)
from common import case_from_fields as common_case_from_fields

from fastpeft.ops.dropout import draw_mask
from fastpeft.ops.lora import lora_linear

OP = "lora_linear"
FULL_M = (1, 16, 64, 256, 4096, 16384)
FULL_FEATURES = ((4096, 4096), (4096, 14336))  # (in, out)
FULL_RANKS = (8, 16, 64)
FULL_DTYPES = (torch.bfloat16, torch.float16)
MODES = ("forward", "forward+backward")
SCALING = 2.0

describe = describe_layer_case  # the runner's one-line name of a case


@dataclass(frozen=True)
class Case:
    m: int
    k: int  # in_features
    n: int  # out_features
    r: int
    dtype: torch.dtype
    mode: str
    dropout: float = 0.0  # on A's input, as PEFT's lora_dropout in training

    def flops(self) -> float:
        """Useful floating-point operations: the base GEMM and the two LoRA GEMMs (and their gradients)."""
        forward = 2 * self.m * self.n * self.k + 2 * self.m * self.r * (self.k + self.n)
        if self.mode == "forward":
            return forward
        # dx (base and LoRA), dA, dB, and the shrinks dy @ B and x @ A the backward recomputes
        backward = 2 * self.m * self.n * self.k + 4 * self.m * self.r * (self.k + self.n) + 2 * self.m * self.r * self.n
        return forward + backward

    def bytes(self) -> float:
        """Fewest bytes moved: every operand read once, every output written once."""
        size = torch.finfo(self.dtype).bits // 8
        forward = (self.n * self.k + self.r * (self.k + self.n) + self.m * (self.k + self.n)) * size
        return forward if self.mode == "forward" else 2 * forward + self.m * self.k * size


def case_from_fields(fields: dict) -> Case:
    """The Case a target names (benchmarks/targets.py): dtype given by name."""
    return common_case_from_fields(Case, fields)


def cases(size: str) -> list[Case]:
    if size in ("smoke", "quick"):
        (k, n, r), rows = ((96, 80, 8), (1, 16)) if size == "smoke" else ((1024, 1024, 16), (16, 256))
        shapes = [Case(m, k, n, r, torch.float32, mode) for m in rows for mode in MODES]
        return [*shapes, Case(rows[-1], k, n, r, torch.float32, "forward+backward", dropout=0.1)]
    sweep = [
        Case(m, k, n, r, dtype, mode)
        for mode, dtype, (k, n), r, m in itertools.product(MODES, FULL_DTYPES, FULL_FEATURES, FULL_RANKS, FULL_M)
    ]
    training = [Case(m, 4096, 4096, 16, torch.bfloat16, "forward+backward", dropout=0.05) for m in (256, 4096)]
    return sweep + training


def operand_sets(case: Case, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Independent random operand sets, enough of them on a GPU that cycling through them defeats L2."""
    count = 1 if device.type == "cpu" else max(2, min(16, int(ROTATE_BYTES // case.bytes()) + 1))
    train = case.mode != "forward"
    sets = []
    for _ in range(count):
        x = torch.randn(case.m, case.k, device=device, dtype=case.dtype).requires_grad_(train)
        weight = (torch.randn(case.n, case.k, device=device) * case.k**-0.5).to(case.dtype)
        lora_a = (torch.randn(case.r, case.k, device=device) * case.k**-0.5).to(case.dtype).requires_grad_(train)
        lora_b = (torch.randn(case.n, case.r, device=device) * case.r**-0.5).to(case.dtype).requires_grad_(train)
        grad = torch.randn(case.m, case.n, device=device, dtype=case.dtype)
        sets.append(dict(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, grad=grad))
    return sets


def k_loop_tiles() -> contextlib.AbstractContextManager:
    """The Triton backend's prefill on its tiles with the K loop, not on cuBLAS and the tiles as its epilogue."""
    from fastpeft.triton_kernels import lora as kernels

    return mock.patch.object(kernels, "CUBLAS_BASE_MIN_M", 2**62)


def on_tiles(fn: Callable) -> Callable:
    """``fn`` (a forward, or a whole timed step with its backward) under :func:`k_loop_tiles`."""

    def run(*args):
        with k_loop_tiles():
            return fn(*args)

    return run


def on_epilogue(fn: Callable) -> Callable:
    """``fn`` with cuBLAS's x W^T first and the tiles as its epilogue (not the LoRA term first)."""
    from fastpeft.triton_kernels import lora as kernels

    def run(*args):
        with mock.patch.object(kernels, "CUBLAS_ACCUMULATES", False):
            return fn(*args)

    return run


def on_persistent(fn: Callable) -> Callable:
    """``fn`` with the prefill forward on the persistent TMA kernel where it takes the call
    (triton_kernels/lora_persistent.py, off by default until a GPU run ranks it)."""
    from fastpeft.triton_kernels import lora_persistent

    def run(*args):
        with mock.patch.object(lora_persistent, "PERSISTENT_PREFILL_MIN_M", 65):
            return fn(*args)

    return run


def _forward_fns(backends: list[str], dropout: float = 0.0, m: int = 0) -> dict[str, Callable[..., torch.Tensor]]:
    lin = torch.nn.functional.linear

    def base(x, weight, lora_a, lora_b):
        return lin(x, weight)

    def unfused(x, weight, lora_a, lora_b):  # PEFT's lora.Linear forward
        dropped = torch.nn.functional.dropout(x, dropout, training=True) if dropout else x
        return lin(x, weight) + lin(lin(dropped, lora_a), lora_b) * SCALING

    def fused(x, weight, lora_a, lora_b):
        return lora_linear(x, weight, lora_a, lora_b, SCALING, dropout_p=dropout)

    fns = {"base": base, "unfused": unfused, "fused:auto": fused}
    fns.update({f"fused:{b}": fused for b in backends})
    if "triton" in backends and m > 64:  # triton_kernels/lora.py's DECODE_MAX_M: decode rows have one form
        fns["fused:triton-tiles"] = on_tiles(fused)
        fns["fused:triton-epilogue"] = on_epilogue(fused)
        fns["fused:triton-persistent"] = on_persistent(fused)
    return fns


def make_step(variant: str, forward: Callable, sets: list[dict], mode: str) -> Callable[[], object]:
    """One timed call of ``variant``; cycles through the operand sets."""
    counter = itertools.count()

    def step():
        ops = sets[next(counter) % len(sets)]
        y = forward(ops["x"], ops["weight"], ops["lora_a"], ops["lora_b"])
        if mode == "forward":
            return y
        wrt = [ops["x"]] if variant == "base" else [ops["x"], ops["lora_a"], ops["lora_b"]]
        return torch.autograd.grad(y, wrt, ops["grad"])

    return step


def _check_outputs(case: Case, ops: dict, variants: dict[str, Callable]) -> dict[str, str]:
    """Variant -> why its forward output is wrong, for the fused variants whose error against the layer in fp32
    exceeds twice that of the unfused path in the case's dtype (plus a floor). With dropout every variant runs
    from the same seed: the fused op draws nn.Dropout's mask, which the fp32 reference applies too."""
    x, weight, lora_a, lora_b = (ops[k].detach() for k in ("x", "weight", "lora_a", "lora_b"))
    seed = 1234

    def seeded(fn):
        torch.manual_seed(seed)
        return fn()

    with torch.no_grad():
        dropped = x.double()
        if case.dropout:
            mask = seeded(lambda: draw_mask(tuple(x.shape), case.dropout, x.dtype, x.device))
            dropped = torch.where(mask, dropped / (1 - case.dropout), 0)
        ref = torch.addmm(x.double() @ weight.double().t(), dropped @ lora_a.double().t(), lora_b.double().t(),
                          alpha=SCALING)  # fmt: skip

        def error(y):
            return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()

        floor = 1e-5 if case.dtype == torch.float32 else 1e-2
        bound = 2 * error(seeded(lambda: variants["unfused"](x, weight, lora_a, lora_b))) + floor
        problems = {}
        for name, fn in variants.items():
            if not name.startswith("fused"):
                continue
            try:
                err = error(seeded(with_backend(name, lambda fn=fn: fn(x, weight, lora_a, lora_b))))
            except Exception as exc:  # a broken backend fails its own variant only
                problems[name] = describe_error(exc)
                continue
            if not err <= bound:  # NaN fails too
                problems[name] = f"wrong result: rel. error {err:.2e} > {bound:.2e}"
    return problems


def run_case(case: Case, device: torch.device, backends: list[str]) -> list[dict]:
    """Check and time every variant on one case; one row per variant, ratios to this case's baselines.

    A variant that raises or gives a wrong result becomes a row with ``error`` set (and no ratios when it could
    not be timed); the other variants still run.
    """
    variants = _forward_fns(backends, case.dropout, case.m)
    try:
        sets = operand_sets(case, device)
        errors = _check_outputs(case, sets[0], variants)
    except Exception as exc:  # out of memory: every variant reports it
        sets, errors = [], {name: describe_error(exc) for name in variants}
    steps = {name: make_step(name, forward, sets, case.mode) for name, forward in variants.items()} if sets else {}
    for name, form in (("fused:triton-tiles", on_tiles), ("fused:triton-epilogue", on_epilogue),
                       ("fused:triton-persistent", on_persistent)):  # fmt: skip
        if name in steps:  # its backward's dx on the same form as its forward
            steps[name] = form(steps[name])
    times = time_variants(steps, errors, device)
    del sets, steps

    def throughput(ms: float) -> dict:
        return {"tflops": case.flops() / ms / 1e9, "gbps": case.bytes() / ms / 1e6}

    return case_rows(case_fields(case), OP, variants, times, errors, ratios={"base": "base"},
                     speedups={"unfused": "unfused"}, extra=throughput)  # fmt: skip


def run(size: str, device: torch.device | None = None) -> list[dict]:
    """Every case of the sweep of ``size`` (smoke, quick or full), one row per (case, variant)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [row for case in cases(size) for row in run_case(case, device, backends_for(device))]


# ---------------------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest benchmarks/` times one small case per variant on the device present
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["base", "unfused", "fused:auto"])
def test_lora_linear(benchmark, variant, mode):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = cases("smoke")[0] if device.type == "cpu" else Case(16, 4096, 4096, 16, torch.bfloat16, mode)
    case = Case(case.m, case.k, case.n, case.r, case.dtype, mode)
    sets = operand_sets(case, device)
    step = make_step(variant, _forward_fns([])[variant], sets, mode)
    if device.type == "cuda":
        benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), rounds=50, warmup_rounds=5)
    else:
        benchmark(step)
