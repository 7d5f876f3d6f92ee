"""Small dora_linear cases, forward and backward, on one forced backend: the program compute-sanitizer runs.

    compute-sanitizer --tool memcheck python3 scripts/sanitize_dora.py --backend triton

The Triton cases reach the GEMM epilogue's magnitude scale and pre-scale store on every tile kind; the CUDA
cases its kernels under the scale applied after them. Environment and checks as in scripts/_sanitize.py.
"""

from __future__ import annotations

import sys

import _sanitize
from _sanitize import TOLERANCE, report

# (leading shape, K, N, r, dtype)
CASES = {
    "cuda": [((1,), 256, 200, 16, "bfloat16"), ((2, 35), 64, 130, 4, "float32")],
    "triton": [
        ((1,), 256, 200, 16, "bfloat16"),  # fused decode launch with the epilogue scale and z
        ((5,), 96, 72, 40, "float32"),  # shrink + decode tiles
        ((2, 35), 64, 130, 4, "bfloat16"),  # shrink + epilogue after cuBLAS; backward: dz and d magnitude pass
    ],
}


def run_case(lead, k, n, r, dtype_name, *, backend, device="cuda") -> bool:
    """One case forward and backward on ``backend``; True when it ran there, finite and near float64."""
    import torch

    from fastpeft.backends import record_backends
    from fastpeft.ops.dora import dora_linear, dora_linear_reference

    dtype = getattr(torch, dtype_name)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=device) * scale + shift).to(dtype).requires_grad_()

    x, w, bias = rand(*lead, k), rand(n, k, scale=k**-0.5).detach(), rand(n).detach()
    a, b, m = rand(r, k, scale=k**-0.5), rand(n, r, scale=r**-0.5), rand(n, scale=0.2, shift=1.0)
    with record_backends() as calls:
        y = dora_linear(x, w, a, b, m, 0.5, bias)
        y.float().square().sum().backward()
    ref = dora_linear_reference(x.double(), w.double(), a.double(), b.double(), m.double(), 0.5, bias.double())
    err = ((y.double() - ref).norm() / ref.norm()).item()
    finite = all(torch.isfinite(t).all().item() for t in (y, x.grad, a.grad, b.grad, m.grad))
    label = f"x={lead!s:<8} K={k:<5} N={n:<4} r={r:<3} {dtype_name:<9}"
    return report(backend, calls, label, err, finite and err < TOLERANCE[dtype_name])


def main(argv: list[str] | None = None) -> int:
    return _sanitize.main(__doc__, CASES, run_case, argv)


if __name__ == "__main__":
    sys.exit(main())
