"""Build script: the Python packages, plus the CUDA extension ``fastpeft._C`` when it can be built.

The extension is built when a CUDA build of torch is importable in the build environment (install with
``pip install --no-build-isolation``) and ``nvcc`` is found. Otherwise the install still succeeds, with the
Triton and PyTorch backends only, and the reason is printed.

Knobs (environment variables):
    FASTPEFT_SKIP_CUDA_BUILD=1   never build the extension
    FASTPEFT_CUDA_ARCHS          semicolon list of compute capabilities, "+PTX" on the last one embeds PTX
                                 (default "8.0;8.6;8.9;9.0+PTX")
    MAX_JOBS                     parallel nvcc jobs (read by torch's ninja build)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _say(message: str) -> None:
    print(f"fastpeft setup: {message}", file=sys.stderr)


def _gencode_flags(archs: str) -> list[str]:
    """Turn "8.0;9.0+PTX" into nvcc -gencode flags (machine code for each, PTX for those marked +PTX)."""
    flags = []
    for item in filter(None, (a.strip() for a in archs.replace(",", ";").split(";"))):
        with_ptx = item.endswith("+PTX")
        cc = item.removesuffix("+PTX").replace(".", "")
        if not cc.removesuffix("a").isdigit():
            raise ValueError(f"FASTPEFT_CUDA_ARCHS: cannot read {item!r} (expected e.g. '8.0', '9.0a' or '9.0+PTX')")
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if with_ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def _set_cuda_home_from_nvcc() -> None:
    """Point CUDA_HOME at a toolkit that has both nvcc and libcudart, unless the user set it.

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


def _why_no_cuda_build() -> str | None:
    """None when the extension can be built, else the reason it is skipped."""
    if os.environ.get("FASTPEFT_SKIP_CUDA_BUILD", "0") == "1":
        return "FASTPEFT_SKIP_CUDA_BUILD=1"
    if not any((ROOT / "csrc").glob("*.cu")):
        return f"no CUDA sources under {ROOT / 'csrc'}"
    _set_cuda_home_from_nvcc()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return "torch is not importable at build time (install torch first, then pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)"
    return None


BUILD_INFO = ROOT / "fastpeft" / "_build_info.json"


def _record(reason: str | None) -> None:
    """What this build decided about the extension, installed beside the package: ``fastpeft env`` and the error
    of a missing extension name the reason and the command that fixes it (fastpeft/_extension.py)."""
    BUILD_INFO.write_text(json.dumps({"cuda_build": "skipped" if reason else "built", "reason": reason}) + "\n")


def _extension_kwargs() -> dict:
    reason = _why_no_cuda_build()
    _record(reason)
    if reason is not None:
        _say(f"skipping the CUDA extension fastpeft._C: {reason}. Triton and PyTorch backends only.")
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("FASTPEFT_CUDA_ARCHS", DEFAULT_ARCHS)
    # torch's own arch logic would add flags too; clear it so FASTPEFT_CUDA_ARCHS is the only knob.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ""
    _say(f"building fastpeft._C for CUDA archs {archs} (MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')})")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cpp"))
    nvcc_flags = [
        "-O3",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        *_gencode_flags(archs),
    ]
    ext = CUDAExtension(
        name="fastpeft._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    packages=[
        "fastpeft",
        "fastpeft.ops",
        "fastpeft.modules",
        "fastpeft.integrations",
        "fastpeft.integrations.peft",
        "fastpeft.triton_kernels",
        "fastpeft.benchmarks",
    ],
    # triton_kernels/ is shipped inside fastpeft: the top-level name belongs to PyPI's triton-kernels. So is
    # benchmarks/, so that `fastpeft bench` runs from an installed wheel (with its committed baselines).
    package_dir={
        "fastpeft": "fastpeft",
        "fastpeft.triton_kernels": "triton_kernels",
        "fastpeft.benchmarks": "benchmarks",
    },
    package_data={"fastpeft": ["_build_info.json"], "fastpeft.benchmarks": ["results/*/*.json", "results/*.md"]},
    **_extension_kwargs(),
)
