"""patch_peft_model on a real PEFT model: PEFT's numbers in inference and training, and PEFT's own forward
wherever the fused op does not apply."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, rel_error
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft_models import (  # noqa: E402
    TARGETS,
    assert_same_training_step,
    logits,
    peft_model,
    randomize_lora_b,
    tiny_llama,
    tokens,
    twin,
)

from fastpeft import from_peft_layer, patch_peft_model, unpatch_peft_model  # noqa: E402
from fastpeft.integrations.peft import patched_layer_count  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patched_inference_matches_peft(backend, dtype, fused_calls):
    model = peft_model(dtype).eval()
    expected = logits(model)
    patch_peft_model(model)
    assert patched_layer_count(model) == 2 * len(TARGETS)
    got = logits(model)
    assert len(fused_calls) == 2 * len(TARGETS)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_error(got, expected) < tolerance
    unpatch_peft_model(model)
    assert patched_layer_count(model) == 0
    assert torch.equal(logits(model), expected)


def test_patched_training_matches_peft(backend, fused_calls):
    model = peft_model()
    reference = twin(model)
    patch_peft_model(model)
    assert_same_training_step(model, reference)
    assert len(fused_calls) == 2 * len(TARGETS)


def test_patch_is_idempotent_and_returns_model():
    model = peft_model()
    assert patch_peft_model(patch_peft_model(model)) is model
    assert patched_layer_count(model) == 2 * len(TARGETS)


def test_several_active_adapters_add_their_deltas(backend):
    model = peft_model().eval()
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model)
    model.base_model.set_adapter(["default", "second"])
    expected = logits(model)
    patch_peft_model(model)
    assert rel_error(logits(model), expected) < 1e-5


def test_uncovered_settings_keep_peft_numbers(backend, fused_calls):
    """Disabled adapters: PEFT's own forward runs. Mixed adapter batches run the multi_lora op (not lora_linear;
    tests/test_integration_peft_mixed_batch.py covers them) with PEFT's numbers."""
    model = peft_model(lora_dropout=0.3)
    model.add_adapter("other", peft.LoraConfig(r=3, target_modules=TARGETS))
    randomize_lora_b(model)
    ids = tokens(batch=3)
    model.eval()
    mixed = logits(model, ids, adapter_names=["default", "__base__", "other"])
    with model.disable_adapter():
        disabled = logits(model, ids)
    patch_peft_model(model)
    assert rel_error(logits(model, ids, adapter_names=["default", "__base__", "other"]), mixed) < 1e-5
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), disabled)
    assert fused_calls == []


def test_merged_adapter_runs_base_layer():
    model = peft_model().eval()
    expected = logits(model)
    patch_peft_model(model)
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.merge()
            assert module.merged
    assert rel_error(logits(model), expected) < 1e-5


def test_lora_linear_from_peft_layer(backend):
    model = peft_model(use_rslora=True, r=4, lora_alpha=6)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    fused = from_peft_layer(layer, "default").eval()
    assert fused.scaling == pytest.approx(6 / 2) and fused.r == 4
    x = torch.randn(3, 40, device=DEVICE)
    with torch.no_grad():
        assert rel_error(fused(x), layer(x)) < 1e-5
    with pytest.raises(ValueError, match="no adapter named"):
        from_peft_layer(layer, "missing")
    with pytest.raises(TypeError, match=r"PEFT lora\.Linear"):
        from_peft_layer(nn.Linear(4, 4))


# ---------------------------------------------------------------------------------------------------------
# LoRA stacked with other PEFT tuners (PEFT's mixed models), and in-place ops on the patched output
# ---------------------------------------------------------------------------------------------------------

MIXED_TARGETS = ["q_proj", "down_proj"]  # the first and the last projection of every decoder layer


def other_tuner_config(kind: str):
    if kind == "loha":
        return peft.LoHaConfig(r=4, alpha=6, target_modules=MIXED_TARGETS, init_weights=False)
    if kind == "lokr":
        return peft.LoKrConfig(r=4, alpha=6, target_modules=MIXED_TARGETS, init_weights=False)
    if kind == "adalora":
        return peft.AdaLoraConfig(init_r=4, target_modules=MIXED_TARGETS, init_lora_weights=False, total_step=10)
    raise ValueError(kind)


def mixed_model(first, second) -> nn.Module:
    """A PeftMixedModel: the adapter added second wraps the first's layer as its base."""
    model = peft.get_peft_model(tiny_llama(), first, adapter_name="first", mixed=True)
    model.add_adapter("second", second)
    model.set_adapter(["first", "second"])
    randomize_lora_b(model)
    return model


@pytest.mark.parametrize("other", ["loha", "lokr", "adalora"])
@pytest.mark.parametrize("lora_outer", [False, True], ids=["lora-inner", "lora-outer"])
def test_lora_stacked_with_another_tuner_matches_peft(backend, fused_calls, other, lora_outer):
    """LoRA over LoHa/LoKr/AdaLoRA keeps PEFT's forward (fusing would drop the wrapped tuner); LoRA under them
    runs fused and the outer tuner adds to its output (AdaLoRA in place, with ``result += ...``)."""
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MIXED_TARGETS, init_lora_weights=False)
    first, second = (other_tuner_config(other), lora) if lora_outer else (lora, other_tuner_config(other))
    model = mixed_model(first, second)
    reference = twin(model)
    expected = logits(reference.eval())
    patch_peft_model(model)
    got = logits(model.eval())
    assert rel_error(got, expected) < 1e-5
    assert len(fused_calls) == (0 if lora_outer else 2 * len(MIXED_TARGETS))
    assert_same_training_step(model, reference)


def test_in_place_ops_on_patched_output(backend, fused_calls):
    """``+=`` and ``nn.ReLU(inplace=True)`` on a patched layer's output, in training and eval, with PEFT's
    outputs and gradients."""
    layer = peft_model().base_model.model.model.layers[0].self_attn.q_proj
    reference = twin(layer)
    patch_peft_model(layer)
    relu = nn.ReLU(inplace=True)
    for training in (True, False):
        results = []
        for module in (layer, reference):
            module.train(training)
            x = torch.randn(2, 3, 40, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(3))
            x.requires_grad_()
            y = module(x)
            y += 0.25
            y = relu(y)
            y.square().sum().backward()
            grads = [x.grad] + [p.grad.clone() for p in module.parameters() if p.requires_grad]
            module.zero_grad()
            results.append((y.detach(), grads))
        (y, grads), (ref_y, ref_grads) = results
        assert rel_error(y, ref_y) < 1e-5
        for grad, ref_grad in zip(grads, ref_grads, strict=True):
            assert rel_error(grad, ref_grad) < 1e-5
    with torch.no_grad():
        out = layer(torch.randn(4, 40, device=DEVICE))
        out += 1
    assert len(fused_calls) == 3


@pytest.mark.parametrize("not_peft", [lambda: tiny_llama(), lambda: nn.Linear(4, 4), lambda: "model"])
def test_what_is_not_a_peft_model_is_refused_by_name(not_peft):
    from fastpeft import explain_patch

    model = not_peft()
    for function in (patch_peft_model, explain_patch):
        with pytest.raises(TypeError, match=f"{function.__name__} expects a PEFT model.*{type(model).__name__}"):
            function(model)


def test_a_model_with_injected_adapters_is_a_peft_model():
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=list(TARGETS)), tiny_llama())
    randomize_lora_b(model)
    expected = logits(model.eval())
    patch_peft_model(model)
    assert patched_layer_count(model) == 2 * len(TARGETS)
    assert rel_error(logits(model), expected) < 1e-5
