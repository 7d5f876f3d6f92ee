"""What a patched model runs where: one :class:`LayerPath` row per adapted module, printed as a table.

``explain_patch`` (PEFT models) and ``explain_adapterhub_patch`` (AdapterHub models) both return a
:class:`PatchReport`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerPath:
    """What an adapted module runs on a plain call in the model's current state, and why."""

    name: str
    path: str  # "fused", the upstream library's name ("PEFT", "AdapterHub"), or "not patched"
    detail: str


class PatchReport(list):
    """The :class:`LayerPath` rows of an explain function; ``str()`` gives a table."""

    def __str__(self) -> str:
        width = max((len(row.name) for row in self), default=5)
        lines = [f"{'layer':<{width}}  {'path':<12}  detail"]
        lines += [f"{row.name:<{width}}  {row.path:<12}  {row.detail}" for row in self]
        return "\n".join(lines)
