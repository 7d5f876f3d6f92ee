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
the ceilings (a memory-bound GEMV streams W at :data:`STREAM_EFFICIENCY`). Beside each prediction, the best any
design of the op could reach (:func:`ideal`: its compulsory bytes and FLOPs at the ceilings themselves).

    python benchmarks/roofline.py                      # every modelled target row: predicted, best any design
    python benchmarks/roofline.py --compare results.json  # measured beside predicted, from a bench run
    python benchmarks/roofline.py --designs               # the LoRA prefill and decode designs compared
    python benchmarks/roofline.py --launch-us 2           # every row again with a 2 µs gap between launches
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import targets
import torch
from fastpeft.triton_kernels import bottleneck as bottleneck_kernels
from fastpeft.triton_kernels import dora as dora_kernels
from fastpeft.triton_kernels import lora as lora_kernels
from fastpeft.triton_kernels import lora_dy_pass as lora_dy_kernels
from fastpeft.triton_kernels import lora_persistent, multi_lora_persistent
from fastpeft.triton_kernels import multi_lora as multi_lora_kernels
from fastpeft.triton_kernels.common import r_pad
from fastpeft.triton_kernels.qlora import block_m, block_n

from fastpeft.ops import bottleneck_plan
from fastpeft.ops import lora as lora_ops
from fastpeft.ops import multi_lora as multi_lora_ops
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
    l2_size: float  # bytes


# launch_s: the GPU's gap between back-to-back kernels in a CUDA-event-timed loop (host overhead hidden).
H200 = Machine("H200", sms=132, bandwidth=4.3e12, tensor_flops=790e12, lane_ops=132 * 128 * 1.98e9,
               shared_bandwidth=132 * 128 * 1.98e9, l2_bandwidth=8e12, launch_s=1e-6, l2_size=60e6)  # fmt: skip

# Assumptions, each named where it is used; the first GPU run replaces them with measured values.
STREAM_EFFICIENCY = 0.9  # a streaming kernel's share of the copy ceiling
# Per 4-bit weight decoded: the scale (1), the rounding to bitsandbytes' dtype as a packed conversion (1 for each of
# the pair), the widening to fp32 (1); the code lookup is shared-memory traffic (DECODE_SHARED_BYTES).
DECODE_LANE_OPS = 3
DECODE_SHARED_BYTES = 4  # the GEMV's 8-byte byte-pair lookup per two weights; Triton's 4-byte code gather per weight
TRITON_4BIT_MMA_EFFICIENCY = 0.6  # Triton tiles that decode W on chip before tl.dot, against cuBLAS's ceiling
# The Triton LoRA tiles (wgmma, pipelined K loop; not persistent, no TMA, no warp specialisation) against cuBLAS on
# the same GEMM: the middle of the 1.15-1.35x a kernel engineer's reading gives them at M = 4096.
TRITON_GEMM_EFFICIENCY = 0.8
# A persistent Hopper GEMM (TMA, warp-specialised, L2-swizzled; Triton's tutorial kernel) against cuBLAS.
PERSISTENT_GEMM_EFFICIENCY = 0.95
# A host sync in the middle of a step (torch.nonzero's count): the GPU idles from the moment the queue drains until
# the host has launched the next kernel.
HOST_SYNC_S = 10e-6
# Per element dropped in-kernel (dropout_mode="philox"): Philox-4x32-10 gives four numbers for ten rounds of two
# 32-bit multiplies and a few xors, plus the compare and select: about 12 lane ops per element.
PHILOX_LANE_OPS = 12


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
    streams: bool = False  # the bytes are shared out evenly over the CTAs: the busiest SM sets the memory time
    fixed_s: float = 0.0  # time no ceiling explains (a host sync), added to the rest
    # Launched programmatically while the kernel before it runs (PDL, sm_90): no launch gap of its own.
    launch_hidden: bool = False
    at_ceiling: bool = False  # bytes at the copy ceiling itself (an ideal pass: :func:`ideal`)

    def seconds(self, machine: Machine | None = None) -> float:
        machine = machine or H200  # read at call time: --launch-us puts another launch gap in its place
        waves = 1.0
        if self.ctas:
            slots = machine.sms * self.ctas_per_sm
            waves = self.ctas / (math.ceil(self.ctas / slots) * slots)
        efficiency = 1.0 if self.at_ceiling else STREAM_EFFICIENCY
        memory = self.bytes / (machine.bandwidth * efficiency * (waves if self.streams else 1.0))
        tensor = self.flops / (machine.tensor_flops * self.mma_efficiency * waves)
        alu = self.lane_ops / (machine.lane_ops * waves)
        shared = self.shared_bytes / (machine.shared_bandwidth * waves)
        l2 = self.l2_bytes / machine.l2_bandwidth
        launch = 0.0 if self.launch_hidden else machine.launch_s
        return max(memory, tensor, alu, shared, l2) + launch + self.fixed_s


def seconds(passes: list[Pass], machine: Machine | None = None) -> float:
    return sum(p.seconds(machine) for p in passes)


def ideal(name: str, bytes_: float, flops: float, launches: int = 1) -> list[Pass]:
    """What no implementation of an op can beat: its compulsory bytes (each operand read and each result written
    once) at the copy ceiling itself and its FLOPs at the tensor ceiling, overlapped, in ``launches`` launches
    (one per direction for a training step). The "best any design" column of the prediction table puts this in
    place of fastpeft's passes, the baseline unchanged: a target the ideal misses cannot be met as set."""
    return [Pass(f"{name}, ideal", bytes_, flops, at_ceiling=True)] + [
        Pass("launch", 0.0, at_ceiling=True) for _ in range(launches - 1)
    ]


def ideal_lora(
    m: int, n: int, k: int, r: int, train: bool = False, extra_bytes: float = 0.0, weight_bytes: float | None = None
) -> list[Pass]:
    """The LoRA layer's ideal (:func:`ideal`): forward x, W, A, B read and y written, x W^T and the rank-r
    products; with ``train`` also the backward (W frozen): dy, W, x, A and B read, dx, dA and dB written, dy W
    and its rank-r products, in a second launch. ``extra_bytes``: what a variant must move beyond (DoRA's);
    ``weight_bytes``: W's bytes as stored (a 4-bit weight's), 16 bits a weight when None."""
    w = 2.0 * n * k if weight_bytes is None else weight_bytes
    forward_bytes = w + 2.0 * (m * k + m * n + r * (k + n))
    forward_flops = 2.0 * m * n * k + 2.0 * m * r * (k + n)
    if not train:
        return ideal("LoRA layer", forward_bytes + extra_bytes, forward_flops)
    backward_bytes = w + 2.0 * (m * n + 2 * m * k + 2 * r * (k + n))
    backward_flops = 2.0 * m * n * k + 4.0 * m * r * (k + n)
    return ideal("LoRA layer step", forward_bytes + backward_bytes + extra_bytes, forward_flops + backward_flops, 2)


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


def _dequantized(m: int, n: int, k: int, r: int, w4: float, dx: bool = False) -> list[Pass]:
    """The dequantize-once tier for the product of m rows, n outputs and reduction k (``dx``: the backward's, n and
    k given as the layer's, its reduction n): W written dense, then by fastpeft.ops.qlora.joins_adapter one cuBLAS
    GEMM over the reduction + r (x, or dy, copied beside s x A^T) or the plain LoRA layer's product on W
    (:func:`lora_product`); the forward's shrink of x first (dx's dy B comes from the dy pass)."""
    reduce, out = (n, k) if dx else (k, n)
    dense = Pass("dequantize once", w4 + 2.0 * n * k, lane_ops=DECODE_LANE_OPS * n * k, shared_bytes=2.0 * n * k)
    if not r:
        return [dense, *bf16_linear(m, out, reduce)]
    shrink = [] if dx else [skinny("LoRA shrink", m, reduce, r)]
    if not qlora_ops.joins_adapter(reduce, out):
        return [dense, *shrink, *lora_product("dequantized W's tiles", m, out, reduce, r)]
    gemm = Pass("cuBLAS GEMM over K + r", 2.0 * (m * (reduce + r) + out * (reduce + r) + m * out),
                2.0 * m * out * (reduce + r))  # fmt: skip
    join = Pass("[x | s x A^T]", 4.0 * m * (reduce + r) + 4.0 * m * r)
    return [dense, *shrink, join, gemm]


