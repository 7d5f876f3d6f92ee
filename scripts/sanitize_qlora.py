"""Small qlora_linear cases on one forced backend, forward and backward: the program compute-sanitizer runs.

    compute-sanitizer --tool memcheck python3 scripts/sanitize_qlora.py --backend cuda

Decode (the GEMV, Triton's fused shrink), prefill (tensor-core tiles) and dequantize-once (M >= 512), odd K
and N (the per-element paths), element counts that end mid-byte and mid-block, NF4 and FP4, with and without
double quantization, LoRA and the backward's dx through the 4-bit weight. Environment and checks as in
scripts/_sanitize.py.
"""

from __future__ import annotations

import sys

import _sanitize
from _sanitize import TOLERANCE, report

# (M, K, N, rank (0: the 4-bit product alone), quant type, blocksize, double quantization, dtype)
_CASES = [
    (1, 256, 200, 16, "nf4", 64, True, "bfloat16"),  # decode, vector loads, the shrink in the same launch
    (9, 512, 70, 32, "fp4", 64, False, "float16"),  # 16-row GEMV, the shrink at its largest fused rank, idle blocks
    (2, 128, 40, 48, "nf4", 64, True, "bfloat16"),  # past the fused rank: the shrink a launch of its own
    (3, 96, 33, 4, "fp4", 32, False, "float32"),  # K not a multiple of 32: the scalar GEMV path
    (5, 33, 17, 0, "nf4", 64, True, "float16"),  # odd K: rows start mid-byte, the element count ends mid-byte
    (70, 160, 72, 8, "nf4", 128, True, "bfloat16"),  # prefill tiles, blocks straddling rows
    (40, 64, 130, 0, "fp4", 64, True, "float32"),  # prefill, fp32 (the CUDA thread-per-output kernel)
    (600, 96, 40, 8, "nf4", 64, True, "bfloat16"),  # dequantize once: 128-bit chunks only, then the LoRA GEMM
    (520, 33, 17, 0, "fp4", 32, False, "float32"),  # dequantize once: 17 whole chunks and a 17-element tail
]
CASES = {"triton": _CASES, "cuda": _CASES}


def run_case(m, k, n, r, quant_type, blocksize, double_quant, dtype_name, *, backend, device="cuda") -> bool:
    """One forward and backward on ``backend``; True when both ran there, finite and near float64."""
    import torch

    from fastpeft.backends import record_backends
    from fastpeft.ops.qlora import qlora_linear, qlora_linear_reference
    from fastpeft.ops.quant_4bit import quantize_4bit

    dtype = getattr(torch, dtype_name)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    packed, state = quantize_4bit(torch.randn(n, k, device=device) * k**-0.5, quant_type, blocksize, double_quant)
    x = rand(m, k).requires_grad_()
    lora = (rand(r, k, scale=k**-0.5), rand(n, r, scale=r**-0.5), 0.5) if r else (None, None, 1.0)
    bias = rand(n)
    with record_backends() as calls:
        y = qlora_linear(x, packed, state, *lora, bias)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x64 = x.detach().double().requires_grad_()
    lora64 = [None if t is None else t.double() for t in lora[:2]]
    ref = qlora_linear_reference(x64, packed, state, *lora64, lora[2], bias.double())
    (dx_ref,) = torch.autograd.grad(ref, x64, torch.ones_like(ref))
    err = max(((out.double() - want).norm() / want.norm()).item() for out, want in ((y, ref), (dx, dx_ref)))
    label = f"M={m:<3} K={k:<4} N={n:<4} r={r:<3} {quant_type}{'+DQ' if double_quant else ''} {dtype_name:<9}"
    finite = bool(torch.isfinite(y).all() and torch.isfinite(dx).all())
    return report(backend, calls, label, err, finite and err < TOLERANCE[dtype_name])


def main(argv: list[str] | None = None) -> int:
    return _sanitize.main(__doc__, CASES, run_case, argv)


if __name__ == "__main__":
    sys.exit(main())
