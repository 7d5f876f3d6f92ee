"""Small lora_linear cases on every GPU backend, forward and backward: run under compute-sanitizer.

    compute-sanitizer --tool memcheck python3 scripts/sanitize_lora.py
Exits non-zero when a result is not finite or strays from the float64 reference.
"""

from __future__ import annotations

import os
import sys

import torch

from fastpeft.backends import available_backends
from fastpeft.ops.lora import lora_linear, lora_linear_reference

CASES = [((1,), 37, 29, 5), ((8,), 256, 200, 16), ((9,), 100, 72, 8), ((70,), 64, 130, 4), ((2, 3), 128, 64, 64)]


def main() -> int:
    failures = 0
    for backend in available_backends("cuda"):
        os.environ["FASTPEFT_BACKEND"] = backend
        for lead, k, n, r in CASES:
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(*lead, k, device="cuda", dtype=dtype, requires_grad=True)
                w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
                a = (torch.randn(r, k, device="cuda", dtype=dtype) / k**0.5).requires_grad_()
                b = (torch.randn(n, r, device="cuda", dtype=dtype) / r**0.5).requires_grad_()
                bias = torch.randn(n, device="cuda", dtype=dtype)
                y = lora_linear(x, w, a, b, 0.5, bias)
                y.sum().backward()
                ref = lora_linear_reference(x.double(), w.double(), a.double(), b.double(), 0.5, bias.double())
                err = ((y.double() - ref).norm() / ref.norm()).item()
                ok = torch.isfinite(y).all().item() and err < (2e-2 if dtype == torch.bfloat16 else 1e-4)
                ok = ok and all(torch.isfinite(t.grad).all().item() for t in (x, a, b))
                failures += not ok
                print(f"{backend:<7} {lead!s:<7} K={k:<4} N={n:<4} r={r:<3} {dtype}: rel. error {err:.2e} "
                      f"{'ok' if ok else 'FAIL'}")  # fmt: skip
    torch.cuda.synchronize()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
