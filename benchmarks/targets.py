"""The speed targets (the README's "Speed targets") as data, and the summary table that says which are met.

Each target names the benchmark (``bench``) that measures it, the cases it covers (fields of that benchmark's
``Case``), the row field it reads and its bound. A target whose op does not exist yet has ``bench=None`` and
shows as such. The runner measures the target cases first, so a run cut short still answers them.
"""

from __future__ import annotations

from dataclasses import dataclass

DECODE_FEATURES = ((4096, 4096), (4096, 14336))


@dataclass(frozen=True)
class Target:
    name: str
    bench: str | None  # the benchmark module (benchmarks/bench_<bench>.py), None while the op is missing
    cases: tuple[dict, ...] = ()
    metric: str = "ratio_vs_base"  # the row field compared with the bound
    bound: float = 1.0
    higher_is_better: bool = False
    variant: str = "fused:auto"

    def met(self, value: float) -> bool:
        return value >= self.bound if self.higher_is_better else value <= self.bound

    def describe(self) -> str:
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.bound:g}"


def _lora_cases(ms, features, mode="forward", dropout=0.0) -> tuple[dict, ...]:
    fields = {"r": 16, "dtype": "bfloat16", "mode": mode, "dropout": dropout}
    return tuple({"m": m, "k": k, "n": n, **fields} for m in ms for k, n in features)


_DECODE = _lora_cases((1, 16, 64), DECODE_FEATURES)
_PREFILL = _lora_cases((4096, 16384), DECODE_FEATURES)
_TRAIN = _lora_cases((4096,), ((4096, 4096),), mode="forward+backward")
_DORA = ({"m": 4096, "k": 4096, "n": 4096, "r": 16, "dtype": "bfloat16", "mode": "forward+backward", "dropout": 0.0},)
_MULTI_DECODE = ({"m": 64, "k": 4096, "n": 4096, "r": 16, "adapters": 32, "segments": 0, "dtype": "bfloat16"},)
_MULTI_POOL = ({"m": 64, "k": 4096, "n": 4096, "r": 16, "adapters": 128, "segments": 0, "dtype": "bfloat16"},)
_MULTI_PREFILL = ({"m": 4096, "k": 4096, "n": 4096, "r": 16, "adapters": 8, "segments": 8, "dtype": "bfloat16"},)
_4BIT = {"r": 0, "dtype": "bfloat16", "mode": "matmul", "quant_type": "nf4", "double_quant": True, "blocksize": 64}
_4BIT_M1 = ({"m": 1, "k": 4096, "n": 14336, **_4BIT},)
_4BIT_M16 = ({"m": 16, "k": 4096, "n": 14336, **_4BIT}, {"m": 16, "k": 4096, "n": 4096, **_4BIT})
_4BIT_M64 = ({"m": 64, "k": 4096, "n": 14336, **_4BIT}, {"m": 64, "k": 4096, "n": 4096, **_4BIT})
_4BIT_M4096 = ({"m": 4096, "k": 4096, "n": 14336, **_4BIT}, {"m": 4096, "k": 4096, "n": 4096, **_4BIT})
_QLORA = tuple({"m": m, "k": 4096, "n": 14336, **_4BIT, "r": 16, "mode": "qlora"} for m in (1, 4096))
_QLORA_TRAIN = ({"m": 4096, "k": 4096, "n": 4096, **_4BIT, "r": 16, "mode": "qlora_train"},)
_BN = {
    "bottleneck": 64,
    "adapters": 1,
    "dtype": "bfloat16",
    "mode": "forward",
    "activation": "relu",
    "ln_before": False,
}
_BN_FORWARD = tuple({"m": m, "d": 4096, **_BN} for m in (8192, 65536)) + ({"m": 8192, "d": 768, **_BN},)
_BN_TRAIN = ({"m": 8192, "d": 4096, **_BN, "mode": "forward+backward"},)
_BN_MULTI = ({"m": 8192, "d": 4096, **_BN, "adapters": 8},)
_DROPOUT = _lora_cases((4096,), ((4096, 4096),), mode="forward+backward", dropout=0.05)

