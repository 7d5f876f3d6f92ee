"""The CUDA extension's first-use build (fastpeft/_jit_build.py), where the install skipped it: the cache it
builds into and loads from, when it builds and when it says why not, and what `fastpeft build` and a missing
extension's error say. The real compile is tests/test_packaging.py's (opt-in, on CI where nvcc is present)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fastpeft import _extension, _jit_build, cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("FASTPEFT_CACHE_DIR", str(tmp_path / "cache"))
    _extension._load.cache_clear()
    yield tmp_path / "cache"
    _extension._load.cache_clear()


def fake_build(root: Path, archs: list[str], name: str = "fastpeft_C.so") -> Path:
    """A library and its record as build() leaves them (the library's bytes do not matter here)."""
    folder = root / ("sm_" + "_".join(archs))
    folder.mkdir(parents=True)
    (folder / name).write_bytes(b"\x7fELF")
    (folder / _jit_build.RECORD).write_text(json.dumps({"archs": archs, "library": name}))
    return folder / name


def test_a_checkout_builds_from_its_csrc():
    assert _jit_build.sources_dir() == ROOT / "csrc"


def test_the_cache_folder_changes_with_the_sources(monkeypatch, tmp_path, cache):
    sources = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", sources)
    before = _jit_build.build_root(sources)
    assert before.parent == cache and "torch" in before.name and "py3" in before.name
    assert _jit_build.build_root(sources) == before  # the same text, the same folder
    (sources / "lora.cu").write_text((sources / "lora.cu").read_text() + "\n// changed\n")
    assert _jit_build.build_root(sources) != before


def test_a_cached_library_is_used_only_where_it_has_every_arch_needed(cache):
    root = _jit_build.build_root(_jit_build.sources_dir())
    library = fake_build(root, ["8.0", "9.0+PTX"])
    assert _jit_build.cached_library(["9.0"]) == library
    assert _jit_build.cached_library(["8.0", "9.0"]) == library
    assert _jit_build.cached_library(["8.6"]) is None  # no machine code for that GPU: built again for it
    assert _jit_build.cached_library([]) == library  # no GPU: loadable, never run
    (root / "sm_8.0_9.0+PTX" / _jit_build.RECORD).write_text("{not json")
    assert _jit_build.cached_library([]) is None  # a half-written record is no build


def test_the_first_use_build_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(_jit_build.SWITCH, "0")
    why, fix = _jit_build.first_use_blocker()
    assert why == "FASTPEFT_JIT_BUILD=0 turns it off" and "fastpeft build" in fix


def test_nothing_builds_on_first_use_without_a_gpu(monkeypatch):
    monkeypatch.setattr(_jit_build, "visible_archs", lambda: [])
    import torch

    why, fix = _jit_build.first_use_blocker()
    assert why in ("no GPU is visible", f"torch {torch.__version__} is a CPU-only build"), why
    assert "fastpeft build" in fix


def test_a_build_without_sources_says_so(monkeypatch):
    monkeypatch.setattr(_jit_build, "sources_dir", lambda: None)
    assert _jit_build.build_blocker()[0] == "this copy of fastpeft ships no CUDA sources"
    with pytest.raises(_jit_build.BuildError, match=r"ships no CUDA sources\. Fix: reinstall"):
        _jit_build.build("9.0")


@pytest.fixture
def not_installed(monkeypatch, cache):
    """fastpeft._C as a plain `pip install` leaves it: not built by setup.py."""
    monkeypatch.setattr(_extension, "_import_installed", lambda: (None, None))
    monkeypatch.setattr(_extension, "missing_reason", lambda: "fastpeft._C is not built: setup.py skipped it.")
    loaded = []
    monkeypatch.setattr(_jit_build, "load_library", loaded.append)
    return loaded


def test_a_cached_first_use_build_is_loaded_without_compiling(monkeypatch, not_installed):
    library = fake_build(_jit_build.build_root(_jit_build.sources_dir()), ["9.0"])
    monkeypatch.setattr(_jit_build, "build", lambda *a, **k: pytest.fail("compiled although a build was cached"))
    assert _extension.extension_error() is None
    assert not_installed == [library] and _extension.extension_origin() == str(library)


def test_the_first_call_on_a_gpu_builds_and_loads(monkeypatch, not_installed, tmp_path):
    monkeypatch.setattr(_jit_build, "first_use_blocker", lambda: None)
    built = tmp_path / "fastpeft_C.so"
    monkeypatch.setattr(_jit_build, "build", lambda: built)
    # A report never compiles: it says the first call will.
    assert "not built yet: the first call that needs it builds it" in _extension.extension_error(build=False)
    assert _extension.extension_error() is None and _extension.extension_origin() == str(built)


def test_a_failed_first_use_build_warns_and_names_the_failure(monkeypatch, not_installed):
    monkeypatch.setattr(_jit_build, "first_use_blocker", lambda: None)

    def failing_build():
        raise _jit_build.BuildError("the compiler failed: error: identifier 'x' is undefined")

    monkeypatch.setattr(_jit_build, "build", failing_build)
    with pytest.warns(RuntimeWarning, match="Building it on first use failed: the compiler failed"):
        error = _extension.extension_error()
    assert error.startswith("fastpeft._C is not built: setup.py skipped it.") and "identifier 'x'" in error
    with pytest.raises(RuntimeError, match="identifier 'x' is undefined"):
        _extension.require_extension()


def test_a_blocked_first_use_build_names_both_reasons(monkeypatch, not_installed):
    monkeypatch.setenv(_jit_build.SWITCH, "0")
    error = _extension.extension_error()
    assert error == (
        "fastpeft._C is not built: setup.py skipped it. It is not built on first use either: "
        "FASTPEFT_JIT_BUILD=0 turns it off. Fix: unset FASTPEFT_JIT_BUILD, or build it now with `fastpeft build`"
    )


def test_fastpeft_build_refuses_archs_it_cannot_read(capsys):
    assert cli.main(["build", "--archs", "hopper"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fastpeft build: CUDA archs: cannot read 'hopper' (expected e.g. '8.0', '9.0a' or '9.0+PTX')"
    )


def test_fastpeft_build_without_a_gpu_asks_for_archs(monkeypatch, capsys):
    monkeypatch.setattr(_jit_build, "build_blocker", lambda: None)
    monkeypatch.setattr(_jit_build, "visible_archs", lambda: [])
    assert cli.main(["build"]) == 1
    assert "no GPU is visible: name the architectures to build for, e.g. `fastpeft build --archs 9.0`" in (
        capsys.readouterr().err
    )
