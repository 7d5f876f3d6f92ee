"""Optional libraries and the extra that installs each: a command that needs one says so in one line."""

from __future__ import annotations

import importlib

# The extras of pyproject.toml, by what a command needs.
EXTRAS = {
    "demo": ("transformers", "peft"),
    "bench": ("transformers", "peft", "pytest_benchmark", "matplotlib"),
    "peft": ("transformers", "peft"),
    "bnb": ("bitsandbytes",),
}


class MissingExtra(ImportError):
    """An optional library a command needs is not installed; the message names the pip command."""


def require_extra(extra: str, command: str) -> None:
    """Raise :class:`MissingExtra` naming ``pip install 'fastpeft[extra]'`` when a library of ``extra`` is missing
    (``command``: what needed it, e.g. "fastpeft demo")."""
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module.replace("_", "-"))
    if missing:
        raise MissingExtra(f"{command} needs {', '.join(missing)}: pip install 'fastpeft[{extra}]'")
