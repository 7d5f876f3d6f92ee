"""add_bottleneck_adapters in transformers models (no AdapterHub): the fused adapters against the same placements
computed unfused, several adapters per batch, saving and loading, training. AdapterHub's own numbers are checked
in tests/test_integration_adapterhub.py (its own environment)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, rel_error

transformers = pytest.importorskip("transformers")

from fastpeft.integrations.bottleneck_checkpoint import load_bottleneck_adapter, save_bottleneck_adapter  # noqa: E402
from fastpeft.integrations.bottleneck_models import (  # noqa: E402
    BottleneckConfig,
    add_bottleneck_adapters,
    bottleneck_batch,
    set_active_bottleneck,
)
from fastpeft.modules.bottleneck import BottleneckAdapter  # noqa: E402

FAMILIES = ["bert", "roberta", "llama", "mistral", "qwen2"]
CONFIGS = ["seq_bn", "double_seq_bn", "par_bn"]


def base_model(family: str):
    torch.manual_seed(0)
    sizes = dict(vocab_size=60, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    if family in ("bert", "roberta"):
        cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
        model_cls = transformers.BertModel if family == "bert" else transformers.RobertaModel
        config = cls(**sizes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[family]  # fmt: skip
        model_cls = {"llama": transformers.LlamaModel, "mistral": transformers.MistralModel,
                     "qwen2": transformers.Qwen2Model}[family]  # fmt: skip
        config = cls(**sizes, num_key_value_heads=2)
    return model_cls(config).to(DEVICE).eval()


def randomize_adapters(model, scale=0.2):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name:
                param.normal_(0.0, scale).add_(1.0 if name.endswith("scaling") else 0.0)


def run(model, batch=3):
    ids = torch.randint(0, 60, (batch, 7), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        return model(ids).last_hidden_state


def unfused_forward(self, x, residual=None, out_residual=None, out_norm=None):
    """AdapterHub's Adapter.forward, residual + up(down(x)) * scaling, then the layer's add and LayerNorm."""
    y = (x if residual is None else residual) + self.adapter_up(self.adapter_down(x)) * self.scaling
    y = y if out_residual is None else y + out_residual
    return y if out_norm is None else out_norm(y)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_placements_match_the_unfused_composition(monkeypatch, family, config):
    model = add_bottleneck_adapters(base_model(family), config, "a")
    randomize_adapters(model)
    fused = run(model)
    monkeypatch.setattr(BottleneckAdapter, "forward", unfused_forward)
    assert rel_error(fused, run(model)) < 1e-5
    set_active_bottleneck(model, None)
    assert rel_error(run(model), run(base_model(family))) < 1e-6  # no adapter active: the base model


def test_parallel_adapters_start_as_the_identity():
    model = add_bottleneck_adapters(base_model("llama"), "par_bn")
    assert rel_error(run(model), run(base_model("llama"))) < 1e-6


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_one_adapter_per_sample(family):
    model = base_model(family)
    add_bottleneck_adapters(model, "double_seq_bn", "a")
    add_bottleneck_adapters(model, "double_seq_bn", "b")
    randomize_adapters(model)
    names = ["b", None, "a"]
    with bottleneck_batch(model, names):
        mixed = run(model)
    for i, name in enumerate(names):
        set_active_bottleneck(model, name)
        assert rel_error(mixed[i], run(model)[i]) < 1e-5, name


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_adapters_of_different_shapes_share_a_batch(family, monkeypatch):
    # One placement, three configurations: one launch per configuration, each on its own samples.
    model = base_model(family)
    add_bottleneck_adapters(model, "double_seq_bn", "a")
    add_bottleneck_adapters(model, BottleneckConfig.preset("double_seq_bn", reduction_factor=6), "b")
    add_bottleneck_adapters(model, BottleneckConfig.preset("double_seq_bn", non_linearity="relu", ln_before=True), "c")
    randomize_adapters(model)
    names = ["b", None, "a", "c", "b"]
    import fastpeft.integrations.bottleneck_models as placements

    launches = []
    real = placements.bottleneck_adapter
    monkeypatch.setattr(placements, "bottleneck_adapter", lambda *a, **k: launches.append(1) or real(*a, **k))
    with bottleneck_batch(model, names):
        mixed = run(model, batch=len(names))
    assert len(launches) == 3 * len(placements.bottleneck_layers(model))
    monkeypatch.undo()
    for i, name in enumerate(names):
        set_active_bottleneck(model, name)
        assert rel_error(mixed[i], run(model, batch=len(names))[i]) < 1e-5, name


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_adapters_placed_differently_are_refused_before_anything_is_attached(family):
    model = add_bottleneck_adapters(base_model(family), "seq_bn", "a")
    randomize_adapters(model)
    before = run(model)
    with pytest.raises(ValueError, match=r"adapter .b. is placed as .*original_ln_before.*do not mix"):
        add_bottleneck_adapters(model, "double_seq_bn", "b")
    assert not any(".adapters.b." in name for name, _ in model.named_parameters())
    assert torch.equal(run(model), before)


def test_save_and_load(tmp_path):
    config = BottleneckConfig.preset("seq_bn", reduction_factor=6, scaling="channel", ln_before=True)
    model = add_bottleneck_adapters(base_model("bert"), config, "task")
    randomize_adapters(model)
    save_bottleneck_adapter(model, tmp_path, "task", config)
    fresh = base_model("bert")
    assert load_bottleneck_adapter(fresh, tmp_path, "again") == "again"
    assert rel_error(run(fresh), run(model)) < 1e-6
    (tmp_path / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        load_bottleneck_adapter(base_model("bert"), tmp_path)


def test_training_reaches_every_adapter_parameter():
    model = add_bottleneck_adapters(base_model("llama"), BottleneckConfig.preset("double_seq_bn", scaling="learned"))
    randomize_adapters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    adapter_params = {n: p for n, p in model.named_parameters() if ".adapters." in n}
    for p in adapter_params.values():
        p.requires_grad_(True)
    ids = torch.randint(0, 60, (2, 5), device=DEVICE)
    model.train()(ids).last_hidden_state.square().mean().backward()
    assert len(adapter_params) == 2 * 2 * 5  # 2 layers x 2 placements x (down w, b, up w, b, scaling)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params.values())


def test_bad_arguments():
    with pytest.raises(ValueError, match="config"):
        add_bottleneck_adapters(base_model("bert"), "lora")
    with pytest.raises(ValueError, match="no layers"):
        add_bottleneck_adapters(torch.nn.Linear(4, 4), "seq_bn")
    with pytest.raises(ValueError, match="ln_after"):
        BottleneckConfig.from_adapterhub({"ln_after": True, "mh_adapter": False, "output_adapter": True,
                                          "reduction_factor": 16, "non_linearity": "relu",
                                          "original_ln_before": True})  # fmt: skip
