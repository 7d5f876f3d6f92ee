"""Benchmark of fastpeft.bottleneck_adapter against the unfused adapter users run today.

Variants, timed in the same run (bf16 on a GPU):
    torch           the unfused composition AdapterHub's module runs: LayerNorm (with ln_before), two Linear, the
                    activation, the scale and the residual add as separate kernels
    adapterhub      AdapterHub's own Adapter module with the same weights, where ``adapters`` is installed
    loop            (several adapters per batch) AdapterHub's BatchSplit: that composition once per adapter on its
                    samples, then concatenated
    fused:<name>    bottleneck_adapter forced to one backend, and fused:auto (one launch for all adapters)
    fused:cuda-noclusters  (16-bit prefill) the CUDA tile kernel planned as for a GPU without clusters: one
                    block per tile of rows (16 rows at d = 4096), so the GPU says what the clusters buy
Modes ``forward`` and ``forward+backward`` (gradients for x and every adapter parameter). Rows carry
``speedup_vs_torch`` (or ``speedup_vs_loop``) and, for the forward, ``gbps`` and ``bw_fraction``: the bytes of x,
y and the weights over the time, against a measured device copy (the roofline of a memory-bound op).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import backends_for, case_fields, case_rows, copy_gbps, describe_error, time_variants, with_backend
from common import case_from_fields as common_case_from_fields

from fastpeft.ops import bottleneck, bottleneck_plan
from fastpeft.ops.bottleneck import activation_fn, bottleneck_adapter, bottleneck_reference

OP = "bottleneck_adapter"
HAS_ADAPTERHUB = importlib.util.find_spec("adapters") is not None  # an optional baseline: left out without it

__all__ = ["OP", "backends_for", "case_fields", "case_from_fields", "cases", "describe", "run_case"]


@dataclass(frozen=True)
class Case:
    m: int  # tokens
    d: int
    bottleneck: int
    adapters: int  # 1, or adapters per batch (one per sample)
    dtype: torch.dtype
    mode: str = "forward"
    activation: str = "relu"
    ln_before: bool = False


def case_from_fields(fields: dict) -> Case:
    return common_case_from_fields(Case, fields)


def describe(case: Case) -> str:
    more = f" {case.adapters} adapters" if case.adapters > 1 else ""
    return f"{case.mode} M={case.m} d={case.d} m={case.bottleneck}{more} {str(case.dtype)[6:]}"


def cases(size: str) -> list[Case]:
    f32 = torch.float32
    if size == "smoke":
        return [Case(24, 48, 8, 1, f32), Case(24, 48, 8, 1, f32, "forward+backward", ln_before=True),
                Case(32, 48, 8, 4, f32)]  # fmt: skip
    if size == "quick":
        return [Case(2048, 768, 64, 1, f32), Case(2048, 768, 64, 1, f32, "forward+backward", ln_before=True),
                Case(2048, 768, 64, 4, f32)]  # fmt: skip
    bf16 = torch.bfloat16
    forward = [Case(m, 4096, 64, 1, bf16) for m in (1, 64, 1024, 8192, 65536)]
    forward += [Case(8192, d, 64, 1, bf16) for d in (768, 1024)] + [Case(8192, 4096, b, 1, bf16) for b in (16, 48, 256)]
    forward += [Case(8192, 1024, 64, 1, bf16, activation="gelu", ln_before=True)]
    train = [Case(8192, d, 64, 1, bf16, "forward+backward") for d in (768, 1024, 4096)]
    multi = [Case(8192, d, 64, 8, bf16) for d in (768, 1024, 4096)]
    return forward + train + multi


def operands(case: Case, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    lead = (case.adapters,) if case.adapters > 1 else ()

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*lead, *shape, device=device, generator=g) * scale + shift).to(case.dtype)

    p = dict(down_weight=rand(case.bottleneck, case.d, scale=case.d**-0.5), down_bias=rand(case.bottleneck),
             up_weight=rand(case.d, case.bottleneck, scale=case.bottleneck**-0.5), up_bias=rand(case.d))  # fmt: skip
    if case.ln_before:
        p.update(ln_weight=rand(case.d, shift=1.0), ln_bias=rand(case.d, scale=0.1))
    p["scaling"] = 2.0
    samples = max(case.adapters, 1) * (8 if case.adapters > 1 else 1)
    x = torch.randn(samples, case.m // samples, case.d, device=device, generator=g).to(case.dtype)
    ops = dict(x=x, params=p, activation=case.activation)
    if case.adapters > 1:
        ops["ids"] = torch.arange(samples, device=device) % case.adapters
    if case.mode == "forward+backward":
        for t in [x, *(v for v in p.values() if isinstance(v, torch.Tensor))]:
            t.requires_grad_(True)
    return ops


def _torch(ops: dict) -> torch.Tensor:
    return bottleneck_reference(ops["x"], **ops["params"], activation=ops["activation"])


def _loop(ops: dict) -> torch.Tensor:
    """AdapterHub's BatchSplit: each adapter's composition on its own samples, concatenated back in order."""
    x, ids, p = ops["x"], ops["ids"], ops["params"]
    out = torch.empty_like(x)
    act = activation_fn(ops["activation"])
    for a in range(p["down_weight"].shape[0]):
        rows = (ids == a).nonzero().squeeze(1)
        h = torch.nn.functional.linear(x[rows], p["down_weight"][a], p["down_bias"][a])
        out[rows] = x[rows] + torch.nn.functional.linear(act(h), p["up_weight"][a], p["up_bias"][a]) * p["scaling"]
    return out


def _adapterhub_module(case: Case, ops: dict) -> torch.nn.Module:
    from adapters import SeqBnConfig
    from adapters.methods.modeling import Adapter

    config = SeqBnConfig(reduction_factor=case.d / case.bottleneck, non_linearity=case.activation,
                         ln_before=case.ln_before, scaling=ops["params"]["scaling"])  # fmt: skip
    module = Adapter("bench", case.d, case.bottleneck, config).to(device=ops["x"].device, dtype=case.dtype)
    p = ops["params"]
    linear = next(m for m in module.adapter_down if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        linear.weight.copy_(p["down_weight"])
        linear.bias.copy_(p["down_bias"])
        module.adapter_up.weight.copy_(p["up_weight"])
        module.adapter_up.bias.copy_(p["up_bias"])
        if case.ln_before:
            module.adapter_norm_before.weight.copy_(p["ln_weight"])
            module.adapter_norm_before.bias.copy_(p["ln_bias"])
    return module


def _adapterhub(ops: dict) -> torch.Tensor:
    return ops["adapterhub"](ops["x"], ops["x"])[0]


def _fused(ops: dict) -> torch.Tensor:
    return bottleneck_adapter(ops["x"], **ops["params"], activation=ops["activation"], adapter_ids=ops.get("ids"))


def _without_clusters(ops: dict) -> torch.Tensor:
    saved = bottleneck.FORCED_CUDA_TILE_PLAN
    bottleneck.FORCED_CUDA_TILE_PLAN = ops["plan_without_clusters"]
    try:
        return _fused(ops)
    finally:
        bottleneck.FORCED_CUDA_TILE_PLAN = saved


FORMS = {"fused:cuda-noclusters": _without_clusters}  # fused variants that run one form of their backend


def _with_backward(fn: Callable[[dict], torch.Tensor]) -> Callable[[dict], torch.Tensor]:
    def step(ops: dict) -> torch.Tensor:
        y = fn(ops)
        leaves = [ops["x"], *(v for v in ops["params"].values() if isinstance(v, torch.Tensor))]
        torch.autograd.grad(y, leaves, ops["dy"])
        return y

    return step


def _variants(case: Case, backends: list[str]) -> dict[str, Callable[[dict], torch.Tensor]]:
    fns = {"torch": _torch} if case.adapters == 1 else {"loop": _loop}
    if HAS_ADAPTERHUB and case.adapters == 1 and case.mode == "forward":
        fns["adapterhub"] = _adapterhub
    fns["fused:auto"] = _fused
    fns.update({f"fused:{b}": _fused for b in backends})
    if "cuda" in backends and case.dtype != torch.float32 and case.m > bottleneck_plan.CUDA_DECODE_MAX_M:
        fns["fused:cuda-noclusters"] = _without_clusters
    if case.mode == "forward+backward":
        fns = {name: _with_backward(fn) for name, fn in fns.items()}
    return fns


def run_case(case: Case, device: torch.device, backends: list[str]) -> list[dict]:
    """Check the fused variants against the float64 formula, then time every variant; one row each."""
    variants = _variants(case, backends)
    errors: dict[str, str] = {}
    ops: dict = {}
    try:
        ops = operands(case, device)
        if "fused:cuda-noclusters" in variants:
            gpu = bottleneck_plan.gpu_of(device)._replace(max_cluster=1)
            plan = bottleneck_plan.cuda_tile_plan(case.d, case.bottleneck, gpu)
            if plan is None:
                del variants["fused:cuda-noclusters"]
            else:
                ops["plan_without_clusters"] = tuple(plan)
        with torch.no_grad():
            x64 = ops["x"].double()
            p64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in ops["params"].items()}
            if case.adapters == 1:
                expected = bottleneck_reference(x64, **p64, activation=case.activation)
            else:
                expected = _loop({"x": x64, "ids": ops["ids"], "params": p64, "activation": case.activation})
            ops["dy"] = torch.randn_like(ops["x"])
            if "adapterhub" in variants:
                ops["adapterhub"] = _adapterhub_module(case, ops)
            for name in variants:
                if name.startswith("fused"):
                    forward = FORMS.get(name, _fused)
                    got = with_backend(name, lambda forward=forward: forward(ops))().double()
                    err = ((got - expected).norm() / expected.norm()).item()
                    if not err <= (1e-4 if case.dtype == torch.float32 else 2e-2):
                        errors[name] = f"wrong result: rel. error {err:.2e} against the float64 formula"
    except Exception as exc:  # out of memory: every variant reports it
        ops, errors = {}, {name: describe_error(exc) for name in variants}
    steps = {name: (lambda fn=fn: fn(ops)) for name, fn in variants.items()} if ops else {}
    grad = torch.enable_grad() if case.mode == "forward+backward" else torch.no_grad()
    with grad:
        times = time_variants(steps, errors, device)
    ceiling = copy_gbps(device) if ops and case.mode == "forward" else None
    size = torch.finfo(case.dtype).bits // 8
    moved = (2 * case.m * case.d + 2 * case.adapters * case.d * case.bottleneck) * size

    def bandwidth(ms: float) -> dict:
        if case.mode != "forward":
            return {}
        gbps = moved / ms / 1e6
        return {"gbps": gbps, "bw_fraction": gbps / ceiling if ceiling else None}

    baseline = "torch" if case.adapters == 1 else "loop"
    speedups = {baseline: baseline} | ({"adapterhub": "adapterhub"} if "adapterhub" in variants else {})
    rows = case_rows(case_fields(case), OP, variants, times, errors, speedups=speedups, extra=bandwidth)
    ops.clear()
    return rows
