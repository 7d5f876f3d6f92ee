"""Build script: the Python packages, plus the CUDA extension ``fastpeft._C`` when it can be built.

The extension is built when a CUDA build of torch is importable in the build environment (install with
``pip install --no-build-isolation``) and ``nvcc`` is found. Otherwise the install still succeeds, with the
Triton and PyTorch backends only, and the reason is printed.

Either way csrc/ ships inside the package (fastpeft/_csrc/), so that an install which skipped the build (a plain
``pip install``: pip's isolated build environment has no torch) builds the extension on first use on a GPU, or
with ``fastpeft build`` (fastpeft/_jit_build.py). Both builds take their flags from fastpeft/_build_flags.py.

Knobs (environment variables):
    FASTPEFT_SKIP_CUDA_BUILD=1   never build the extension here
    FASTPEFT_CUDA_ARCHS          semicolon list of compute capabilities, "+PTX" on the last one embeds PTX
                                 (default "8.0;8.6;8.9;9.0+PTX")
    MAX_JOBS                     parallel nvcc jobs (read by torch's ninja build)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_build_flags():
    """fastpeft/_build_flags.py, by path: importing fastpeft would import torch, which the build may not have."""
    spec = importlib.util.spec_from_file_location("_fastpeft_build_flags", ROOT / "fastpeft" / "_build_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FLAGS = _load_build_flags()


def _say(message: str) -> None:
    print(f"fastpeft setup: {message}", file=sys.stderr)


def _why_no_cuda_build() -> str | None:
    """None when the extension can be built, else the reason it is skipped."""
    if os.environ.get("FASTPEFT_SKIP_CUDA_BUILD", "0") == "1":
        return "FASTPEFT_SKIP_CUDA_BUILD=1"
    if not any((ROOT / "csrc").glob("*.cu")):
        return f"no CUDA sources under {ROOT / 'csrc'}"
    FLAGS.set_cuda_home_from_nvcc()
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

    archs = os.environ.get("FASTPEFT_CUDA_ARCHS", FLAGS.DEFAULT_ARCHS)
    # torch's own arch logic would add flags too; clear it so FASTPEFT_CUDA_ARCHS is the only knob.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ""
    _say(f"building fastpeft._C for CUDA archs {archs} (MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')})")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir() if p.suffix in FLAGS.SOURCE_SUFFIXES)
    nvcc_flags = [*FLAGS.NVCC_FLAGS, *FLAGS.gencode_flags(archs)]
    ext = CUDAExtension(
        name="fastpeft._C", sources=sources, extra_compile_args={"cxx": FLAGS.CXX_FLAGS, "nvcc": nvcc_flags}
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


class BuildPyWithKernelSources(build_py):
    """The Python packages, plus csrc/ as fastpeft/_csrc/: what the first-use build compiles where this build
    skipped the extension. An editable install reads the checkout's csrc/ instead."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "fastpeft" / "_csrc"
        self.mkpath(str(target))
        for source in sorted((ROOT / "csrc").iterdir()):
            if source.suffix in FLAGS.SHIPPED_SUFFIXES:
                self.copy_file(str(source), str(target / source.name))


def _setup_kwargs() -> dict:
    kwargs = _extension_kwargs()
    kwargs["cmdclass"] = {"build_py": BuildPyWithKernelSources, **kwargs.get("cmdclass", {})}
    return kwargs


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
    **_setup_kwargs(),
)
