"""Small multi_lora_linear cases on one forced backend: the program compute-sanitizer runs.

    compute-sanitizer --tool memcheck python3 scripts/sanitize_multi_lora.py --backend triton

Mixed ranks, -1 tokens and out-of-pool ids with the host check off (the kernels must not read outside the pool
for them: memcheck says so). No CUDA kernel exists for this family yet: --backend cuda has nothing to check.
Environment and checks as in scripts/_sanitize.py.
"""

from __future__ import annotations

import sys

import _sanitize
from _sanitize import TOLERANCE, report

# (tokens, K, N, ranks of the pooled adapters, dtype)
CASES = {
    "triton": [
        (1, 256, 200, (16,), "bfloat16"),  # decode, one adapter
        (7, 96, 72, (4, 64, 8), "float32"),  # mixed ranks, odd sizes
        (33, 64, 130, (16, 16, 5), "float16"),  # more tokens than adapters, N past one column block
    ],
}


def run_case(m, k, n, ranks, dtype_name, *, backend, device="cuda") -> bool:
    """One case on ``backend``, ids in and out of the pool; True when it ran there, finite and near float64."""
    import torch

    from fastpeft.backends import record_backends
    from fastpeft.ops.multi_lora import AdapterPool, multi_lora_linear

    dtype = getattr(torch, dtype_name)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    adapters = [(rand(r, k, scale=k**-0.5), rand(n, r, scale=r**-0.5), 0.5 + i) for i, r in enumerate(ranks)]
    pool = AdapterPool.build(adapters)
    x, w, bias = rand(m, k), rand(n, k, scale=k**-0.5), rand(n)
    ids = torch.arange(m, device=device) % (len(ranks) + 3) - 2  # -2 .. len + 1: out-of-pool ids on purpose
    with record_backends() as calls:
        y = multi_lora_linear(x, w, pool, ids, bias, check_ids=False)
    ref = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    for t, adapter in enumerate(ids.tolist()):
        if 0 <= adapter < len(ranks):
            a, b, s = adapters[adapter]
            ref[t] += s * (x[t].double() @ a.double().t() @ b.double().t())
    err = ((y.double() - ref).norm() / ref.norm()).item()
    label = f"M={m:<4} K={k:<5} N={n:<4} ranks={ranks!s:<12} {dtype_name:<9}"
    return report(backend, calls, label, err, bool(torch.isfinite(y).all()) and err < TOLERANCE[dtype_name])


def main(argv: list[str] | None = None) -> int:
    return _sanitize.main(__doc__, CASES, run_case, argv)


if __name__ == "__main__":
    sys.exit(main())
