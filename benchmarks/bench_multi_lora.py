"""Benchmark of fastpeft.multi_lora_linear (a LoRA adapter per token) against what users run today.

Variants, timed in the same run on the same operands (bf16 on a GPU):
    base            the base GEMM alone (torch.nn.functional.linear): the floor
    peft            PEFT's mixed-batch path: a lora.Linear holding every adapter, called with adapter_names
    gather_bmm      the torch path without PEFT: each token's A and B gathered from stacked adapters, two bmm
    fused:<name>    multi_lora_linear forced to one backend, and fused:auto, given the batch's description (built
                    once per step for every layer of a model, as adapter_batch and the PEFT path build it: not
                    timed); decode (M <= 64) runs the grouped kernels
    fused:auto-ids  fused:auto given plain per-sequence ids instead (decode: the per-token kernels)
    fused:triton-base-first  prefill on Triton with cuBLAS first and the expand reading and rewriting y, instead
                    of the terms first and cuBLAS adding x W^T into them (fastpeft.ops.multi_lora.TERMS_BEFORE_BASE)
    fused:triton-persistent  prefill on the multi-adapter persistent TMA kernel, x A_i^T in its own pass
                    (triton_kernels/multi_lora_persistent.py, off by default until a GPU run ranks it)
    shrink+expand   the adapter launches alone (no base GEMM) as fused:auto runs them
    pool32          (decode from a pool of more than 32 adapters) fused:auto on the same tokens with a pool of
                    32 of those adapters (token t uses adapter t % 32): what the larger pool costs beyond its bytes
    copy            a device-to-device copy of 256 MiB: the bandwidth the adapters' reads are compared with

A case is decode (``segments = 0``: token t uses adapter t % distinct, one token per sequence) or prefill
(``segments`` sequences of m / segments tokens, sequence j with adapter j % distinct). Rows carry
``ratio_vs_base``, ``speedup_vs_peft`` and, for shrink+expand, ``adapter_gbps`` (the bytes of the adapters
the batch uses, each read once, per second) and ``bw_fraction`` (that over the copy's GB/s); with pool32,
fused:auto's row carries ``extra_over_bytes``: its time beyond pool32's over the time the extra adapters' bytes
take at the copy's GB/s (1.0: the larger pool costs exactly its bytes). Every fused variant and gather_bmm are
checked against PEFT's output first; failures become rows with ``error``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch
from common import backends_for, case_fields, case_rows, copy_gbps, describe_error, time_variants, with_backend
from common import case_from_fields as common_case_from_fields

from fastpeft.ops.adapter_pool import AdapterPool
from fastpeft.ops.batch_description import describe_batch
from fastpeft.ops.multi_lora import SGMV_MAX_M, multi_lora_expand, multi_lora_linear, multi_lora_sgmv, multi_lora_shrink

OP = "multi_lora_linear"
ALPHA = 32.0

__all__ = ["OP", "backends_for", "case_fields", "case_from_fields", "cases", "describe", "run_case"]


@dataclass(frozen=True)
class Case:
    m: int  # tokens
    k: int
    n: int
    r: int
    adapters: int  # adapters in the pool; the batch uses min(adapters, sequences) of them
    segments: int  # 0: decode, one token per sequence; else prefill sequences of m / segments tokens
    dtype: torch.dtype
    mode: str = "forward"


def case_from_fields(fields: dict) -> Case:
    return common_case_from_fields(Case, fields)


def describe(case: Case) -> str:
    shape = "decode" if not case.segments else f"prefill {case.segments} segments"
    dtype = str(case.dtype).removeprefix("torch.")
    return f"{shape} M={case.m} {case.k}->{case.n} r={case.r} adapters={case.adapters} {dtype}"


def cases(size: str) -> list[Case]:
    if size == "smoke":
        return [Case(8, 64, 48, 8, 4, 0, torch.float32), Case(40, 64, 48, 8, 4, 4, torch.float32)]
    if size == "quick":
        return [Case(64, 1024, 1024, 16, 8, 0, torch.float32), Case(512, 1024, 1024, 16, 8, 4, torch.float32)]
    bf16 = torch.bfloat16
    decode = [Case(m, 4096, 4096, 16, min(m, 32), 0, bf16) for m in (1, 16, 64, 256)]
    decode += [Case(m, 4096, 4096, 16, a, 0, bf16) for m, a in itertools.product((64, 256), (1, 8, 128)) if a <= m]
    decode += [Case(64, 4096, 4096, r, 32, 0, bf16) for r in (8, 64)] + [Case(64, 4096, 4096, 16, 128, 0, bf16)]
    decode += [Case(64, 4096, 14336, 16, 32, 0, bf16)]
    prefill = [Case(4096, 4096, n, 16, 8, 8, bf16) for n in (4096, 14336)] + [Case(4096, 4096, 4096, 64, 8, 8, bf16)]
    return decode + prefill


def _names(case: Case) -> list[str]:
    """One adapter name per sequence."""
    sequences = case.m if not case.segments else case.segments
    return [f"a{j % case.adapters}" for j in range(sequences)]


def _peft_layer(case: Case, weight: torch.Tensor, adapters: list[tuple]) -> torch.nn.Module:
    import peft

    holder = torch.nn.ModuleDict({"proj": torch.nn.Linear(case.k, case.n, bias=False, device=weight.device)})
    config = peft.LoraConfig(r=case.r, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False)
    model = peft.get_peft_model(holder, config, adapter_name="a0")
    for i in range(1, case.adapters):
        model.add_adapter(f"a{i}", config)
    layer = model.base_model.model["proj"].to(case.dtype).eval()
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        for i, (lora_a, lora_b, _) in enumerate(adapters):
            layer.lora_A[f"a{i}"].weight.copy_(lora_a)
            layer.lora_B[f"a{i}"].weight.copy_(lora_b)
    return layer


def operands(case: Case, device: torch.device) -> dict:
    def rand(*shape, scale):
        return (torch.randn(*shape, device=device) * scale).to(case.dtype)

    weight = rand(case.n, case.k, scale=case.k**-0.5)
    adapters = [(rand(case.r, case.k, scale=case.k**-0.5), rand(case.n, case.r, scale=case.r**-0.5), ALPHA / case.r)
                for _ in range(case.adapters)]  # fmt: skip
    names = _names(case)
    per_sequence = torch.tensor([int(name[1:]) for name in names], device=device)
    seq_len = 1 if not case.segments else case.m // case.segments
    x = rand(len(names), seq_len, case.k, scale=1.0)
    return dict(
        x=x, weight=weight, names=names, ids=per_sequence, pool=AdapterPool.build(adapters),
        peft=_peft_layer(case, weight, adapters), a_stack=torch.stack([a for a, _, _ in adapters]),
        b_stack=torch.stack([b for _, b, _ in adapters]), token_ids=per_sequence.repeat_interleave(seq_len),
        scaling=ALPHA / case.r, batch=describe_batch(per_sequence.repeat_interleave(seq_len), case.adapters),
        **(_fewer(adapters, per_sequence) if _compares_pools(case) else {}),
    )  # fmt: skip


FEWER = 32  # the smaller pool a decode case with more adapters is compared with


def _compares_pools(case: Case) -> bool:
    return not case.segments and case.adapters > FEWER and case.m <= SGMV_MAX_M


def _fewer(adapters: list[tuple], per_sequence: torch.Tensor) -> dict:
    """The operands of pool32: a pool of the first 32 adapters, token t using adapter t % 32."""
    return dict(pool_fewer=AdapterPool.build(adapters[:FEWER]), batch_fewer=describe_batch(per_sequence % FEWER, FEWER))


def _gather_bmm(ops: dict) -> torch.Tensor:
    rows = ops["x"].reshape(-1, ops["x"].shape[-1])
    v = torch.bmm(rows[:, None, :], ops["a_stack"][ops["token_ids"]].transpose(1, 2))  # [M, 1, r]
    delta = torch.bmm(v, ops["b_stack"][ops["token_ids"]].transpose(1, 2))[:, 0]  # [M, n]
    y = torch.nn.functional.linear(rows, ops["weight"]) + ops["scaling"] * delta
    return y.reshape(*ops["x"].shape[:-1], -1)


def _shrink_expand(ops: dict) -> torch.Tensor:
    rows = ops["x"].reshape(-1, ops["x"].shape[-1])
    ids, pool = ops["token_ids"], ops["pool"]
    if rows.shape[0] <= SGMV_MAX_M:
        return multi_lora_sgmv(ops["base"], rows, pool, ops["batch"])
    return multi_lora_expand(ops["base"], multi_lora_shrink(rows, pool, ids), pool, ids)


def _variants(backends: list[str], prefill: bool) -> dict[str, Callable[[dict], torch.Tensor]]:
    def fused(ops):
        return multi_lora_linear(ops["x"], ops["weight"], ops["pool"], ops["batch"])

    fns = {
        "base": lambda ops: torch.nn.functional.linear(ops["x"], ops["weight"]),
        "peft": lambda ops: ops["peft"](ops["x"], adapter_names=ops["names"]),
        "gather_bmm": _gather_bmm,
        "fused:auto": fused,
        "fused:auto-ids": lambda ops: multi_lora_linear(
            ops["x"], ops["weight"], ops["pool"], ops["ids"], check_ids=False
        ),
    }
    fns.update({f"fused:{b}": fused for b in backends})
    if "triton" in backends and prefill:  # decode has one form
        fns["fused:triton-base-first"] = _base_first(fused)
        fns["fused:triton-persistent"] = _on_persistent(fused)
    fns["shrink+expand"] = _shrink_expand
    return fns


def _base_first(fn: Callable) -> Callable:
    """``fn`` with the prefill's base GEMM before the adapters' expand (TERMS_BEFORE_BASE off)."""
    from fastpeft.ops import multi_lora as ops_module

    def run(ops):
        with mock.patch.object(ops_module, "TERMS_BEFORE_BASE", False):
            return fn(ops)

    return run


def _on_persistent(fn: Callable) -> Callable:
    """``fn`` with the prefill on the persistent kernel where it takes the layer (off by default)."""
    from fastpeft.triton_kernels import multi_lora_persistent

    def run(ops):
        with mock.patch.object(multi_lora_persistent, "MULTI_PERSISTENT_PREFILL_MIN_M", SGMV_MAX_M + 1):
            return fn(ops)

    return run


def _fewer_adapters(ops: dict) -> torch.Tensor:
    return multi_lora_linear(ops["x"], ops["weight"], ops["pool_fewer"], ops["batch_fewer"])


def run_case(case: Case, device: torch.device, backends: list[str]) -> list[dict]:
    """Check fused variants and gather_bmm against PEFT's mixed batch, then time every variant; one row each."""
    variants = _variants(backends, prefill=bool(case.segments))
    if _compares_pools(case):
        variants[f"pool{FEWER}"] = _fewer_adapters
    errors: dict[str, str] = {}
    ops: dict = {}
    try:
        with torch.no_grad():
            ops = operands(case, device)
            ops["base"] = torch.nn.functional.linear(ops["x"].reshape(-1, case.k), ops["weight"])
            expected = variants["peft"](ops).double()
            for name, fn in variants.items():
                if name.startswith("fused") or name == "gather_bmm":
                    got = with_backend(name, lambda fn=fn: fn(ops))().double()
                    err = ((got - expected).norm() / expected.norm()).item()
                    if not err <= (1e-4 if case.dtype == torch.float32 else 3e-2):
                        errors[name] = f"wrong result: rel. error {err:.2e} against PEFT's mixed batch"
    except Exception as exc:  # peft missing, out of memory: every variant reports it
        ops, errors = {}, {name: describe_error(exc) for name in variants}
    steps = {name: (lambda fn=fn: fn(ops)) for name, fn in variants.items()} if ops else {}
    with torch.no_grad():
        times = time_variants(steps, errors, device)
        ceiling = copy_gbps(device) if ops else None
    used = len(set(_names(case)))
    per_adapter = case.r * (case.k + case.n) * (torch.finfo(case.dtype).bits // 8)
    adapter_bytes = used * per_adapter

    def bandwidth(ms: float) -> dict:
        gbps = adapter_bytes / ms / 1e6
        return {"adapter_gbps": gbps, "bw_fraction": gbps / ceiling if ceiling else None}

    rows = case_rows(case_fields(case), OP, variants, times, errors, ratios={"base": "base"},
                     speedups={"peft": "peft"})  # fmt: skip
    fewer = times.get(f"pool{FEWER}")
    for row in rows:
        if row["variant"] == "shrink+expand" and row["ms"] is not None:
            row.update(bandwidth(row["ms"]))
        extra_bytes = (used - min(used, FEWER)) * per_adapter
        if row["variant"] == "fused:auto" and row["ms"] is not None and fewer is not None and ceiling and extra_bytes:
            row["extra_over_bytes"] = (row["ms"] - fewer) / (extra_bytes / ceiling / 1e6)
    ops.clear()  # free the operands before the next case
    return rows
