"""How fastpeft._C is compiled, in one place for both builds: setup.py's (at install) and the first-use build
(fastpeft/_jit_build.py). Imports nothing beyond the standard library, so that setup.py can load it by path
before torch or fastpeft are importable."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Compute capabilities built by default at install; "+PTX" also embeds PTX, which newer GPUs JIT-compile.
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
SOURCE_SUFFIXES = (".cu", ".cpp")  # compiled; headers (.h, .cuh) are shipped beside them
SHIPPED_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")
CXX_FLAGS = ["-O3"]
# torch's extension build defines __CUDA_NO_HALF_OPERATORS__ and friends; the kernels use the half and
# bfloat16 operators, so they are undefined again.
NVCC_FLAGS = [
    "-O3",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
]


def parse_archs(archs: str) -> list[str]:
    """ "8.0;9.0+PTX" (commas work too) as ["8.0", "9.0+PTX"]; ValueError naming an item it cannot read."""
    items = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    for item in items:
        cc = item.removesuffix("+PTX").replace(".", "")
        if not cc.removesuffix("a").isdigit():
            raise ValueError(f"CUDA archs: cannot read {item!r} (expected e.g. '8.0', '9.0a' or '9.0+PTX')")
    if not items:
        raise ValueError(f"CUDA archs: {archs!r} names no architecture (expected e.g. '9.0' or '8.0;9.0+PTX')")
    return items


def gencode_flags(archs: str) -> list[str]:
    """nvcc -gencode flags for "8.0;9.0+PTX": machine code for each, PTX too for those marked +PTX."""
    flags = []
    for item in parse_archs(archs):
        cc = item.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if item.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def set_cuda_home_from_nvcc() -> None:
    """Point CUDA_HOME at a toolkit that has both nvcc and libcudart, unless the user set it; before
    torch.utils.cpp_extension is imported (it reads CUDA_HOME once).

    torch guesses CUDA_HOME as the parent of nvcc's folder, which is wrong for a linked or wrapper nvcc
    (/usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc) and then fails to link libcudart.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for home in (Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")):
        if (home / "bin" / "nvcc").exists() and any((home / lib / "libcudart.so").exists() for lib in ("lib64", "lib")):
            os.environ["CUDA_HOME"] = str(home)
            return
