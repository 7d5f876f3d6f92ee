"""Every configuration AdapterHub's ``adapters`` offers, run patched and unpatched on tiny models: the patched model
gives AdapterHub's numbers (its forward, or the fused op where the structure allows), and raises exactly where
AdapterHub raises. Enumerated from the installed package: every named config of ``ADAPTER_CONFIG_MAP``, every
field of ``BnConfig``, every composition block (fusion added before and after patching), gating scores, heads.
Runs in AdapterHub's own environment (``make test-adapterhub``); skips where ``adapters`` is absent."""

from __future__ import annotations

import dataclasses

import pytest
import torch

adapters = pytest.importorskip("adapters")
transformers = pytest.importorskip("transformers")

from adapters import composition  # noqa: E402
from adapters.configuration.adapter_config import ADAPTER_CONFIG_MAP, BnConfig  # noqa: E402
from conftest import rel_error  # noqa: E402

from fastpeft.integrations.adapterhub import (  # noqa: E402
    activation_name,
    explain_adapterhub_patch,
    patch_adapterhub_model,
    unpatch_adapterhub_model,
)
from fastpeft.ops.bottleneck import ACTIVATIONS  # noqa: E402

IDS = torch.randint(0, 60, (3, 7), generator=torch.Generator().manual_seed(1))


def base_model(family: str, head: bool = False):
    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)  # fmt: skip
        return adapters.BertAdapterModel(config) if head else transformers.BertModel(config)
    config = transformers.LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return transformers.LlamaModel(config)


