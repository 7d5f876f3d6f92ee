"""Compile fastpeft's Triton kernels for a GPU exactly as the host code launches them, on a machine without one.

    python scripts/compile_triton.py [--arch 90] [--cases coverage,targets] [--json FILE] [--jobs N] [--all-configs]

How: the host code runs on meta tensors (shapes, strides and 16-byte alignment as a GPU's allocations have them;
nothing is computed), Triton's driver is replaced by one that targets sm_<arch> and never launches, and each
launch is recorded with its arguments, its configuration (the pinned one that FASTPEFT_TRITON_AUTOTUNE=0
launches) and its grid. Each launch is then compiled through Triton's own JIT path, so the integer arguments are
specialised as they are at run time (16-divisible sizes and strides, unit strides as constants, aligned
pointers), and read back:

- registers, stack bytes (spills), shared memory (cuobjdump -res-usage on the cubin, Triton's metadata);
- blocks per SM (registers, shared memory and warps against an SM's), CTAs and waves on 132 SMs;
- SASS features: 16-byte global loads (LDG.128, LDGSTS.128), tensor-core MMA (HGMMA, HMMA), TMA (UTMALDG,
  UBLKCP), local memory (LDL, STL), float atomics (RED/ATOM on F16/BF16/F32/F64);
- the TTIR's 32-bit integer products with a runtime size or stride argument: offsets that could pass 2**31
  elements. Every kernel forms such offsets in 64 bits.

Cases: ``coverage`` (every kernel variant the host code launches, at small odd shapes, fp16/bf16/fp32) and
``targets`` (benchmarks/targets.py's TARGETS shapes, bf16, through the ops' own dispatch with the Triton
backend). Exit status 1 when a launch fails to compile, exceeds the GPU's shared memory, spills in a 16-bit
pinned configuration, forms a 32-bit offset product, or has float atomics where its module does not allow them
(FLOAT_ATOMIC_KERNELS). ``--json`` writes one row per launch
(scripts/kernel_report.py reads it). Needs TRITON_INTERPRET unset (cleared here) and Triton's CUDA backend.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: kernels must be JIT functions
os.environ["FASTPEFT_TRITON_AUTOTUNE"] = "0"  # the pinned configurations, which launch without timing anything

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # targets.py: the TARGETS shapes
sys.path.insert(0, str(ROOT / "scripts"))  # kernel_facts.py

import torch  # noqa: E402
import triton  # noqa: E402
from kernel_facts import (  # noqa: E402
    REFERENCE_SMS,
    SHARED_PER_BLOCK,
    cuobjdump,
    narrow_offset_products,
    occupancy,
    sass_features,
)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

META = torch.device("meta")


# ------------------------------------------------------------------------------------------------------------
# Recording launches
# ------------------------------------------------------------------------------------------------------------


class OffDeviceDriver:
    """Stands in for Triton's CUDA driver: the current target is sm_<arch>, and nothing ever launches."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return META


