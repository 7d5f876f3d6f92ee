"""The cost model: what a target case should take on the reference GPU before any GPU has run it.

An op is a list of kernel passes (:class:`Pass`). A pass costs the largest of these times, plus one launch:

- its bytes (HBM, read plus written) at the copy ceiling, times :data:`STREAM_EFFICIENCY`;
- its tensor-core FLOPs at the bf16 GEMM ceiling, divided by the pass's MMA efficiency (1 for cuBLAS, whose
  ceiling it is) and by its wave efficiency (CTAs over the slots of the waves they need on 132 SMs);
- its CUDA-core work in FMA slots (an FMA is one; a scalar conversion F2F eight, a packed F2FP two) at 128 lanes
  per SM per clock, divided by the wave efficiency;
- its shared-memory (and L1 gather) traffic at 128 bytes per SM per clock (code-table lookups, staged x);
- its L2 traffic beyond the HBM bytes (operands every tile re-reads) at :data:`H200`'s assumed L2 bandwidth.

The ceilings are the ones measured on the lent machine (4.3 TB/s copy, 790 TFLOP/s bf16 on an H200); every
efficiency and per-weight count below is an assumption, named, that the first GPU run corrects: the GPU bench
prints measured beside predicted (``python benchmarks/roofline.py --compare RESULTS.json``), and the kernel
report prints the predicted value of every target row it models. Baselines are modelled the same way: cuBLAS at
the ceilings (a memory-bound GEMV streams W at :data:`STREAM_EFFICIENCY`).

    python benchmarks/roofline.py                      # the predicted value of every modelled target row
    python benchmarks/roofline.py --compare results.json  # measured beside predicted, from a bench run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import targets
from fastpeft.triton_kernels.qlora import block_m, block_n

from fastpeft.ops import qlora as qlora_ops


@dataclass(frozen=True)
class Machine:
    name: str
    sms: int
    bandwidth: float  # bytes/s, read plus written: the measured copy ceiling
    tensor_flops: float  # bf16 FLOP/s of a large cuBLAS GEMM on random data
    lane_ops: float  # FMA slots per second on the CUDA cores (128 per SM per clock)
    shared_bandwidth: float  # bytes/s of shared memory and L1 over all SMs (128 per SM per clock)
    l2_bandwidth: float  # bytes/s from L2 to the SMs: an assumption (about twice the HBM's), not a measured ceiling
    launch_s: float  # the fixed cost of one kernel launch, back to back in a stream


# launch_s: the GPU's gap between back-to-back kernels in a CUDA-event-timed loop (host overhead hidden).
H200 = Machine("H200", sms=132, bandwidth=4.3e12, tensor_flops=790e12, lane_ops=132 * 128 * 1.98e9,
               shared_bandwidth=132 * 128 * 1.98e9, l2_bandwidth=8e12, launch_s=1e-6)  # fmt: skip

# Assumptions, each named where it is used; the first GPU run replaces them with measured values.
STREAM_EFFICIENCY = 0.9  # a streaming kernel's share of the copy ceiling
# Per 4-bit weight decoded: the scale (1), the rounding to bitsandbytes' dtype as a packed conversion (1 for each of
# the pair), the widening to fp32 (1); the code lookup is shared-memory traffic (DECODE_SHARED_BYTES).
DECODE_LANE_OPS = 3
DECODE_SHARED_BYTES = 4  # the GEMV's 8-byte byte-pair lookup per two weights; Triton's 4-byte code gather per weight
TRITON_4BIT_MMA_EFFICIENCY = 0.6  # Triton tiles that decode W on chip before tl.dot, against cuBLAS's ceiling


@dataclass(frozen=True)
class Pass:
    name: str
    bytes: float
    flops: float = 0.0
    lane_ops: float = 0.0
    mma_efficiency: float = 1.0
    ctas: int = 0  # 0: not wave-limited (cuBLAS picks its own grid)
    ctas_per_sm: int = 1
    shared_bytes: float = 0.0
    l2_bytes: float = 0.0

    def seconds(self, machine: Machine = H200) -> float:
        waves = 1.0
        if self.ctas:
            slots = machine.sms * self.ctas_per_sm
            waves = self.ctas / (math.ceil(self.ctas / slots) * slots)
        memory = self.bytes / (machine.bandwidth * STREAM_EFFICIENCY)
        tensor = self.flops / (machine.tensor_flops * self.mma_efficiency * waves)
        alu = self.lane_ops / (machine.lane_ops * waves)
        shared = self.shared_bytes / (machine.shared_bandwidth * waves)
        l2 = self.l2_bytes / machine.l2_bandwidth
        return max(memory, tensor, alu, shared, l2) + machine.launch_s


def seconds(passes: list[Pass], machine: Machine = H200) -> float:
    return sum(p.seconds(machine) for p in passes)


# ------------------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------------------


def bf16_linear(m: int, n: int, k: int) -> list[Pass]:
    """cuBLAS ``x W^T`` in bf16: x, W and y once, the GEMM at the ceiling."""
    return [Pass("cuBLAS GEMM", 2.0 * (m * k + n * k + m * n), 2.0 * m * n * k)]


# ------------------------------------------------------------------------------------------------------------
# The 4-bit ops (fastpeft/ops/qlora.py's tiers)
# ------------------------------------------------------------------------------------------------------------


def tiles(m: int, n: int) -> tuple[int, int]:
    """(row tiles, CTAs) of the Triton 4-bit forward's pinned tiles (triton_kernels/qlora.py's pinned_config)."""
    row_tiles = math.ceil(m / block_m(m, m <= qlora_ops.DECODE_MAX_M))
    return row_tiles, row_tiles * math.ceil(n / block_n(row_tiles, n))


def weight_4bit_bytes(n: int, k: int, blocksize: int = 64, nested: bool = True) -> float:
    """Packed nibbles plus absmax (uint8 and its fp32 second level when nested, else fp32)."""
    blocks = math.ceil(n * k / blocksize)
    absmax = blocks + 4 * math.ceil(blocks / 256) if nested else 4 * blocks
    return n * k / 2 + absmax


def skinny(name: str, m: int, k: int, r: int) -> Pass:
    """A product with one side of rank r ([m, k] by [k, r] or its gradients' shapes): the two 16-bit operands
    read, the fp32 [m, r] result written."""
    return Pass(name, 2.0 * (m * k + r * k) + 4.0 * m * r, 2.0 * m * k * r)


def lora_passes(m: int, n: int, k: int, r: int, fused_tiles: int = 0) -> tuple[list[Pass], Pass]:
    """(the separate shrink launch, if any; the expand's extra work inside the main pass): A and B from HBM once,
    x again by a separate shrink, xa written and read in fp32. ``fused_tiles``: the shrink rides the K loop of
    that many column tiles, each of which recomputes it (16 rows on the tensor cores) and re-reads A from L2."""
    expand_flops = 2.0 * m * n * r
    if fused_tiles:
        return [], Pass("LoRA in the K loop", 2.0 * (r * k + n * r), 2.0 * 16 * k * r * fused_tiles + expand_flops,
                        l2_bytes=2.0 * r * k * fused_tiles)  # fmt: skip
    return [skinny("LoRA shrink", m, k, r)], Pass(
        "LoRA expand in the epilogue", 2.0 * n * r + 4.0 * m * r, expand_flops
    )


def matmul_4bit(m: int, n: int, k: int, r: int = 0, blocksize: int = 64, nested: bool = True) -> list[Pass]:
    """fastpeft's 4-bit product (with a rank-r adapter when r > 0) by the tier fastpeft.ops.qlora's dispatch
    gives its row count on a GPU with both backends."""
    w4 = weight_4bit_bytes(n, k, blocksize, nested)
    io = 2.0 * (m * k + m * n)
    decode_ops = DECODE_LANE_OPS * n * k
    if m >= qlora_ops.DEQUANTIZE_ONCE_MIN_M:
        return _dequantized(m, n, k, r, w4)
    lookups = DECODE_SHARED_BYTES * n * k
    if qlora_ops.preference("matmul_4bit", m, r > 0)[0] == "cuda":
        # The GEMV: one FMA per weight per row; x read back from shared memory once per warp's features.
        features = 4 if m <= 4 else 2
        main = Pass("CUDA GEMV", w4 + io, lane_ops=decode_ops + m * n * k, shared_bytes=lookups + 2.0 * m * n * k
                    / features, ctas=math.ceil(n / (8 * features)), ctas_per_sm=2)  # fmt: skip
    else:  # Triton's tiles: W decoded once per row tile (decode: one tile of 16 rows), the MMA on the tensor cores
        row_tiles, ctas = tiles(m, n)
        padded = max(m, 16)
        main = Pass("Triton 4-bit tiles", w4 * row_tiles + io, 2.0 * padded * n * k, decode_ops * row_tiles,
                    TRITON_4BIT_MMA_EFFICIENCY, ctas, 2, lookups * row_tiles)  # fmt: skip
    if not r:
        return [main]
    shrink, inside = lora_passes(m, n, k, r, fused_tiles=main.ctas if m <= qlora_ops.DECODE_MAX_M else 0)
    return [*shrink, _plus(main, inside)]


def _dequantized(m: int, n: int, k: int, r: int, w4: float, reduce: int | None = None) -> list[Pass]:
    """The dequantize-once tier: W written dense (with the adapter's r columns, or rows, beside it), x (or dy)
    copied beside s x A^T, one cuBLAS GEMM over K + r (``reduce``: the GEMM's reduction, K forward, N for dx)."""
    reduce = k if reduce is None else reduce
    out = n * k // reduce  # the GEMM's other side: N forward, K for dx
    dense = Pass("dequantize once", w4 + 2.0 * n * k, lane_ops=DECODE_LANE_OPS * n * k, shared_bytes=2.0 * n * k)
    gemm = Pass("cuBLAS GEMM over K + r", 2.0 * (m * (reduce + r) + out * (reduce + r) + m * out),
                2.0 * m * out * (reduce + r))  # fmt: skip
    if not r:
        return [dense, gemm]
    join = Pass("[x | s x A^T]", 4.0 * m * (reduce + r) + 4.0 * m * r)
    return [dense, skinny("LoRA shrink", m, reduce, r), join, gemm]


def _plus(main: Pass, lora: Pass) -> Pass:
    """``main`` carrying an adapter's bytes and FLOPs (in its K loop or its epilogue)."""
    return Pass(main.name + " + LoRA", main.bytes + lora.bytes, main.flops + lora.flops, main.lane_ops,
                main.mma_efficiency, main.ctas, main.ctas_per_sm, main.shared_bytes,
                main.l2_bytes + lora.l2_bytes)  # fmt: skip


def bnb_matmul_4bit(m: int, n: int, k: int, blocksize: int = 64, nested: bool = True) -> list[Pass]:
    """bitsandbytes 0.50's ``matmul_4bit`` as its dispatch runs it: the inference GEMV for one row, else a
    dequantize to a dense W (the nested absmax first) and cuBLAS. Its fused GEMM tiers for 2..64 rows are not
    modelled: rows against bitsandbytes above one are not predicted."""
    w4 = weight_4bit_bytes(n, k, blocksize, nested)
    if m == 1:
        # kgemm_4bit_inference_naive: a warp per output feature, 4 per block of 128 threads, the code in shared
        # memory, one FMA per weight.
        return [Pass("bnb GEMV", w4 + 2.0 * (k + n), lane_ops=(DECODE_LANE_OPS + 1) * n * k,
                     shared_bytes=DECODE_SHARED_BYTES * n * k, ctas=math.ceil(n / 4), ctas_per_sm=16)]  # fmt: skip
    absmax = [Pass("bnb nested absmax", 5.0 * n * k / blocksize)] if nested else []
    return [*absmax, Pass("bnb dequantize", w4 + 2.0 * n * k, lane_ops=DECODE_LANE_OPS * n * k,
                          shared_bytes=DECODE_SHARED_BYTES * n * k),
            *bf16_linear(m, n, k)]  # fmt: skip


def peft_bnb_lora(m: int, n: int, k: int, r: int, blocksize: int = 64, nested: bool = True) -> list[Pass]:
    """PEFT's LoRA layer on a bitsandbytes Linear4bit, inference: the 4-bit product, then dropout (identity),
    two GEMMs, a scale and an add, each its own launch over [m, r] or [m, n]."""
    lora = [Pass("x A^T", 2.0 * (m * k + r * k + m * r), 2.0 * m * k * r),
            Pass("(x A^T) B^T", 2.0 * (m * r + n * r + m * n), 2.0 * m * n * r),
            Pass("* scaling", 4.0 * m * n), Pass("+ base", 6.0 * m * n)]  # fmt: skip
    return [*bnb_matmul_4bit(m, n, k, blocksize, nested), *lora]


def qlora_train(m: int, n: int, k: int, r: int, blocksize: int = 64, nested: bool = True) -> list[Pass]:
    """fastpeft's QLoRA layer, forward and backward: the forward, dy B, dx through the dequantize-once tier (or
    the dx tiles), x A^T again, dA = s (dy B)^T x and dB = s dy^T (x A^T)."""
    w4 = weight_4bit_bytes(n, k, blocksize, nested)
    if m >= qlora_ops.DEQUANTIZE_ONCE_MIN_M:
        dx = _dequantized(m, n, k, r, w4, reduce=n)
    else:
        row_tiles = tiles(m, n)[0]
        dx = [Pass("4-bit dx tiles", w4 * row_tiles + 2.0 * (m * n + m * k), 2.0 * m * n * k,
                   DECODE_LANE_OPS * n * k * row_tiles, TRITON_4BIT_MMA_EFFICIENCY)]  # fmt: skip
    grads = [skinny("dy B", m, n, r), skinny("x A^T", m, k, r), skinny("dA", m, k, r), skinny("dB", m, n, r)]
    return [*matmul_4bit(m, n, k, r, blocksize, nested), *grads, *dx]


def peft_bnb_lora_train(m: int, n: int, k: int, r: int, blocksize: int = 64, nested: bool = True) -> list[Pass]:
    """PEFT's layer on a bitsandbytes Linear4bit, forward and backward: its forward, then autograd's nodes: the
    scale, the two LoRA GEMMs' gradients (four GEMMs), bitsandbytes' dx (dequantize, GEMM) and the sum of dx."""
    elementwise = [Pass("dy * scaling", 4.0 * m * n), Pass("dx + dx_lora", 6.0 * m * k)]
    gemms = [Pass(name, 2.0 * (m * a + a * b + m * b), 2.0 * m * a * b)
             for name, a, b in (("d(xA) = dy B", n, r), ("dB", n, r), ("dA", r, k), ("dx_lora", r, k))]  # fmt: skip
    return [*peft_bnb_lora(m, n, k, r, blocksize, nested), *elementwise, *gemms, *bnb_matmul_4bit(2, k, n, blocksize,
            nested)[:-1], *bf16_linear(m, k, n)]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Target rows
# ------------------------------------------------------------------------------------------------------------


def _qlora_metric(metric: str, case: dict) -> float | None:
    m, n, k = case["m"], case["n"], case["k"]
    r = case["r"] if case.get("mode") in ("qlora", "qlora_train") else 0
    shape = dict(blocksize=case.get("blocksize", 64), nested=case.get("double_quant", True))
    if case.get("mode") == "qlora_train":
        if metric != "speedup_vs_peft":
            return None
        return seconds(peft_bnb_lora_train(m, n, k, r, **shape)) / seconds(qlora_train(m, n, k, r, **shape))
    fused = seconds(matmul_4bit(m, n, k, r, **shape))
    if metric == "speedup_vs_bf16":
        return seconds(bf16_linear(m, n, k)) / fused
    if metric == "ratio_vs_bf16":
        return fused / seconds(bf16_linear(m, n, k))
    if metric == "speedup_vs_bnb" and m == 1:  # its fused GEMM tiers for 2..64 rows are not modelled
        return seconds(bnb_matmul_4bit(m, n, k, **shape)) / fused
    if metric == "ratio_vs_matmul_4bit":
        return fused / seconds(matmul_4bit(m, n, k, 0, **shape))
    if metric == "speedup_vs_peft" and case.get("mode") == "qlora":
        return seconds(peft_bnb_lora(m, n, k, r, **shape)) / fused
    return None


MODELS: dict[str, Callable[[str, dict], float | None]] = {"qlora": _qlora_metric}


def predict(target: targets.Target, case: dict) -> float | None:
    """The model's value of ``target.metric`` for ``case``, or None where no model covers it yet."""
    model = MODELS.get(target.bench or "")
    return None if model is None else model(target.metric, case)


def prediction_rows() -> list[tuple[targets.Target, dict, float | None]]:
    return [(target, case, predict(target, case)) for target in targets.TARGETS for case in target.cases]


def prediction_table() -> list[str]:
    """Markdown: every target row, the model's prediction and whether it meets the bound."""
    lines = ["| target | case | bound | predicted | meets |", "|---|---|---|---:|---|"]
    for target, case, value in prediction_rows():
        shape = targets.case_label(case)
        if value is None:
            lines.append(f"| {target.name} | {shape} | {target.describe()} | not modelled | |")
        else:
            lines.append(f"| {target.name} | {shape} | {target.describe()} | {value:.2f} | "
                         f"{'yes' if target.met(value) else '**no**'} |")  # fmt: skip
    return lines


def compare(rows: list[dict]) -> list[str]:
    """Measured beside predicted for every target row a bench run's rows answer."""
    lines = ["| target | case | measured | predicted | measured / predicted |", "|---|---|---:|---:|---:|"]
    for target, case, value in prediction_rows():
        measured = targets.value_for(target, case, rows)
        if measured is None:
            continue
        ratio = f"{measured / value:.2f}" if value else "-"
        shown = f"{value:.2f}" if value is not None else "not modelled"
        lines.append(f"| {target.name} | {targets.case_label(case)} | {measured:.2f} | {shown} | {ratio} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", metavar="RESULTS_JSON", help="a bench run's results.json (benchmarks/run.py)")
    args = parser.parse_args(argv)
    if args.compare:
        report = json.loads(Path(args.compare).read_text())
        print("\n".join(compare(report["rows"] if isinstance(report, dict) else report)))
    else:
        print("\n".join(prediction_table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
