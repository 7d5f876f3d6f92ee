"""Building fastpeft._C on first use, where the install did not.

A plain ``pip install fastpeft`` (or ``pip install .``) builds in pip's isolated environment, which has no torch,
so setup.py skips the extension. The wheel still ships csrc/ (as fastpeft/_csrc/), and on a machine with a GPU,
a CUDA build of torch, nvcc and ninja, the first call that needs the extension compiles it with torch's ninja
build for the visible GPUs' architectures, into a cache folder keyed by torch, CUDA, Python and the sources,
then loads it. Later processes load the cached library without compiling. ``fastpeft build`` does the same
ahead of time (``--archs`` builds for GPUs this machine does not have).

Knobs (environment variables):
    FASTPEFT_JIT_BUILD=0    never build on first use (the Triton backend runs the ops instead)
    FASTPEFT_CACHE_DIR      the cache (default $XDG_CACHE_HOME/fastpeft, else ~/.cache/fastpeft)
    MAX_JOBS                parallel nvcc jobs (read by torch's ninja build)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from fastpeft import _build_flags

PACKAGE = Path(__file__).resolve().parent
SWITCH = "FASTPEFT_JIT_BUILD"
LIBRARY = "fastpeft_C"
RECORD = "build.json"  # written beside the library once it is built: the archs it has machine code for


class BuildError(RuntimeError):
    """The first-use build cannot run here, or the compiler failed (the message says which, and what to do)."""


def sources_dir() -> Path | None:
    """The CUDA sources: the copy a wheel ships (fastpeft/_csrc/), else a checkout's csrc/ (editable install)."""
    for folder in (PACKAGE / "_csrc", PACKAGE.parent / "csrc"):
        if any(folder.glob("*.cu")):
            return folder
    return None


def cache_root() -> Path:
    explicit = os.environ.get("FASTPEFT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastpeft"


def build_root(sources: Path) -> Path:
    """One folder per torch build, CUDA version, Python version and source text (flags included), so an
    upgrade of any of them builds afresh instead of loading a library built against something else."""
    import torch

    digest = hashlib.sha256(json.dumps([_build_flags.CXX_FLAGS, _build_flags.NVCC_FLAGS]).encode())
    for path in sorted(sources.iterdir()):
        if path.suffix in _build_flags.SHIPPED_SUFFIXES:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / f"torch{torch.__version__}-cuda{torch.version.cuda}-{python}-{digest.hexdigest()[:12]}"


def visible_archs() -> list[str]:
    """The compute capabilities of the visible GPUs, e.g. ["9.0"]; empty without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return []
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return [f"{major}.{minor}" for major, minor in sorted(capabilities)]


def _machine_code_archs(archs: list[str]) -> set[str]:
    return {arch.removesuffix("+PTX") for arch in archs}


def cached_library(needed: list[str]) -> Path | None:
    """A library built earlier with machine code for every arch in ``needed`` (any, when ``needed`` is empty:
    a process without a GPU can load it, though not run it), or None."""
    sources = sources_dir()
    if sources is None:
        return None
    root = build_root(sources)
    for record in sorted(root.glob(f"*/{RECORD}")):
        try:
            built = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        library = record.parent / built.get("library", "")
        if library.is_file() and set(needed) <= _machine_code_archs(built.get("archs", [])):
            return library
    return None


def first_use_blocker() -> tuple[str, str] | None:
    """None when this process may build the extension on first use, else (why not, what to do)."""
    import torch

    if os.environ.get(SWITCH, "1").strip() == "0":
        return f"{SWITCH}=0 turns it off", f"unset {SWITCH}, or build it now with `fastpeft build`"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build", "install a CUDA build of torch, then `fastpeft build`"
    if not visible_archs():
        return "no GPU is visible", "on a GPU machine it builds on first use; `fastpeft build --archs 9.0` builds now"
    return build_blocker()


def build_blocker() -> tuple[str, str] | None:
    """What stops a build on this machine (sources, toolkit, ninja), with the fix; None when it can run."""
    if sources_dir() is None:
        return "this copy of fastpeft ships no CUDA sources", "reinstall fastpeft from its wheel or sdist"
    _build_flags.set_cuda_home_from_nvcc()
    _put_ninja_on_path()
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "no CUDA toolkit is found", "install the CUDA toolkit (nvcc on PATH, or CUDA_HOME set), then retry"
    if not is_ninja_available():
        return "ninja is not installed", "pip install ninja, then retry"
    return None


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; pip's ninja package puts it beside the interpreter, which is not on PATH when
    a virtual environment's python runs without the environment activated."""
    if shutil.which("ninja") is not None:
        return
    folders = [Path(sys.executable).parent]
    package = _ninja_package()
    if package is not None and hasattr(package, "BIN_DIR"):
        folders.append(Path(package.BIN_DIR))
    for folder in folders:
        if (folder / "ninja").is_file():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def _ninja_package() -> object | None:
    try:
        import ninja
    except ImportError:
        return None
    return ninja


def build(archs: str | None = None, verbose: bool = False) -> Path:
    """Compile csrc/ for ``archs`` (e.g. "9.0" or "8.0;9.0+PTX"; default: the visible GPUs') into the cache and
    load it; returns the library's path. BuildError says what stopped it."""
    items = _build_flags.parse_archs(archs) if archs else None  # a ValueError before anything else
    blocker = build_blocker()
    if blocker is not None:
        raise BuildError(f"cannot build fastpeft._C: {blocker[0]}. Fix: {blocker[1]}")
    items = items or visible_archs()
    if not items:
        raise BuildError("no GPU is visible: name the architectures to build for, e.g. `fastpeft build --archs 9.0`")
    sources = sources_dir()
    folder = build_root(sources) / ("sm_" + "_".join(a.replace(".", "").replace("+PTX", "ptx") for a in items))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"fastpeft: building the CUDA extension fastpeft._C for {';'.join(items)} into {folder} (once per torch, "
          f"CUDA and fastpeft version; a minute or a few, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}; "
          f"{SWITCH}=0 turns this off)", file=sys.stderr, flush=True)  # fmt: skip
    from torch.utils.cpp_extension import load

    start = time.monotonic()
    compiled = [str(p) for p in sorted(sources.iterdir()) if p.suffix in _build_flags.SOURCE_SUFFIXES]
    nvcc_flags = [*_build_flags.NVCC_FLAGS, *_build_flags.gencode_flags(";".join(items))]
    try:
        load(name=LIBRARY, sources=compiled, extra_cflags=_build_flags.CXX_FLAGS, extra_cuda_cflags=nvcc_flags,
             build_directory=str(folder), verbose=verbose, is_python_module=False)  # fmt: skip
    except Exception as exc:  # torch raises RuntimeError with the compiler's output, or OSError from the loader
        tail = " | ".join(str(exc).strip().splitlines()[-3:])
        raise BuildError(f"the compiler failed: {tail}. `fastpeft build --verbose` shows the whole log") from exc
    library = max(folder.glob(f"{LIBRARY}*.so"), key=lambda p: p.stat().st_mtime)  # torch names a rebuild _v1
    staged = folder / f"{RECORD}.tmp"
    staged.write_text(json.dumps({"archs": items, "library": library.name}) + "\n")
    staged.replace(folder / RECORD)  # the record appears whole, after the library: readers never see half
    print(f"fastpeft: built fastpeft._C in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return library


def load_library(path: Path) -> None:
    """Load a built library into this process: its static initialisers register the fastpeft::*_cuda ops."""
    import torch

    torch.ops.load_library(str(path))
