"""Every LoRA configuration the installed PEFT offers, walked on tiny models: after ``patch_peft_model`` each runs
fused with PEFT's numbers or runs PEFT's own forward, and never raises where PEFT does not.

The cases come from PEFT itself, so a newer PEFT is covered without editing this file where it can be: every
field of ``LoraConfig`` (a value from ``VALUES``, else one derived from the field's type annotation), every LoRA
variant class PEFT's ``lora.Linear`` knows (``Linear.lora_variants``), and a variant class PEFT does not have yet.
A field that can be neither given a value nor named in ``NOT_VARIED`` with the reason fails
``test_every_config_field_is_walked``: the walk never skips a field silently.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing

import pytest
import torch
from conftest import DEVICE, rel_error
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft_models import VOCAB, tiny_llama, tokens  # noqa: E402

from fastpeft import explain_patch, patch_peft_model  # noqa: E402

LoraConfig = peft.LoraConfig
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_CONFIGS = vars(peft.tuners.lora.config)


def _config_class(name: str, **kwargs):
    """An instance of PEFT's config class ``name`` (absent from older PEFT: None)."""
    cls = _CONFIGS.get(name)
    return None if cls is None else cls(**kwargs)


# Non-default values worth walking, per LoraConfig field (a field absent from the installed PEFT is ignored).
VALUES: dict[str, list] = {
    "inference_mode": [True],
    "r": [3],
    "lora_alpha": [5],
    "lora_dropout": [0.2],
    "bias": ["all", "lora_only"],
    "use_rslora": [True],
    "modules_to_save": [["lm_head"]],
    "init_lora_weights": [False, "gaussian", "olora", "pissa", "pissa_niter_2", "orthogonal", "mica", "loftq"],
    "layers_to_transform": [[1]],
    "layers_pattern": ["layers"],
    "rank_pattern": [{"q_proj": 6, "down_proj": 2}],
    "alpha_pattern": [{"v_proj": 3}],
    "trainable_token_indices": [[1, 2]],
    "use_dora": [True],
    "velora_config": [_config_class("VeloraConfig", num_groups=4)],
    "alora_invocation_tokens": [[5, 6]],
    "use_qalora": [True],
    "qalora_group_size": [8],
    "monteclora_config": [_config_class("MontecloraConfig")],
    "layer_replication": [[[0, 2], [1, 2]]],
    "runtime_config": [_config_class("LoraRuntimeConfig", ephemeral_gpu_offload=True)],
    "lora_bias": [True],
    "target_parameters": [["mlp.gate_proj.weight"]],
    "use_bdlora": [
        _config_class(
            "BdLoraConfig",
            target_modules_bd_a=["q_proj", "k_proj", "gate_proj"],
            target_modules_bd_b=["v_proj", "o_proj", "up_proj", "down_proj"],
            nblocks=2,
        )
    ],
    "kasa_config": [_config_class("KasaConfig")],
    "ensure_weight_tying": [True],
    "exclude_modules": [["o_proj"]],
    "fan_in_fan_out": [True],  # on GPT-2, whose projections are Conv1D (see _build)
    "arrow_config": ["create_arrow_model"],  # built the way PEFT documents it (see _build)
}
# What a field's value needs beside it for PEFT to accept it.
COMPANIONS: dict[str, dict] = {
    "layers_pattern": {"layers_to_transform": [0]},
    "qalora_group_size": {"use_qalora": True},
}
# Fields not varied here, and why: none of them changes what a LoRA layer computes once built, or they need what
# a CPU test cannot have.
NOT_VARIED = {
    "task_type": "metadata",
    "peft_type": "metadata",
    "auto_mapping": "metadata",
    "peft_version": "metadata",
    "base_model_name_or_path": "metadata",
    "revision": "metadata",
    "target_modules": "set by every case",
    "megatron_config": "needs Megatron-LM (another layer class, never patched)",
    "megatron_core": "needs Megatron-LM",
    "loftq_config": "walked with init_lora_weights='loftq'",
    "eva_config": "initialisation from data (EVA): the layers it leaves are plain LoRA of other ranks (rank_pattern)",
    "corda_config": "initialisation from data (CorDA): the layers it leaves are plain LoRA",
    "lora_ga_config": "initialisation from gradients (LoRA-GA): the layers it leaves are plain LoRA",
}
# The PEFT variants the fused ops express (PEFT's class names); every other one keeps PEFT's forward.
FUSED_VARIANTS = {"DoraLinearVariant"}


