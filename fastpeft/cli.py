"""The ``fastpeft`` console script: ``fastpeft env | build | demo | bench``."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

from fastpeft._extras import MissingExtra, require_extra
from fastpeft._quiet import quiet_third_party_output


def package_version(dist: str) -> str:
    """The installed version of distribution ``dist``, or "not installed"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvcc_version() -> str:
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "not found"
    return out.strip().splitlines()[-1]


def env_report() -> str:
    """Versions, the extension's state, the GPU and the backends each op can use, as printable text."""
    import torch

    from fastpeft import __version__
    from fastpeft._extension import extension_error, extension_origin
    from fastpeft.backends import BACKENDS, backend_unavailable_reason, forced_backend

    lines = [
        f"fastpeft      {__version__}",
        f"python        {platform.python_version()}",
        f"torch         {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton        {package_version('triton')}",
        f"nvcc          {_nvcc_version()}",
        f"transformers  {package_version('transformers')}",
        f"peft          {package_version('peft')}",
        f"bitsandbytes  {package_version('bitsandbytes')}",
        f"extension     {extension_error(build=False) or 'fastpeft._C loaded from ' + extension_origin(build=False)}",
    ]
    devices = ["cpu"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"gpu           {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB")  # fmt: skip
        devices.insert(0, "cuda")
    else:
        lines.append("gpu           none visible to torch")
    lines.append(f"FASTPEFT_BACKEND {forced_backend() or '(not set: automatic choice)'}")
    for op in ("lora_linear",):
        for device in devices:
            for backend in BACKENDS:
                reason = backend_unavailable_reason(backend, device, build=False)
                lines.append(f"  {op:<12} {device:<5} {backend:<7} {'yes' if reason is None else 'no: ' + reason}")
    return "\n".join(lines)


def bench_runner() -> Path:
    """benchmarks/run.py: the one a wheel installs as ``fastpeft/benchmarks/`` (setup.py), else a source
    checkout's (an editable install)."""
    installed = Path(__file__).resolve().parent / "benchmarks" / "run.py"
    return installed if installed.exists() else Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def _bench(argv: list[str]) -> int:
    """Run benchmarks/run.py with ``argv`` (its options are fastpeft bench's: ``fastpeft bench --help``)."""
    quiet_third_party_output()  # checking the extra imports peft, which imports bitsandbytes
    require_extra("bench", "fastpeft bench")
    return subprocess.call([sys.executable, str(bench_runner()), *argv])


def main(argv: list[str] | None = None) -> int:
    """``fastpeft env|build|demo|bench ...``: the exit status (0 ok, 1 a failed check, build or regression, 2 bad
    input)."""
    parser = argparse.ArgumentParser(prog="fastpeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print versions, the extension's state, the GPU and the usable backends")
    build = sub.add_parser("build", help="build the CUDA extension now, where the install skipped it "
                           "(otherwise it builds on first use on a GPU)")  # fmt: skip
    build.add_argument("--archs", default=None, help="compute capabilities, e.g. '9.0' or '8.0;9.0+PTX' "
                       "(default: the visible GPUs')")  # fmt: skip
    build.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    demo = sub.add_parser("demo", help="LoRA, a mixed batch, QLoRA and bottleneck adapters: before and after fastpeft")
    demo.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    demo.add_argument("--model", default=None, help="a local transformers checkpoint (default: a small random Llama)")
    demo.add_argument("--steps", type=int, default=5, help="timed forward passes per variant")
    sub.add_parser("bench", add_help=False, help="run the benchmarks (options: fastpeft bench --help)")
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["bench"]:  # every option belongs to benchmarks/run.py
            return _bench(argv[1:])
        return _run(parser.parse_args(argv))
    except MissingExtra as exc:
        print(f"fastpeft: {exc}", file=sys.stderr)
        return 2


def _build(archs: str | None, verbose: bool) -> int:
    """Compile csrc/ into the first-use cache (fastpeft/_jit_build.py) and print the library's path."""
    from fastpeft import _jit_build

    try:
        print(_jit_build.build(archs, verbose))
    except ValueError as exc:  # --archs it cannot read
        print(f"fastpeft build: {exc}", file=sys.stderr)
        return 2
    except _jit_build.BuildError as exc:
        print(f"fastpeft build: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "env":
        print(env_report())
        return 0
    if args.command == "build":
        return _build(args.archs, args.verbose)
    if args.command == "demo":
        quiet_third_party_output()  # before the demo imports peft, which imports bitsandbytes
        require_extra("demo", "fastpeft demo")
        from fastpeft.demo import DemoError, run_demo

        try:
            return 0 if run_demo(device=args.device, steps=args.steps, model=args.model).passed else 1
        except DemoError as exc:
            print(f"fastpeft demo: {exc}", file=sys.stderr)
            return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