def randomise(model, base_names: set[str]) -> None:
    """Every parameter the adapters added, random (at initialisation an adapter is near the identity, or zero)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in base_names:
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.2
                param.copy_(noise + (1.0 if name.endswith("scaling") else 0.0))


def outcome(build, patched: bool, train: bool, **forward_kwargs):
    """``build()``'s model (patched or not) run once: its output and gradients, or the exception it raised."""
    try:
        model = build()
        if patched:
            patch_adapterhub_model(model)
        model.train(train)
        torch.manual_seed(3)  # the same dropout masks on both sides
        out = model(IDS, **forward_kwargs)
        hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
        result = {"out": hidden}
        scores = getattr(out, "adapter_gating_scores", None)
        if scores:
            result.update({f"gate/{k}/{i}/{loc}": torch.as_tensor(v) for k, by_layer in scores.items()
                           for i, by_loc in by_layer.items() for loc, v in by_loc.items()})  # fmt: skip
        if train:
            # A random projection: a sum of squares after BERT's final LayerNorm has no gradient to speak of.
            weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(4))
            (hidden.float() * weights).sum().backward()
            result.update({f"grad/{n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
        return model, result
    except Exception as exc:  # the outcome includes what AdapterHub raises
        return None, exc


def assert_same(build, train: bool = False, **forward_kwargs):
    """Patched and unpatched agree (numbers within 1e-5, or the same exception type); returns the patched model."""
    _, expected = outcome(build, False, train, **forward_kwargs)
    model, got = outcome(build, True, train, **forward_kwargs)
    if isinstance(expected, Exception):
        assert type(got) is type(expected), f"AdapterHub raised {expected!r}, patched gave {got!r}"
        return None
    assert not isinstance(got, Exception), f"patched raised {got!r} where AdapterHub ran"
    assert expected.keys() == got.keys()
    for key in expected:
        assert rel_error(got[key], expected[key]) < 1e-5, key
    return model


def builder(family: str, configs: dict, setup=None, head: bool = False, fusion=None):
    """A model with the named adapters added (randomised), ``setup`` active and trainable."""

    def build():
        model = base_model(family, head)
        base_names = {n for n, _ in model.named_parameters()}
        if not head:
            adapters.init(model)
        for name, config in configs.items():
            model.add_adapter(name, config=config)
            if head:
                model.add_classification_head(name, num_labels=3)
        if fusion is not None:
            model.add_adapter_fusion(fusion)
        randomise(model, base_names)
        active = setup if setup is not None else next(iter(configs))
        model.train_adapter_fusion(active) if fusion is not None else model.train_adapter(active)
        return model

    return build


def fused_rows(model) -> list[str]:
    return [row.name for row in explain_adapterhub_patch(model) if row.path == "fused"]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("config", list(ADAPTER_CONFIG_MAP))
def test_every_named_config(config, family, train):
    assert_same(builder(family, {"a": config}), train=train)


# Every BnConfig field: values besides the default (on seq_bn), and whether the fused op must take every adapter.
FIELD_VALUES = {
    "mh_adapter": [(True, True)],
    "output_adapter": [(False, True)],
    "reduction_factor": [(4, True), ({"default": 16, "1": 8}, True), (0.5, True)],
    "non_linearity": [(name, True) for name in ACTIVATIONS] + [("quick_gelu", False), ("relu6", False)],
    "original_ln_before": [(False, True)],
    "original_ln_after": [(False, True)],
    "ln_before": [(True, True)],
    "ln_after": [(True, False)],
    "init_weights": [("mam_adapter", True), ("houlsby", True)],
    "init_weights_seed": [(7, True)],
    "is_parallel": [(True, True)],
    "scaling": [(2.0, True), ("learned", True), ("channel", True)],
    "use_gating": [(True, False)],
    "residual_before_ln": [(False, True), ("post_add", True)],
    "adapter_residual_before_ln": [(True, False)],
    "inv_adapter": [("nice", True), ("glow", True)],
    "inv_adapter_reduction_factor": [(4, True)],
    "cross_adapter": [(True, True)],
    "leave_out": [([0], True)],
    "dropout": [(0.3, True)],  # in training AdapterHub's forward runs (its dropout), in eval the fused op
    "phm_layer": [(True, False)],
    "phm_dim": [(2, True)],
    "factorized_phm_W": [(False, True)],
    "shared_W_phm": [(True, True)],
    "shared_phm_rule": [(False, True)],
    "factorized_phm_rule": [(True, True)],
    "phm_c_init": [("uniform", True)],
    "phm_init_range": [(0.01, True)],
    "learn_phm": [(False, True)],
    "hypercomplex_nonlinearity": [("normal", True)],
    "phm_rank": [(2, True)],
    "phm_bias": [(False, True)],
    "stochastic_depth": [(0.2, False)],
}
# Fields that mean something only beside another value.
COMPANIONS = {"output_adapter": {"mh_adapter": True}, "adapter_residual_before_ln": {"ln_after": True}}
FIELD_CASES = [(field, value, fused) for field, values in FIELD_VALUES.items() for value, fused in values]


def test_every_bn_config_field_is_walked():
    assert {f.name for f in dataclasses.fields(BnConfig)} - {"architecture"} == set(FIELD_VALUES)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("field", "value", "fused"), FIELD_CASES, ids=[f"{f}={v}" for f, v, _ in FIELD_CASES])
def test_every_bn_config_field(field, value, fused, train):
    config = dataclasses.replace(adapters.SeqBnConfig(), **{field: value, **COMPANIONS.get(field, {})})
    model = assert_same(builder("bert", {"a": config}), train=train)
    if model is not None and fused and not (train and field == "dropout"):
        assert fused_rows(model), f"{field}={value!r} ran no adapter fused"
        assert all(row.path == "fused" for row in explain_adapterhub_patch(model)), explain_adapterhub_patch(model)
    if model is not None and not fused:
        assert not fused_rows(model)


COMPOSITIONS = {
    "stack": composition.Stack("a", "b"),
    "parallel": composition.Parallel("a", "b"),
    "batch_split": composition.BatchSplit("a", "b", batch_sizes=[1, 2]),
    "split": composition.Split("a", "b", splits=[3, 4]),
    "average": composition.Average("a", "b", weights=[0.3, 0.7]),
    "stack_split": composition.Stack("c", composition.Split("a", "b", splits=[2, 5])),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_every_composition(name, family, train):
    configs = {"a": "seq_bn", "b": "double_seq_bn", "c": "par_bn"}
    model = assert_same(builder(family, configs, COMPOSITIONS[name]), train=train)
    assert model is None or fused_rows(model)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fusion_runs_adapterhubs_forward_for_the_adapters_it_reads_only(train):
    setup = composition.Stack(composition.Fuse("a", "b"), "c")
    build = builder("bert", {"a": "seq_bn", "b": "seq_bn", "c": "seq_bn"}, setup, fusion=composition.Fuse("a", "b"))
    model = assert_same(build, train=train)
    rows = {row.name.rsplit(".", 1)[-1]: row.path for row in explain_adapterhub_patch(model)}
    assert rows == {"a": "AdapterHub", "b": "AdapterHub", "c": "fused"}
    model.set_active_adapters("a")  # the fusion is not active: every adapter runs fused again
    assert all(row.path == "fused" for row in explain_adapterhub_patch(model))


def test_fusion_added_after_patching():
    model = builder("bert", {"a": "seq_bn", "b": "seq_bn"})()
    patch_adapterhub_model(model)
    model.add_adapter_fusion(composition.Fuse("a", "b"))
    model.set_active_adapters(composition.Fuse("a", "b"))
    model.eval()
    with torch.no_grad():
        got = model(IDS).last_hidden_state
        unpatch_adapterhub_model(model)
        expected = model(IDS).last_hidden_state
    assert rel_error(got, expected) < 1e-6


@pytest.mark.parametrize("gating", [False, True], ids=["plain", "gated"])
def test_gating_scores_requested(gating):
    config = dataclasses.replace(adapters.SeqBnConfig(), use_gating=gating)
    assert_same(builder("bert", {"a": config}), output_adapter_gating_scores=True)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_heads(train):
    build = builder("bert", {"a": "seq_bn", "b": "par_bn"}, head=True)
    model = assert_same(build, train=train)
    assert len(fused_rows(model)) == 2 * 2  # one placement per layer for each, two layers


@pytest.mark.parametrize("name", ["silu", "swish", "gelu", "gelu_new", "relu", "tanh", "sigmoid", "leakyrelu"])
def test_activations_are_recognised_by_what_they_compute(name):
    from adapters.methods.modeling import Activation_Function_Class

    assert activation_name(Activation_Function_Class(name).f) in ({name} | ({"silu", "swish"} & {name} and
                                                                         {"silu", "swish"}))  # fmt: skip
    assert activation_name(torch.nn.ReLU(inplace=True)) == "relu"
    assert activation_name(torch.nn.PReLU()) is None  # a parameter of its own
    assert activation_name(torch.nn.Hardswish()) is None


def test_unpatch_restores_adapterhubs_forward():
    model = builder("bert", {"a": "seq_bn"})()
    assert patch_adapterhub_model(model) == patch_adapterhub_model(model) == 2  # idempotent
    unpatch_adapterhub_model(model)
    assert all(row.path == "not patched" for row in explain_adapterhub_patch(model))
    assert not any("forward" in m.__dict__ for m in model.modules())
