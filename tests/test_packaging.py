"""What `pip install` gets: the sdist carries every source the CUDA build needs, the wheel ships the Triton
kernels and the benchmarks inside fastpeft (no top-level names of its own but fastpeft), and the sdist installs
into a fresh target folder where `fastpeft bench` finds its runner. The CUDA build is skipped in those
(FASTPEFT_SKIP_CUDA_BUILD=1); with FASTPEFT_TEST_SDIST_CUDA=1 (.ci/run sets it where nvcc and a CUDA build of
torch are present) the sdist is also installed with its CUDA build, for sm_90 only, and its extension loads; and
an install that skipped the build builds it with `fastpeft build` into the first-use cache, which a new process
loads. A command that needs an optional library says in one line which extra to install."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "*.so", "bench_out",
                                 "gpu_check_out")  # fmt: skip


def build(tmp_path: Path, *args: str) -> Path:
    """``setup.py`` run on a copy of the source tree (no build files left in the checkout); returns the output."""
    source = tmp_path / "src"
    if not source.exists():
        shutil.copytree(ROOT, source, ignore=IGNORED)
    out = tmp_path / "out"
    env = {**os.environ, "FASTPEFT_SKIP_CUDA_BUILD": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", *args, "-d", str(out)], cwd=source, env=env, check=True,
                   capture_output=True)  # fmt: skip
    return out


def run_installed(target: Path, args: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    """Python with fastpeft from ``target`` only: ``-S`` skips the .pth files, among them the editable install's
    finder, which would otherwise answer for fastpeft's submodules from the checkout whatever PYTHONPATH says."""
    path = os.pathsep.join([str(target), *site.getsitepackages()])
    return subprocess.run([sys.executable, "-S", *args], env={**env, "PYTHONPATH": path}, capture_output=True,
                          text=True, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("packaging")
    sdist = next(build(tmp, "sdist").glob("*.tar.gz"))
    wheel = next(build(tmp, "bdist_wheel").glob("*.whl"))
    return sdist, wheel


def test_the_sdist_carries_every_kernel_source(artifacts):
    sdist, _ = artifacts
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for folder in ("csrc", "triton_kernels"):
        sources = [p for p in (ROOT / folder).iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp", ".py")]
        expected = {str(p.relative_to(ROOT)) for p in sources}
        assert expected and expected <= names, expected - names
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "benchmarks/run.py"} <= names


def test_the_wheel_ships_everything_inside_fastpeft(artifacts):
    _, wheel = artifacts
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"fastpeft"}  # no top-level triton_kernels (PyPI's triton-kernels owns that name)
    for kernel in (ROOT / "triton_kernels").glob("*.py"):
        assert f"fastpeft/triton_kernels/{kernel.name}" in names
    assert "fastpeft/benchmarks/run.py" in names and "fastpeft/integrations/peft/patch.py" in names
    for source in (ROOT / "csrc").iterdir():  # what the first-use build compiles (fastpeft/_jit_build.py)
        assert f"fastpeft/_csrc/{source.name}" in names
    with zipfile.ZipFile(wheel) as zf:  # the build's record of why it skipped the extension, for `fastpeft env`
        record = json.loads(zf.read("fastpeft/_build_info.json"))
    assert record == {"cuda_build": "skipped", "reason": "FASTPEFT_SKIP_CUDA_BUILD=1"}


def test_the_sdist_installs_and_finds_its_bench_runner(artifacts, tmp_path):
    sdist, _ = artifacts
    target = tmp_path / "site"
    env = {**os.environ, "FASTPEFT_SKIP_CUDA_BUILD": "1"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(sdist)], env=env, check=True, capture_output=True)  # fmt: skip
    code = "import fastpeft.cli as c; print(c.bench_runner()); import fastpeft; print(fastpeft.__file__)"
    out = run_installed(target, ["-c", code], env, cwd=tmp_path, check=True).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in out) and Path(out[0]).exists()


@pytest.mark.skipif(os.environ.get("FASTPEFT_TEST_SDIST_CUDA") != "1",
                    reason="the sdist's CUDA build takes minutes: FASTPEFT_TEST_SDIST_CUDA=1 runs it")  # fmt: skip
def test_the_sdist_builds_the_extension(artifacts, tmp_path):
    sdist, _ = artifacts
    target = tmp_path / "site"
    env = {key: value for key, value in os.environ.items() if key != "FASTPEFT_SKIP_CUDA_BUILD"}
    env["FASTPEFT_CUDA_ARCHS"] = "9.0"  # one architecture: the build is what is tested, not the arch list
    command = [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation", "--target",
               str(target), str(sdist)]  # fmt: skip
    install = subprocess.run(command, env=env, capture_output=True, text=True)
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    assert "building fastpeft._C" in install.stdout + install.stderr
    code = (
        "import torch, fastpeft._extension as e; print(e.extension_error()); import fastpeft; print(fastpeft.__file__)"
    )
    out = run_installed(target, ["-c", code], env, cwd=tmp_path, check=True).stdout.split("\n")
    assert out[0] == "None" and Path(out[1]).is_relative_to(target), out


@pytest.mark.skipif(os.environ.get("FASTPEFT_TEST_SDIST_CUDA") != "1",
                    reason="the first-use CUDA build takes minutes: FASTPEFT_TEST_SDIST_CUDA=1 runs it")  # fmt: skip
def test_an_install_without_the_extension_builds_it_for_first_use(artifacts, tmp_path):
    """A plain `pip install` skips the extension (no torch in pip's isolated build); what it installed compiles
    its shipped csrc/ into the cache (`fastpeft build`, as the first call on a GPU does), and a new process,
    without a GPU here, loads the cached library and has the ops."""
    sdist, _ = artifacts
    target = tmp_path / "site"
    env = {**os.environ, "FASTPEFT_SKIP_CUDA_BUILD": "1", "FASTPEFT_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(sdist)], env=env, check=True, capture_output=True)  # fmt: skip
    assert (target / "fastpeft" / "_csrc" / "ops.cpp").is_file()
    build = run_installed(target, ["-m", "fastpeft.cli", "build", "--archs", "9.0"], env, cwd=tmp_path)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    assert "fastpeft: building the CUDA extension fastpeft._C for 9.0 into" in build.stderr
    library = Path(build.stdout.strip().splitlines()[-1])
    assert library.is_relative_to(tmp_path / "cache") and library.is_file()
    code = (
        "import torch, fastpeft._extension as e; print(e.extension_error()); print(e.extension_origin()); "
        "print(torch.ops.fastpeft.lora_linear_cuda.default._schema)"
    )
    out = run_installed(target, ["-c", code], env, cwd=tmp_path, check=True).stdout.splitlines()
    assert out[:2] == ["None", str(library)], out
    assert out[2].startswith("fastpeft::lora_linear_cuda(Tensor x, Tensor weight"), out


@pytest.mark.parametrize(("command", "extra"), [("demo", "demo"), ("bench", "bench")])
def test_a_missing_extra_is_named_in_one_line(command, extra):
    # transformers made unimportable, as in a plain `pip install fastpeft`.
    code = (
        f"import sys; sys.modules['transformers'] = None; from fastpeft.cli import main; sys.exit(main([{command!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"fastpeft: fastpeft {command} needs transformers") and line.endswith(f"[{extra}]'")
