"""Load LoRA adapters saved by PEFT (``adapter_config.json`` + ``adapter_model.safetensors``) into a plain
transformers model, without PEFT: every targeted ``nn.Linear``/Conv1D becomes a
:class:`~fastpeft.modules.multi_lora.MultiLoRALinear` holding the adapters, so a serving framework can run mixed
batches through fastpeft's kernels with no PEFT dependency.

PEFT saves each adapter's weights as ``base_model.model.<module path>.lora_A.weight`` [r, in] and ``...lora_B.weight``
[out, r] (the adapter's name stripped). The scaling is PEFT's: ``alpha / r``, or ``alpha / sqrt(r)`` with
``use_rslora``, ``r`` and ``alpha`` taken per module from ``rank_pattern`` and ``alpha_pattern`` when a pattern
matches the module's path. Only safetensors are read: a pickle checkpoint (``adapter_model.bin``) can run
arbitrary code when loaded, so it is refused with a message saying how to convert it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from fastpeft._base_layers import is_linear_like
from fastpeft.modules.multi_lora import MultiLoRALinear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# Config fields whose non-default values change the computation in ways MultiLoRALinear does not express.
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "modules_to_save": None, "layers_to_transform": None}


def read_adapter_config(path: str | Path) -> dict:
    """``adapter_config.json`` of a PEFT LoRA adapter directory, checked: ValueError for anything else."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path} (expected a directory written by PEFT's save_pretrained)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type is {config.get('peft_type')!r}, only LORA adapters load")
    for field, default in _UNSUPPORTED.items():
        if config.get(field, default) not in (default, [], False):
            raise ValueError(f"{config_file}: {field}={config[field]!r} is not supported by MultiLoRALinear")
    return config


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors from ``adapter_model.safetensors``; a pickle checkpoint is refused."""
    from safetensors.torch import load_file

    weights_file = Path(path) / WEIGHTS_FILE
    if not weights_file.is_file():
        pickles = [name for name in PICKLE_FILES if (Path(path) / name).is_file()]
        if pickles:
            raise ValueError(
                f"{path} holds {pickles[0]}, a pickle file: fastpeft does not load pickles (they can run code). "
                "Convert it once, in a trusted environment, with PEFT: load the adapter and call "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path}")
    return load_file(str(weights_file))


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module's path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def module_scaling(config: dict, module_path: str, rank: int) -> float:
    """PEFT's scaling for one module: alpha / r, or alpha / sqrt(r) with use_rslora."""
    alpha = _pattern_value(config.get("alpha_pattern"), module_path, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank


def load_peft_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> list[str]:
    """Add the PEFT LoRA adapter saved in directory ``path`` to ``model`` as ``adapter_name``: each targeted
    ``nn.Linear``/Conv1D is wrapped in a :class:`MultiLoRALinear` (once; later adapters join it). Returns the
    module paths that received the adapter. Call it once per adapter; then run batches with
    :func:`fastpeft.adapter_batch`. ValueError for configs or keys MultiLoRALinear cannot run (DoRA, lora_bias,
    embeddings, modules_to_save), before the model changes."""
    config = read_adapter_config(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_adapter_weights(path).items():
        match = _KEY.match(key.removeprefix(_PREFIX))
        if not key.startswith(_PREFIX) or match is None:
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA linear weight (only lora_A/lora_B load)")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    targets = []
    for module_path, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{path}: {module_path} has lora_{'A' if 'A' in pair else 'B'} without its partner")
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise ValueError(f"{path}: the model has no module {module_path!r}") from None
        if not (isinstance(module, MultiLoRALinear) or is_linear_like(module)):
            raise ValueError(f"{path}: {module_path} is a {type(module).__name__}, not an nn.Linear or Conv1D")
        targets.append((module_path, module, pair))
    for module_path, module, pair in targets:
        if not isinstance(module, MultiLoRALinear):
            parent_path, _, child = module_path.rpartition(".")
            module = MultiLoRALinear(module)
            setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
        scaling = module_scaling(config, module_path, pair["A"].shape[0])
        module.add_adapter(adapter_name, pair["A"], pair["B"], scaling)
    return [module_path for module_path, _, _ in targets]
