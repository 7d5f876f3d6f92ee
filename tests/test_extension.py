"""The compiled extension, the backend registry and the package layout."""

from __future__ import annotations

import importlib
import importlib.util
import json

import pytest
import torch

import fastpeft
from fastpeft import _extension
from fastpeft.backends import BACKENDS, available_backends, backend_unavailable_reason


def test_available_backends_on_cpu():
    backends = available_backends("cpu")
    assert backends[-1] == "torch" and "cuda" not in backends
    assert set(backends) <= set(BACKENDS)
    assert fastpeft.available_backends() == available_backends("cuda" if torch.cuda.is_available() else "cpu")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        backend_unavailable_reason("opencl", "cpu")


@pytest.mark.skipif(not _extension.extension_available(), reason=f"extension not built: {_extension.extension_error()}")
def test_extension_registers_cuda_ops():
    schemas = {
        "lora_shrink_cuda": "lora_shrink_cuda(Tensor x, Tensor lora_a) -> Tensor",
        "lora_expand_linear_cuda": "float scaling, Tensor? bias) -> Tensor",
        "lora_linear_cuda": "lora_linear_cuda(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b",
    }
    for name, fragment in schemas.items():
        schema = str(getattr(torch.ops.fastpeft, name).default._schema)
        assert fragment in schema, schema
    # The public ops (defined in Python) and the CUDA kernels (TORCH_LIBRARY in C++) share the namespace.
    assert torch.ops.fastpeft.lora_linear.default is not None


def test_missing_extension_names_the_reinstall_command(monkeypatch):
    real_import = importlib.import_module

    def failing_import(name, *args, **kwargs):
        if name == "fastpeft._C":
            raise ImportError("libcudart.so.13: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    _extension._load.cache_clear()
    monkeypatch.setattr(importlib, "import_module", failing_import)
    try:
        assert not _extension.extension_available()
        with pytest.raises(RuntimeError, match="pip install --no-build-isolation") as info:
            _extension.require_extension()
        assert "failed to load: libcudart" in str(info.value)
        reason = backend_unavailable_reason("cuda", "cuda")  # what a forced cuda backend raises with
        assert "failed to load: libcudart" in reason and "pip install --no-build-isolation" in reason
    finally:
        monkeypatch.undo()
        _extension._load.cache_clear()


@pytest.mark.parametrize(
    ("reason", "fix"),
    [
        ("FASTPEFT_SKIP_CUDA_BUILD=1", "unset FASTPEFT_SKIP_CUDA_BUILD"),
        ("torch is not importable at build time (install torch first, then ...)", "isolated build environment"),
        ("torch 2.13.0+cpu is a CPU-only build", "install a CUDA build of torch"),
        ("no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)", "install the CUDA toolkit"),
    ],
)
def test_a_missing_extension_names_the_builds_reason_and_the_fix(monkeypatch, tmp_path, reason, fix):
    """setup.py records why it skipped the build (fastpeft/_build_info.json); the error and `fastpeft env` say it."""
    record = tmp_path / "_build_info.json"
    record.write_text(json.dumps({"cuda_build": "skipped", "reason": reason}))
    monkeypatch.setattr(_extension, "BUILD_INFO", record)
    message = _extension.missing_reason()
    assert f"setup.py skipped it because {reason}" in message and fix in message
    assert "pip install --no-build-isolation --force-reinstall" in message
    record.write_text(json.dumps({"cuda_build": "built", "reason": None}))
    assert "though the build that installed fastpeft made it" in _extension.missing_reason()
    record.unlink()
    assert "no build recorded why" in _extension.missing_reason()


def test_this_install_recorded_its_build():
    record = _extension.build_record()
    assert record.get("cuda_build") in ("built", "skipped")
    assert (record["cuda_build"] == "built") == (record["reason"] is None)
    if record["cuda_build"] == "built":  # where the build ran, the extension loads
        assert _extension.extension_available(), _extension.extension_error()


def test_triton_kernels_ship_inside_fastpeft():
    """PyPI's triton-kernels owns the top-level name `triton_kernels`; fastpeft must not claim it. Read from what
    the installed distribution provides, so the test means the same wherever the checkout lies (a folder named
    fastpeft included)."""
    import importlib.metadata

    spec = importlib.util.find_spec("fastpeft.triton_kernels")
    assert spec is not None and spec.origin.endswith("__init__.py")
    dist = importlib.metadata.distribution("fastpeft")
    assert (dist.read_text("top_level.txt") or "fastpeft").split() == ["fastpeft"]
    assert not any(str(f).startswith("triton_kernels/") for f in dist.files or [])
    assert "fastpeft" not in importlib.metadata.packages_distributions().get("triton_kernels", [])
