"""Small lora_linear cases, forward and backward, on one forced backend: the program compute-sanitizer runs.

    compute-sanitizer --tool memcheck  python3 scripts/sanitize_lora.py --backend cuda
    compute-sanitizer --tool racecheck python3 scripts/sanitize_lora.py --backend triton

The cases reach every kernel of the backend (see CASES); the environment is set as scripts/_sanitize.py says.
Through fastpeft.backends.record_backends it checks that every call really ran on that backend, and exits
non-zero when one did not or a result is not finite or strays from the float64 reference.
"""

from __future__ import annotations

import sys

import _sanitize
from _sanitize import TOLERANCE, report

# Kernel paths each case reaches: (leading shape, K, N, r, dtype, dropout on A's input with lora_bias, and
# optionally the mode: "philox" draws the dropout mask inside the Triton kernels; "persistent" forces the Triton
# persistent TMA kernel on (off by default) and adds an inference call, which computes x A^T in its own pass).
CASES = {
    "cuda": [
        ((1,), 256, 200, 16, "bfloat16", 0.0),  # shrink kernel + GEMV, 16-byte loads
        ((3,), 37, 29, 5, "float32", 0.0),  # shrink kernel + GEMV, scalar loads (odd K)
        ((8,), 128, 72, 64, "float16", 0.0),  # GEMV at its row limit, rank 64
        ((9,), 100, 72, 8, "bfloat16", 0.0),  # cuBLAS base + tiled expand kernel, shrink kernel
        ((2, 35), 64, 130, 4, "float32", 0.0),  # tiled shrink kernel (M > 64) + tiled expand
        ((4, 20), 96, 50, 8, "bfloat16", 0.1),  # dropout: shrink of the dropped x, expand; masked backward
    ],
    "triton": [
        ((1,), 256, 200, 16, "bfloat16", 0.0),  # one-launch decode, stream-K: 7 tiles, each K in two shares
        ((1,), 256, 2500, 8, "float16", 0.0),  # stream-K, 79 tiles on 132 programs: shares straddle tiles
        ((2, 32), 512, 300, 16, "bfloat16", 0.0),  # 64 rows: stream-K tiles 64 wide
        ((5,), 2048, 72, 40, "float32", 0.0),  # split-K shrink (atomics) + decode kernel
        ((3,), 37, 29, 5, "float16", 0.0),  # fused decode, odd sizes
        ((2, 35), 64, 130, 4, "bfloat16", 0.0),  # shrink, LoRA term before cuBLAS; backward: dy pass, dx term
        ((4, 20), 96, 50, 8, "bfloat16", 0.1),  # nn.Dropout's mask as bits: pack, shrink, dx term, dA over x^T
        ((3,), 40, 29, 5, "float16", 0.2, "philox"),  # in-kernel mask in the fused decode kernel, both passes
        ((2, 35), 64, 130, 40, "bfloat16", 0.2, "philox"),  # in-kernel mask: shrink, transposed dA shrink, dx
        ((2, 70), 256, 264, 16, "bfloat16", 0.0, "persistent"),  # persistent: product, dx, x A^T in its own pass
    ],
}


def run_case(lead, k, n, r, dtype_name, dropout, mode="torch", *, backend, device="cuda") -> bool:
    """One case forward and backward on ``backend`` (and with mode "persistent" an inference call too); True when
    it ran there, finite and near float64."""
    import contextlib
    from unittest import mock

    import torch

    from fastpeft.backends import record_backends
    from fastpeft.ops.dropout import draw_mask, draw_seed, seeded_mask
    from fastpeft.ops.lora import lora_linear, lora_linear_reference

    dtype = getattr(torch, dtype_name)

    def rand(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(grad)

    x = rand(*lead, k, grad=True)
    w, bias = rand(n, k, scale=k**-0.5), rand(n)
    a, b = rand(r, k, scale=k**-0.5, grad=True), rand(n, r, scale=r**-0.5, grad=True)
    lora_bias = rand(n, grad=True) if dropout else None
    persistent = mode == "persistent"
    forced = contextlib.nullcontext()
    if persistent and backend == "triton":
        from fastpeft.triton_kernels import lora_persistent

        forced = mock.patch.object(lora_persistent, "PERSISTENT_PREFILL_MIN_M", 0)
    torch.manual_seed(0)
    with forced, record_backends() as calls:
        y = lora_linear(x, w, a, b, 0.5, bias, lora_bias=lora_bias, dropout_p=dropout,
                        dropout_mode="torch" if persistent else mode)  # fmt: skip
        y.float().square().sum().backward()
        with torch.no_grad():
            inference = lora_linear(x, w, a, b, 0.5, bias) if persistent else y
    if device == "cuda":
        torch.cuda.synchronize()
    ref = lora_linear_reference(x.double(), w.double(), a.double(), b.double(), 0.5, bias.double())
    if dropout:  # the same mask from the same seed, and the LoRA bias
        torch.manual_seed(0)
        if mode == "philox":  # the seed the op drew, and the mask the kernels derive from it
            mask = seeded_mask(draw_seed(), dropout, x[..., 0].numel(), k, x.device).view(x.shape)
        else:
            mask = draw_mask(tuple(x.shape), dropout, dtype, x.device)
        dropped = torch.where(mask, x.double() / (1 - dropout), 0)
        ref = ref + 0.5 * ((dropped - x.double()) @ a.double().t() @ b.double().t() + lora_bias.double())
    err = max(((out.double() - ref).norm() / ref.norm()).item() for out in (y, inference))
    finite = all(torch.isfinite(t).all().item() for t in (y, inference, x.grad, a.grad, b.grad))
    label = f"x={lead!s:<8} K={k:<5} N={n:<4} r={r:<3} {dtype_name:<9} dropout={dropout:<4} {mode}"
    return report(backend, calls, label, err, finite and err < TOLERANCE[dtype_name])


def main(argv: list[str] | None = None) -> int:
    return _sanitize.main(__doc__, CASES, run_case, argv)


if __name__ == "__main__":
    sys.exit(main())
