"""Loading the compiled CUDA extension ``fastpeft._C`` (built from csrc/ by setup.py).

Importing it registers the ``fastpeft::*_cuda`` ops with torch. It is optional: without it the Triton and
PyTorch backends still work. Code that needs it calls :func:`require_extension`, which fails with a message
naming why it is missing (the build's own record, fastpeft/_build_info.json) and the command that fixes it.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

# What fixes each reason setup.py gives for skipping the build (its _why_no_cuda_build), by the reason's start.
FIXES = {
    "FASTPEFT_SKIP_CUDA_BUILD=1": "unset FASTPEFT_SKIP_CUDA_BUILD, then reinstall: {reinstall}",
    "torch is not importable at build time": "pip's isolated build environment has no torch: {reinstall}",
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


@functools.cache
def _load() -> tuple[object | None, str | None]:
    try:
        module = importlib.import_module("fastpeft._C")
    except ImportError as exc:
        if "No module named 'fastpeft._C'" in str(exc):
            return None, missing_reason()
        return None, f"fastpeft._C is built but failed to load: {exc}. Fix: {REINSTALL} with the torch it runs with"
    return module, None


def extension_available() -> bool:
    """True when fastpeft._C imported and its ops are registered with torch."""
    return _load()[0] is not None


def extension_error() -> str | None:
    """Why the extension is unavailable, or None when it loaded."""
    return _load()[1]


def require_extension() -> None:
    """Raise RuntimeError naming the reinstall command when fastpeft._C is unavailable."""
    error = extension_error()
    if error is not None:
        raise RuntimeError(error)
