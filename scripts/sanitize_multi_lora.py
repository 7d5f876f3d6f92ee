"""Small multi_lora_linear cases on one forced backend: the program compute-sanitizer runs.

    compute-sanitizer --tool memcheck python3 scripts/sanitize_multi_lora.py --backend triton

Mixed ranks, -1 tokens and out-of-pool ids with the host check off (the kernels must not read outside the pool
for them: memcheck says so), per-token (decode) and tile (prefill, > 64 tokens) kernels, packed slices of
different widths; each case again with a batch description (decode: the grouped kernels), and at decode sizes
on a 4-bit base as well (NF4, nested absmax: the fused 4-bit kernel); a prefill forced onto the persistent TMA
kernel (off by default), its row blocks holding many adapters. Environment and checks as in
scripts/_sanitize.py.
"""

from __future__ import annotations

import sys

import _sanitize
from _sanitize import TOLERANCE, report

# (tokens, K, output slice widths, ranks of the pooled adapters, dtype[, "persistent"]); every adapter has each
# slice, slice s of adapter i with rank max(1, ranks[i] - s).
_DECODE = [
    (1, 256, (200,), (16,), "bfloat16"),  # decode, one adapter
    (7, 96, (72,), (4, 64, 8), "float32"),  # mixed ranks, odd sizes
    (33, 64, (130,), (16, 16, 5), "float16"),  # more tokens than adapters, N past one column block
    (5, 64, (64, 16, 16), (8, 4), "bfloat16"),  # packed q/k/v-like slices
]
_PREFILL = [
    (150, 80, (96,), (4, 16, 64), "bfloat16"),  # tile kernels: runs of ids crossing tiles, terms before cuBLAS
    (70, 64, (40, 24), (8, 3), "float32"),  # tile kernels, packed
]
_PERSISTENT = [(150, 80, (96,), (4, 16, 32), "bfloat16", "persistent")]  # the persistent kernel forced on
CASES = {"triton": _DECODE + _PREFILL + _PERSISTENT, "cuda": _DECODE + _PREFILL[:1]}


def run_case(m, k, widths, ranks, dtype_name, mode="", *, backend, device="cuda") -> bool:
    """One case on ``backend``, ids in and out of the pool; True when it ran there, finite and near float64.
    ``mode`` "persistent": the prefill on the multi-adapter persistent kernel."""
    import contextlib
    from unittest import mock

    import torch

    from fastpeft.backends import record_backends
    from fastpeft.ops.adapter_pool import AdapterPool
    from fastpeft.ops.batch_description import describe_batch
    from fastpeft.ops.multi_lora import multi_lora_linear
    from fastpeft.ops.multi_lora_4bit import multi_lora_linear_4bit
    from fastpeft.ops.qlora import Weight4bit
    from fastpeft.ops.quant_4bit import dequantize_4bit, quantize_4bit

    dtype = getattr(torch, dtype_name)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    def pair(r, width, scaling):
        return rand(r, k, scale=k**-0.5), rand(width, r, scale=r**-0.5), scaling

    adapters = [[pair(max(1, r - s), w, 0.5 + i + s) for s, w in enumerate(widths)] for i, r in enumerate(ranks)]
    pool = AdapterPool.build_packed(adapters)
    n = sum(widths)
    x, w, bias = rand(m, k), rand(n, k, scale=k**-0.5), rand(n)
    # -2 .. len + 1 in runs of 3 tokens: out-of-pool ids on purpose, and runs for the tile kernels
    ids = (torch.arange(m, device=device) // 3) % (len(ranks) + 3) - 2
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
    forced = contextlib.nullcontext()
    if mode == "persistent":
        from fastpeft.triton_kernels import multi_lora_persistent

        forced = mock.patch.object(multi_lora_persistent, "MULTI_PERSISTENT_PREFILL_MIN_M", 0)
    with forced, record_backends() as calls:
        y = multi_lora_linear(x, w, pool, ids, bias, check_ids=False)
        description = describe_batch(ids, len(ranks), check=False)
        grouped = multi_lora_linear(x, w, pool, description, bias)
        outs = [(y, w), (grouped, w)]
        if m <= 64:
            w4 = Weight4bit.from_state(packed, state)
            outs.append((multi_lora_linear_4bit(x, w4, bias, pool, description), dequantize_4bit(packed, state)))
    adapters_only = torch.zeros(m, n, dtype=torch.float64, device=device)
    bounds = [0, *torch.tensor(widths).cumsum(0).tolist()]
    for t, adapter in enumerate(ids.tolist()):
        for s, (a, b, scaling) in enumerate(adapters[adapter] if 0 <= adapter < len(ranks) else []):
            term = scaling * (x[t].double() @ a.double().t() @ b.double().t())
            adapters_only[t, bounds[s] : bounds[s + 1]] += term
    err = 0.0
    for out, weight in outs:
        ref = torch.nn.functional.linear(x.double(), weight.double(), bias.double()) + adapters_only
        err = max(err, ((out.double() - ref).norm() / ref.norm()).item())
    label = f"M={m:<4} K={k:<5} N={widths!s:<12} ranks={ranks!s:<12} {dtype_name:<9} {mode}".rstrip()
    finite = all(bool(torch.isfinite(out).all()) for out, _ in outs)
    return report(backend, calls, label, err, finite and err < TOLERANCE[dtype_name])


def main(argv: list[str] | None = None) -> int:
    return _sanitize.main(__doc__, CASES, run_case, argv)


if __name__ == "__main__":
    sys.exit(main())
