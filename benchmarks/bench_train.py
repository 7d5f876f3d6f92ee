"""Benchmark of one training step of a small Llama with LoRA (or DoRA) on every projection: PEFT's model against
the same model patched by fastpeft.

Variants, timed in the same run on copies of one model and one batch:
    peft           the PEFT model as built: its forward, autograd's backward
    fused:auto     the copy after ``patch_peft_model`` (PEFT's dropout masks, so the same losses from a seed)
    fused_philox   patched with ``dropout_mode="philox"`` (masks drawn in-kernel); LoRA cases with dropout only

A step is ``zero_grad``, the forward with labels, the backward and an AdamW step on the trainable parameters:
what a training loop runs, so the ratio says what users gain end to end (attention, norms and the optimizer
included). Before timing, each fused variant's loss from PEFT's seed is checked against PEFT's (fused_philox
draws other masks: its loss only has to be finite). Case fields follow the layer benchmarks: ``m`` is tokens
per step (batch x sequence), ``k`` the hidden size, ``n`` the MLP's intermediate size.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import case_fields, case_rows, describe_error, time_variants
from common import case_from_fields as common_case_from_fields

from fastpeft.integrations.peft import patch_peft_model

OP = "train_step"
MODE = "train step"
SEQ = 512

__all__ = ["OP", "backends_for", "case_fields", "case_from_fields", "cases", "describe", "run_case"]


@dataclass(frozen=True)
class Case:
    m: int  # tokens per step: batch * sequence length
    k: int  # hidden size
    n: int  # MLP intermediate size
    r: int
    dtype: torch.dtype
    layers: int
    dora: bool = False
    dropout: float = 0.0
    mode: str = MODE


def case_from_fields(fields: dict) -> Case:
    """The Case a target names (benchmarks/targets.py): dtype given by name."""
    return common_case_from_fields(Case, fields)


def describe(case: Case) -> str:
    kind = "DoRA" if case.dora else "LoRA"
    dropout = f" dropout={case.dropout:g}" if case.dropout else ""
    dtype = str(case.dtype).removeprefix("torch.")
    return f"{MODE}: Llama {case.layers}x{case.k} ({case.n}), {case.m} tokens, {kind} r={case.r} {dtype}{dropout}"


def cases(size: str) -> list[Case]:
    if size == "smoke":  # tiny: Python overhead shows
        return [Case(16, 48, 96, 4, torch.float32, 2, dora, 0.1) for dora in (False, True)]
    if size == "quick":  # the demo's model size: a CPU workload, GEMMs show
        kinds = ((False, 0.1), (False, 0.0), (True, 0.1))  # (DoRA, dropout)
        return [Case(256, 256, 704, 8, torch.float32, 2, dora, p) for dora, p in kinds]
    return [Case(8 * SEQ, 2048, 5632, 16, torch.bfloat16, 4, dora, p) for dora in (False, True) for p in (0.05, 0.0)]


def backends_for(device: torch.device) -> list[str]:
    return []  # the patched model runs fused:auto; the layer benchmarks time each backend


def _peft_model(case: Case, device: torch.device) -> torch.nn.Module:
    """A Llama of ``case``'s size, random weights, LoRA (or DoRA) with B random on every projection."""
    import peft
    import transformers

    heads = max(1, case.k // 128)
    config = transformers.LlamaConfig(
        vocab_size=32000 if device.type == "cuda" else 97, hidden_size=case.k, intermediate_size=case.n,
        num_hidden_layers=case.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max(SEQ, case.m),
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(device=device, dtype=case.dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, target_modules=targets, lora_dropout=case.dropout,
                           use_dora=case.dora, init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(base, lora).to(case.dtype).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return model


def _variant_models(case: Case, device: torch.device) -> dict[str, torch.nn.Module]:
    peft_model = _peft_model(case, device)
    models = {"peft": peft_model, "fused:auto": patch_peft_model(copy.deepcopy(peft_model))}
    if case.dropout and not case.dora:
        models["fused_philox"] = patch_peft_model(copy.deepcopy(peft_model), dropout_mode="philox")
    return models


def _batch(case: Case, device: torch.device, vocab: int) -> torch.Tensor:
    seq = min(SEQ, case.m)
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (case.m // seq, seq), generator=generator).to(device)


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    torch.manual_seed(1234)  # the same dropout masks for PEFT and fused:auto
    with torch.no_grad():
        return model(ids, labels=ids).loss.float().item()


def _step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss

    return step


def run_case(case: Case, device: torch.device, backends: list[str]) -> list[dict]:
    """Check each fused variant's loss against PEFT's, then time a training step of each; one row per variant,
    ``speedup_vs_peft`` = PEFT's step time / the variant's."""
    variants = ["peft", "fused:auto", *(["fused_philox"] if case.dropout and not case.dora else [])]
    errors: dict[str, str] = {}
    steps: dict[str, Callable[[], object]] = {}
    try:
        models = _variant_models(case, device)
        ids = _batch(case, device, models["peft"].config.vocab_size)
        expected = _loss(models["peft"], ids)
        tolerance = 1e-4 if case.dtype == torch.float32 else 2e-2
        for name, model in models.items():
            got = _loss(model, ids)
            same_masks = name != "fused_philox"
            if not math.isfinite(got) or (same_masks and abs(got - expected) > tolerance * abs(expected)):
                errors[name] = f"wrong result: loss {got:.6g}, PEFT's {expected:.6g}"
        steps = {name: _step(model, ids) for name, model in models.items()}
        for name, step in steps.items():  # compile and autotune before timing: do_bench sizes its loop on it
            try:
                step(), step()
            except Exception as exc:  # one broken variant fails its own row only
                errors[name] = describe_error(exc)
    except Exception as exc:  # peft or transformers missing, out of memory: every variant reports it
        errors = {name: describe_error(exc) for name in variants}
    times = time_variants(steps, errors, device, rep_ms=1000)
    steps.clear()
    return case_rows(case_fields(case), OP, variants, times, errors, speedups={"peft": "peft"})