def _derived_values(field: dataclasses.Field) -> list:
    """Values for a field this file does not know (a newer PEFT's): from its type annotation, or []."""
    hint = typing.get_type_hints(LoraConfig).get(field.name)
    default = field.default if field.default is not dataclasses.MISSING else None
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is bool:
            return [not default]
        if option in (int, float):
            return [option(default or 0) + 3]
        if typing.get_origin(option) is typing.Literal:
            return [value for value in typing.get_args(option) if value != default]
        if dataclasses.is_dataclass(option):
            try:
                return [option()]
            except TypeError:  # required arguments: nothing to derive
                return []
    return []


def walk() -> list[tuple[str, dict]]:
    """(case id, LoraConfig overrides) for every value of every walked field of the installed LoraConfig."""
    cases = [("default", {})]
    for field in dataclasses.fields(LoraConfig):
        if field.name in NOT_VARIED:
            continue
        for value in VALUES.get(field.name, _derived_values(field)):
            if value is not None:
                overrides = {**COMPANIONS.get(field.name, {}), field.name: value}
                cases.append((f"{field.name}={value!r}"[:70], overrides))
    return cases


def _randomize(model: nn.Module) -> None:
    """Every adapter parameter moved off its initialisation (B = 0 would make the walk pass vacuously)."""
    generator = torch.Generator(device="cpu").manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and param.is_floating_point():
                param.add_(0.3 * torch.randn(param.shape, generator=generator).to(param))


def _tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(DEVICE)


def _build(overrides: dict, tmp_path) -> nn.Module:
    """The PEFT model of one case, its adapters randomised; the same every call (seeded)."""
    torch.manual_seed(0)
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **overrides}
    if "arrow_config" in overrides:  # Arrow routes among saved task adapters: PEFT's create_arrow_model
        paths = []
        for task in range(2):
            task_model = peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
            _randomize(task_model)
            task_model.save_pretrained(tmp_path / f"task{task}")
            paths.append(str(tmp_path / f"task{task}"))
        arrow = peft.ArrowConfig(top_k=1)
        model = peft.create_arrow_model(tiny_llama(), paths, arrow)
    elif overrides.get("fan_in_fan_out"):
        config["target_modules"] = ["c_attn", "c_proj", "c_fc"]
        model = peft.get_peft_model(_tiny_gpt2(), LoraConfig(**config))
    else:
        if "target_parameters" in overrides:
            config["target_modules"] = ["q_proj"]
        if overrides.get("init_lora_weights") == "loftq":
            config["loftq_config"] = peft.LoftQConfig(loftq_bits=4)
        model = peft.get_peft_model(tiny_llama(), LoraConfig(**config))
    _randomize(model)
    return model.to(DEVICE)


def _outcome(call):
    try:
        return call(), None
    except Exception as exc:  # the patched model must raise exactly where PEFT raises
        return None, exc


def _eval_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(11)  # variants that draw at their first call (Arrow's routing) draw alike on both sides
    with torch.no_grad():
        return model.eval()(ids).logits