def _plus(main: Pass, lora: Pass) -> Pass:
    """``main`` carrying an adapter's bytes and FLOPs (in its K loop or its epilogue)."""
    return Pass(main.name + " + LoRA", main.bytes + lora.bytes, main.flops + lora.flops, main.lane_ops,
                main.mma_efficiency, main.ctas, main.ctas_per_sm, main.shared_bytes,
                main.l2_bytes + lora.l2_bytes)  # fmt: skip


def bnb_fused_4bit(m: int, n: int, k: int) -> bool:
    """Whether bitsandbytes 0.50 runs its fused 4-bit kernels for ``m`` rows of an [n, k] weight on an H200, as
    its backends/cuda/ops.py's gemm_4bit decides for weights of 4 Mi elements or more: always up to 4 rows; on
    sm90 up to 64, 48, 32 or 16 rows as its 64-column blocks fill three, two, one or half a wave of SMs (none at
    half a wave when K >= N and under three quarters); dequantize + cuBLAS otherwise."""
    if m <= 4:
        return True
    blocks, sms = math.ceil(n / 64), H200.sms
    for waves, rows in ((3, 64), (2, 48), (1, 32)):
        if blocks >= waves * sms:
            return m <= rows
    if blocks >= sms // 2:
        return not (k >= n and blocks * 4 < sms * 3) and m <= 16
    return False


def bnb_dequantize(n: int, k: int, blocksize: int = 64, nested: bool = True) -> list[Pass]:
    """bitsandbytes' dequantize of a 4-bit weight to dense 16 bits: the nested absmax first (its 8-bit codes
    decoded to fp32, then the offset added: a torch add), then W."""
    absmax = [Pass("bnb nested absmax", 5.0 * n * k / blocksize), Pass("absmax + offset", 8.0 * n * k / blocksize)]
    w4 = weight_4bit_bytes(n, k, blocksize, nested)
    return [*(absmax if nested else []), Pass("bnb dequantize", w4 + 2.0 * n * k, lane_ops=DECODE_LANE_OPS * n * k,
                                              shared_bytes=DECODE_SHARED_BYTES * n * k)]  # fmt: skip


def bnb_matmul_4bit(m: int, n: int, k: int, blocksize: int = 64, nested: bool = True) -> list[Pass] | None:
    """bitsandbytes 0.50's ``matmul_4bit`` (inference) as its dispatch runs it on an H200 (:func:`bnb_fused_4bit`):
    its fused SIMT kernel up to 4 rows (csrc/gemm_4bit_simt.cu: a warp per output column, 4 to a block, 16-byte
    weight loads, the code values through warp shuffles, one FMA per weight per row), dequantize + cuBLAS where it
    does not fuse. Its MMA tier (mma.sync tiles, which sm90 takes between 5 and 64 rows only where N fills whole
    waves of 64-column blocks) is not modelled: None there. The TARGETS rows at M = 64 (N = 4096 and 14336)
    dequantize."""
    if bnb_fused_4bit(m, n, k):
        if m > 4:
            return None
        w4 = weight_4bit_bytes(n, k, blocksize, nested)
        return [Pass("bnb SIMT 4-bit GEMM", w4 + 2.0 * (m * k + m * n), lane_ops=(DECODE_LANE_OPS + m) * n * k,
                     shared_bytes=DECODE_SHARED_BYTES * n * k, ctas=math.ceil(n / 4), ctas_per_sm=16)]  # fmt: skip
    return [*bnb_dequantize(n, k, blocksize, nested), *bf16_linear(m, n, k)]


def peft_lora_term(m: int, n: int, k: int, r: int) -> list[Pass]:
    """PEFT's LoRA term beside its base layer: dropout (identity at p = 0), two GEMMs, a scale and an add, each
    its own launch over [m, r] or [m, n]."""
    return [Pass("x A^T", 2.0 * (m * k + r * k + m * r), 2.0 * m * k * r),
            Pass("(x A^T) B^T", 2.0 * (m * r + n * r + m * n), 2.0 * m * n * r),
            Pass("* scaling", 4.0 * m * n), Pass("+ base", 6.0 * m * n)]  # fmt: skip


def peft_lora_term_backward(m: int, n: int, k: int, r: int) -> list[Pass]:
    """Autograd's nodes for PEFT's LoRA term: the scale, the two LoRA GEMMs' gradients (four GEMMs) and the sum
    of the base's and the adapter's dx."""
    elementwise = [Pass("dy * scaling", 4.0 * m * n), Pass("dx + dx_lora", 6.0 * m * k)]
    gemms = [Pass(name, 2.0 * (m * a + a * b + m * b), 2.0 * m * a * b)
             for name, a, b in (("d(xA) = dy B", n, r), ("dB", n, r), ("dA", r, k), ("dx_lora", r, k))]  # fmt: skip
    return elementwise + gemms


def peft_bnb_lora(m: int, n: int, k: int, r: int, blocksize: int = 64, nested: bool = True) -> list[Pass]:
    """PEFT's LoRA layer on a bitsandbytes Linear4bit, inference: the 4-bit product, then the LoRA term."""
    base = bnb_matmul_4bit(m, n, k, blocksize, nested)
    if base is None:
        raise ValueError(f"bitsandbytes' MMA tier (M = {m}) is not modelled")
    return [*base, *peft_lora_term(m, n, k, r)]


def qlora_train(m: int, n: int, k: int, r: int, blocksize: int = 64, nested: bool = True) -> list[Pass]:
    """fastpeft's QLoRA layer, forward and backward: the forward (keeping x A^T past the decode rows), dy B and
    dB = s dy^T (x A^T) from the dy pass, dx through the dequantize-once tier (or the dx tiles), dA = s (dy B)^T x."""
    w4 = weight_4bit_bytes(n, k, blocksize, nested)
    if m >= qlora_ops.DEQUANTIZE_ONCE_MIN_M:
        dx = _dequantized(m, n, k, r, w4, dx=True)
    else:
        row_tiles = tiles(m, n)[0]
        dx = [Pass("4-bit dx tiles", w4 * row_tiles + 2.0 * (m * n + m * k), 2.0 * m * n * k,
                   DECODE_LANE_OPS * n * k * row_tiles, TRITON_4BIT_MMA_EFFICIENCY)]  # fmt: skip
    shrink = [] if m > qlora_ops.DECODE_MAX_M else [skinny("x A^T again", m, k, r)]
    grads = [*shrink, *lora_dy_products(m, n, r), Pass("s dy B", 6.0 * m * r), skinny("dA", m, k, r)]
    return [*matmul_4bit(m, n, k, r, blocksize, nested), *grads, *dx]


def peft_bnb_lora_train(m: int, n: int, k: int, r: int, blocksize: int = 64, nested: bool = True) -> list[Pass]:
    """PEFT's layer on a bitsandbytes Linear4bit, forward and backward: its forward, then autograd's nodes for
    the LoRA term, and bitsandbytes' dx (dequantize, GEMM)."""
    return [*peft_bnb_lora(m, n, k, r, blocksize, nested), *peft_lora_term_backward(m, n, k, r),
            *bnb_dequantize(n, k, blocksize, nested), *bf16_linear(m, k, n)]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# The LoRA op (fastpeft/ops/lora.py's dispatch on a GPU with both backends) and PEFT's layer
# ------------------------------------------------------------------------------------------------------------


def lora_tile_pass(name: str, m: int, n: int, k: int, r: int, shrink_in_loop: bool, kind: str = "") -> Pass:
    """The Triton tile kernel (triton_kernels/lora.py, its pinned tiles) for ``y = x W^T + s xa B^T`` of m rows,
    n outputs and reduction k: x, W, B and y once from HBM, xa (fp32) from the separate shrink, or A once and the
    shrink in the K loop of every column tile (``shrink_in_loop``: recomputed per tile, A re-read from L2). Decode
    tiles hold every row, so each CTA re-reads those rows of x from L2, and each streams its share of W: the
    busiest SM sets the time (a last wave of 92 of 132 SMs costs as much as a full one). ``kind``: the pinned
    tile's (decode or prefill by the row count when not given)."""
    decode = m <= lora_kernels.DECODE_MAX_M
    kind = kind or ("decode" if decode else "prefill")
    config = lora_kernels.pinned_config(kind, m, n, r_pad(r), torch.bfloat16, interpreter=False).kwargs
    row_tiles, col_tiles = math.ceil(m / config["BLOCK_M"]), math.ceil(n / config["BLOCK_N"])
    rows, padded_r = row_tiles * config["BLOCK_M"], r_pad(r)  # the MMA runs on whole tiles
    hbm = 2.0 * (m * k + n * k + m * n + n * r)
    flops = 2.0 * rows * n * (k + padded_r)
    l2 = 2.0 * row_tiles * col_tiles * min(m, config["BLOCK_M"]) * k if decode else 0.0
    if shrink_in_loop:
        hbm += 2.0 * r * k
        flops += 2.0 * rows * k * padded_r * col_tiles
        l2 += 2.0 * row_tiles * col_tiles * r * k
    else:
        hbm += 4.0 * m * r
    return Pass(name, hbm, flops, mma_efficiency=TRITON_GEMM_EFFICIENCY, ctas=row_tiles * col_tiles, l2_bytes=l2,
                streams=decode)  # fmt: skip


