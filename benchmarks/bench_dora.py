"""Benchmark of fastpeft::dora_linear against PEFT's DoRA layer and against the fused plain LoRA layer.

Variants, timed in the same run on the same operands (adapters in the base dtype):
    peft           PEFT's lora.Linear with use_dora=True on an nn.Linear (its forward, and autograd's backward)
    lora           fastpeft.lora_linear: the fused plain LoRA layer, the bound DoRA should stay near
    fused:<name>   fastpeft.ops.dora.dora_linear forced to one backend, and fused:auto (||W_n||^2 computed once
                   per weight and passed in, as the PEFT integration caches it: W is frozen)

Modes ``forward`` and ``forward+backward`` (x, A, B and the magnitude need gradients; W is frozen); training
cases may name a dropout (PEFT's ``lora_dropout``: its DoRA then runs the base product twice, on x and on the
dropped x, and so does the fused op). Each fused variant's forward is checked against PEFT's output first, from
the same seed; failures become rows with ``error``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

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

from fastpeft.ops.dora import dora_linear, weight_row_norm_sq
from fastpeft.ops.lora import lora_linear

OP = "dora_linear"
SCALING = 2.0
MODES = ("forward", "forward+backward")

__all__ = ["OP", "backends_for", "case_fields", "case_from_fields", "cases", "describe", "run_case"]

describe = describe_layer_case  # the runner's one-line name of a case


@dataclass(frozen=True)
class Case:
    m: int
    k: int
    n: int
    r: int
    dtype: torch.dtype
    mode: str
    dropout: float = 0.0  # PEFT's lora_dropout, on in training


def case_from_fields(fields: dict) -> Case:
    """The Case a target names (benchmarks/targets.py): dtype given by name."""
    return common_case_from_fields(Case, fields)


def cases(size: str) -> list[Case]:
    if size in ("smoke", "quick"):
        m, k, n, r = (16, 96, 80, 8) if size == "smoke" else (256, 1024, 1024, 16)
        return [*(Case(m, k, n, r, torch.float32, mode) for mode in MODES),
                Case(m, k, n, r, torch.float32, "forward+backward", dropout=0.1)]  # fmt: skip
    sweep = [
        Case(m, 4096, n, 16, torch.bfloat16, mode)
        for mode, n, m in itertools.product(MODES, (4096, 14336), (1, 64, 4096))
    ]
    return sweep + [Case(4096, 4096, n, 16, torch.bfloat16, "forward+backward", 0.05) for n in (4096, 14336)]


def _peft_layer(case: Case, weight: torch.Tensor, lora_a, lora_b, magnitude) -> torch.nn.Module:
    """PEFT's own DoRA layer on an nn.Linear holding ``weight``, built through get_peft_model (any PEFT version)."""
    import peft

    holder = torch.nn.ModuleDict({"proj": torch.nn.Linear(case.k, case.n, bias=False, device=weight.device)})
    config = peft.LoraConfig(r=case.r, lora_alpha=SCALING * case.r, target_modules=["proj"], use_dora=True,
                             lora_dropout=case.dropout)  # fmt: skip
    layer = peft.get_peft_model(holder, config).base_model.model["proj"].to(case.dtype)
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
        layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
    return layer.train(case.mode != "forward")


def operand_sets(case: Case, device: torch.device) -> list[dict]:
    size = torch.finfo(case.dtype).bits // 8
    per_set = (case.n * case.k + case.m * (case.k + case.n)) * size
    count = 1 if device.type == "cpu" else max(2, min(8, int(ROTATE_BYTES // per_set) + 1))
    train = case.mode != "forward"
    sets = []
    for _ in range(count):
        weight = (torch.randn(case.n, case.k, device=device) * case.k**-0.5).to(case.dtype)
        lora_a = (torch.randn(case.r, case.k, device=device) * case.k**-0.5).to(case.dtype)
        lora_b = (torch.randn(case.n, case.r, device=device) * case.r**-0.5).to(case.dtype)
        magnitude = torch.linalg.vector_norm(weight.float(), dim=1).to(case.dtype) * 1.1
        peft = _peft_layer(case, weight, lora_a, lora_b, magnitude)
        ours = [t.clone().requires_grad_(train) for t in (lora_a, lora_b, magnitude)]
        # ||W_n||^2 once per weight, as the PEFT integration caches it (W is frozen; its version is the key)
        sets.append(dict(x=torch.randn(case.m, case.k, device=device, dtype=case.dtype).requires_grad_(train),
                         weight=weight, weight_norm_sq=weight_row_norm_sq(weight), lora_a=ours[0],
                         lora_b=ours[1], magnitude=ours[2], peft=peft,
                         grad=torch.randn(case.m, case.n, device=device, dtype=case.dtype)))  # fmt: skip
    return sets


def _variants(backends: list[str], dropout: float) -> dict[str, Callable[[dict], torch.Tensor]]:
    def fused(ops):
        x, w, a, b = ops["x"], ops["weight"], ops["lora_a"], ops["lora_b"]
        return dora_linear(x, w, a, b, ops["magnitude"], SCALING, weight_norm_sq=ops["weight_norm_sq"],
                           dropout_p=dropout)  # fmt: skip

    def lora(ops):
        return lora_linear(ops["x"], ops["weight"], ops["lora_a"], ops["lora_b"], SCALING, dropout_p=dropout)

    fns = {"peft": lambda ops: ops["peft"](ops["x"]), "lora": lora, "fused:auto": fused}
    fns.update({f"fused:{b}": fused for b in backends})
    return fns


def _step(variant: str, fn: Callable, sets: list[dict], mode: str) -> Callable[[], object]:
    counter = itertools.count()

    def step():
        ops = sets[next(counter) % len(sets)]
        y = fn(ops)
        if mode == "forward":
            return y
        params = list(ops["peft"].parameters()) if variant == "peft" else [ops["lora_a"], ops["lora_b"]]
        wrt = [ops["x"]] + [p for p in params if p.requires_grad]
        if variant.startswith("fused"):
            wrt.append(ops["magnitude"])
        return torch.autograd.grad(y, wrt, ops["grad"])

    return step


def run_case(case: Case, device: torch.device, backends: list[str]) -> list[dict]:
    """Check each fused variant against PEFT's DoRA output (same seed, so the same dropout mask), then time
    every variant; one row per variant."""
    variants = _variants(backends, case.dropout)
    errors: dict[str, str] = {}

    def seeded(fn):
        torch.manual_seed(1234)
        return fn()

    try:
        sets = operand_sets(case, device)
        with torch.no_grad():
            first = sets[0]
            expected = seeded(lambda: variants["peft"](first)).double()
            for name, fn in variants.items():
                if name.startswith("fused"):
                    got = seeded(with_backend(name, lambda fn=fn: fn(first))).double()
                    err = ((got - expected).norm() / expected.norm()).item()
                    if not err <= (1e-4 if case.dtype == torch.float32 else 3e-2):
                        errors[name] = f"wrong result: rel. error {err:.2e} against PEFT's DoRA"
    except Exception as exc:  # peft missing, out of memory: every variant reports it
        sets, errors = [], {name: describe_error(exc) for name in variants}
    steps = {name: _step(name, fn, sets, case.mode) for name, fn in variants.items()} if sets else {}
    times = time_variants(steps, errors, device)
    del sets, steps
    return case_rows(case_fields(case), OP, variants, times, errors, ratios={"lora": "lora"}, speedups={"peft": "peft"})
