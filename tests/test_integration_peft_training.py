"""The LoRA configurations people train with, patched, against PEFT on tiny Llama and GPT-2 models: dropout in
training (PEFT's masks under the same seed), lora_bias, GPT-2's Conv1D, several active adapters, rsLoRA; per
layer, per model, and over 20 optimizer steps. Also explain_patch, and adapters added after patching."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, rel_error
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft_models import TARGETS, VOCAB, randomize_lora_b, tiny_llama, tokens, twin  # noqa: E402

from fastpeft import explain_patch, patch_peft_model, unpatch_peft_model  # noqa: E402
from fastpeft.integrations.peft import patched_layer_count  # noqa: E402

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=24, n_layer=2, n_head=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(DEVICE)


def lora_model(family: str, **config) -> nn.Module:
    if family == "llama":
        base, targets = tiny_llama(), TARGETS
    else:
        base, targets = tiny_gpt2(), GPT2_TARGETS
        config.setdefault("fan_in_fan_out", True)
    config = {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": False, **config}
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    randomize_lora_b(model)
    return model


CONFIGS = {
    "dropout": dict(lora_dropout=0.1),
    "dropout-lora-bias-rslora": dict(lora_dropout=0.2, lora_bias=True, use_rslora=True),
    "lora-bias": dict(lora_bias=True),
}


def seeded_step(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(123)  # dropout: both models draw their masks from the same generator state
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_step_matches_peft(backend, fused_calls, family, config):
    model = lora_model(family, **CONFIGS[config]).train()
    reference = twin(model)
    patch_peft_model(model)
    assert patched_layer_count(model) > 0
    ids = tokens()
    loss, ref_loss = seeded_step(model, ids), seeded_step(reference, ids)
    assert fused_calls and len(fused_calls) == patched_layer_count(model)
    assert rel_error(loss, ref_loss) < 1e-5
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert rel_error(param.grad, ref_params[name].grad) < 1e-4, name


@pytest.mark.parametrize("variant", [dict(lora_bias=True), dict(use_dora=True)], ids=["lora_bias", "dora"])
def test_twenty_optimizer_steps_with_dropout_match_peft(backend, variant):
    # Two projections per decoder layer: the Triton interpreter runs every kernel in Python on the CPU.
    model = lora_model("llama", lora_dropout=0.1, target_modules=["q_proj", "down_proj"], **variant)
    reference = twin(model)
    patch_peft_model(model)
    losses = {}
    for name, m in (("fused", model), ("peft", reference)):
        m.train()
        optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for step in range(20):
            ids = tokens(seq=8 + step % 3)
            optimizer.zero_grad()
            losses[name].append(seeded_step(m, ids).item())
            optimizer.step()
    assert losses["fused"][-1] < losses["fused"][0]  # it trains
    for step, (got, expected) in enumerate(zip(losses["fused"], losses["peft"], strict=True)):
        assert abs(got - expected) <= 1e-4 * abs(expected), f"step {step}: {got} vs {expected}"


@pytest.mark.parametrize("dropouts", [(0.0, 0.0), (0.2, 0.1), (0.0, 0.3)], ids=str)
def test_several_active_adapters_match_peft(backend, fused_calls, dropouts):
    """All active adapters (different ranks, one with lora_bias) run in one fused call, with dropout in training
    too: each adapter's mask drawn in PEFT's order (none for an adapter without dropout). Loss and gradients."""
    model = lora_model("llama", lora_dropout=dropouts[0])
    second = dict(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"], lora_bias=True, lora_dropout=dropouts[1])
    model.add_adapter("second", peft.LoraConfig(**second, init_lora_weights=False))
    randomize_lora_b(model)
    model.base_model.set_adapter(["default", "second"])
    reference = twin(model)
    patch_peft_model(model)
    ids = tokens()
    loss, ref_loss = seeded_step(model.train(), ids), seeded_step(reference.train(), ids)
    assert rel_error(loss, ref_loss) < 1e-5
    assert len(fused_calls) == patched_layer_count(model)  # one fused call per layer, however many adapters
    ref_params = dict(reference.named_parameters())
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    assert any(".second." in name for name in trained) and any(".default." in name for name in trained)
    for name in trained:
        assert rel_error(model.get_parameter(name).grad, ref_params[name].grad) < 1e-4, name
    report = {row.name.removeprefix("base_model.model."): row for row in explain_patch(model)}
    q_proj = report["model.layers.0.self_attn.q_proj"]
    assert q_proj.path == "fused" and "second" in q_proj.detail
    assert ("with PEFT's masks" in q_proj.detail) == any(dropouts)


def test_explain_patch_names_each_path():
    model = lora_model("llama", use_dora=False)
    model.add_adapter("dora", peft.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    report = explain_patch(model)
    assert {row.path for row in report} == {"not patched"}
    patch_peft_model(model)
    model.base_model.set_adapter(["default", "dora"])
    rows = {row.name.removeprefix("base_model.model."): row for row in explain_patch(model)}
    assert rows["model.layers.0.self_attn.v_proj"].path == "PEFT"
    assert "DoRA adapter 'dora' with other active adapters" in rows["model.layers.0.self_attn.v_proj"].detail
    model.base_model.set_adapter("dora")
    rows = {row.name.removeprefix("base_model.model."): row for row in explain_patch(model)}
    assert (
        rows["model.layers.0.self_attn.v_proj"].path == "fused"
        and "DoRA" in rows["model.layers.0.self_attn.v_proj"].detail
    )
    model.base_model.set_adapter(["default", "dora"])
    rows = {row.name.removeprefix("base_model.model."): row for row in explain_patch(model)}
    assert rows["model.layers.0.self_attn.q_proj"].path == "fused"
    with model.disable_adapter():
        assert {row.path for row in explain_patch(model)} == {"PEFT"}
    assert "layer" in str(explain_patch(model)).splitlines()[0]


def test_adapters_added_after_patching_are_covered(backend, fused_calls):
    """A new adapter on patched layers runs fused on the next call; LoRA layers created later need patching
    again (patch_peft_model is idempotent)."""
    model = lora_model("llama", target_modules=["q_proj"])
    patch_peft_model(model)
    model.add_adapter("late", peft.LoraConfig(r=3, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    randomize_lora_b(model)
    model.base_model.set_adapter("late")
    reference = unpatch_peft_model(twin(model))  # the copy carries the patch: PEFT's own forward for reference
    ids = tokens()
    with torch.no_grad():
        expected = reference.eval()(ids).logits
        assert rel_error(model.eval()(ids).logits, expected) < 1e-5
        assert len(fused_calls) == 2  # q_proj of both decoder layers, patched before "late" existed
        patch_peft_model(model)
        assert rel_error(model(ids).logits, expected) < 1e-5
    assert len(fused_calls) == 2 + 4  # now up_proj too


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dora_matches_peft(backend, fused_calls, family):
    """PEFT's DoRA, fused: eval logits, then training steps (dropout 0) with the magnitude's gradients too."""
    model = lora_model(family, use_dora=True)
    reference = twin(model)
    patch_peft_model(model)
    ids = tokens()
    with torch.no_grad():
        assert rel_error(model.eval()(ids).logits, reference.eval()(ids).logits) < 1e-5
    assert fused_calls == ["dora_linear"] * patched_layer_count(model)
    loss, ref_loss = seeded_step(model.train(), ids), seeded_step(reference.train(), ids)
    assert rel_error(loss, ref_loss) < 1e-5
    ref_params = dict(reference.named_parameters())
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in name for name in grads)
    for name, grad in grads.items():
        assert rel_error(grad, ref_params[name].grad) < 1e-4, name


def test_dora_eval_norm_follows_updated_adapters(backend):
    """The norm cached in eval is keyed on the adapter weights: an in-place update of B is seen next call."""
    model = patch_peft_model(lora_model("llama", use_dora=True)).eval()
    reference = unpatch_peft_model(twin(model))
    ids = tokens()
    for m in (model, reference):
        with torch.no_grad():
            m(ids)  # fills the caches
            for name, param in m.named_parameters():
                if "lora_B" in name:
                    param.mul_(1.5)
    with torch.no_grad():
        assert rel_error(model(ids).logits, reference(ids).logits) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dora_with_dropout_matches_peft(backend, fused_calls, family):
    """DoRA in training with dropout on: PEFT's masks, one fused call per layer, loss and every gradient (the
    magnitude's too) equal to PEFT's; the philox mode keeps PEFT's mask for DoRA and says so."""
    model = lora_model(family, use_dora=True, lora_dropout=0.1).train()
    reference = twin(model)
    patch_peft_model(model, dropout_mode="philox")
    ids = tokens()
    loss, ref_loss = seeded_step(model, ids), seeded_step(reference, ids)
    assert fused_calls == ["dora_linear"] * patched_layer_count(model)
    assert rel_error(loss, ref_loss) < 1e-5
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert rel_error(param.grad, ref_params[name].grad) < 1e-4, name
    row = next(r for r in explain_patch(model) if r.path == "fused")
    assert "(DoRA), dropout p=0.1 with PEFT's mask" in row.detail


