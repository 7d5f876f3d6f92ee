"""``quantize_model``: a plain transformers (or any torch) model's linear layers as fastpeft 4-bit layers, for
users without bitsandbytes. The weights are quantized exactly as bitsandbytes would quantize them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastpeft.modules.qlora import Linear4bit
from fastpeft.ops.quant_4bit import check_blocksize, check_quant_type

DEFAULT_SKIP = ("lm_head",)  # transformers keeps the output head in 16 bits (llm_int8_skip_modules)


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: Sequence[str] = DEFAULT_SKIP,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`~fastpeft.Linear4bit`; returns ``model``.

    Args:
        quant_type, blocksize, double_quant: the 4-bit format (bitsandbytes' ``bnb_4bit_quant_type``,
            blocksize, ``bnb_4bit_use_double_quant``).
        compute_dtype: the dtype the products run in (bitsandbytes' ``bnb_4bit_compute_dtype``); None: x's.
        skip_modules: names of modules left as they are, matched against the last part of a module's name or
            its whole dotted name (with everything inside it), ``("lm_head",)`` by default.

    Layers already 4-bit, and linear subclasses (which may compute something else), are left alone.
    """
    check_quant_type(quant_type)
    check_blocksize("blocksize", blocksize)
    if isinstance(skip_modules, str):
        raise TypeError("skip_modules must be a sequence of module names, not one str")
    skip = set(skip_modules)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            skipped = child_name in skip or any(full == s or full.startswith(s + ".") for s in skip)
            if type(child) is nn.Linear and not skipped:
                setattr(module, child_name, Linear4bit.from_linear(child, quant_type, blocksize, double_quant,
                                                                   compute_dtype))  # fmt: skip
    return model
