"""Adapters saved by PEFT loaded into a plain transformers model with fastpeft.load_peft_adapter (no PEFT at load
or run time): mixed batches give PEFT's numbers; pickle checkpoints and unsupported configs are refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rel_error

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft_models import TARGETS, logits, randomize_lora_b, tiny_llama, tokens  # noqa: E402
from test_integration_peft_mixed_batch import NAMES, three_adapter_model  # noqa: E402

from fastpeft import MultiLoRALinear, adapter_batch, load_peft_adapter  # noqa: E402


@pytest.fixture
def saved_adapters(tmp_path):
    """The three adapters of the mixed-batch tests, each saved by PEFT in its own directory."""
    model = three_adapter_model()
    model.save_pretrained(tmp_path, selected_adapters=["default", "second", "third"])
    dirs = {"default": tmp_path, "second": tmp_path / "second", "third": tmp_path / "third"}
    return model, dirs


def test_loaded_adapters_give_peft_mixed_batch_numbers(backend, saved_adapters):
    peft_model, dirs = saved_adapters
    ids = tokens(batch=len(NAMES))
    expected = logits(peft_model, ids, adapter_names=NAMES)
    plain = tiny_llama().eval()  # the same base weights (seeded), no PEFT wrapper
    touched = {name: load_peft_adapter(plain, path, name) for name, path in dirs.items()}
    assert len(touched["default"]) == 2 * len(TARGETS) and len(touched["second"]) == 2 * 4
    layers = [m for m in plain.modules() if isinstance(m, MultiLoRALinear)]
    assert len(layers) == 2 * len(TARGETS)
    with torch.no_grad(), adapter_batch(plain, NAMES):
        got = plain(ids).logits
    assert rel_error(got, expected) < 1e-5
    with torch.no_grad():  # outside the block: the base model
        base = plain(ids).logits
    with peft_model.disable_adapter(), torch.no_grad():
        assert rel_error(base, peft_model(ids).logits) < 1e-6


def test_pickle_checkpoints_and_unsupported_configs_are_refused(tmp_path, saved_adapters):
    _, dirs = saved_adapters
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((dirs["default"] / "adapter_config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    plain = tiny_llama()
    with pytest.raises(ValueError, match="pickle file: fastpeft does not load pickles"):
        load_peft_adapter(plain, pickled)
    config = json.loads((dirs["default"] / "adapter_config.json").read_text())
    for field, value in (("use_dora", True), ("lora_bias", True), ("peft_type", "LOHA")):
        (pickled / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=field if field != "peft_type" else "only LORA"):
            load_peft_adapter(plain, pickled)
    assert not any(isinstance(m, MultiLoRALinear) for m in plain.modules())  # nothing changed
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_peft_adapter(plain, tmp_path / "nowhere")


def test_a_checkpoint_for_another_model_is_refused(tmp_path):
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_lora_b(model)
    model.save_pretrained(tmp_path)
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="the model has no module"):
        load_peft_adapter(other, tmp_path)