TARGETS: tuple[Target, ...] = (
    Target("lora_linear decode (M<=64, r=16): time vs base GEMM", "lora", _DECODE, "ratio_vs_base", 1.10),
    Target("lora_linear decode: speed-up over unfused PEFT", "lora", _DECODE, "speedup_vs_unfused", 1.5, True),
    Target("lora_linear prefill (M>=4096): time vs base GEMM", "lora", _PREFILL, "ratio_vs_base", 1.05),
    Target("lora_linear prefill: speed-up over unfused PEFT", "lora", _PREFILL, "speedup_vs_unfused", 1.1, True),
    Target("lora_linear forward+backward (M=4096): over unfused", "lora", _TRAIN, "speedup_vs_unfused", 1.2, True),
    Target(
        "lora_linear + dropout 0.05, fwd+bwd (M=4096): over PEFT", "lora", _DROPOUT, "speedup_vs_unfused", 1.3, True
    ),
    Target("DoRA layer fwd+bwd (M=4096): over PEFT's DoRA", "dora", _DORA, "speedup_vs_peft", 2.0, True),
    Target("DoRA layer fwd+bwd (M=4096): vs fused plain LoRA", "dora", _DORA, "ratio_vs_lora", 1.25),
    Target(
        "multi_lora_linear decode, batch 64, 32 adapters: vs base GEMM",
        "multi_lora",
        _MULTI_DECODE,
        "ratio_vs_base",
        1.35,
    ),
    Target(
        "multi_lora_linear decode, batch 64, 32 adapters: over PEFT",
        "multi_lora",
        _MULTI_DECODE,
        "speedup_vs_peft",
        3.0,
        True,
    ),
    Target(
        "multi_lora shrink + expand: fraction of copy bandwidth",
        "multi_lora",
        _MULTI_DECODE,
        "bw_fraction",
        0.7,
        True,
        "shrink+expand",
    ),
    Target(
        "multi_lora decode, pool of 128 vs 32: extra time / extra bytes",
        "multi_lora",
        _MULTI_POOL,
        "extra_over_bytes",
        1.0,
    ),
    Target("multi_lora_linear prefill, 8 segments: vs base GEMM", "multi_lora", _MULTI_PREFILL, "ratio_vs_base", 1.10),
    Target("matmul_4bit NF4+DQ M=1, 4096x14336: over bf16 cuBLAS", "qlora", _4BIT_M1, "speedup_vs_bf16", 3.3, True),
    Target("matmul_4bit NF4+DQ M=1, 4096x14336: over bitsandbytes", "qlora", _4BIT_M1, "speedup_vs_bnb", 1.0, True),
    Target("matmul_4bit M=16: over bf16 cuBLAS", "qlora", _4BIT_M16, "speedup_vs_bf16", 2.5, True),
    Target("matmul_4bit M=64: over bf16 cuBLAS", "qlora", _4BIT_M64, "speedup_vs_bf16", 1.5, True),
    Target("matmul_4bit M=64: over bitsandbytes", "qlora", _4BIT_M64, "speedup_vs_bnb", 1.0, True),
    Target("matmul_4bit M=4096: vs bf16 cuBLAS", "qlora", _4BIT_M4096, "ratio_vs_bf16", 1.10),
    Target("QLoRA layer M=1 and 4096, r=16: vs 4-bit matmul alone", "qlora", _QLORA, "ratio_vs_matmul_4bit", 1.08),
    Target(
        "QLoRA layer M=1 and 4096, r=16: over PEFT's bitsandbytes layer", "qlora", _QLORA, "speedup_vs_peft", 2.0, True
    ),
    Target(
        "QLoRA layer fwd+bwd (M=4096): over PEFT + bitsandbytes", "qlora", _QLORA_TRAIN, "speedup_vs_peft", 1.5, True
    ),
    Target(
        "bottleneck_adapter forward, M>=8192: fraction of roofline", "bottleneck", _BN_FORWARD, "bw_fraction", 0.8, True
    ),
    Target("bottleneck_adapter forward, M>=8192: over torch", "bottleneck", _BN_FORWARD, "speedup_vs_torch", 2.0, True),
    Target("bottleneck_adapter forward+backward: over torch", "bottleneck", _BN_TRAIN, "speedup_vs_torch", 1.5, True),
    Target(
        "bottleneck_adapter 8 adapters: over a per-adapter loop", "bottleneck", _BN_MULTI, "speedup_vs_loop", 4.0, True
    ),
)


def target_cases(bench: str) -> list[dict]:
    """The cases of ``bench`` that some target reads, each once, in TARGETS order."""
    seen: list[dict] = []
    for target in TARGETS:
        if target.bench == bench:
            seen.extend(case for case in target.cases if case not in seen)
    return seen


def _matches(row: dict, case: dict, variant: str) -> bool:
    return row.get("variant") == variant and all(row.get(k) == v for k, v in case.items())


def case_label(case: dict) -> str:
    """M and the features of a case: ``m=1 4096->14336`` (linear ops) or ``m=8192 d=4096`` (bottleneck)."""
    features = f"{case['k']}->{case['n']}" if "k" in case else f"d={case['d']}"
    return f"m={case['m']} {features}"


def value_for(target: Target, case: dict, rows: list[dict]) -> float | None:
    """The measured value of ``target.metric`` for one case in a run's rows, or None when it has none."""
    found = [r for r in rows if _matches(r, case, target.variant)]
    value = found[0].get(target.metric) if found and not found[0].get("error") else None
    return None if value is None else float(value)


def evaluate(target: Target, rows: list[dict]) -> tuple[str, str]:
    """(measured, verdict) for one target: the worst value over its cases, and met / NOT met / why not."""
    if target.bench is None:
        return "-", "no op yet"
    values = []
    for case in target.cases:
        found = [r for r in rows if _matches(r, case, target.variant)]
        if not found:
            return "-", f"not measured ({case_label(case)})"
        if found[0].get("error") or found[0].get(target.metric) is None:
            return "-", f"FAILED ({case_label(case)}: {found[0].get('error', 'no value')})"
        values.append((found[0][target.metric], case))
    worst, case = (min if target.higher_is_better else max)(values, key=lambda item: item[0])
    measured = f"{worst:.3f} ({case_label(case)})"
    return measured, "met" if target.met(worst) else "NOT met"


def summary_table(rows: list[dict]) -> str:
    """Every target, its measured value (the worst of its cases), the bound, and whether it is met."""
    lines = [
        f"| {'target':<62} | {'measured (worst case)':<30} | {'bound':<26} | verdict |",
        f"|{'-' * 64}|{'-' * 32}|{'-' * 28}|---------|",
    ]
    for target in TARGETS:
        measured, verdict = evaluate(target, rows)
        bound = target.describe() if target.bench else "-"
        lines.append(f"| {target.name:<62} | {measured:<30} | {bound:<26} | {verdict} |")
    return "\n".join(lines)
