"""Loading the compiled CUDA extension ``fastpeft._C`` (built from csrc/ by setup.py, or on first use).

Loading it registers the ``fastpeft::*_cuda`` ops with torch. It is optional: without it the Triton and
PyTorch backends still work. Where the install built it, it is the module fastpeft._C; where the install skipped
it (a plain ``pip install``), the first call that needs it on a GPU builds it into a cache and loads that
(fastpeft/_jit_build.py). Code that needs it calls :func:`require_extension`, which fails with a message naming
why it is missing (the install's own record, fastpeft/_build_info.json, and why it was not built on first use)
and the command that fixes it.
"""

from __future__ import annotations

import functools
import importlib
import json
import warnings
from pathlib import Path

from fastpeft import _jit_build

# What fixes each reason setup.py gives for skipping the build (its _why_no_cuda_build), by the reason's start.
FIXES = {
    "FASTPEFT_SKIP_CUDA_BUILD=1": "unset FASTPEFT_SKIP_CUDA_BUILD, then reinstall: {reinstall}",
    "torch is not importable at build time": "pip's isolated build environment has no torch: on a GPU machine it "
    "builds on first use (or now: `fastpeft build`), or {reinstall}",
    "no CUDA sources": "this copy of fastpeft has no csrc/: install from the sdist or a checkout: {reinstall}",
    "torch ": "install a CUDA build of torch (https://pytorch.org/get-started/locally/), then {reinstall}",
    "no CUDA toolkit": "install the CUDA toolkit (nvcc on PATH, or CUDA_HOME set), then {reinstall}",
}
REINSTALL = "pip install --no-build-isolation --force-reinstall --no-deps fastpeft (a checkout: `make install`)"
BUILD_INFO = Path(__file__).resolve().parent / "_build_info.json"


def build_record() -> dict:
    """What the build that installed this copy decided about the extension (setup.py writes it): ``cuda_build``
    ("built" / "skipped") and ``reason``; empty when no build recorded it."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def missing_reason() -> str:
    """Why fastpeft._C is absent and the command that fixes it, from the build's record."""
    record = build_record()
    reason = record.get("reason")
    if record.get("cuda_build") == "built":
        return f"fastpeft._C is missing, though the build that installed fastpeft made it. Fix: {REINSTALL}"
    if not reason:
        return f"fastpeft._C is not built (no build recorded why). Fix: {REINSTALL}"
    fix = next((fix for start, fix in FIXES.items() if reason.startswith(start)), "{reinstall}")
    return f"fastpeft._C is not built: setup.py skipped it because {reason}. Fix: {fix.format(reinstall=REINSTALL)}"


def _import_installed() -> tuple[object | None, str | None]:
    """fastpeft._C as the install built it: (module, None), (None, why it failed to load), or (None, None) when
    the install did not build it."""
    try:
        return importlib.import_module("fastpeft._C"), None
    except ImportError as exc:
        if "No module named 'fastpeft._C'" in str(exc):
            return None, None
        return None, f"fastpeft._C is built but failed to load: {exc}. Fix: {REINSTALL} with the torch it runs with"


def _not_built(blocker: tuple[str, str]) -> str:
    return f"{missing_reason()} It is not built on first use either: {blocker[0]}. Fix: {blocker[1]}"


@functools.cache
def _load(build: bool = True) -> tuple[object | None, str | None]:
    """(what was loaded, None) or (None, why not). ``build=False`` asks without compiling anything: where the
    extension would be built on first use, the answer says so."""
    module, error = _import_installed()
    if module is not None or error is not None:
        return module, error
    cached = _jit_build.cached_library(_jit_build.visible_archs())
    if cached is not None:
        _jit_build.load_library(cached)
        return cached, None
    blocker = _jit_build.first_use_blocker()
    if blocker is not None:
        return None, _not_built(blocker)
    if not build:
        return None, "fastpeft._C is not built yet: the first call that needs it builds it (or now: `fastpeft build`)"
    try:
        library = _jit_build.build()
    except _jit_build.BuildError as exc:
        message = f"{missing_reason()} Building it on first use failed: {exc}"
        warnings.warn(f"{message}. The cuda backend is unavailable.", RuntimeWarning, stacklevel=2)
        return None, message
    return library, None


def extension_available() -> bool:
    """True when the extension loaded (as the install built it, or built on first use): its ops are registered."""
    return _load(True)[0] is not None  # the key extension_error() and extension_origin() cache it under


def extension_error(build: bool = True) -> str | None:
    """Why the extension is unavailable, or None when it loaded. ``build=False``: never compile (for reports)."""
    return _load(build)[1]


def extension_origin(build: bool = True) -> str | None:
    """The file the extension was loaded from (the install's module, or the first-use build's library), or None."""
    loaded = _load(build)[0]
    return None if loaded is None else str(getattr(loaded, "__file__", loaded))


def require_extension() -> None:
    """Raise RuntimeError naming the reinstall command when fastpeft._C is unavailable."""
    error = extension_error()
    if error is not None:
        raise RuntimeError(error)
