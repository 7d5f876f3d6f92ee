"""Loading the compiled CUDA extension ``fastpeft._C`` (built from csrc/ by setup.py).

Importing it registers the ``fastpeft::*_cuda`` ops with torch. It is optional: without it the Triton and
PyTorch backends still work. Code that needs it calls :func:`require_extension`, which fails with a message
naming the reinstall command.
"""

from __future__ import annotations

import functools
import importlib

REINSTALL_HINT = (
    "Rebuild it with a CUDA build of torch and nvcc present: "
    "`pip install --no-build-isolation --force-reinstall --no-deps -e .` (or `make install`); "
    "`fastpeft env` shows what was found."
)


@functools.cache
def _load() -> tuple[object | None, str | None]:
    try:
        module = importlib.import_module("fastpeft._C")
    except ImportError as exc:
        if "No module named 'fastpeft._C'" in str(exc):
            return None, "fastpeft._C is not built (setup.py skipped it, or this is a source checkout)"
        return None, f"fastpeft._C is built but failed to load: {exc}"
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
        raise RuntimeError(f"{error}. {REINSTALL_HINT}")
