"""What the compilers say about a kernel, read from their outputs: SASS features, 32-bit offset products in
Triton's TTIR, and blocks per SM. Pure functions on text and numbers (no environment changes, no GPU), shared by
scripts/compile_triton.py, scripts/kernel_report.py and their tests."""

from __future__ import annotations

import collections
import re
import shutil
from pathlib import Path

# Per SM on sm_80/86/89/90: shared memory a block may opt in to, shared memory in all, registers, warps.
SHARED_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
SHARED_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}
REGISTERS_PER_SM = 65536
WARPS_PER_SM = {80: 64, 86: 48, 89: 48, 90: 64}
BLOCKS_PER_SM = {80: 32, 86: 16, 89: 24, 90: 32}
REFERENCE_SMS = 132  # H100 SXM and H200
_OPCODE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", re.M)


def sass_features(sass: str) -> dict[str, int]:
    """Counts of the instructions that say how a kernel moves data and multiplies: 16-byte and narrower global
    loads, tensor-core MMA (Hopper's HGMMA, the older HMMA), TMA, local memory (spills), floating-point atomics
    and reductions to memory (whose order, and so whose rounding, changes from run to run), and grid dependency
    control: the wait for the kernel before (ACQBULK, ``gdc_wait``) and the early start of the one after
    (PREEXIT, ``gdc_launch_dependents``)."""
    ops = collections.Counter(_OPCODE.findall(sass))

    def count(test) -> int:
        return sum(n for op, n in ops.items() if test(op))

    return {
        "ldg128": count(lambda op: op.startswith(("LDG.", "LDGSTS.")) and ".128" in op),
        "ldg_narrow": count(lambda op: op.startswith("LDG") and ".128" not in op and not op.startswith("LDGDEPBAR")),
        "hgmma": count(lambda op: op.startswith("HGMMA")),
        "hmma": count(lambda op: op.startswith("HMMA")),
        "tma": count(lambda op: op.startswith(("UTMALDG", "UTMASTG", "UBLKCP"))),
        "local": count(lambda op: op.startswith(("LDL", "STL"))),
        "float_atomics": count(lambda op: op.startswith(("RED", "ATOM")) and re.search(r"\.(B?F16|F32|F64)", op)),
        "gdc_wait": count(lambda op: op.startswith("ACQBULK")),
        "gdc_trigger": count(lambda op: op.startswith("PREEXIT")),
    }


_MULI = re.compile(r"^\s*%\S+ = arith\.muli (%\S+), (%\S+) : (?:i32|tensor<[0-9x]+xi32>)", re.M)
_DERIVED = re.compile(r"^\s*(%\S+) = tt\.(?:splat|broadcast|expand_dims) (%\S+)", re.M)


def narrow_offset_products(ttir: str, int_args: set[str]) -> list[str]:
    """32-bit products in which one factor is (a splat of) a runtime integer argument (a size or a stride): the
    offsets that overflow past 2**31 elements. Returns the product lines."""
    values = {f"%{name}" for name in int_args}
    for derived, source in _DERIVED.findall(ttir):
        if source in values:
            values.add(derived)
    return [m.group(0).strip() for m in _MULI.finditer(ttir) if m.group(1) in values or m.group(2) in values]


def occupancy(arch: int, warps: int, registers: int, shared: int) -> int:
    """Blocks of this kernel one SM holds: the least of what its registers, shared memory and warps allow."""
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_registers = REGISTERS_PER_SM // (per_warp * warps) if registers else BLOCKS_PER_SM[arch]
    by_shared = SHARED_PER_SM[arch] // (shared + 1024) if shared else BLOCKS_PER_SM[arch]  # 1 KB reserved per block
    return max(0, min(by_registers, by_shared, WARPS_PER_SM[arch] // warps, BLOCKS_PER_SM[arch]))


def cuobjdump() -> str | None:
    """cuobjdump from Triton's own CUDA backend (its wheel ships one), else the toolkit's on PATH, else None."""
    try:
        from triton.backends.nvidia import compiler
    except ImportError:
        return shutil.which("cuobjdump")
    bundled = Path(compiler.__file__).parent / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")