def lora_epilogue(m: int, n: int, r: int) -> Pass:
    """The tile kernel as cuBLAS's epilogue (BASE_FROM_Y): y read and written again, xa (fp32) and B read."""
    return Pass("tiles as cuBLAS's epilogue", 4.0 * m * n + 4.0 * m * r + 2.0 * n * r, 2.0 * m * n * r)


def cublas_accumulating(m: int, n: int, k: int) -> Pass:
    """cuBLAS adding ``x W^T`` into an existing y in place (beta = 1): y read once more, in the GEMM's epilogue,
    beside its own bytes."""
    (gemm,) = bf16_linear(m, n, k)
    return Pass("cuBLAS GEMM, beta = 1", gemm.bytes + 2.0 * m * n, gemm.flops)


def lora_term_then_cublas(m: int, n: int, k: int, r: int) -> list[Pass]:
    """The tiles without a K loop write y = s xa B^T (xa fp32 and B read), then cuBLAS adds x W^T into y."""
    return [Pass("LoRA term, no K loop", 2.0 * m * n + 4.0 * m * r + 2.0 * n * r, 2.0 * m * n * r),
            cublas_accumulating(m, n, k)]  # fmt: skip


def persistent_product(m: int, n: int, k: int, r: int) -> Pass:
    """``x W^T + s xa B^T`` on the persistent Hopper kernel (triton_kernels/lora_persistent.py): the adapter one
    more K step, x, W, B and y once, xa (fp32) read; as efficient as :data:`PERSISTENT_GEMM_EFFICIENCY` says."""
    return Pass("persistent, adapter in the K loop", 2.0 * (m * k + n * k + m * n + n * r) + 4.0 * m * r,
                2.0 * m * n * (k + r), mma_efficiency=PERSISTENT_GEMM_EFFICIENCY)  # fmt: skip


def shrinking_tiles(row_blocks: int, tiles: int) -> int:
    """The tiles of a persistent kernel that compute their row block's x A^T in its own pass: each row block's
    first and the rest of the first round (one tile per program start together; after that the first tiles
    have published)."""
    return min(max(row_blocks, H200.sms), tiles)


