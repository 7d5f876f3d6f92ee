"""patch_peft_model on a real PEFT model: PEFT's numbers in inference and training, and PEFT's own forward
wherever the fused op does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE, rel_error
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fastpeft import LoRALinear, patch_peft_model, unpatch_peft_model  # noqa: E402
from fastpeft.integrations.peft import patched_layer_count  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype=torch.float32) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=DEVICE, dtype=dtype)


def randomize_lora_b(model: nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.normal_(std=0.3)


def peft_model(dtype=torch.float32, **config) -> nn.Module:
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "lora_dropout": 0.0, **config}
    model = peft.get_peft_model(tiny_llama(dtype), peft.LoraConfig(**config))
    randomize_lora_b(model)
    return model


def tokens(batch=2, seq=9):
    return torch.randint(0, 97, (batch, seq), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """Counts the calls patched layers make to the fused op (one entry per call)."""
    import fastpeft.integrations.peft as integration

    calls: list[int] = []
    real = integration.lora_linear

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "lora_linear", spy)
    return calls


def logits(model, ids=None, **kwargs):
    with torch.no_grad():
        return model(ids if ids is not None else tokens(), **kwargs).logits


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
    model = peft_model().train()
    reference = copy.deepcopy(model)
    patch_peft_model(model)
    ids = tokens()
    for m in (model, reference):
        m(ids, labels=ids).loss.backward()
    assert len(fused_calls) == 2 * len(TARGETS)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and len(grads) == 4 * len(TARGETS)
    for name, grad in grads.items():
        assert grad is not None, name
        assert rel_error(grad, ref_grads[name]) < 1e-4, name


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
    """DoRA, active dropout, mixed adapter batches, merged and disabled adapters: PEFT's own forward runs."""
    dora = peft_model(use_dora=True).eval()
    expected = logits(dora)
    patch_peft_model(dora)
    assert torch.equal(logits(dora), expected)

    model = peft_model(lora_dropout=0.3)
    model.add_adapter("other", peft.LoraConfig(r=3, target_modules=TARGETS))
    randomize_lora_b(model)
    ids = tokens(batch=3)
    model.eval()
    mixed = logits(model, ids, adapter_names=["default", "__base__", "other"])
    with model.disable_adapter():
        disabled = logits(model, ids)
    model.train()
    torch.manual_seed(5)
    train_out = model(ids).logits
    patch_peft_model(model)
    model.eval()
    assert torch.equal(logits(model, ids, adapter_names=["default", "__base__", "other"]), mixed)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), disabled)
    model.train()
    torch.manual_seed(5)
    assert torch.equal(model(ids).logits, train_out)  # dropout active in training: PEFT's path, same RNG
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
    fused = LoRALinear.from_peft(layer, "default").eval()
    assert fused.scaling == pytest.approx(6 / 2) and fused.r == 4
    x = torch.randn(3, 40, device=DEVICE)
    with torch.no_grad():
        assert rel_error(fused(x), layer(x)) < 1e-5
    with pytest.raises(ValueError, match="no adapter named"):
        LoRALinear.from_peft(layer, "missing")
    with pytest.raises(TypeError, match=r"PEFT lora\.Linear"):
        LoRALinear.from_peft(nn.Linear(4, 4))
