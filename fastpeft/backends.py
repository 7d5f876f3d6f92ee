"""Backend choice: which implementation (``cuda``, ``triton`` or ``torch``) runs an op.

- ``torch``: the pure-PyTorch path (reference math, fp32 accumulation). Runs on every device.
- ``triton``: fastpeft.triton_kernels. Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``
  (set before fastpeft is imported; this is how CI tests the kernels).
- ``cuda``: the compiled extension fastpeft._C (csrc/). Runs on CUDA tensors.

``FASTPEFT_BACKEND=cuda|triton|torch`` forces one backend for every op; if it cannot run the call raises,
never falls back. Without it, :func:`select_backend` takes the op's preference for the device and row count.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

from fastpeft._extension import extension_error

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "FASTPEFT_BACKEND"


def triton_interpret_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken triton install raises all sorts of errors
        return f"triton failed to import: {exc}"
    return None


def backend_unavailable_reason(backend: str, device: torch.device | str, *, build: bool = True) -> str | None:
    """None when ``backend`` can run ops on ``device``, else a sentence saying why not. ``build=False``: a report
    only, which never starts the CUDA extension's first-use build (fastpeft/_jit_build.py)."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend == "triton":
        error = _triton_import_error()
        if error is not None:
            return error
        if device.type == "cuda" or (device.type == "cpu" and triton_interpret_enabled()):
            return None
        return f"triton cannot run on {device.type} tensors (on CPU it needs TRITON_INTERPRET=1)"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        return extension_error(build)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run fastpeft ops on ``device`` (default: the current CUDA device, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [b for b in BACKENDS if backend_unavailable_reason(b, device) is None]


def forced_backend() -> str | None:
    """The backend named by FASTPEFT_BACKEND, or None. Raises ValueError for an unknown name."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; expected one of {BACKENDS}")
    return value


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force backend ``name`` (FASTPEFT_BACKEND) inside the block, restoring what was set before."""
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = previous


_recorders: list[list[tuple[str, str]]] = []


@contextlib.contextmanager
def record_backends() -> Iterator[list[tuple[str, str]]]:
    """Collect ``(op, backend)`` for every backend choice made inside the block, in order.

    Tests, warm-up checks and the compute-sanitizer script use it to show which implementation really ran.
    """
    calls: list[tuple[str, str]] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def select_backend(op: str, device: torch.device, preference: tuple[str, ...], *, record: bool = True) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    ``preference`` is the op's own order for this device and shape. A forced backend (FASTPEFT_BACKEND) that
    cannot run raises RuntimeError instead of falling back. ``record=False``: a question only (nothing runs on
    the answer yet), not reported to :func:`record_backends`.
    """
    backend = _choose_backend(op, device, preference)
    if record:
        record_choice(op, backend)
    return backend


def record_choice(op: str, backend: str) -> None:
    """Report to :func:`record_backends` that ``op`` runs on ``backend``, a choice made by
    ``select_backend(..., record=False)`` that the caller has now acted on."""
    for calls in _recorders:
        calls.append((op, backend))


def differentiable_as_is(op: str, device: torch.device, preference: tuple[str, ...]) -> bool:
    """Whether ``op`` runs on the torch backend off CUDA, where training differentiates that backend's PyTorch
    ops as they stand: autograd's C++ backward beats an autograd.Function's Python one, which on a CPU costs
    more than a small layer's GEMMs. A question only: not reported to :func:`record_backends`."""
    return device.type != "cuda" and select_backend(op, device, preference, record=False) == "torch"


def _choose_backend(op: str, device: torch.device, preference: tuple[str, ...]) -> str:
    forced = forced_backend()
    if forced is not None:
        reason = backend_unavailable_reason(forced, device)
        if reason is not None:
            raise RuntimeError(f"{ENV_VAR}={forced} cannot run fastpeft::{op} on {device}: {reason}")
        return forced
    if device.type != "cuda":
        return "torch"  # the Triton interpreter is for tests, never picked by itself
    for backend in preference:
        if backend_unavailable_reason(backend, device) is None:
            return backend
    return "torch"
