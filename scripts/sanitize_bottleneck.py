"""Small bottleneck_adapter cases on one forced backend, forward and backward: the program compute-sanitizer runs.

    compute-sanitizer --tool memcheck python3 scripts/sanitize_bottleneck.py --backend triton

Odd d and bottleneck sizes (masked chunks and padded bottleneck columns), LayerNorm folded or not, a per-channel
scaling, several adapters per batch with samples that use none. On CUDA: the rows kernel (decode, and d not a
multiple of 16) and the tile kernel (fp16/bf16 beyond 64 rows: a partial last tile, tiles straddling samples of
different adapters, and at d = 4096 a tile spread over a cluster of blocks). Environment and checks as in
scripts/_sanitize.py.
"""

from __future__ import annotations

import sys

import _sanitize
from _sanitize import TOLERANCE, report

# (samples, tokens per sample, d, bottleneck, adapters (0: one, unstacked), ln_before, activation, dtype)
_CASES = [
    (1, 1, 96, 16, 0, False, "relu", "bfloat16"),  # one token
    (2, 37, 200, 24, 0, True, "gelu", "float32"),  # odd sizes, LayerNorm folded
    (5, 9, 64, 8, 3, True, "silu", "float16"),  # three adapters, one sample without any
    (3, 70, 130, 64, 2, False, "gelu_new", "bfloat16"),  # row tiles past one block
    (3, 70, 128, 48, 2, True, "gelu_new", "bfloat16"),  # CUDA tiles straddling samples, LayerNorm folded
    (2, 50, 96, 16, 0, False, "relu", "float16"),  # CUDA tiles, a partial last one
    (2, 70, 4096, 64, 2, True, "gelu", "bfloat16"),  # CUDA on sm_90: 64 rows over clusters of 8 blocks
    (1, 130, 2048, 32, 0, False, "relu", "bfloat16"),  # clusters of 4 without a LayerNorm: no exit barrier
]
CASES = {"triton": _CASES, "cuda": _CASES}


def run_case(samples, tokens, d, m, adapters, ln, activation, dtype_name, *, backend, device="cuda") -> bool:
    """One forward and backward on ``backend``; True when the forward ran there, finite and near float64."""
    import torch

    from fastpeft.backends import record_backends
    from fastpeft.ops.bottleneck import bottleneck_adapter, bottleneck_reference

    dtype = getattr(torch, dtype_name)
    lead = (adapters,) if adapters else ()

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*lead, *shape, device=device) * scale + shift).to(dtype)

    p = dict(down_weight=rand(m, d, scale=d**-0.5), down_bias=rand(m, scale=0.1), up_weight=rand(d, m, scale=m**-0.5),
             up_bias=rand(d, scale=0.1), scaling=rand(d, shift=1.0))  # fmt: skip
    if ln:
        p.update(ln_weight=rand(d, scale=0.2, shift=1.0), ln_bias=rand(d, scale=0.1))
    x = torch.randn(samples, tokens, d, device=device).to(dtype).requires_grad_()
    ids = (torch.arange(samples, device=device) % (adapters + 1)) - 1 if adapters else None
    with record_backends() as calls:
        y = bottleneck_adapter(x, **p, activation=activation, adapter_ids=ids)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    ref = x.detach().double().clone()
    for b in range(samples):
        a = 0 if ids is None else int(ids[b])
        if a >= 0:
            one = {k: (v[a] if adapters else v).double() for k, v in p.items()}
            ref[b] = bottleneck_reference(x[b].detach().double(), **one, activation=activation)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    label = f"B={samples} T={tokens:<3} d={d:<4} m={m:<3} adapters={adapters} ln={ln!s:<5} {activation:<8} {dtype_name}"
    finite = bool(torch.isfinite(y).all() and torch.isfinite(dx).all())
    return report(backend, calls, label, err, finite and err < TOLERANCE[dtype_name])


def main(argv: list[str] | None = None) -> int:
    return _sanitize.main(__doc__, CASES, run_case, argv)


if __name__ == "__main__":
    sys.exit(main())
