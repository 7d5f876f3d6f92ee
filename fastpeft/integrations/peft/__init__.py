"""Make a PEFT model's LoRA layers run fastpeft's fused ops, with PEFT's numbers.

``patch_peft_model(model)`` replaces, per instance, the ``forward`` of every PEFT ``lora.Linear`` layer (that
class exactly: its subclasses, such as torchao's or INC's, have forwards of their own) whose direct base layer
is a floating-point ``nn.Linear`` or GPT-2 ``Conv1D`` holding plain tensors. The direct base, not
``get_base_layer()``: when LoRA is stacked on another tuner (a LoHa or LoKr layer in a mixed model),
``get_base_layer()`` descends to the innermost layer and fusing with its weight would drop that tuner.

The replacement decides per call, from the layer's state then (so adapters added, loaded, switched or deleted
through PEFT's API after patching are covered on the next call; new LoRA layers by patching again):

- fused, one call for all active adapters (their ranks stacked): vanilla LoRA with or without ``lora_bias``,
  rsLoRA, any number of active adapters, in eval and in training;
- dropout in training with the masks PEFT's ``nn.Dropout`` modules would draw (same generator, same order, one
  per adapter, drawn for the dtype PEFT casts x to), or, with ``dropout_mode="philox"`` and one adapter, drawn
  inside the kernels;
- DoRA as the only active adapter, with or without dropout (:mod:`fastpeft.ops.dora`);
- ``adapter_names`` mixed batches (``model(..., adapter_names=[...])``, one name per sample) in one
  ``multi_lora_linear`` call per layer (:mod:`.mixed_batch`), at inference;
- PEFT's LoRA layers on bitsandbytes 4-bit bases (QLoRA), in :mod:`.qlora`: the
  4-bit product and the adapter in one fused op, in training and inference, mixed batches included;
- PEFT's own forward otherwise: DoRA beside other adapters, other LoRA variants, merged or disabled adapters,
  other dropout modules, mixed batches the multi_lora op does not express (DoRA, lora_bias, training).

:func:`explain_patch` says, per layer, which path runs now and why. ``unpatch_peft_model`` removes the patch.

The package, bottom to top: :mod:`.cache` and :mod:`.base_4bit` (4-bit bases), :mod:`.layers` (what a PEFT
layer holds and whether the fused ops express it), the forwards (:mod:`.mixed_batch`, :mod:`.lora`,
:mod:`.qlora`), then :mod:`.patch` and :mod:`.modules` (fastpeft modules from PEFT layers); :mod:`.checkpoint`
reads PEFT's saved adapters without PEFT.
"""

from fastpeft.integrations.peft.checkpoint import load_peft_adapter
from fastpeft.integrations.peft.layers import PeftAdapter, peft_4bit_adapter, peft_adapter, unsupported_reason
from fastpeft.integrations.peft.mixed_batch import reassign_adapter_names
from fastpeft.integrations.peft.modules import from_peft_layer
from fastpeft.integrations.peft.patch import (
    explain_patch,
    is_patched,
    patch_peft_model,
    patched_layer_count,
    unpatch_peft_model,
)
from fastpeft.integrations.report import LayerPath, PatchReport

__all__ = [
    "LayerPath",
    "PatchReport",
    "PeftAdapter",
    "explain_patch",
    "from_peft_layer",
    "is_patched",
    "load_peft_adapter",
    "patch_peft_model",
    "patched_layer_count",
    "peft_4bit_adapter",
    "peft_adapter",
    "reassign_adapter_names",
    "unpatch_peft_model",
    "unsupported_reason",
]
