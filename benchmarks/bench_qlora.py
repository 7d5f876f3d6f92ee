"""Benchmark of fastpeft's 4-bit ops (matmul_4bit, qlora_linear) against what QLoRA users run today.

Cases of mode ``matmul`` (the 4-bit product alone, NF4 with double quantization unless the case says otherwise):
    bf16            cuBLAS on the dense bf16 weight (torch.nn.functional.linear): the baseline to beat
    dequant_matmul  dequantize the whole weight, then cuBLAS: what a 4-bit layer costs without a fused kernel
    bnb             bitsandbytes.matmul_4bit (its GEMV for one row, dequantize + GEMM otherwise), if installed
                    (without bitsandbytes, this variant and peft below are left out)
    fused:<name>    fastpeft.matmul_4bit forced to one backend, and fused:auto
Cases of mode ``qlora`` (a 4-bit base with a rank-r adapter):
    matmul_4bit     fastpeft.matmul_4bit alone (fused:auto): the floor the adapter is measured against
    peft            PEFT's LoRA layer on a bitsandbytes Linear4bit (needs bitsandbytes)
    fused:<name>    fastpeft.qlora_linear forced to one backend, and fused:auto
Cases of mode ``qlora_train``: the same layer's forward and backward (dx, dA, dB from one dy), PEFT's and fused.

Rows carry ``ratio_vs_bf16`` / ``speedup_vs_bf16`` / ``speedup_vs_bnb`` (matmul), ``ratio_vs_matmul_4bit`` /
``speedup_vs_peft`` (qlora) or ``speedup_vs_peft`` (qlora_train), and ``weight_gbps``: the 4-bit weight's bytes
(packed plus absmax) per second.
Every fused variant is checked against the dequantize-then-matmul reference first; failures become rows with
``error``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import backends_for, case_fields, case_rows, describe_error, time_variants, with_backend
from common import case_from_fields as common_case_from_fields

from fastpeft.ops.qlora import Weight4bit, matmul_4bit, qlora_linear
from fastpeft.ops.quant_4bit import dequantize_4bit, quantize_4bit

OP = "qlora"
ALPHA = 32.0
# bitsandbytes is an optional baseline: without it the bnb and peft variants are left out, not failed.
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None

__all__ = ["OP", "backends_for", "case_fields", "case_from_fields", "cases", "describe", "run_case"]


@dataclass(frozen=True)
class Case:
    m: int
    k: int  # in_features
    n: int  # out_features
    r: int  # 0 in matmul mode
    dtype: torch.dtype
    mode: str = "matmul"  # "matmul", "qlora" or "qlora_train"
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64


def case_from_fields(fields: dict) -> Case:
    return common_case_from_fields(Case, fields)


def describe(case: Case) -> str:
    dq = "+DQ" if case.double_quant else ""
    lora = f" r={case.r}" if case.mode != "matmul" else ""
    return f"{case.mode} {case.quant_type}{dq} M={case.m} {case.k}->{case.n}{lora} {str(case.dtype)[6:]}"


FEATURES = ((4096, 4096), (4096, 14336), (14336, 4096))


def cases(size: str) -> list[Case]:
    if size in ("smoke", "quick"):
        fp32 = torch.float32
        (m, k, r) = (24, 64, 8) if size == "smoke" else (256, 1024, 16)
        return [Case(1, k, k, 0, fp32), Case(m, k, k, 0, fp32), Case(1, k, k, r, fp32, "qlora"),
                Case(m, k, k, r, fp32, "qlora_train")]  # fmt: skip
    bf16 = torch.bfloat16
    matmul = [Case(m, k, n, 0, bf16) for m in (1, 4, 16, 64, 256, 4096) for k, n in FEATURES]
    matmul += [Case(1, 4096, 14336, 0, bf16, blocksize=b) for b in (128, 256)]
    matmul += [Case(1, 4096, 14336, 0, bf16, quant_type="fp4", double_quant=False)]
    qlora = [Case(m, k, n, 16, bf16, "qlora") for m in (1, 16, 4096) for k, n in FEATURES[:2]]
    train = [Case(4096, k, n, 16, bf16, "qlora_train") for k, n in FEATURES[:2]]
    return matmul + qlora + train


def _peft_layer(case: Case, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.nn.Module:
    import bitsandbytes as bnb
    import peft

    base = bnb.nn.Linear4bit(case.k, case.n, bias=False, compute_dtype=case.dtype, quant_type=case.quant_type,
                             compress_statistics=case.double_quant)  # fmt: skip
    base.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type=case.quant_type,
                                    blocksize=case.blocksize, compress_statistics=case.double_quant)  # fmt: skip
    holder = torch.nn.ModuleDict({"proj": base.to(weight.device)})
    config = peft.LoraConfig(r=case.r, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False)
    layer = peft.get_peft_model(holder, config).base_model.model["proj"].eval()
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    return layer


def operands(case: Case, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(case.n, case.k, device=device, generator=g) * case.k**-0.5).to(case.dtype)
    packed, state = quantize_4bit(weight, case.quant_type, case.blocksize, case.double_quant)
    ops = dict(x=torch.randn(case.m, case.k, device=device, generator=g).to(case.dtype), weight=weight,
               packed=packed, state=state, w4=Weight4bit.from_state(packed, state))  # fmt: skip
    if case.mode != "matmul":
        ops["lora_a"] = (torch.randn(case.r, case.k, device=device, generator=g) * case.k**-0.5).to(case.dtype)
        ops["lora_b"] = (torch.randn(case.n, case.r, device=device, generator=g) * case.r**-0.5).to(case.dtype)
    if case.mode == "qlora_train":
        ops["dy"] = torch.randn(case.m, case.n, device=device, generator=g).to(case.dtype)
    return ops


def _train_step(ops: dict, forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple:
    """Forward and backward of one layer: gradients of x, A and B (fresh leaves; the weights' values are ops')."""
    x = ops["x"].detach().requires_grad_()
    a, b = ops["lora_a"].detach().requires_grad_(), ops["lora_b"].detach().requires_grad_()
    with torch.enable_grad():
        return torch.autograd.grad(forward(x, a, b), (x, a, b), ops["dy"])


def _peft_train_step(ops: dict) -> tuple:
    layer = ops["peft"]
    x = ops["x"].detach().requires_grad_()
    with torch.enable_grad():
        params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        return torch.autograd.grad(layer(x), (x, *params), ops["dy"])


def _bnb_matmul(ops: dict) -> torch.Tensor:
    import bitsandbytes as bnb

    if "bnb_state" not in ops:
        ops["bnb_state"] = ops["state"].to_bnb()  # the same bytes and state, as bitsandbytes' own object
    return bnb.matmul_4bit(ops["x"], ops["packed"].t(), quant_state=ops["bnb_state"])


def _variants(case: Case, backends: list[str]) -> dict[str, Callable[[dict], torch.Tensor]]:
    if case.mode == "matmul":

        def fused(ops):
            return matmul_4bit(ops["x"], ops["w4"], None)

        fns = {
            "bf16": lambda ops: torch.nn.functional.linear(ops["x"], ops["weight"]),
            "dequant_matmul": lambda ops: torch.nn.functional.linear(
                ops["x"], dequantize_4bit(ops["packed"], ops["state"], ops["x"].dtype)
            ),
        }
        if HAS_BNB:
            fns["bnb"] = _bnb_matmul
    elif case.mode == "qlora":

        def fused(ops):
            return qlora_linear(ops["x"], ops["w4"], None, ops["lora_a"], ops["lora_b"], ALPHA / case.r)

        fns = {
            "matmul_4bit": lambda ops: matmul_4bit(ops["x"], ops["w4"], None),
        }
        if HAS_BNB:
            fns["peft"] = lambda ops: ops["peft"](ops["x"])
    else:

        def fused(ops):
            return _train_step(ops, lambda x, a, b: qlora_linear(x, ops["w4"], None, a, b, ALPHA / case.r))

        fns = {"peft": _peft_train_step} if HAS_BNB else {}
    fns["fused:auto"] = fused
    fns.update({f"fused:{b}": fused for b in backends})
    return fns


def _reference(case: Case, ops: dict) -> torch.Tensor:
    w = dequantize_4bit(ops["packed"], ops["state"], torch.float64)
    y = ops["x"].double() @ w.t()
    if case.mode != "matmul":
        y += ALPHA / case.r * (ops["x"].double() @ ops["lora_a"].double().t()) @ ops["lora_b"].double().t()
    return y


def _check(case: Case, ops: dict, name: str, fn: Callable[[dict], object], expected: torch.Tensor) -> str | None:
    """Why variant ``name`` is wrong, or None: the forward against the float64 reference (training: dx too)."""
    bound = 1e-4 if case.dtype == torch.float32 else 2e-2
    if case.mode == "qlora_train":
        dx = with_backend(name, lambda: fn(ops))()[0].double()
        w = dequantize_4bit(ops["packed"], ops["state"], torch.float64)
        a, b = ops["lora_a"].double(), ops["lora_b"].double()
        want = ops["dy"].double() @ (w + ALPHA / case.r * b @ a)
        err = ((dx - want).norm() / want.norm()).item()
        return None if err <= bound else f"wrong dx: rel. error {err:.2e} against the dequantized reference"
    got = with_backend(name, lambda: fn(ops))().double()
    err = ((got - expected).norm() / expected.norm()).item()
    return None if err <= bound else f"wrong result: rel. error {err:.2e} against the dequantized reference"


def run_case(case: Case, device: torch.device, backends: list[str]) -> list[dict]:
    """Check the fused variants against the float64 reference, then time every variant; one row each."""
    variants = _variants(case, backends)
    errors: dict[str, str] = {}
    ops: dict = {}
    try:
        with torch.no_grad():
            ops = operands(case, device)
            expected = _reference(case, ops)
            for name, fn in variants.items():
                problem = _check(case, ops, name, fn, expected) if name.startswith("fused") else None
                if problem:
                    errors[name] = problem
    except Exception as exc:  # out of memory: every variant reports it
        ops, errors = {}, {name: describe_error(exc) for name in variants}
    if case.mode != "matmul" and ops and HAS_BNB:
        try:
            ops["peft"] = _peft_layer(case, ops["weight"], ops["lora_a"], ops["lora_b"])
        except Exception as exc:  # bitsandbytes or peft missing
            errors["peft"] = describe_error(exc)
    steps = {name: (lambda fn=fn: fn(ops)) for name, fn in variants.items()} if ops else {}
    with torch.no_grad():
        times = time_variants(steps, errors, device)
    weight_bytes = (
        0 if not ops else ops["packed"].numel() + ops["state"].absmax.numel() * ops["state"].absmax.element_size()
    )

    def bandwidth(ms: float) -> dict:
        return {"weight_gbps": weight_bytes / ms / 1e6}

    if case.mode == "matmul":
        ratios, speedups = {"bf16": "bf16"}, {"bf16": "bf16", "bnb": "bnb"}
    elif case.mode == "qlora":
        ratios, speedups = {"matmul_4bit": "matmul_4bit"}, {"peft": "peft"}
    else:
        ratios, speedups = {}, {"peft": "peft"}
    rows = case_rows(case_fields(case), OP, variants, times, errors, ratios=ratios, speedups=speedups,
                     extra=bandwidth)  # fmt: skip
    ops.clear()
    return rows