def _training_step(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The loss of one training forward (dropout drawn from a seeded generator) and every gradient."""
    model.train().zero_grad()
    torch.manual_seed(11)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(patched, reference, fused: bool, what: str) -> None:
    """Fused: PEFT's numbers to fp32 rounding. PEFT's forward everywhere: PEFT's numbers bit for bit."""
    if fused:
        assert rel_error(patched, reference) < 1e-4, what
    else:
        assert torch.equal(patched, reference), what


@pytest.mark.parametrize(("case", "overrides"), walk(), ids=[case for case, _ in walk()])
def test_every_lora_config_runs_fused_with_peft_numbers_or_peft_forward(case, overrides, tmp_path):
    reference, error = _outcome(lambda: _build(overrides, tmp_path))
    if error is not None:  # PEFT itself refuses the configuration here: nothing to patch
        pytest.skip(f"PEFT refuses {case}: {type(error).__name__}: {str(error)[:120]}")
    model = patch_peft_model(copy.deepcopy(reference))
    report = explain_patch(model)  # must not raise, whatever the layers hold
    assert report and all(row.path in ("fused", "PEFT", "not patched") for row in report), str(report)
    variants = {
        type(v).__name__ for m in model.modules() for v in getattr(m, "lora_variant", {}).values() if v is not None
    }
    fused = any(row.path == "fused" for row in report)
    if variants - FUSED_VARIANTS:
        assert not fused, f"{case}: variant {variants} must keep PEFT's forward\n{report}"
    else:
        assert fused, f"{case}: plain LoRA and DoRA layers run fused\n{report}"
    ids = tokens()
    for run in (_eval_logits, _training_step):
        expected, expected_error = _outcome(lambda run=run: run(reference, ids))
        got, got_error = _outcome(lambda run=run: run(model, ids))
        if expected_error is not None:
            assert type(got_error) is type(expected_error), f"{case}: PEFT raised {expected_error!r}, got {got!r}"
            continue
        assert got_error is None, f"{case}: {run.__name__} raised where PEFT does not: {got_error!r}"
        if run is _eval_logits:
            _assert_same(got, expected, fused, f"{case}: logits")
            continue
        (loss, grads), (ref_loss, ref_grads) = got, expected
        _assert_same(loss, ref_loss, fused, f"{case}: loss")
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            if ref_grads[name] is None:
                assert grad is None, name
            else:
                _assert_same(grad, ref_grads[name], fused, f"{case}: gradient of {name}")


def test_every_config_field_is_walked():
    """Each LoraConfig field of the installed PEFT is walked with some value or named with a reason."""
    unwalked = [
        f.name
        for f in dataclasses.fields(LoraConfig)
        if f.name not in NOT_VARIED and not any(v is not None for v in VALUES.get(f.name, _derived_values(f)))
    ]
    assert not unwalked, f"LoraConfig fields with no value to walk: {unwalked}; add them to VALUES or NOT_VARIED"


def test_every_lora_variant_is_walked():
    """Each variant class PEFT's lora.Linear builds is reached by some walked configuration."""
    from peft.tuners.lora.layer import Linear

    variants = getattr(Linear, "lora_variants", None)
    if variants is None:  # PEFT before variant classes: DoRA is a flag, walked as use_dora
        pytest.skip("this PEFT has no LoRA variant classes")
    walked = {key for _, overrides in walk() for key, value in overrides.items() if value}
    walked |= {value for _, overrides in walk() for value in overrides.values() if isinstance(value, str)}
    table = variants.fget(None) if isinstance(variants, property) else variants
    missing = [(key, cls.__name__) for key, cls in table.items() if key and not set(key) & walked]
    assert not missing, f"LoRA variants no walked configuration reaches: {missing}"


class FutureLinearVariant:
    """A LoRA variant class PEFT does not have yet, computing plain LoRA its own way."""

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        return result + 2.0 * lora_b(lora_a(module.lora_dropout[active_adapter](x))) * module.scaling[active_adapter]


def test_a_variant_peft_adds_later_keeps_peft_forward():
    model = _build({}, None)
    reference = copy.deepcopy(model)
    for target in (model, reference):
        for module in target.modules():
            if hasattr(module, "lora_variant") and "default" in module.lora_A:
                module.lora_variant["default"] = FutureLinearVariant()
    patch_peft_model(model)
    report = explain_patch(model)
    assert {row.path for row in report} == {"PEFT"}, str(report)
    assert all("FutureLinearVariant" in row.detail for row in report)
    ids = tokens()
    assert torch.equal(_eval_logits(model, ids), _eval_logits(reference, ids))


def test_a_hooked_base_layer_keeps_peft_forward(fused_calls):
    """A forward hook on the base layer (accelerate's offloading installs such) must run: PEFT's forward calls the
    base layer, the fused op would not. Decided per call: the hook may come after patching."""
    model = _build({}, None)
    reference = copy.deepcopy(model)
    patch_peft_model(model)
    ids = tokens()
    assert rel_error(_eval_logits(model, ids), _eval_logits(reference, ids)) < 1e-5 and fused_calls
    for target in (model, reference):
        base = target.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        base.register_forward_hook(lambda module, inputs, output: output * 3)
    row = next(r for r in explain_patch(model) if r.name.endswith("layers.0.self_attn.q_proj"))
    assert row.path == "PEFT" and "hooks" in row.detail
    assert rel_error(_eval_logits(model, ids), _eval_logits(reference, ids)) < 1e-5
