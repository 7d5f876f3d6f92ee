"""QLoRA models as users build them: transformers loads a checkpoint with BitsAndBytesConfig(load_in_4bit=True),
PEFT wraps it; patched by fastpeft it infers and trains with PEFT's numbers (bitsandbytes runs on the CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE, rel_error

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft_models import TARGETS, randomize_lora_b, tokens, trainable_grads  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.integrations.peft import explain_patch, patched_layer_count  # noqa: E402
from fastpeft.integrations.peft import qlora as peft_qlora  # noqa: E402
from fastpeft.integrations.peft.base_4bit import is_peft_4bit_layer  # noqa: E402

VOCAB = 97


def quantized_llama(path, double_quant=True, quant_type="nf4", compute_dtype=torch.float32):
    """A tiny Llama saved and loaded back in 4 bits. Its in_features are multiples of the blocksize: bitsandbytes'
    CPU dequantization kernel is wrong when blocks straddle rows (fastpeft's kernels are not)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                   bnb_4bit_use_double_quant=double_quant,
                                                   bnb_4bit_compute_dtype=compute_dtype)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization,
                                                              device_map=str(DEVICE))  # fmt: skip
    for module in model.modules():
        # bitsandbytes' CPU inference would repack the weights into its own layout with bf16 absmax (lossy):
        # PEFT's reference numbers here are those of the standard layout, as on a GPU.
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def qlora_model(path, adapters=("default",), dropout=0.0, **kwargs):
    base = quantized_llama(path, **kwargs)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout)
    model = peft.get_peft_model(base, config, adapter_name=adapters[0])
    for i, name in enumerate(adapters[1:]):
        model.add_adapter(name, peft.LoraConfig(r=8 + i, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    randomize_lora_b(model)
    return model


def logits(model, **kwargs):
    with torch.no_grad():
        return model(tokens(batch=3), **kwargs).logits


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_inference_matches_peft(tmp_path, monkeypatch, quant_type, double_quant):
    model = qlora_model(tmp_path, quant_type=quant_type, double_quant=double_quant).eval()
    reference = logits(model)
    fastpeft.patch_peft_model(model)
    calls = []
    for entry in ("qlora_linear", "qlora_forward_unchecked"):  # with dropout, and without (inference)
        real = getattr(peft_qlora, entry)
        monkeypatch.setattr(peft_qlora, entry, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    logits(model)
    assert len(calls) == 14  # every LoRA layer, one fused call each
    assert patched_layer_count(model) == 14
    assert all(is_peft_4bit_layer(m) for m in model.modules() if fastpeft.integrations.peft.is_patched(m))
    report = explain_patch(model)
    assert all(row.path == "fused" and "4-bit" in row.detail for row in report), str(report)
    assert rel_error(logits(model), reference) < 1e-5


def test_training_matches_peft(tmp_path):
    """Train first: a no_grad forward before training leaves some LoRA weights without gradients in a model
    loaded by transformers in 4 bits, fastpeft or not (reference/nf4.md)."""
    model = qlora_model(tmp_path, dropout=0.1).train()
    reference = copy.deepcopy(model)
    fastpeft.patch_peft_model(model)
    ids = tokens()
    losses = []
    for m in (model, reference):
        torch.manual_seed(7)  # the same dropout masks, drawn as PEFT's nn.Dropout draws them
        loss = m(ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert rel_error(losses[0], losses[1]) < 1e-5
    ours, theirs = trainable_grads(model), trainable_grads(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 28
    for name in ours:
        assert ours[name] is not None, name
        assert rel_error(ours[name], theirs[name]) < 1e-4, name
    # and evaluation afterwards still matches
    model.eval(), reference.eval()
    assert rel_error(logits(model), logits(reference)) < 1e-5


def test_evaluation_then_training_matches_peft(tmp_path):
    model = qlora_model(tmp_path).eval()
    reference = copy.deepcopy(model)
    fastpeft.patch_peft_model(model)
    assert rel_error(logits(model), logits(reference)) < 1e-5  # a no_grad forward first, on both
    ids = tokens()
    for m in (model.train(), reference.train()):
        m(ids, labels=ids).loss.backward()
    ours, theirs = trainable_grads(model), trainable_grads(reference)
    assert all(g is not None for g in ours.values()) and len(ours) == 28
    assert all(rel_error(ours[name], theirs[name]) < 1e-4 for name in ours)


def test_training_after_bitsandbytes_own_cpu_inference_warns_nothing(tmp_path):
    """bitsandbytes' AVX-512 CPU inference (left on, as bitsandbytes sets it) repacks a layer's weight on an eval
    forward, and a later training forward on that layer would run its gemv_4bit, which has no autograd (a
    warning, and no gradient through the layer). The patched layers put the weight back first: training after
    inference, PEFT's forward included (adapters disabled), warns nothing and every gradient arrives."""
    import warnings

    from bitsandbytes.functional import has_avx512bf16

    model = qlora_model(tmp_path)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = has_avx512bf16()
    fastpeft.patch_peft_model(model)
    model.eval()
    logits(model)
    with model.disable_adapter():
        logits(model)  # bitsandbytes' own forward: it repacks where the CPU has AVX-512 bf16
    ids = tokens()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train()
        model(ids, labels=ids).loss.backward()
    assert not [str(w.message) for w in caught if "autograd kernel was not registered" in str(w.message)]
    grads = trainable_grads(model)
    assert len(grads) == 28 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_mixed_batch_and_several_adapters(tmp_path):
    model = qlora_model(tmp_path, adapters=("default", "other", "third")).eval()
    names = ["other", "__base__", "third"]
    reference_mixed = logits(model, adapter_names=names)
    model.base_model.set_adapter(["default", "other"])
    reference_both = logits(model)
    fastpeft.patch_peft_model(model)
    assert rel_error(logits(model), reference_both) < 1e-5
    with torch.no_grad():  # the multi_lora op is inference-only: with gradients PEFT's forward would run
        report = explain_patch(model, adapter_names=names)
    assert all(row.path == "fused" for row in report), str(report)
    assert rel_error(logits(model, adapter_names=names), reference_mixed) < 1e-5


def test_unsupported_calls_keep_peft_forward(tmp_path):
    model = qlora_model(tmp_path).eval()
    reference = logits(model)
    fastpeft.patch_peft_model(model)
    with model.disable_adapter():
        assert all(row.path == "PEFT" for row in explain_patch(model))
        base = logits(model)
    assert rel_error(base, reference) > 1e-3  # the adapters really were off
    assert rel_error(logits(model), reference) < 1e-5


def test_qlora_linear_from_peft_layer(tmp_path):
    model = qlora_model(tmp_path).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    module = fastpeft.from_peft_layer(layer)
    x = torch.randn(2, 5, 64, device=DEVICE)
    with torch.no_grad():
        assert rel_error(module(x), layer(x)) < 1e-5


def test_layers_repacked_by_bitsandbytes_cpu_inference_are_read_back(tmp_path):
    model = qlora_model(tmp_path).eval()
    reference = logits(model)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True  # bitsandbytes' default where the CPU has AVX-512 bf16
    repacked_logits = logits(model)
    states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not any(getattr(s, "packing_format_for_cpu", False) for s in states):
        pytest.skip("bitsandbytes did not repack here (no AVX-512 bf16, or a GPU)")
    fastpeft.patch_peft_model(model)
    # the repacking rounded absmax to bf16: the numbers are bitsandbytes' CPU ones, not the standard layout's
    assert rel_error(logits(model), repacked_logits) < 1e-2 and rel_error(logits(model), reference) < 1e-2
