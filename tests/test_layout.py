"""The house rules of the code, read from the sources: kernels never import the ops, modules never import the
integrations, no private name crosses a file boundary (in fastpeft/ and triton_kernels/ alike), no function
imports fastpeft lazily inside the PEFT integration (its layers import bottom-up), and fastpeft.modules exports
every module class."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from torch import nn

import fastpeft.modules

ROOT = Path(__file__).resolve().parents[1]
# fastpeft's private modules
PRIVATE_MODULES = {"_C", "_autocast", "_base_layers", "_build_flags", "_extension", "_extras", "_jit_build", "_quiet"}


def imports(folder: str) -> list[tuple[Path, ast.ImportFrom | ast.Import, bool]]:
    """(file, import node, inside a function) for every import under ``folder``."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text())
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
        found += [
            (path, node, id(node) in nested)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
        ]
    return found


def module_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module or ""]


def test_triton_kernels_never_import_the_ops():
    bad = [f"{p.name}:{n.lineno}" for p, n, _ in imports("triton_kernels")
           if any(m.startswith("fastpeft.ops") for m in module_names(n))]  # fmt: skip
    assert not bad


def test_modules_never_import_the_integrations():
    bad = [f"{p.name}:{n.lineno}" for p, n, _ in imports("fastpeft/modules")
           if any(m.startswith("fastpeft.integrations") for m in module_names(n))]  # fmt: skip
    assert not bad


def test_no_private_name_crosses_a_file_boundary():
    bad = []
    for path, node, _ in imports("fastpeft") + imports("triton_kernels"):
        if isinstance(node, ast.ImportFrom) and ((node.module or "").startswith("fastpeft") or node.level):
            names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            names = [name for name in names if name not in PRIVATE_MODULES]
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in names]
    assert not bad


def test_the_peft_integration_imports_bottom_up():
    lazy = [f"{p.name}:{n.lineno}" for p, n, inside in imports("fastpeft/integrations/peft")
            if inside and any(m.startswith("fastpeft") for m in module_names(n))]  # fmt: skip
    assert not lazy
    assert not (ROOT / "fastpeft" / "integrations" / "peft.py").exists()


def test_fastpeft_modules_exports_every_module_class():
    defined = set()
    for path in (ROOT / "fastpeft" / "modules").glob("*.py"):
        module = __import__(f"fastpeft.modules.{path.stem}", fromlist=["_"])
        classes = inspect.getmembers(module, inspect.isclass)
        defined |= {name for name, cls in classes if issubclass(cls, nn.Module) and cls.__module__ == module.__name__}
    defined = {name for name in defined if not name.startswith("_")}
    assert defined and defined <= set(fastpeft.modules.__all__)


SOURCES = ("README.md", "Makefile", "setup.py", "pyproject.toml", ".ci", ".github", "benchmarks", "csrc", "fastpeft",
           "scripts", "tests", "triton_kernels")  # fmt: skip


def test_nothing_points_outside_the_repository():
    """The developers' notes live beside the repository; what users need is copied into its own docs."""
    outside = "../" + "shared"  # spelled in two parts so that this test does not find itself
    bad = []
    for entry in SOURCES:
        path = ROOT / entry
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            readable = file.is_file() and file.suffix not in (".so", ".png", ".pyc") and "__pycache__" not in file.parts
            if readable and outside in file.read_text(errors="replace"):
                bad.append(str(file.relative_to(ROOT)))
    assert not bad


def test_the_readme_lists_every_speed_target():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import targets

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Speed targets") : readme.index("\n## ", readme.index("## Speed targets") + 1)]
    missing = [target.name for target in targets.TARGETS if f"| {target.name} |" not in section]
    assert not missing


def test_every_path_the_readme_names_exists():
    import re

    readme = (ROOT / "README.md").read_text()
    roots = ("benchmarks/", "scripts/", "tests/", "csrc/", "fastpeft/", "triton_kernels/", ".ci/", ".github/")
    installed_only = {"fastpeft/benchmarks/", "fastpeft/_build_info.json", "fastpeft/_csrc/"}  # an install writes
    named = set(re.findall(r"[\w./<>*-]+", readme))  # patterns such as benchmarks/bench_<op>.py stay whole
    paths = {p.rstrip(".,:;") for p in named if p.startswith(roots)} - installed_only
    missing = sorted(p for p in paths if "<" not in p and "*" not in p and not (ROOT / p).exists())
    assert not missing
