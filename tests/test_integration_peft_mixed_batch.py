"""PEFT mixed-adapter batches (``adapter_names``) through patch_peft_model: one multi_lora call per layer, PEFT's
numbers; adapters on different module sets, rsLoRA, rank/alpha patterns, "__base__"; adapters added and deleted
through PEFT's API after patching; PEFT's forward where the op does not apply."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_error

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft_models import TARGETS, logits, peft_model, randomize_lora_b, tokens, twin  # noqa: E402

import fastpeft.integrations.peft.mixed_batch as mixed  # noqa: E402
from fastpeft import explain_patch, patch_peft_model  # noqa: E402

NAMES = ["second", "__base__", "default", "third"]


def three_adapter_model(dtype=torch.float32):
    """'default' on every projection; 'second' on attention only with rsLoRA and a rank pattern; 'third' on
    the MLP with an alpha pattern."""
    model = peft_model(dtype)
    model.add_adapter("second", peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=TARGETS[:4],
                                                rank_pattern={"k_proj": 2}))  # fmt: skip
    model.add_adapter("third", peft.LoraConfig(r=16, lora_alpha=4, target_modules=TARGETS[4:],
                                               alpha_pattern={"down_proj": 32}))  # fmt: skip
    randomize_lora_b(model)
    return model.eval()


@pytest.fixture
def multi_lora_calls(monkeypatch) -> list[int]:
    """Counts the fused multi-adapter calls of patched layers (its unchecked entry: the layer's own tensors)."""
    calls: list[int] = []
    real = mixed.multi_lora_forward_unchecked

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mixed, "multi_lora_forward_unchecked", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_batch_matches_peft_in_one_call_per_layer(backend, dtype, multi_lora_calls):
    model = three_adapter_model(dtype)
    ids = tokens(batch=len(NAMES))
    expected = logits(model, ids, adapter_names=NAMES)
    patch_peft_model(model)
    got = logits(model, ids, adapter_names=NAMES)
    assert len(multi_lora_calls) == 2 * len(TARGETS)  # every LoRA layer, once
    tolerance = 1e-5 if dtype == torch.float32 else 4e-2  # bf16 logits of a 2-layer model: rounding, not bugs
    assert rel_error(got, expected) < tolerance
    for i, name in enumerate(NAMES):  # each sample as PEFT runs it alone with that adapter
        alone = logits(model, ids[i : i + 1], adapter_names=[name])
        assert rel_error(alone, expected[i : i + 1]) < tolerance, name
    with torch.no_grad():  # as the calls above ran (logits): the LoRA weights require grad
        rows = explain_patch(model, adapter_names=NAMES)
    assert all(row.path == "fused" for row in rows) and "mixed batch" in rows[0].detail


def test_adapters_added_and_deleted_after_patching(backend, multi_lora_calls):
    model = three_adapter_model()
    reference = twin(model)
    patch_peft_model(model)
    ids = tokens(batch=len(NAMES))
    logits(model, ids, adapter_names=NAMES)  # pools built
    for m in (model, reference):
        m.delete_adapter("third")
        torch.manual_seed(3)
        m.add_adapter("fourth", peft.LoraConfig(r=4, lora_alpha=12, target_modules=["v_proj", "down_proj"]))
        torch.manual_seed(4)
        randomize_lora_b(m)
    names = ["fourth", "default", "__base__", "second"]
    assert rel_error(logits(model, ids, adapter_names=names), logits(reference, ids, adapter_names=names)) < 1e-5
    with pytest.raises(ValueError, match="Length of `adapter_names`"):  # PEFT's own check still applies
        logits(model, ids, adapter_names=names[:2])


def test_peft_forward_where_the_op_does_not_apply(multi_lora_calls):
    model = three_adapter_model()
    patch_peft_model(model)
    ids = tokens(batch=len(NAMES))
    with torch.enable_grad():
        model(ids, adapter_names=NAMES)  # LoRA weights require grad: PEFT's forward
    assert not multi_lora_calls
    with torch.enable_grad():
        assert "gradients are needed" in explain_patch(model, adapter_names=NAMES)[0].detail
    model.add_adapter("dora", peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="DoRA"):  # PEFT refuses DoRA in mixed batches; so do we
        logits(model, ids, adapter_names=["dora", "default", "default", "default"])
    with torch.no_grad():
        rows = {row.name: row for row in explain_patch(model, adapter_names=["dora"])}
    assert any("DoRA" in row.detail for row in rows.values())