def test_dora_beside_another_adapter_keeps_peft_forward(fused_calls):
    """DoRA beside another active adapter on a layer: PEFT's forward there (PEFT scales only the DoRA delta)."""
    model = lora_model("llama", use_dora=True)
    model.add_adapter("plain", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    randomize_lora_b(model)
    reference = twin(model)
    patch_peft_model(model)
    ids = tokens()
    for m in (model, reference):
        m.base_model.set_adapter(["default", "plain"])
    with torch.no_grad():
        assert rel_error(model.eval()(ids).logits, reference.eval()(ids).logits) < 1e-5
    rows = {row.name.removeprefix("base_model.model."): row for row in explain_patch(model)}
    assert "with other active adapters" in rows["model.layers.0.self_attn.q_proj"].detail
    assert rows["model.layers.0.self_attn.k_proj"].path == "fused"  # DoRA alone there
    assert len(fused_calls) == patched_layer_count(model) - 2  # all but the two q_proj layers


def test_philox_dropout_mode_trains_and_is_explained(backend, fused_calls):
    """patch_peft_model(dropout_mode="philox"): masks drawn in-kernel (not PEFT's), reproducible per seed; the
    model trains; explain_patch names the mode; an unknown mode is refused."""
    model = patch_peft_model(lora_model("llama", lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
                             dropout_mode="philox")  # fmt: skip
    ids = tokens()
    losses = [seeded_step(model.train(), ids).item() for _ in range(2)]
    assert losses[0] == losses[1] and fused_calls  # same seed, same in-kernel masks
    row = next(r for r in explain_patch(model) if r.path == "fused")
    assert "in-kernel (philox)" in row.detail
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        loss = seeded_step(model, ids)
        optimizer.step()
    assert loss.item() < losses[0]
    with pytest.raises(ValueError, match="dropout_mode must be one of"):
        patch_peft_model(model, dropout_mode="curand")
