"""Benchmark of inference with each patched layer kind in a whole model: the model as users run it today against
the same model patched by fastpeft, on the device present (a CPU included: this is where CPU speed is measured).

Scenarios (the demo's, ``fastpeft demo``), on a Llama built from a config (random weights, nothing downloaded):
    lora         PEFT, three LoRA adapters of ranks 8/16/32, one active
    mixed        the same, one adapter per sample (PEFT's ``adapter_names``: the three and the base model)
    qlora        the base in 4 bits by transformers + bitsandbytes (NF4 + double quantization), PEFT LoRA on top
    bottleneck   AdapterHub's seq_bn adapters in every block

Variants, timed in the same run on the same tokens:
    unpatched    the PEFT model as built (bottleneck: fastpeft's torch backend forced, the unfused composition
                 AdapterHub computes)
    fused:auto   the same weights patched by fastpeft (a second copy, built from the same seed)

Modes: ``prefill`` (batch x sequence tokens in one forward) and ``decode`` (one token per sample, no KV cache:
the projections' shapes in a generation step). Before timing, the patched logits are checked against the
unpatched ones. Case fields: ``m`` tokens per forward, ``k`` the hidden size, ``n`` the MLP's intermediate size.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from common import case_fields, case_rows, describe_error, time_variants
from common import case_from_fields as common_case_from_fields

from fastpeft.backends import use_backend
from fastpeft.demo import ADAPTERS

OP = "inference"
SCENARIOS = ("lora", "mixed", "qlora", "bottleneck")
MIXED_NAMES = (*ADAPTERS, "__base__")

__all__ = ["OP", "backends_for", "case_fields", "case_from_fields", "cases", "describe", "run_case"]


@dataclass(frozen=True)
class Case:
    scenario: str
    m: int  # tokens per forward: batch * sequence length
    k: int  # hidden size
    n: int  # MLP intermediate size
    dtype: torch.dtype
    layers: int
    batch: int
    mode: str  # "prefill" or "decode"


def case_from_fields(fields: dict) -> Case:
    """The Case a target names (benchmarks/targets.py): dtype given by name."""
    return common_case_from_fields(Case, fields)


def describe(case: Case) -> str:
    dtype = str(case.dtype).removeprefix("torch.")
    return (f"{case.scenario} {case.mode}: Llama {case.layers}x{case.k} ({case.n}), {case.batch} x "
            f"{case.m // case.batch} tokens {dtype}")  # fmt: skip


def cases(size: str) -> list[Case]:
    """smoke and quick: the demo's model (hidden 256), CPU-sized; full: a 2-layer Llama of hidden 2048 in bf16."""
    if size in ("smoke", "quick"):
        shapes = [(256, 704, torch.float32, 2, 4, 64, "prefill"), (256, 704, torch.float32, 2, 4, 1, "decode")]
    else:
        shapes = [(2048, 5632, torch.bfloat16, 2, 8, 512, "prefill"), (2048, 5632, torch.bfloat16, 2, 64, 1, "decode")]
    return [
        Case(scenario, batch * seq, k, n, dtype, layers, batch, mode)
        for scenario in SCENARIOS
        for k, n, dtype, layers, batch, seq, mode in shapes
    ]


def backends_for(device: torch.device) -> list[str]:
    return []  # the patched model runs fused:auto; the layer benchmarks time each backend


def _checkpoint(case: Case, folder: Path) -> Path:
    from fastpeft.demo import tiny_llama_checkpoint

    return tiny_llama_checkpoint(folder / "llama", hidden=case.k, layers=case.layers, vocab=512)


def _models(case: Case, path: Path, device: torch.device) -> dict[str, tuple[torch.nn.Module, object]]:
    """variant: (model, context factory or None): the unpatched model and the patched one."""
    from fastpeft.demo import bottleneck_model, load_model, qlora_model, with_lora
    from fastpeft.integrations.peft import patch_peft_model

    if case.scenario == "bottleneck":
        model, _ = bottleneck_model(path, device, case.dtype)
        return {"unpatched": (model, lambda: use_backend("torch")), "fused:auto": (model, None)}
    models = []
    for _ in range(2):  # two copies of the same weights: seeded alike
        torch.manual_seed(0)
        if case.scenario == "qlora":
            models.append(qlora_model(path, device, case.dtype))
        else:
            models.append(with_lora(load_model(path, device, case.dtype)))
    return {"unpatched": (models[0], None), "fused:auto": (patch_peft_model(models[1]), None)}


def _forward(model: torch.nn.Module, context, tokens: torch.Tensor, names: list[str] | None):
    kwargs = {} if names is None else {"adapter_names": names}

    def forward():
        with torch.no_grad():
            if context is None:
                return model(tokens, **kwargs).logits
            with context():
                return model(tokens, **kwargs).logits

    return forward


def run_case(case: Case, device: torch.device, backends: list[str]) -> list[dict]:
    """Check the patched logits against the unpatched ones, then time a forward of each; ``speedup_vs_unpatched``
    = the unpatched model's time / the variant's."""
    variants = ["unpatched", "fused:auto"]
    errors: dict[str, str] = {}
    steps = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = _checkpoint(case, Path(tmp))
            models = _models(case, path, device)
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 512, (case.batch, case.m // case.batch), generator=generator).to(device)
        names = [MIXED_NAMES[i % 4] for i in range(case.batch)] if case.scenario == "mixed" else None
        steps = {name: _forward(model, context, tokens, names) for name, (model, context) in models.items()}
        expected = steps["unpatched"]().float()
        got = steps["fused:auto"]().float()
        tolerance = 1e-4 if case.dtype == torch.float32 else 5e-2
        rel = ((got - expected).norm() / expected.norm()).item()
        if not rel <= tolerance:
            errors["fused:auto"] = f"wrong result: logits differ by {rel:.3g} (relative), tolerance {tolerance:g}"
    except Exception as exc:  # bitsandbytes, peft or transformers missing, out of memory: every variant reports it
        errors = {name: describe_error(exc) for name in variants}
        steps = {}
    times = time_variants(steps, errors, device, rep_ms=300, rounds=1 if device.type == "cuda" else 5)
    steps.clear()
    return case_rows(case_fields(case), OP, variants, times, errors, speedups={"unpatched": "unpatched"})