def persistent_with_shrink(m: int, n: int, k: int, r: int) -> Pass:
    """The persistent kernel computing ``x A^T`` in its own pass over x (the forward at inference): A read once
    more, the shrink's MMA (r padded, on the x blocks the tile already holds) in every tile that finds its row
    block's x A^T unpublished (:func:`shrinking_tiles`), x A^T written once (fp32) and read by the other tiles
    from L2."""
    options = lora_persistent.tile_options(interpreter=False)
    row_blocks = math.ceil(m / options["BLOCK_M"])
    tiles = row_blocks * math.ceil(n / options["BLOCK_N"])
    shrinking = shrinking_tiles(row_blocks, tiles)
    product = persistent_product(m, n, k, r)
    return Pass("persistent, x A^T in its pass, adapter in the K loop", product.bytes + 2.0 * r * k,
                product.flops + 2.0 * options["BLOCK_M"] * k * r_pad(r) * shrinking,
                mma_efficiency=PERSISTENT_GEMM_EFFICIENCY, l2_bytes=4.0 * m * r * (tiles // row_blocks))  # fmt: skip


def on_persistent(m: int, r: int, persistent: bool | None) -> bool:
    """Whether a product of m rows at rank r runs on the persistent kernel: from PERSISTENT_PREFILL_MIN_M rows
    (``persistent``: forced on or off), past the decode rows, at a rank its adapter step holds."""
    if persistent is None:
        persistent = m >= lora_persistent.PERSISTENT_PREFILL_MIN_M
    return persistent and m > lora_kernels.DECODE_MAX_M and r_pad(r) <= lora_persistent.MAX_R_PAD


def lora_product(name: str, m: int, n: int, k: int, r: int, persistent: bool | None = None) -> list[Pass]:
    """``x W^T + s xa B^T`` for a given xa, as triton_kernels/lora.py runs it for m rows: on the persistent kernel
    (:func:`on_persistent`), else the LoRA term then cuBLAS adding into it (cublas_accumulates), cuBLAS then the
    tiles as its epilogue (base_on_cublas), else the tiles with their K loop."""
    if on_persistent(m, r, persistent):
        return [persistent_product(m, n, k, r)]
    if lora_kernels.cublas_accumulates(m, r):
        return lora_term_then_cublas(m, n, k, r)
    if lora_kernels.base_on_cublas(m, r):
        return [*bf16_linear(m, n, k), lora_epilogue(m, n, r)]
    return [lora_tile_pass(name, m, n, k, r, shrink_in_loop=False)]


def stream_k_partial_sums(tiles: int, k_iters: int, programs: int) -> int:
    """The partial sums the stream-K decode passes through memory: for a tile cut between s programs, those of
    the s - 1 that do not arrive last."""
    return sum(shares - 1 for shares in lora_kernels.stream_k_shares(tiles, k_iters, programs))


def stream_k_decode(m: int, n: int, k: int, r: int) -> Pass:
    """The one-launch decode on the stream-K schedule (triton_kernels/lora.py's _decode_stream_k_kernel): the
    bytes and work of its tiles (the stream-K tile, at least as wide as tall) shared out in equal parts over its
    programs (stream_k_programs: one per SM, or a multiple of the tile count), plus the fp32 partial sums (acc
    and xa) that tiles cut between programs pass through memory: each written once (to HBM, when L2 evicts it)
    and read back from L2 by the tile's last program within the launch."""
    tiles_pass = lora_tile_pass("tiles", m, n, k, r, shrink_in_loop=True, kind="stream_k")
    tile = lora_kernels.pinned_config("stream_k", m, n, r_pad(r), torch.bfloat16, interpreter=False).kwargs
    tiles, k_iters = math.ceil(n / tile["BLOCK_N"]), math.ceil(k / tile["BLOCK_K"])
    programs = lora_kernels.stream_k_programs(tiles, k_iters, H200.sms)
    partials = stream_k_partial_sums(tiles, k_iters, programs) * 4.0 * tile["BLOCK_M"] * (tile["BLOCK_N"] + r_pad(r))
    return Pass("stream-K decode, shrink in the K loop", tiles_pass.bytes + partials, tiles_pass.flops,
                mma_efficiency=tiles_pass.mma_efficiency, ctas=programs, streams=True,
                l2_bytes=tiles_pass.l2_bytes + partials)  # fmt: skip


def lora_forward(
    m: int, n: int, k: int, r: int, persistent: bool | None = None, keeps_xa: bool = False
) -> list[Pass] | None:
    """fastpeft's LoRA layer forward by its dispatch (``persistent`` as in :func:`lora_product`; on it, x A^T in
    its own pass over x unless the forward ``keeps_xa`` for a backward, which runs the shrink first); None where
    it picks the CUDA GEMV (not modelled)."""
    if lora_ops.preference("lora_linear", m, r)[0] != "triton":
        return None
    if lora_kernels.uses_stream_k(m, n, k, r, torch.bfloat16, H200.sms, interpreter=False):
        return [stream_k_decode(m, n, k, r)]
    if lora_kernels.fuses_shrink(m, r):
        return [lora_tile_pass("Triton decode, shrink in the K loop", m, n, k, r, shrink_in_loop=True)]
    if not keeps_xa and on_persistent(m, r, persistent):
        return [persistent_with_shrink(m, n, k, r)]
    kind = "decode" if m <= lora_kernels.DECODE_MAX_M else "prefill"
    return [skinny("LoRA shrink", m, k, r), *lora_product(f"Triton {kind} tiles", m, n, k, r, persistent)]


def lora_dy_products(m: int, n: int, r: int) -> list[Pass]:
    """dy B and dB = s dy^T xa as fastpeft::lora_dy_pass runs them on Triton: one pass over dy (the fp32
    partial sums written to L2 and, in HBM terms, written back once) and the launch that sums the partials from
    L2; or, where that does not pay (triton_kernels/lora_dy_pass.py's one_pass_pays), two products each reading
    dy."""
    if not lora_dy_kernels.one_pass_pays(m, n, r, torch.bfloat16, H200.sms, interpreter=False):
        return [skinny("dy B", m, n, r), Pass("s xa", 6.0 * m * r), skinny("dB", m, n, r)]
    tile = lora_dy_kernels.tile_options(m, n, r_pad(r), torch.bfloat16, H200.sms, interpreter=False)
    partials = lora_dy_kernels.partial_bytes(m, n, r, torch.bfloat16, H200.sms, interpreter=False)
    ctas = math.ceil(m / tile["BLOCK_M"]) * tile["SPLITS"]
    return [Pass("dy pass: dy B, partial dB", 2.0 * m * n + 4.0 * m * r + 2.0 * n * r + partials,
                 4.0 * m * n * r_pad(r), mma_efficiency=TRITON_GEMM_EFFICIENCY, ctas=ctas, streams=True),
            Pass("sum of the partials", 4.0 * m * r + 2.0 * n * r, l2_bytes=partials)]  # fmt: skip


def lora_train(m: int, n: int, k: int, r: int, persistent: bool | None = None) -> list[Pass] | None:
    """fastpeft's LoRA layer, forward and backward without dropout (fastpeft.ops.lora.lora_grads, W frozen): the
    forward (keeping xa = x A^T from SHRINK_KEPT_MIN_M rows, else recomputing it), dy B and dB from the dy pass,
    dx = dy W + s (dy B) A as the forward's product (reduction n), dA = (s dy B)^T x; ``persistent`` as in
    :func:`lora_product`, for the forward and dx alike."""
    forward = lora_forward(m, n, k, r, persistent, keeps_xa=m >= lora_ops.SHRINK_KEPT_MIN_M)
    if forward is None:
        return None
    shrink = [] if m >= lora_ops.SHRINK_KEPT_MIN_M else [skinny("x A^T again", m, k, r)]
    dx = lora_product("dx tiles", m, k, n, r, persistent)
    return [*forward, *shrink, *lora_dy_products(m, n, r), *dx, Pass("s dy B", 6.0 * m * r),
            skinny("dA", m, k, r)]  # fmt: skip


def lora_train_dropout(m: int, n: int, k: int, r: int, mode: str) -> list[Pass] | None:
    """The fused layer's training step with dropout on A's input, as the Triton backend runs it past the decode
    rows: the undropped step's passes, the mask applied inside three of them (the forward's shrink, dx's LoRA
    term, dA's shrink over x^T), so no dropped copy of x is written. ``mode`` "philox": the mask drawn there by
    Philox (lane ops per element); "torch" (the default: nn.Dropout's own mask), drawn first by native_dropout on
    a tensor like x (which reads and writes one beside the bool mask), packed to bits (one Triton pass), and
    read by those passes as bits (1/8 byte per element)."""
    step = lora_train(m, n, k, r)
    if step is None or m < lora_ops.SHRINK_KEPT_MIN_M:
        return None  # the decode rows' fused forward with dropout is not modelled
    dx_term = [i for i, p in enumerate(step) if p.name == "LoRA term, no K loop"][-1]
    masked = [i for i, p in enumerate(step) if p.name in ("LoRA shrink", "dA")] + [dx_term]
    mk = float(m * k)
    if mode == "philox":
        return [dataclasses.replace(p, lane_ops=p.lane_ops + PHILOX_LANE_OPS * mk) if i in masked else p
                for i, p in enumerate(step)]  # fmt: skip
    draw = [Pass("draw the mask (native_dropout)", 5.0 * mk), Pass("pack the mask to bits", 1.125 * mk)]
    return draw + [dataclasses.replace(p, bytes=p.bytes + mk / 8) if i in masked else p for i, p in enumerate(step)]


def small_ops(name: str, count: int) -> list[Pass]:
    """``count`` launches over vectors of the output size: their launch cost only."""
    return [Pass(f"{name} {i + 1}", 0.0) for i in range(count)]


def dora_train(m: int, n: int, k: int, r: int) -> list[Pass] | None:
    """fastpeft's DoRA layer, forward and backward (fastpeft.ops.dora on Triton, as the bench and the PEFT
    integration call it): the norm per call in one pass over W and the scale's [N]-sized ops; the shrink,
    cuBLAS, then the tiles as its epilogue (the scale needs the whole sum: y read, y and z written); backward: one
    pass over dy and z (dz and d magnitude: triton_kernels/dora.py), then the LoRA gradients of dz on the x A^T
    the forward kept."""
    if lora_ops.preference("lora_linear", m, r)[0] != "triton" or m < lora_ops.SHRINK_KEPT_MIN_M:
        return None
    # fastpeft.ops.dora.dora_weight_norm on Triton (triton_kernels/dora.py): W + s B A formed block by block
    # (B's rows times A's block) and squared, one pass over W, A re-read from L2 by every program; then the
    # scale's ops: the norm rounded to W's dtype and back, the magnitude cast, the division
    programs = math.ceil(n / dora_kernels.norm_options(torch.bfloat16, r_pad(r), interpreter=False)["BLOCK_N"])
    norm = [Pass("weight norm, one pass over W", 2.0 * (n * k + r * k + n * r) + 4.0 * n, 2.0 * n * k * r_pad(r),
                 ctas=programs, streams=True, l2_bytes=2.0 * r * k * programs),
            *small_ops("scale op", 4)]  # fmt: skip
    forward = [
        skinny("LoRA shrink", m, k, r),
        *bf16_linear(m, n, k),
        Pass("tiles as cuBLAS's epilogue, z kept", 6.0 * m * n + 4.0 * m * r + 2.0 * n * r, 2.0 * m * n * r),
    ]
    scale = [Pass("dz and d magnitude (one pass)", 6.0 * m * n), Pass("sum of the partials", 4.0 * n)]
    grads = [*lora_dy_products(m, n, r), *lora_product("dx tiles", m, k, n, r), Pass("s dy B", 6.0 * m * r),
             skinny("dA", m, k, r)]  # fmt: skip
    return [*norm, *forward, *scale, *grads]


def peft_dora_train(m: int, n: int, k: int, r: int) -> list[Pass]:
    """PEFT's DoRA layer (use_dora=True, no dropout), forward and backward, op by op: the base layer; B A formed
    through an identity (eye(K) through lora_A and lora_B), scaled, added to W and its row norm taken; the LoRA
    GEMMs on x; ``(c - 1) * base + c * lora * s`` and the sum with the base output as elementwise passes; autograd's
    nodes for each (the magnitude's gradient two products summed over rows); dx = dy W, the LoRA GEMMs'
    gradients, and the sum of the two dx."""
    mn, nk = float(m * n), float(n * k)
    weight_norm = [
        Pass("eye(K)", 2.0 * k * k),
        Pass("lora_A(eye)", 2.0 * (k * k + r * k + k * r), 2.0 * k * k * r),
        Pass("lora_B(.)", 2.0 * (k * r + n * r + n * k), 2.0 * n * k * r),
        Pass("s * B A", 4.0 * nk),
        Pass("W + s B A", 6.0 * nk),
        Pass("row norm", 2.0 * nk),
        *small_ops("magnitude / norm", 3),
    ]
    forward = [
        *bf16_linear(m, n, k),
        *weight_norm,
        skinny("lora_A(x)", m, k, r),
        Pass("lora_B", 2.0 * (m * r + n * r) + 2.0 * mn, 2.0 * m * n * r),
        Pass("(c - 1) * base", 4.0 * mn),
        Pass("c * lora", 4.0 * mn),
        Pass("* scaling", 4.0 * mn),
        Pass("+", 6.0 * mn),
        Pass("result +", 6.0 * mn),
    ]
    backward = [Pass("g * scaling", 4.0 * mn), Pass("* c", 4.0 * mn), Pass("g s * lora", 6.0 * mn),
                Pass("sum over rows", 2.0 * mn), Pass("g * (c - 1)", 4.0 * mn), Pass("g * base", 6.0 * mn),
                Pass("sum over rows", 2.0 * mn), Pass("g + g (c - 1)", 6.0 * mn), *bf16_linear(m, k, n),
                skinny("d(xA) = dlora B", m, n, r), skinny("dB", m, n, r),
                Pass("dx_lora", 2.0 * (m * r + r * k + m * k), 2.0 * m * k * r), skinny("dA", m, k, r),
                Pass("dx + dx_lora", 6.0 * m * k)]  # fmt: skip
    return forward + backward


def peft_lora(m: int, n: int, k: int, r: int) -> list[Pass]:
    """PEFT's LoRA layer on an nn.Linear, inference: cuBLAS, then the LoRA term."""
    return [*bf16_linear(m, n, k), *peft_lora_term(m, n, k, r)]


def peft_lora_train(m: int, n: int, k: int, r: int, dropout: bool = False) -> list[Pass]:
    """PEFT's layer forward and backward: its forward, autograd's nodes for the LoRA term, cuBLAS's dx = dy W;
    with ``dropout``, nn.Dropout's forward (x read, the dropped x and the bool mask written) and backward (the
    LoRA part of dx and the mask read, its masked copy written)."""
    drop = [Pass("nn.Dropout", 5.0 * m * k), Pass("nn.Dropout backward", 5.0 * m * k)] if dropout else []
    return [*peft_lora(m, n, k, r), *peft_lora_term_backward(m, n, k, r), *bf16_linear(m, k, n), *drop]


def prefill_designs(m: int, n: int, k: int, r: int) -> dict[str, list[Pass]]:
    """The LoRA prefill forward five ways: the Triton tiles with their K loop; the tiles writing the LoRA term,
    then cuBLAS adding x W^T into it (what ships, CUBLAS_BASE_MIN_M and CUBLAS_ACCUMULATES); cuBLAS then the tiles
    as its epilogue, adding the LoRA term to y (read and written again; what DoRA's scaled output runs); cuBLAS over
    K + r on [x | s x A^T] and [W | B] (x copied beside the shrink's output; W's part of [W | B] kept between
    calls, a second copy of W, B's columns refreshed); a persistent Hopper kernel with the adapter as one more
    step of its K loop (as efficient as :data:`PERSISTENT_GEMM_EFFICIENCY` says), after the shrink or with x A^T
    in its own pass over x (:func:`persistent_with_shrink`)."""
    shrink = skinny("LoRA shrink", m, k, r)
    joined = [Pass("[x | s x A^T]", 2.0 * m * k + 2.0 * m * (k + r) + 4.0 * m * r), Pass("B into [W | B]", 4.0 * n * r),
              Pass("cuBLAS over K + r", 2.0 * (m * (k + r) + n * (k + r) + m * n), 2.0 * m * n * (k + r))]  # fmt: skip
    return {
        "Triton tiles, K loop": [shrink, lora_tile_pass("Triton prefill tiles", m, n, k, r, shrink_in_loop=False)],
        "the LoRA term, then cuBLAS adds x W^T (ships)": [shrink, *lora_term_then_cublas(m, n, k, r)],
        "cuBLAS, then the tiles as epilogue (DoRA)": [shrink, *bf16_linear(m, n, k), lora_epilogue(m, n, r)],
        "cuBLAS on [x | s xA^T] and [W | B]": [shrink, *joined],
        "persistent kernel, adapter as a K step": [shrink, persistent_product(m, n, k, r)],
        "persistent kernel, x A^T in its own pass": [persistent_with_shrink(m, n, k, r)],
    }


def decode_designs(m: int, n: int, k: int, r: int) -> dict[str, list[Pass]]:
    """The one-launch decode on its two schedules: a CTA per column tile (the last wave partly idle where the
    tiles do not fill it), and stream-K (:func:`stream_k_decode`) over one CTA per SM or over a multiple of its
    wider tiles."""
    ships = lora_kernels.uses_stream_k(m, n, k, r, torch.bfloat16, H200.sms, interpreter=False)
    return {
        f"column tiles{'' if ships else ' (ships)'}": [
            lora_tile_pass("Triton decode, shrink in the K loop", m, n, k, r, shrink_in_loop=True)
        ],
        f"stream-K{' (ships)' if ships else ''}": [stream_k_decode(m, n, k, r)],
    }


def training_designs(m: int, n: int, k: int, r: int) -> dict[str, list[Pass]]:
    """A training step of the layer (forward and backward) without dropout (also with the forward and dx on the
    persistent kernel, off by default) and with dropout on A's input in either mode, and PEFT's beside them."""
    return {
        "fused, no dropout": lora_train(m, n, k, r) or [],
        "fused, no dropout, forward and dx on the persistent kernel": lora_train(m, n, k, r, persistent=True) or [],
        "fused, dropout_mode='torch' (default: nn.Dropout's mask)": lora_train_dropout(m, n, k, r, "torch") or [],
        "fused, dropout_mode='philox' (mask drawn in the kernels)": lora_train_dropout(m, n, k, r, "philox") or [],
        "PEFT, no dropout": peft_lora_train(m, n, k, r),
        "PEFT, dropout": peft_lora_train(m, n, k, r, dropout=True),
    }


def multi_prefill_designs(m: int, n: int, k: int, r: int) -> dict[str, list[Pass]]:
    """The multi-adapter prefill in 8 segments three ways: the terms written first, then cuBLAS adding x W^T
    (ships); cuBLAS first, then the expand reading and rewriting y (the bench's fused:triton-base-first); the
    persistent kernel with x A_i^T in its own pass (off by default: fused:triton-persistent)."""
    ships = multi_lora_ops.TERMS_BEFORE_BASE
    return {
        f"terms, then cuBLAS adds x W^T{' (ships)' if ships else ''}": multi_lora_tiles(m, n, k, r, terms_first=True),
        f"cuBLAS, then the expand{'' if ships else ' (ships)'}": multi_lora_tiles(m, n, k, r, terms_first=False),
        "persistent kernel, x A_i^T in its own pass": multi_lora_prefill(m, n, k, r, 8, persistent=True),
    }


def design_table() -> list[str]:
    """Markdown: each design's predicted time and its ratio to cuBLAS's base GEMM, at the target shapes."""
    lines = ["| shape | design | predicted µs | vs base GEMM |", "|---|---|---:|---:|"]
    shapes = [("prefill", m, n) for m in (4096,) for n in (4096, 14336)]
    shapes += [("decode", m, n) for m in (1, 16, 64) for n in (4096, 14336)] + [("training", 4096, 4096)]
    shapes += [("multi-adapter prefill, 8 segments", 4096, 4096)]
    makers = {"prefill": prefill_designs, "decode": decode_designs, "training": training_designs,
              "multi-adapter prefill, 8 segments": multi_prefill_designs}  # fmt: skip
    for kind, m, n in shapes:
        base = seconds(bf16_linear(m, n, 4096))
        for name, passes in makers[kind](m, n, 4096, 16).items():
            time = seconds(passes)
            lines.append(f"| {kind} M={m}, 4096->{n}, r=16 | {name} | {time * 1e6:.1f} | {time / base:.3f} |")
    return lines


# ------------------------------------------------------------------------------------------------------------
# Many LoRA adapters in one batch (fastpeft/ops/multi_lora.py) and PEFT's adapter_names loop
# ------------------------------------------------------------------------------------------------------------


def multi_lora_grouped(m: int, n: int, k: int, r: int, adapters: int) -> list[Pass]:
    """Decode with a batch description (built once per step for every layer: not counted): the grouped shrink,
    each adapter present reading its A once over K splits of about two programs per SM and writing fp32 slabs;
    then the base GEMM on the LoRA decode tiles (every row in one tile, W streamed once, x's rows re-read per
    column tile from L2) with the grouped expand in its epilogue: each column tile reads the B tile of every
    adapter present and its tokens' slabs from L2, y written once. On sm_90 the tiles are launched while the
    shrink runs (PROGRAMMATIC_AFTER_SHRINK): no launch gap of their own; the two share the bandwidth."""
    present = min(adapters, m)
    v = max(16, 1 << (r - 1).bit_length())
    splits, _ = multi_lora_kernels.sgmv_splits(adapters, k, 2 * H200.sms, interpreter=False)
    slabs = 4.0 * splits * m * v
    # Assumed: one program keeps its SM's share of the bandwidth busy (three pipelined stages of 8 KB in flight),
    # so the busiest SM's programs set the time.
    shrink = Pass("grouped shrink", 2.0 * present * r * k + 2.0 * m * k + slabs, 2.0 * m * k * r,
                  ctas=adapters * splits, streams=True)  # fmt: skip
    tiles = lora_tile_pass("base GEMM tiles, grouped expand in the epilogue", m, n, k, r, shrink_in_loop=False)
    config = lora_kernels.pinned_config("decode", m, n, v, torch.bfloat16, interpreter=False).kwargs
    col_tiles = math.ceil(n / config["BLOCK_N"])
    linear = Pass(tiles.name, tiles.bytes - 2.0 * n * r - 4.0 * m * r + 2.0 * present * n * r, tiles.flops,
                  mma_efficiency=tiles.mma_efficiency, ctas=tiles.ctas, l2_bytes=tiles.l2_bytes + slabs * col_tiles,
                  streams=True, launch_hidden=multi_lora_kernels.PROGRAMMATIC_AFTER_SHRINK)  # fmt: skip
    return [shrink, linear]


def multi_lora_adapters_alone(m: int, n: int, k: int, r: int, adapters: int) -> list[Pass]:
    """The bench's shrink+expand row for decode: the grouped shrink and expand on a base computed elsewhere (a
    4-bit layer's path), base read and y written by the expand, each adapter's B read once per column tile."""
    present = min(adapters, m)
    v = max(16, 1 << (r - 1).bit_length())
    shrink = multi_lora_grouped(m, n, k, r, adapters)[0]
    splits, _ = multi_lora_kernels.sgmv_splits(adapters, k, 2 * H200.sms, interpreter=False)
    tiles = math.ceil(n / multi_lora_kernels.sgmv_blocks(interpreter=False)[1])
    expand = Pass("grouped expand", 2.0 * present * n * r + 4.0 * m * n, 2.0 * m * n * r, ctas=(adapters + 1) * tiles,
                  streams=True, l2_bytes=4.0 * splits * m * v * tiles,
                  launch_hidden=multi_lora_kernels.PROGRAMMATIC_AFTER_SHRINK)  # fmt: skip
    return [shrink, expand]


def multi_lora_tiles(m: int, n: int, k: int, r: int, terms_first: bool | None = None) -> list[Pass]:
    """Prefill (segments of one adapter): the shrink's tiles read x once and write v; then (``terms_first``, by
    default TERMS_BEFORE_BASE) the expand's tiles write the terms over the broadcast bias and cuBLAS adds x W^T
    into them (y read once more inside the GEMM), else cuBLAS first and the expand reading base and v and
    writing y."""
    v = max(16, 1 << (r - 1).bit_length())
    shrink = Pass("shrink tiles", 2.0 * m * k + 4.0 * m * v, 2.0 * m * k * r)
    if multi_lora_ops.TERMS_BEFORE_BASE if terms_first is None else terms_first:
        return [shrink, Pass("expand tiles, terms only", 2.0 * m * n + 4.0 * m * v, 2.0 * m * n * r),
                cublas_accumulating(m, n, k)]  # fmt: skip
    return [*bf16_linear(m, n, k), shrink, Pass("expand tiles", 4.0 * m * n + 4.0 * m * v, 2.0 * m * n * r)]


def multi_lora_persistent_pass(m: int, n: int, k: int, r: int, segments: int) -> Pass:
    """Prefill in ``segments`` sequences of m / segments tokens (sequence j with its own adapter) on the
    multi-adapter persistent kernel (triton_kernels/multi_lora_persistent.py): x, W and y once, each adapter's A
    and B once from HBM, x A^T (fp32) written once and read by the other tiles of its row block from L2; the
    first round's tiles (:func:`shrinking_tiles`) multiply x by the A block of each
    sequence in their rows (the third and later ones' passes over x from L2 not counted: the target's sequences
    are longer than a row block), and every tile takes one adapter step per sequence in its rows; as efficient
    as :data:`PERSISTENT_GEMM_EFFICIENCY` says."""
    options = multi_lora_persistent.tile_options(interpreter=False)
    block_m, block_n, padded = options["BLOCK_M"], options["BLOCK_N"], r_pad(r)
    row_blocks, col_tiles = math.ceil(m / block_m), math.ceil(n / block_n)
    length = m // segments
    runs = sum(len({t // length for t in range(b * block_m, min(m, (b + 1) * block_m))}) for b in range(row_blocks))
    shrinking = shrinking_tiles(row_blocks, row_blocks * col_tiles)
    steps = runs / row_blocks  # adapter steps per tile, on average
    flops = 2.0 * m * n * k + 2.0 * block_m * padded * (block_n * runs * col_tiles + k * shrinking * steps)
    return Pass("multi-adapter persistent, x A_i^T in its pass", 2.0 * (m * k + n * k + m * n + segments * r * (k + n))
                + 4.0 * m * padded, flops, mma_efficiency=PERSISTENT_GEMM_EFFICIENCY,
                l2_bytes=4.0 * m * padded * col_tiles)  # fmt: skip


def multi_lora_prefill(m: int, n: int, k: int, r: int, segments: int, persistent: bool | None = None) -> list[Pass]:
    """The multi-adapter prefill by its dispatch: on the persistent kernel from MULTI_PERSISTENT_PREFILL_MIN_M
    rows (``persistent``: forced on or off) at a rank it takes, else the tiles and cuBLAS
    (:func:`multi_lora_tiles`)."""
    if persistent is None:
        persistent = m >= multi_lora_persistent.MULTI_PERSISTENT_PREFILL_MIN_M
    if persistent and r_pad(r) <= multi_lora_persistent.MAX_R_PAD:
        return [multi_lora_persistent_pass(m, n, k, r, segments)]
    return multi_lora_tiles(m, n, k, r)


def peft_mixed_batch(m: int, n: int, k: int, r: int, adapters: int) -> list[Pass]:
    """PEFT's ``_mixed_batch_forward``: the base layer, then per adapter present its rows gathered, lora_A,
    lora_B, the scale and an indexed add into the result: five launches each (GPU time only: the Python loop's
    host time, larger, is left out)."""
    rows = m / min(adapters, m)
    per_adapter = [Pass("x[rows]", 4.0 * rows * k), skinny("lora_A", math.ceil(rows), k, r),
                   Pass("lora_B", 2.0 * (rows * r + n * r + rows * n), 2.0 * rows * n * r),
                   Pass("* scaling", 4.0 * rows * n), Pass("result[rows] +=", 6.0 * rows * n)]  # fmt: skip
    return [*bf16_linear(m, n, k), *per_adapter * min(adapters, m)]


def ideal_multi_lora(m: int, n: int, k: int, r: int, adapters: int, base_given: bool = False) -> list[Pass]:
    """The multi-adapter layer's ideal (:func:`ideal`): x and W read, y written, and the A and B of each adapter
    the batch uses once; ``base_given``: the adapters alone on a base computed elsewhere (the base read, no W)."""
    used = 2.0 * min(adapters, m) * r * (k + n)
    if base_given:
        return ideal("shrink and expand", 2.0 * (m * k + 2 * m * n) + used, 2.0 * m * r * (k + n))
    return ideal("multi-adapter layer", 2.0 * (m * k + n * k + m * n) + used, 2.0 * m * n * k + 2.0 * m * r * (k + n))


def _multi_lora_metric(metric: str, case: dict, best: bool = False) -> float | None:
    m, n, k, r, count = case["m"], case["n"], case["k"], case["r"], case["adapters"]
    decode = m <= multi_lora_ops.SGMV_MAX_M

    def layer(adapters: int) -> list[Pass]:
        if best:
            return ideal_multi_lora(m, n, k, r, adapters)
        return multi_lora_grouped(m, n, k, r, adapters) if decode else multi_lora_prefill(m, n, k, r, case["segments"])

    fused = layer(count)
    if metric == "ratio_vs_base":
        return seconds(fused) / seconds(bf16_linear(m, n, k))
    if metric == "speedup_vs_peft":
        return seconds(peft_mixed_batch(m, n, k, r, count)) / seconds(fused)
    if metric == "extra_over_bytes" and decode:  # the bench's: beyond a pool of 32 on the same tokens
        extra_bytes = 2.0 * (min(count, m) - min(32, m)) * r * (k + n)
        return (seconds(fused) - seconds(layer(32))) / (extra_bytes / H200.bandwidth)
    if metric == "bw_fraction" and decode:  # the bench's: the adapters' bytes, each once, over their launches
        adapter_bytes = 2.0 * min(count, m) * r * (k + n)
        alone = (
            ideal_multi_lora(m, n, k, r, count, base_given=True)
            if best
            else multi_lora_adapters_alone(m, n, k, r, count)
        )
        return adapter_bytes / H200.bandwidth / seconds(alone)
    return None


# ------------------------------------------------------------------------------------------------------------
# The bottleneck adapter's forward (fastpeft/ops/bottleneck.py's dispatch) and the composition it replaces
# ------------------------------------------------------------------------------------------------------------

# One cluster barrier's latency (Hopper microbenchmarks put it at a few hundred ns), paid once per wave of
# clusters at each barrier: an assumption.
CLUSTER_SYNC_S = 0.25e-6
# mma.sync (WMMA 16x16x16, what csrc/'s tile kernels issue) against the wgmma ceiling cuBLAS reaches: an assumption.
WMMA_EFFICIENCY = 0.5


def bottleneck_forward(m: int, d: int, mb: int, design: str = "dispatch") -> list[Pass]:
    """One adapter's fused forward (no LayerNorm), bf16, by its dispatch on an H200 (fastpeft/ops/bottleneck_plan.py),
    or the ``design`` named: "triton" or "cuda tiles" (decode's rows kernel is modelled as the tiles: no target
    reads it).

    The CUDA tile kernel spreads a tile of rows over a cluster, each block staging its slice of x in shared memory:
    x read once, y written once, both projections read from L2 once per tile; two cluster barriers per tile
    (the partial h, z; the exit needs none without a LayerNorm); its shared-memory traffic is x staged and read
    once per 16 columns of h, z read once per 16 features of y, the fp32 scratch tiles and y's epilogue. The
    Triton tiles take 64 rows (32 past a
    bottleneck of 64) and read both projections once per tile, and x twice: the second time from L2 when the
    tiles in flight (two per SM) fit in it, else from HBM. Loads, MMAs and stores are assumed to overlap (two
    blocks per SM for the CUDA kernel where they fit: otherwise optimistic)."""
    weights, io = 4.0 * d * mb, 4.0 * m * d
    flops = 4.0 * m * d * mb
    gpu = bottleneck_plan.H200
    if design == "dispatch":
        design = "cuda tiles" if bottleneck_plan.prefill_on_cuda_tiles(m, d, mb, torch.bfloat16, gpu) else "triton"
    if design == "cuda tiles":
        plan = bottleneck_plan.cuda_tile_plan(d, mb, gpu)
        if plan is None:
            raise ValueError(f"the CUDA tile kernel does not take d={d}, m={mb}")
        tiles = math.ceil(m / plan.rows)
        ctas = tiles * plan.cluster
        two = bottleneck_plan.tile_layout_bytes(d // plan.cluster, mb, plan.rows) <= bottleneck_plan.TWO_BLOCKS_PER_SM
        per_sm = 2 if two else 1
        waves = math.ceil(ctas / (H200.sms * per_sm))
        # x staged, read per 16 columns of h, read and rewritten by y's epilogue, read for the store; z per 16
        # features of y; the fp32 scratch tiles written and read.
        staged = 2.0 * m * d
        shared = staged * (4 + mb // 16) + 2.0 * m * mb * d / 16 + 8.0 * m * d
        return [Pass("CUDA bottleneck cluster tiles", io + weights, flops, mma_efficiency=WMMA_EFFICIENCY, ctas=ctas,
                     ctas_per_sm=per_sm, shared_bytes=shared, l2_bytes=weights * tiles, streams=True,
                     fixed_s=2 * CLUSTER_SYNC_S * waves)]  # fmt: skip
    rows = bottleneck_plan.triton_tile_rows(mb, torch.bfloat16)
    programs = math.ceil(m / rows)
    reread = 2.0 * m * d
    from_l2 = not bottleneck_plan.triton_rereads_x_from_hbm(d, mb, torch.bfloat16, gpu)
    return [Pass("Triton bottleneck tiles", io + (0.0 if from_l2 else reread) + weights, flops, ctas=programs,
                 ctas_per_sm=2, mma_efficiency=TRITON_GEMM_EFFICIENCY,
                 l2_bytes=weights * programs + (reread if from_l2 else 0.0))]  # fmt: skip


def bottleneck_composition(m: int, d: int, mb: int) -> list[Pass]:
    """AdapterHub's module as PyTorch runs it: two cuBLAS GEMMs through [m, mb], the activation, the scale and
    the residual add each a pass over their tensors."""
    return [Pass("x Wd^T + bd", 2.0 * (m * d + mb * d + m * mb), 2.0 * m * d * mb), Pass("act", 4.0 * m * mb),
            Pass("z Wu^T + bu", 2.0 * (m * mb + d * mb + m * d), 2.0 * m * d * mb), Pass("* scaling", 4.0 * m * d),
            Pass("x + out", 6.0 * m * d)]  # fmt: skip


def bottleneck_backward(m: int, d: int, mb: int, adapters: int = 1, samples: int = 1) -> list[Pass]:
    """The fused backward's two Triton launches (bf16, no LayerNorm, the residual x itself) as
    triton_kernels/bottleneck.py tiles them, and the host's small tensors around them. The row pass reads x and
    dy, writes z, dz and dx (dy reread from L2 for the residual's share), and every tile of rows reads the three
    projection tiles it multiplies by from L2; the parameter pass reads x and dy again by feature tile, and each
    (adapter, feature tile) re-reads its rows' z and dz from L2; the splits' fp32 partial sums go out and back."""
    mb_pad = max(16, 1 << (mb - 1).bit_length())
    rows = bottleneck_kernels.tile_options(mb_pad, torch.bfloat16, backward=True, interpreter=False)
    programs = math.ceil(m / rows["BLOCK_M"])
    weights = 2.0 * d * mb
    row_pass = Pass("Triton backward rows", 6.0 * m * d + 4.0 * m * mb + 4.0 * d * mb * adapters, 6.0 * m * d * mb,
                    mma_efficiency=TRITON_GEMM_EFFICIENCY, ctas=programs,
                    l2_bytes=3.0 * weights * programs + 2.0 * m * d)  # fmt: skip
    opts = bottleneck_kernels.param_grad_options(mb_pad, torch.bfloat16, interpreter=False)
    tiles = math.ceil(d / opts["BLOCK_D"])
    shares = bottleneck_kernels.param_grad_shares(samples, m // samples, adapters * tiles, opts["BLOCK_R"], H200.sms)
    ctas = adapters * tiles * shares.splits
    slot = 4.0 * (2 * opts["BLOCK_D"] * mb_pad + opts["BLOCK_D"] + mb_pad)
    partials = 2.0 * ctas * slot if shares.splits > 1 else 0.0
    grads = 8.0 * d * mb * adapters  # dWd and dWu in fp32
    param_pass = Pass("Triton backward parameters", 4.0 * m * d + partials + grads, 4.0 * m * d * mb,
                      mma_efficiency=TRITON_GEMM_EFFICIENCY, ctas=ctas, ctas_per_sm=2,
                      l2_bytes=tiles * 4.0 * m * mb)  # fmt: skip
    # The host's: the fp32 down bias (c0), the grads' zeros for M = 0 aside; the four gradients cast to bf16.
    casts = [Pass("gradient to bf16", 6.0 * d * mb * adapters) for _ in range(2)] + [Pass("bias grads", 0.0)] * 2
    return [Pass("c0 = down bias in fp32", 0.0), row_pass, param_pass, *casts]


def bottleneck_composition_backward(m: int, d: int, mb: int) -> list[Pass]:
    """Autograd through the composition: the scale's gradient, cuBLAS for each Linear's two gradients, the
    biases' column sums, the activation's mask, and x's two gradients (the residual's and the Linear's) added."""
    return [Pass("dy * scaling", 4.0 * m * d), Pass("dz = dout Wu", 2.0 * (m * d + d * mb + m * mb), 2.0 * m * d * mb),
            Pass("dWu = dout^T z", 2.0 * (m * d + m * mb + d * mb), 2.0 * m * d * mb), Pass("dbu", 2.0 * m * d),
            Pass("act'", 6.0 * m * mb), Pass("dx = dh Wd", 2.0 * (m * mb + d * mb + m * d), 2.0 * m * d * mb),
            Pass("dWd = dh^T x", 2.0 * (m * mb + m * d + d * mb), 2.0 * m * d * mb), Pass("dbd", 2.0 * m * mb),
            Pass("dx + dy", 6.0 * m * d)]  # fmt: skip


def bottleneck_loop(m: int, d: int, mb: int, adapters: int) -> list[Pass]:
    """AdapterHub's BatchSplit as the bench's loop runs it: per adapter, its rows found (nonzero: a host sync),
    x gathered for the down-projection and again for the residual, the composition on those rows, and the result
    scattered back into the output."""
    rows = m / adapters
    passes: list[Pass] = []
    for _ in range(adapters):
        passes += [Pass("ids == a", 0.0), Pass("nonzero", 0.0, fixed_s=HOST_SYNC_S)]
        passes += [Pass("x[rows]", 4.0 * rows * d), Pass("x[rows] again", 4.0 * rows * d)]
        passes += bottleneck_composition(math.ceil(rows), d, mb) + [Pass("out[rows] = ...", 4.0 * rows * d)]
    return passes


def ideal_bottleneck(m: int, d: int, mb: int, train: bool = False) -> list[Pass]:
    """The bottleneck adapter's ideal (:func:`ideal`, bf16): x read, y written, both projections read, their two
    products; with ``train`` also the backward: x and dy read, dx written, the projections read and their
    gradients written, four products, in a second launch."""
    forward_bytes, flops = 4.0 * m * d + 4.0 * d * mb, 4.0 * m * d * mb
    if not train:
        return ideal("bottleneck adapter", forward_bytes, flops)
    return ideal("bottleneck adapter step", forward_bytes + 6.0 * m * d + 8.0 * d * mb, 3 * flops, 2)


def _bottleneck_metric(metric: str, case: dict, best: bool = False) -> float | None:
    if case.get("ln_before"):
        return None  # the LayerNorm's passes are not modelled yet
    m, d, mb, count = case["m"], case["d"], case["bottleneck"], case.get("adapters", 1)
    fused = seconds(ideal_bottleneck(m, d, mb) if best else bottleneck_forward(m, d, mb))
    if case.get("mode") == "forward+backward":
        if count != 1 or metric != "speedup_vs_torch":
            return None
        composition = bottleneck_composition(m, d, mb) + bottleneck_composition_backward(m, d, mb)
        if best:
            return seconds(composition) / seconds(ideal_bottleneck(m, d, mb, train=True))
        return seconds(composition) / (fused + seconds(bottleneck_backward(m, d, mb)))
    if count > 1:  # the fused forward reads each tile's own adapter's weights: as one adapter's
        return seconds(bottleneck_loop(m, d, mb, count)) / fused if metric == "speedup_vs_loop" else None
    if metric == "bw_fraction":  # the bench's: x, y and the weights once, against the copy ceiling
        return (4.0 * m * d + 4.0 * d * mb) / H200.bandwidth / fused
    if metric == "speedup_vs_torch":
        return seconds(bottleneck_composition(m, d, mb)) / fused
    return None


# ------------------------------------------------------------------------------------------------------------
# Target rows
# ------------------------------------------------------------------------------------------------------------


def ideal_4bit(m: int, n: int, k: int, r: int, train: bool = False, blocksize: int = 64, nested: bool = True):
    """The 4-bit layer's ideal: :func:`ideal_lora` with W read as its packed nibbles and absmax (r = 0: the
    4-bit product alone)."""
    return ideal_lora(m, n, k, r, train, weight_bytes=weight_4bit_bytes(n, k, blocksize, nested))


def _qlora_metric(metric: str, case: dict, best: bool = False) -> float | None:
    m, n, k = case["m"], case["n"], case["k"]
    r = case["r"] if case.get("mode") in ("qlora", "qlora_train") else 0
    shape = dict(blocksize=case.get("blocksize", 64), nested=case.get("double_quant", True))
    if case.get("mode") == "qlora_train":
        if metric != "speedup_vs_peft":
            return None
        step = ideal_4bit(m, n, k, r, True, **shape) if best else qlora_train(m, n, k, r, **shape)
        return seconds(peft_bnb_lora_train(m, n, k, r, **shape)) / seconds(step)
    fused = seconds(ideal_4bit(m, n, k, r, **shape) if best else matmul_4bit(m, n, k, r, **shape))
    if metric == "speedup_vs_bf16":
        return seconds(bf16_linear(m, n, k)) / fused
    if metric == "ratio_vs_bf16":
        return fused / seconds(bf16_linear(m, n, k))
    if metric == "speedup_vs_bnb":
        bnb = bnb_matmul_4bit(m, n, k, **shape)  # None: its MMA tier, not modelled
        return None if bnb is None else seconds(bnb) / fused
    if metric == "ratio_vs_matmul_4bit":
        return fused / seconds(matmul_4bit(m, n, k, 0, **shape))
    if metric == "speedup_vs_peft" and case.get("mode") == "qlora":
        return seconds(peft_bnb_lora(m, n, k, r, **shape)) / fused
    return None


def _lora_metric(metric: str, case: dict, best: bool = False) -> float | None:
    m, n, k, r = case["m"], case["n"], case["k"], case["r"]
    train = case.get("mode") == "forward+backward"
    if case.get("dropout"):  # the default mode, nn.Dropout's own mask (--designs: the philox mode beside it)
        fused = lora_train_dropout(m, n, k, r, "torch") if train else None
        if fused is None or metric != "speedup_vs_unfused":
            return None
        step = ideal_lora(m, n, k, r, train=True) if best else fused  # ideally the mask is drawn in the kernels
        return seconds(peft_lora_train(m, n, k, r, dropout=True)) / seconds(step)
    fused = (lora_train if train else lora_forward)(m, n, k, r)
    if fused is None:
        return None
    if best:
        fused = ideal_lora(m, n, k, r, train)
    if metric == "ratio_vs_base" and not train:
        return seconds(fused) / seconds(bf16_linear(m, n, k))
    if metric == "speedup_vs_unfused":
        return seconds((peft_lora_train if train else peft_lora)(m, n, k, r)) / seconds(fused)
    return None


def _dora_metric(metric: str, case: dict, best: bool = False) -> float | None:
    m, n, k, r = case["m"], case["n"], case["k"], case["r"]
    fused = dora_train(m, n, k, r) if case.get("mode") == "forward+backward" and not case.get("dropout") else None
    if fused is None:
        return None
    if best:  # the LoRA step's, and the pre-scale product read back for the magnitude's gradient
        fused = ideal_lora(m, n, k, r, train=True, extra_bytes=2.0 * m * n)
    if metric == "speedup_vs_peft":
        return seconds(peft_dora_train(m, n, k, r)) / seconds(fused)
    if metric == "ratio_vs_lora":
        return seconds(fused) / seconds(lora_train(m, n, k, r))
    return None


MODELS: dict[str, Callable[..., float | None]] = {
    "dora": _dora_metric,
    "qlora": _qlora_metric,
    "lora": _lora_metric,
    "multi_lora": _multi_lora_metric,
    "bottleneck": _bottleneck_metric,
}


def predict(target: targets.Target, case: dict, best: bool = False) -> float | None:
    """The model's value of ``target.metric`` for ``case``, or None where no model covers it yet; ``best``: the
    value with fastpeft's op replaced by its ideal (:func:`ideal`), the baseline as it is: what no design of
    the op can better."""
    model = MODELS.get(target.bench or "")
    return None if model is None else model(target.metric, case, best=best)


def prediction_rows() -> list[tuple[targets.Target, dict, float | None]]:
    return [(target, case, predict(target, case)) for target in targets.TARGETS for case in target.cases]


def prediction_table() -> list[str]:
    """Markdown: every target row, the model's prediction, the best any design could reach (:func:`ideal`) and
    whether the prediction meets the bound; a row whose bound even the ideal misses says so."""
    lines = ["| target | case | bound | predicted | best any design | meets |", "|---|---|---|---:|---:|---|"]
    for target, case, value in prediction_rows():
        shape = targets.case_label(case)
        if value is None:
            lines.append(f"| {target.name} | {shape} | {target.describe()} | not modelled | | |")
            continue
        best = predict(target, case, best=True)
        meets = "yes" if target.met(value) else "**no**" if target.met(best) else "**no**: beyond any design"
        lines.append(f"| {target.name} | {shape} | {target.describe()} | {value:.2f} | {best:.2f} | {meets} |")
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
    global H200
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", metavar="RESULTS_JSON", help="a bench run's results.json (benchmarks/run.py)")
    parser.add_argument("--designs", action="store_true", help="the LoRA designs compared on paper")
    parser.add_argument("--launch-us", type=float, default=None,
                        help="another gap between back-to-back launches than the assumed 1 µs: the rows that hang "
                             "on the one assumption no run has measured (every 'over PEFT' decode row)")  # fmt: skip
    args = parser.parse_args(argv)
    assumed = H200
    if args.launch_us is not None:
        H200 = dataclasses.replace(H200, launch_s=args.launch_us * 1e-6)
    try:
        if args.designs:
            print("\n".join(design_table()))
        elif args.compare:
            report = json.loads(Path(args.compare).read_text())
            print("\n".join(compare(report["rows"] if isinstance(report, dict) else report)))
        else:
            print("\n".join(prediction_table()))
    finally:
        H200 = assumed
    return 0


if __name__ == "__main__":
    sys.exit(main())