@dataclass(frozen=True)
class TensorSpec:
    """A tensor argument as Triton specialises it: its dtype and whether its address is 16-byte aligned."""

    dtype: str
    misaligned_bytes: int

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(str(t.dtype).removeprefix("torch."), t.data_ptr() % 16)

    def tensor(self) -> torch.Tensor:
        """A meta tensor whose data_ptr() has the same alignment (a meta tensor's is its byte offset)."""
        dtype = getattr(torch, self.dtype)
        size = dtype.itemsize if dtype.is_floating_point or dtype == torch.bool else torch.iinfo(dtype).bits // 8
        return torch.empty(64, dtype=dtype, device=META)[self.misaligned_bytes // size :]


@dataclass
class Launch:
    """One recorded launch: the kernel, its arguments (tensors as specs), options and grid, and its case."""

    case: str
    dtype: str
    module: str
    kernel: str
    args: list
    kwargs: dict
    grid: tuple[int, ...]

    def run_args(self) -> tuple[list, dict]:
        def value(v):
            return v.tensor() if isinstance(v, TensorSpec) else v

        return [value(a) for a in self.args], {k: value(v) for k, v in self.kwargs.items()}

    @property
    def ctas(self) -> int:
        count = 1
        for g in self.grid:
            count *= g
        return count

    def config(self) -> str:
        """The launch's tile: BLOCK_* and friends, warps and stages."""
        keys = sorted(k for k in self.kwargs if k.startswith(("BLOCK", "GROUP", "SPLIT", "R_PAD", "MB_PAD", "V_W")))
        parts = [f"{k.removeprefix('BLOCK_')}={self.kwargs[k]}" for k in keys]
        parts.append(f"w{self.kwargs.get('num_warps', 4)}s{self.kwargs.get('num_stages', 3)}")
        return " ".join(parts)


_recorded: list[Launch] | None = None
_current = ("", "")


def _record_run(self: JITFunction, *args, grid, warmup, **kwargs):
    """JITFunction.run while recording: no compile, no launch; the arguments and grid are kept."""
    meta = dict(zip(self.arg_names, args, strict=False)) | kwargs
    grid = tuple(int(g) for g in (grid(meta) if callable(grid) else grid))

    def spec(v):
        return TensorSpec.of(v) if isinstance(v, torch.Tensor) else v

    kwargs = {k: spec(v) for k, v in kwargs.items() if k not in ("debug", "instrumentation_mode")}
    _recorded.append(Launch(*_current, self.module, self.fn.__name__, [spec(a) for a in args], kwargs, grid))


@contextlib.contextmanager
def recording(case: str, dtype: torch.dtype) -> Iterator[list[Launch]]:
    """Record the Triton launches of the block (which runs on meta tensors), labelled ``case``."""
    global _recorded, _current
    previous = JITFunction.run
    JITFunction.run = _record_run
    _recorded, _current = [], (case, str(dtype).removeprefix("torch."))
    try:
        yield _recorded
    finally:
        JITFunction.run = previous
        _recorded = None


@contextlib.contextmanager
def triton_on_meta() -> Iterator[None]:
    """The ops run their Triton backend on meta tensors: the dispatch accepts Triton there (it would refuse: no
    GPU), and the custom ops the ops call eagerly run their Python bodies (on meta tensors torch would run
    their fake implementations, which launch nothing)."""
    import importlib
    import pkgutil

    import fastpeft.backends as backends
    import fastpeft.ops

    real = backends.backend_unavailable_reason

    def reason(backend, device):
        return None if backend == "triton" and torch.device(device).type == "meta" else real(backend, device)

    custom_ops = []
    for info in pkgutil.iter_modules(fastpeft.ops.__path__):
        module = importlib.import_module(f"fastpeft.ops.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, torch._library.custom_ops.CustomOpDef):
                custom_ops.append((module, name, value))
                setattr(module, name, value._init_fn)
    backends.backend_unavailable_reason = reason
    try:
        with backends.use_backend("triton"):
            yield
    finally:
        backends.backend_unavailable_reason = real
        for module, name, value in custom_ops:
            setattr(module, name, value)


# ------------------------------------------------------------------------------------------------------------
# The cases: host code on meta tensors
# ------------------------------------------------------------------------------------------------------------


def _t(*shape: int, dtype=torch.bfloat16, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META, requires_grad=grad)


def _lora_form(fn: Callable[[], None], setting: str, value: object) -> Callable[[], None]:
    """``fn`` with ``setting`` (a dispatch threshold or rule of triton_kernels/lora.py or lora_persistent.py) at
    ``value``."""
    from fastpeft.triton_kernels import lora, lora_persistent

    module = lora_persistent if hasattr(lora_persistent, setting) else lora

    def run() -> None:
        with mock.patch.object(module, setting, value):
            fn()

    return run


def _lora_coverage(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    """Each form of the dispatch: prefill on the tiles with their K loop (not cuBLAS and the epilogue), and the
    one-launch decode on its column tiles as well as on the stream-K schedule these small shapes get."""
    for name, fn in _lora_forms_coverage(dtype):
        if " prefill " in name:
            yield name, _lora_form(fn, "CUBLAS_BASE_MIN_M", 2**62)
        else:
            yield name, fn
            if " fused" in name:
                never = lambda *args, **kwargs: False
                yield name.replace(" fused", " fused tiles"), _lora_form(fn, "uses_stream_k", never)


def _lora_forms_coverage(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    from fastpeft.triton_kernels import lora

    k, n = 200, 120
    dropout = lora.PhiloxDropout(5, 0.1, 1 / 0.9, k, 1)
    w, bias = _t(n, k, dtype=dtype), _t(n, dtype=dtype)
    a16, b16 = _t(16, k, dtype=dtype), _t(n, 16, dtype=dtype)
    a64, b64 = _t(64, k, dtype=dtype), _t(n, 64, dtype=dtype)
    a256, b256 = _t(256, k, dtype=dtype), _t(n, 256, dtype=dtype)
    for m, label in ((5, "decode"), (37, "decode"), (100, "epilogue"), (100, "prefill")):
        x = _t(m, k, dtype=dtype)
        xa64, xa256 = _t(m, 64, dtype=torch.float32), _t(m, 256, dtype=torch.float32)
        if m <= lora.DECODE_MAX_M:
            yield f"lora {label} fused m={m}", partial(lora.lora_linear, x, w, a16, b16, 2.0, bias)
            yield (
                f"lora {label} fused+dropout-x m={m}",
                partial(lora.lora_linear, x, w, a16, b16, 2.0, None, dropout_x=dropout),
            )
        yield f"lora {label} expand r=64 m={m}", partial(lora.lora_linear, x, w, None, b64, 2.0, bias, xa=xa64)
        yield (
            f"lora {label} expand+dropout-out m={m}",
            partial(lora.lora_linear, x, w, None, b64, 2.0, None, xa=xa64, dropout_out=dropout),
        )
        dora = dict(out_scale=_t(n, dtype=torch.float32), z=_t(m, n, dtype=dtype))
        yield f"lora {label} dora m={m}", partial(lora.lora_linear, x, w, None, b64, 2.0, bias, xa=xa64, **dora)
        yield f"lora {label} expand r=256 m={m}", partial(lora.lora_linear, x, w, None, b256, 2.0, None, xa=xa256)
        if label != "prefill":  # the shrink is the same in both forms past the decode rows
            yield f"lora shrink r=64 m={m}", partial(lora.lora_shrink, x, a64)
            yield f"lora shrink+dropout r=256 m={m}", partial(lora.lora_shrink, x, a256, dropout)
    dy, dyb = _t(37, n, dtype=dtype), _t(37, 64, dtype=torch.float32)
    yield "lora dx (transposed W) m=37", partial(lora.lora_linear, dy, w.t(), None, a64.t(), 2.0, None, xa=dyb)
    for m in (5, 100):  # nn.Dropout's mask read as bits: the forward's shrink, dx's LoRA term, dA's shrink over x^T
        bits = lora.BitsDropout(_t(m, -(-k // 8), dtype=torch.uint8), 1 / 0.9)
        x, dy, dyb = _t(m, k, dtype=dtype), _t(m, n, dtype=dtype), _t(m, 16, dtype=torch.float32)
        yield f"lora shrink+bits r=16 m={m}", partial(lora.lora_shrink, x, a16, bits)
        yield f"lora dx+bits r=16 m={m}", partial(lora.lora_linear, dy, w.t(), None, a16.t(), 2.0, None, xa=dyb,
                                                   dropout_out=bits)  # fmt: skip
        yield f"lora dA shrink+bits m={m}", partial(lora.lora_shrink, x.t(), _t(16, m, dtype=dtype), bits.transposed())
        if m <= lora.DECODE_MAX_M:
            yield f"lora fused+bits m={m}", partial(lora.lora_linear, x, w, a16, b16, 2.0, None, dropout_x=bits)
    from fastpeft.triton_kernels.lora_dy_pass import lora_dy_pass

    for m, b in ((37, b16), (100, b64)):
        xa = _t(m, b.shape[1], dtype=torch.float32)
        yield f"lora dy pass r={b.shape[1]} m={m}", partial(lora_dy_pass, _t(m, n, dtype=dtype), b, xa, 2.0)
    yield "lora keep mask", partial(lora.keep_mask, dropout, 37, k, META)
    yield "lora pack bits", partial(lora.pack_bits, _t(37, k, dtype=torch.bool))
    from fastpeft.triton_kernels.dora import dora_grad_scale, dora_weight_norm

    yield "dora grad scale m=100", partial(dora_grad_scale, _t(100, n, dtype=dtype), _t(100, n, dtype=dtype),
                                           _t(n, dtype=torch.float32))  # fmt: skip
    for rank in (16, 64, 128):
        a, b = _t(rank, k, dtype=dtype), _t(n, rank, dtype=dtype)
        yield f"dora weight norm r={rank}", partial(dora_weight_norm, w, a, b, 2.0)
    if dtype != torch.float32:  # the persistent TMA prefill (off by default), here and at a target's size
        xa = _t(100, 64, dtype=torch.float32)
        persistent = partial(lora.lora_linear, _t(100, k, dtype=dtype), w, None, b64, 2.0, bias, xa=xa)
        yield "lora persistent r=64 m=100", _lora_form(persistent, "PERSISTENT_PREFILL_MIN_M", 0)
        x, big, b_big = _t(4096, 4096, dtype=dtype), _t(4096, 4096, dtype=dtype), _t(4096, 16, dtype=dtype)
        yield "lora persistent r=16 m=4096 4096->4096", _lora_form(
            partial(lora.lora_linear, x, big, None, b_big, 2.0, None, xa=_t(4096, 16, dtype=torch.float32)),
            "PERSISTENT_PREFILL_MIN_M", 0,
        )  # fmt: skip
        # The backward's dx = dy W + s (dy B) A: W and A read through descriptors of their stored layout.
        dx = partial(lora.lora_linear, x, big.t(), None, _t(16, 4096, dtype=dtype).t(), 2.0, None,
                     xa=_t(4096, 16, dtype=torch.float32))  # fmt: skip
        yield "lora persistent dx r=16 m=4096 4096->4096", _lora_form(dx, "PERSISTENT_PREFILL_MIN_M", 0)
        # The forward with x A^T in the kernel's own pass over x (A [16, 4096] through a descriptor too).
        own_pass = partial(lora.lora_linear, x, big, _t(16, 4096, dtype=dtype), b_big, 2.0, None)
        yield "lora persistent shrink r=16 m=4096 4096->4096", _lora_form(own_pass, "PERSISTENT_PREFILL_MIN_M", 0)


def _multi_lora_coverage(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    from fastpeft.triton_kernels import multi_lora as ml
    from fastpeft.triton_kernels import multi_lora_4bit as ml4

    k, n = 200, 120
    tables = (_t(3, 3, dtype=torch.int32), _t(3, 3, dtype=torch.int32), _t(3, 3, dtype=torch.int64))
    tables += (_t(3, 3, dtype=torch.float32), _t(4, dtype=torch.int32))
    for v_width in (16, 64, 256, 512, 1024):  # 512 and 1024: packed q/k/v pools of rank 128 and 256 per slice
        a, b, a_offsets = _t(v_width * 3, k, dtype=dtype), _t(v_width * n, dtype=dtype), _t(4, dtype=torch.int32)
        for m in (5, 100):
            x, ids, base = _t(m, k, dtype=dtype), _t(m, dtype=torch.int32), _t(m, 3 * n, dtype=dtype)
            form = "token" if m <= ml.DECODE_MAX_M else "tile"
            yield f"multi_lora shrink/{form} v={v_width}", partial(ml.multi_lora_shrink, x, a, a_offsets, ids, v_width)
            v = _t(m, v_width, dtype=torch.float32)
            yield f"multi_lora expand/{form} v={v_width}", partial(ml.multi_lora_expand, base, v, b, ids, *tables, n)
        m = 37  # the grouped kernels (decode with a batch description)
        x, base, order, starts = (
            _t(m, k, dtype=dtype),
            _t(m, 3 * n, dtype=dtype),
            _t(m, dtype=torch.int32),
            _t(5, dtype=torch.int32),
        )
        yield (f"multi_lora sgmv v={v_width}",
               partial(ml.multi_lora_sgmv, base, x, a, a_offsets, b, order, starts, *tables, v_width, n))  # fmt: skip
        weight = _t(3 * n, k, dtype=dtype)
        yield (f"multi_lora sgmv linear v={v_width}",
               partial(ml.multi_lora_sgmv_linear, x, weight, _t(3 * n, dtype=dtype), a, a_offsets, b, order, starts,
                       *tables, v_width, n))  # fmt: skip
        for nested, odd in ((True, 0), (False, 1)):  # the 4-bit base, its K even (byte pairs) and odd
            w4 = _weight4bit(3 * n, k - odd, nested, dtype).forward_args()
            yield (f"multi_lora sgmv linear 4-bit v={v_width} nested={nested} K={k - odd}",
                   partial(ml4.multi_lora_sgmv_linear_4bit, _t(m, k - odd, dtype=dtype), w4, _t(3 * n, dtype=dtype),
                           _t(v_width * 3, k - odd, dtype=dtype), a_offsets, b, order, starts, *tables, v_width,
                           n))  # fmt: skip
    if dtype != torch.float32:  # the persistent TMA prefill (off by default), here and at the target's size
        from fastpeft.triton_kernels.multi_lora_persistent import multi_lora_linear_persistent

        for m, k, n, rank in ((100, 200, 120, 32), (4096, 4096, 4096, 16)):
            tables = (_t(9, dtype=torch.int32), _t(8 * rank * n, dtype=dtype), _t(m, dtype=torch.int32),
                      _t(1, 8, dtype=torch.int64), _t(1, 8, dtype=torch.float32))  # fmt: skip
            yield (f"multi_lora persistent r={rank} m={m} {k}->{n}",
                   partial(multi_lora_linear_persistent, _t(m, k, dtype=dtype), _t(n, k, dtype=dtype),
                           _t(n, dtype=dtype), _t(8 * rank, k, dtype=dtype), *tables, rank))  # fmt: skip


def _weight4bit(n: int, k: int, nested: bool, dtype: torch.dtype, blocksize: int = 64):
    """A 4-bit weight [n, k] as the kernels take it, on meta tensors (its bytes and state)."""
    from fastpeft.ops.qlora import Weight4bit

    blocks = -(-n * k // blocksize)
    absmax = _t(blocks, dtype=torch.uint8 if nested else torch.float32)
    fp32 = dict(dtype=torch.float32)
    state2 = (_t(-(-blocks // 256), **fp32), _t(256, **fp32), _t(1, **fp32)) if nested else (None, None, None)
    packed, code = _t(-(-n * k // 2), dtype=torch.uint8), _t(16, **fp32)
    return Weight4bit(packed, absmax, code, *state2, blocksize, 256, n, k, dtype)


def _qlora_coverage(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    from fastpeft.triton_kernels import qlora as q

    n = 120
    for k in (256, 203):  # even K: byte pairs; odd K: the per-element path
        a, b = _t(16, k, dtype=dtype), _t(n, 16, dtype=dtype)
        for m in (5, 100):
            label = f"{'decode' if m <= q.DECODE_MAX_M else 'prefill'} m={m} K={k}"
            x, bias, xa = _t(m, k, dtype=dtype), _t(n, dtype=dtype), _t(m, 16, dtype=torch.float32)
            for nested in (True, False):
                w = _weight4bit(n, k, nested, dtype)
                forward = partial(q.matmul_4bit, x, w.packed, *w.state_args(), n, dtype)
                yield f"qlora forward {label} {'nested' if nested else 'plain absmax'}", partial(forward, bias)
                if m == 5:  # the dequantize-once tier's pass, once per K and absmax kind
                    dense = partial(q.dequantize_4bit, w.packed, *w.state_args(), n, k, dtype, _t(n, k, dtype=dtype))
                    yield f"qlora dequantize K={k} {'nested' if nested else 'plain absmax'}", dense
            yield f"qlora forward {label} lora xa", partial(forward, None, None, xa, b, 2.0)
            if m <= q.DECODE_MAX_M:
                yield f"qlora forward {label} lora fused shrink", partial(forward, None, a, None, b, 2.0)
            dx = partial(q.matmul_4bit_t, _t(m, n, dtype=dtype), w.packed, *w.state_args(), k, dtype)
            yield f"qlora dx {label}", dx
            yield f"qlora dx {label} lora", partial(dx, xa, a, 2.0)


def _bottleneck_coverage(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    from fastpeft.triton_kernels import bottleneck as bn

    from fastpeft.ops.bottleneck import ACTIVATION_CODES, Adapters, Post

    d, rows = 200, 130
    x, dy = _t(rows, d, dtype=dtype), _t(rows, d, dtype=dtype)
    plain = Post(None, None, None, 1e-5)
    add_ln = Post(_t(rows, d, dtype=dtype), _t(d, dtype=dtype), _t(d, dtype=dtype), 1e-5)
    for mb in (16, 64, 128, 256):
        for count in (1, 3):

            def per_adapter(*shape, dtype=dtype, count=count):
                return _t(count, *shape, dtype=dtype)

            scaling = per_adapter(d, dtype=torch.float32) if count > 1 else 2.0
            adapters = Adapters(per_adapter(mb, d), per_adapter(mb), per_adapter(d, mb), per_adapter(d), scaling,
                                per_adapter(d), per_adapter(d))  # fmt: skip
            ids = _t(rows, dtype=torch.int32) if count > 1 else None
            label = f"bottleneck m={mb} adapters={count}"
            for act in sorted(set(ACTIVATION_CODES)) if mb == 64 and count == 1 else ["gelu"]:
                yield (
                    f"{label} {act}",
                    partial(bn.bottleneck_forward, x, None, adapters, ids, 10, ACTIVATION_CODES[act], 1e-5, plain),
                )
            yield (
                f"{label} + add & LayerNorm",
                partial(bn.bottleneck_forward, x, None, adapters, ids, 10, ACTIVATION_CODES["relu"], 1e-5, add_ln),
            )
            if mb <= bn.BACKWARD_MAX_MB_PAD:
                yield (
                    f"bottleneck backward m={mb} adapters={count}",
                    partial(bn.bottleneck_backward, x, dy, adapters, ids, 10, ACTIVATION_CODES["gelu"], 1e-5, True),
                )


COVERAGE = {
    "lora": _lora_coverage,
    "multi_lora": _multi_lora_coverage,
    "qlora": _qlora_coverage,
    "bottleneck": _bottleneck_coverage,
}
# Kernel modules of a family other than the one named like them.
FAMILY_OF_MODULE = {
    "lora_persistent": "lora",
    "lora_dy_pass": "lora",
    "dora": "lora",
    "multi_lora_4bit": "multi_lora",
    "multi_lora_persistent": "multi_lora",
}


def family_of(module: str) -> str:
    """The family (a COVERAGE key) whose kernels ``module`` (fastpeft.triton_kernels.<name>) holds."""
    name = module.rsplit(".", 1)[-1]
    return FAMILY_OF_MODULE.get(name, name)


def _target_calls(bench: str, case: dict) -> Callable[[], None]:
    """The ops' calls of one TARGETS case (bf16), through their own dispatch."""
    import fastpeft
    from fastpeft.ops.adapter_pool import AdapterPool

    dtype = getattr(torch, case.get("dtype", "bfloat16"))
    if bench in ("lora", "dora"):
        m, k, n, r = case["m"], case["k"], case["n"], case["r"]
        train = case.get("mode") == "forward+backward"

        def call():
            x, w = _t(m, k, dtype=dtype, grad=train), _t(n, k, dtype=dtype)
            a, b = _t(r, k, dtype=dtype, grad=train), _t(n, r, dtype=dtype, grad=train)
            if bench == "dora":
                y = fastpeft.dora_linear(x, w, a, b, _t(n, dtype=dtype, grad=True), 2.0)
            else:
                y = fastpeft.lora_linear(x, w, a, b, 2.0, dropout_p=case.get("dropout", 0.0))
            if train:
                y.backward(_t(m, n, dtype=dtype))

        return call
    if bench == "multi_lora":
        m, k, n, r, count = case["m"], case["k"], case["n"], case["r"], case["adapters"]
        adapters = [(_t(r, k, dtype=dtype), _t(n, r, dtype=dtype), 2.0) for _ in range(count)]
        batch = fastpeft.describe_batch(_t(m, dtype=torch.int32), count, check=False)  # as the layers get it
        return lambda: fastpeft.multi_lora_linear(
            _t(m, k, dtype=dtype), _t(n, k, dtype=dtype), AdapterPool.build(adapters), batch
        )  # fmt: skip
    if bench == "qlora":
        from fastpeft.ops.qlora import qlora_linear

        m, k, n, r = case["m"], case["k"], case["n"], case["r"]
        w = _weight4bit(n, k, case["double_quant"], dtype, case["blocksize"])
        lora = (_t(r, k, dtype=dtype), _t(n, r, dtype=dtype)) if r else (None, None)
        return lambda: qlora_linear(_t(m, k, dtype=dtype), w, None, *lora, 2.0)
    if bench == "bottleneck":
        from fastpeft.triton_kernels import bottleneck as bn

        from fastpeft.ops.bottleneck import ACTIVATION_CODES, Adapters, Post

        m, d, mb, count = case["m"], case["d"], case["bottleneck"], case["adapters"]
        lead = (count,)
        adapters = Adapters(_t(*lead, mb, d, dtype=dtype), _t(*lead, mb, dtype=dtype), _t(*lead, d, mb, dtype=dtype),
                            _t(*lead, d, dtype=dtype), 2.0, None, None)  # fmt: skip
        ids = _t(m, dtype=torch.int32) if count > 1 else None
        per_sample = m // (8 * count) if count > 1 else m
        x, act = _t(m, d, dtype=dtype), ACTIVATION_CODES[case["activation"]]
        if case.get("mode") == "forward+backward":
            return lambda: (
                bn.bottleneck_forward(x, None, adapters, ids, per_sample, act, 1e-5, Post(None, None, None, 1e-5)),
                bn.bottleneck_backward(x, x, adapters, ids, per_sample, act, 1e-5, True),
            )
        return lambda: bn.bottleneck_forward(
            x, None, adapters, ids, per_sample, act, 1e-5, Post(None, None, None, 1e-5)
        )
    raise ValueError(f"no launches known for bench {bench!r}")


def _targets() -> Iterator[tuple[str, Callable[[], None]]]:
    import targets

    seen = set()
    for target in targets.TARGETS:
        for case in target.cases:
            label = f"{target.bench} {targets.case_label(case)} {case.get('mode', '')} r={case.get('r', '-')}".strip()
            if case.get("adapters", 1) > 1:
                label += f" {case['adapters']} adapters"
            if case.get("dropout"):
                label += f" dropout {case['dropout']}"
            if label not in seen:
                seen.add(label)
                yield f"TARGET {label}", _target_calls(target.bench, case)


def record(families: list[str], dtypes: list[str], kinds: list[str]) -> list[Launch]:
    """Every launch of the chosen cases, recorded on meta tensors."""
    launches: list[Launch] = []
    if "coverage" in kinds:
        for family in families:
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                for case, call in COVERAGE[family](dtype):
                    with recording(case, dtype) as got, torch.no_grad():
                        call()
                    launches += got
    if "targets" in kinds:
        with triton_on_meta():
            for case, call in _targets():
                with recording(case, torch.bfloat16) as got:
                    call()
                launches += [launch for launch in got if family_of(launch.module) in families]
    return launches


# ------------------------------------------------------------------------------------------------------------
# Compiling and reading the machine code
# ------------------------------------------------------------------------------------------------------------


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED (static) and LOCAL of the one kernel in ``cubin``, from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = cuobjdump() or "cuobjdump"
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    usage = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}
    return usage | sass_features(sass)


def compile_launch(job: tuple[Launch, int]) -> dict:
    """Compile one recorded launch as Triton's JIT would, and read it back: one row of the report."""
    launch, arch = job
    from triton.runtime import driver

    driver.set_active(OffDeviceDriver(arch))
    module = __import__(launch.module, fromlist=["_"])
    fn = getattr(module, launch.kernel)
    args, kwargs = launch.run_args()
    row = {**asdict(launch), "triton": triton.__version__, "arch": arch, "config": launch.config(), "ctas": launch.ctas}
    del row["args"], row["kwargs"]
    try:
        compiled = fn.run(*args, grid=launch.grid, warmup=True, **kwargs)
    except Exception as exc:  # every failing launch is reported, not just the first
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return row | {"error": f"{type(exc).__name__}: {' | '.join(lines[-3:])[:400]}"}
    shared = compiled.metadata.shared
    warps = compiled.metadata.num_warps
    usage = resource_usage(compiled.asm["cubin"])
    int_args = {name for name, value in zip(fn.arg_names, args, strict=False) if type(value) is int}
    blocks = occupancy(arch, warps, usage.get("reg", 0), shared)
    return (
        row
        | usage
        | {
            "shared": shared,
            "warps": warps,
            "blocks_per_sm": blocks,
            "waves": launch.ctas / (REFERENCE_SMS * blocks) if blocks else float("inf"),
            "narrow_products": narrow_offset_products(compiled.asm["ttir"], int_args),
        }
    )


def problems(row: dict) -> list[str]:
    """What fails a launch: no compile, shared memory over the limit, spills in 16-bit, 32-bit offsets, float
    atomics in a kernel its module does not name in FLOAT_ATOMIC_KERNELS (the kernels whose sums may round
    differently from run to run: every other kernel gives the same bits every time)."""
    if "error" in row:
        return [row["error"]]
    found = []
    if row["shared"] > SHARED_PER_BLOCK.get(row["arch"], 99 * 1024):
        found.append(f"{row['shared']} B of shared memory is over the GPU's {SHARED_PER_BLOCK.get(row['arch'])}")
    if row["dtype"] in ("float16", "bfloat16") and (row.get("stack") or row.get("local")):
        found.append(f"spills: {row.get('stack')} B stack, {row.get('local')} local-memory instructions")
    if row["narrow_products"]:
        found.append(f"32-bit offset products: {row['narrow_products'][:3]}")
    allowed = getattr(sys.modules.get(row["module"]), "FLOAT_ATOMIC_KERNELS", ())
    if row.get("float_atomics") and row["kernel"] not in allowed:
        found.append(f"{row['float_atomics']} float atomics: results that change from run to run")
    return found


def describe(row: dict) -> str:
    if "error" in row:
        return f"{row['kernel']} [{row['config']}]"
    return (f"{row['kernel']} [{row['config']}] grid={'x'.join(map(str, row['grid']))} regs={row.get('reg')} "
            f"stack={row.get('stack')} shared={row['shared']} B blocks/SM={row['blocks_per_sm']} "
            f"waves={row['waves']:.2f} ldg128={row['ldg128']} hgmma={row['hgmma']} hmma={row['hmma']}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (default 90)")
    parser.add_argument("--families", default=",".join(COVERAGE), help="comma list of op families")
    parser.add_argument("--dtypes", default="float16,bfloat16,float32", help="coverage dtypes, comma list")
    parser.add_argument("--cases", default="coverage,targets", help="coverage, targets or both (comma list)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    launches = record(args.families.split(","), args.dtypes.split(","), args.cases.split(","))
    with multiprocessing.get_context("spawn").Pool(max(1, args.jobs)) as pool:
        rows = pool.map(compile_launch, [(launch, args.arch) for launch in launches])
    failed = 0
    for row in rows:
        found = problems(row)
        failed += bool(found)
        print(f"{'FAIL' if found else 'ok  '} {row['dtype']} {row['case']}: {describe(row)}", flush=True)
        for problem in found:
            print(f"     {problem}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    verdict = "all compiled and checked" if not failed else f"{failed} failed"
    print(f"compile_triton sm_{args.arch} triton {triton.__version__}: {len(rows)} launches, {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
