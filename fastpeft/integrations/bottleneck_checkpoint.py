"""Saving and loading bottleneck adapters: ``adapter_config.json`` and ``adapter.safetensors`` with AdapterHub's
parameter names, and AdapterHub's own saved adapters (``adapter.safetensors`` or ``pytorch_adapter.bin``, read
with ``torch.load(weights_only=True)``: tensors only, no code)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from torch import nn

from fastpeft.integrations.bottleneck_models import BottleneckConfig, add_bottleneck_adapters

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
ADAPTERHUB_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
_PREFIX = "adapters_layer."  # fastpeft's BERT placements hold their adapters one module deeper than AdapterHub's


def _adapter_keys(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The parameters of adapter ``name`` under AdapterHub's names."""
    marker = f"adapters.{name}."
    return {k.replace(_PREFIX, ""): v for k, v in model.state_dict().items() if marker in k}


def save_bottleneck_adapter(model: nn.Module, directory: str | Path, name: str, config: BottleneckConfig) -> None:
    """Write adapter ``name`` of ``model`` (added with ``config``) as AdapterHub lays a saved adapter out."""
    from safetensors.torch import save_file

    tensors = _adapter_keys(model, name)
    if not tensors:
        raise ValueError(f"model has no bottleneck adapter named {name!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # clone: ln_before registers one LayerNorm under two names (as AdapterHub does), and both are saved
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, directory / WEIGHTS_FILE)
    fields = {"architecture": "bottleneck", **dataclasses.asdict(config)}
    (directory / CONFIG_FILE).write_text(json.dumps({"config": fields, "name": name}, indent=2))


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    for file in ADAPTERHUB_WEIGHTS:
        path = directory / file
        if path.exists():
            if file.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} holds none of {ADAPTERHUB_WEIGHTS}")


def load_bottleneck_adapter(model: nn.Module, directory: str | Path, name: str | None = None) -> str:
    """Add the bottleneck adapter saved in ``directory`` (by :func:`save_bottleneck_adapter` or by AdapterHub's
    ``save_adapter``) to ``model`` as ``name`` (default: its saved name), load its weights and return the name.
    ValueError when the checkpoint does not fit the model (every saved tensor must find its parameter)."""
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    fields = dict(meta.get("config", {}))
    if fields.pop("architecture", "bottleneck") != "bottleneck":
        raise ValueError(f"{directory} is not a bottleneck adapter")
    saved_name = meta.get("name", "default")
    name = name or saved_name
    config = BottleneckConfig.from_adapterhub(fields)
    tensors = _read_weights(directory)
    add_bottleneck_adapters(model, config, name)
    targets = {k.replace(_PREFIX, ""): (k, v) for k, v in model.state_dict(keep_vars=True).items()
               if f"adapters.{name}." in k}  # fmt: skip
    pattern = re.compile(rf"adapters\.{re.escape(saved_name)}\.")
    loaded = set()
    for key, value in tensors.items():
        key = pattern.sub(f"adapters.{name}.", key)
        match = [t for t in targets if key.endswith(t) or t.endswith(key)]  # model prefixes may differ
        if len(match) != 1:
            raise ValueError(f"saved tensor {key!r} matches {len(match)} parameters of the model")
        param = targets[match[0]][1]
        if param.shape != value.shape:
            raise ValueError(f"saved tensor {key!r} is {tuple(value.shape)}, the model's {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value)
        loaded.add(match[0])
    missing = sorted(set(targets) - loaded)
    if missing:
        raise ValueError(f"the checkpoint has no values for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return name
