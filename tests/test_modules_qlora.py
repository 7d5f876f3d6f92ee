"""Linear4bit, QLoRALinear, MultiLoRALinear on a 4-bit base, and quantize_model."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import DEVICE, assert_close_to_reference, rel_error
from torch import nn

import fastpeft
from fastpeft import Linear4bit, MultiLoRALinear, QLoRALinear, quantize_model
from fastpeft.ops.quant_4bit import dequantize_4bit


def linear(k=64, n=24, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(device=DEVICE, dtype=dtype)


def dequantized_reference(layer: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    w = dequantize_4bit(layer.weight, layer.quant_state, torch.float64)
    return nn.functional.linear(x.double(), w, None if layer.bias is None else layer.bias.double())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_computes_the_dequantized_layer(backend, quant_type, double_quant):
    layer = Linear4bit.from_linear(linear(), quant_type, 64, double_quant)
    x = torch.randn(2, 3, 64, device=DEVICE)
    y = layer(x)
    assert y.shape == (2, 3, 24) and y.dtype == x.dtype
    assert_close_to_reference(y, dequantized_reference(layer, x), layer.to_linear()(x))


def test_compute_dtype_casts_like_bitsandbytes():
    layer = Linear4bit.from_linear(linear(), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 64, device=DEVICE)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = nn.functional.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16()).float()
    assert rel_error(y, ref) < 1e-2


def test_half_and_to_keep_the_state():
    layer = Linear4bit.from_linear(linear(), double_quant=True)
    absmax = layer.quant_state.absmax.clone()
    layer.half()
    assert layer.weight.dtype == torch.uint8 and layer.quant_state.state2.absmax.dtype == torch.float32
    assert torch.equal(layer.quant_state.absmax, absmax) and layer.bias.dtype == torch.float16
    layer.to(DEVICE)
    assert layer.quant_state.device.type == DEVICE.type


def test_state_dict_is_bitsandbytes_and_loads_both_ways():
    bnb = pytest.importorskip("bitsandbytes")
    ours = Linear4bit.from_linear(linear(dtype=torch.bfloat16).cpu(), "nf4", 64, True)
    sd = ours.state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}  # fmt: skip
    # transformers' way of loading a pre-quantized checkpoint into bitsandbytes
    theirs = bnb.nn.Linear4bit(64, 24, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=theirs)
    theirs.bias = nn.Parameter(sd["bias"])
    assert torch.equal(theirs.weight.data.view(torch.uint8), ours.weight)
    from_bnb = Linear4bit.from_bnb(theirs)
    assert from_bnb.compute_dtype == torch.float32
    assert torch.equal(from_bnb.dequantize(), ours.dequantize())
    x = torch.randn(3, 64)  # fp32: both compute in it
    torch.testing.assert_close(from_bnb(x), ours(x), rtol=0, atol=0)

    fresh = Linear4bit.from_linear(linear(seed=1, dtype=torch.bfloat16).cpu(), "fp4", 128)
    fresh.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(fresh(x), ours(x), rtol=0, atol=0)


def test_bad_state_dict_is_refused():
    layer = Linear4bit.from_linear(linear())
    sd = layer.state_dict()
    sd["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match=r"state\.absmax"):
        layer.load_state_dict(sd)
    other = Linear4bit.from_linear(linear(k=32))
    with pytest.raises(RuntimeError, match="weight"):
        layer.load_state_dict(other.state_dict())


def qlora(dtype=torch.float32, dropout=0.0):
    module = QLoRALinear(Linear4bit.from_linear(linear(dtype=dtype), "nf4", 64, True), r=4, lora_alpha=8,
                         lora_dropout=dropout)  # fmt: skip
    with torch.no_grad():
        module.lora_B.normal_(std=0.3)  # B = 0 would test nothing
    return module


def test_qlora_layer_trains_with_the_reference_gradients(backend):
    module = qlora()
    x = torch.randn(5, 64, device=DEVICE)
    module(x).square().sum().backward()
    a, b = (p.detach().double().requires_grad_() for p in (module.lora_A, module.lora_B))
    ref = dequantized_reference(module.base_layer, x) + module.scaling * (x.double() @ a.t()) @ b.t()
    ref.square().sum().backward()
    assert module.base_layer.weight.grad is None
    assert_close_to_reference(module.lora_A.grad, a.grad, a.grad.float())
    assert_close_to_reference(module.lora_B.grad, b.grad, b.grad.float())


def test_eval_then_train_and_train_then_eval():
    module = qlora(dropout=0.1)
    x = torch.randn(3, 64, device=DEVICE)
    with torch.no_grad():
        first = module.eval()(x)
    module.train()(x).sum().backward()
    assert module.lora_A.grad is not None and module.lora_B.grad is not None
    with torch.no_grad():
        again = module.eval()(x)
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # nothing stepped: eval gives the same numbers
    module.train()(x).sum().backward()
    assert torch.isfinite(module.lora_A.grad).all()


def test_merging_goes_into_a_dequantized_copy():
    module = qlora().eval()
    x = torch.randn(4, 64, device=DEVICE)
    merged = module.merged_linear()
    assert type(merged) is nn.Linear and module.base_layer.weight.dtype == torch.uint8
    torch.testing.assert_close(merged(x), module(x), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="lossy"):
        requantized = module.merged_4bit()
    assert isinstance(requantized, Linear4bit)
    assert rel_error(requantized(x), module(x)) > 1e-4  # it is lossy, as it says


def test_several_adapters_on_one_4bit_base(backend):
    base = Linear4bit.from_linear(linear(), "nf4", 64, True)
    layer = MultiLoRALinear(base)
    g = torch.Generator().manual_seed(0)
    adapters = {name: (torch.randn(r, 64, generator=g) * 0.3, torch.randn(24, r, generator=g) * 0.3, s)
                for name, r, s in (("a", 4, 0.5), ("b", 8, 2.0))}  # fmt: skip
    for name, (a, b, s) in adapters.items():
        layer.add_adapter(name, a, b, s)
    x = torch.randn(3, 5, 64, device=DEVICE)
    names = ["b", None, "a"]
    with torch.no_grad():
        y = layer(x, layer.ids_for(names))
    ref = dequantized_reference(base, x)
    for i, name in enumerate(names):
        if name is not None:
            a, b, s = (t.to(DEVICE).double() if isinstance(t, torch.Tensor) else t for t in adapters[name])
            ref[i] += s * (x[i].double() @ a.t()) @ b.t()
    assert_close_to_reference(y, ref, ref.float())


def test_quantize_model_replaces_linear_layers_but_the_head():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DEVICE).eval()
    ids = torch.randint(0, 50, (2, 6), device=DEVICE)
    quantize_model(model, "nf4", 64, double_quant=True)
    assert type(model.lm_head) is nn.Linear
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 7 and all(m.quant_state.nested for m in layers)
    with torch.no_grad():
        y = model(ids).logits
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, Linear4bit):
                    setattr(module, child_name, child.to_linear())
        ref = model(ids).logits
    assert rel_error(y, ref) < 1e-5
    with pytest.raises(ValueError, match="blocksize"):
        quantize_model(model, blocksize=100)


def test_bad_module_arguments():
    with pytest.raises(TypeError, match="Linear4bit"):
        QLoRALinear(linear())
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        Linear4bit.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="bitsandbytes"):
        Linear4bit.from_bnb(linear())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qlora().merged_linear()  # the exact merge says nothing


def test_warmup_runs_4bit_layers_once_each(backend):
    model = nn.Sequential(qlora(), Linear4bit.from_linear(linear(k=24, n=16, bias=False)))
    assert fastpeft.warmup(model, [1, 5], training=True) == 4  # the QLoRA layer's own base is not run twice
    assert model[0].lora_A.grad is None


def test_from_bnb_reads_a_layer_bitsandbytes_repacked_for_cpu_inference():
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(64, 64) * 0.1
    theirs = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4").to("cpu")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = theirs.eval()(x)  # bitsandbytes' CPU inference repacks the layer here (AVX-512 bf16 CPUs)
    if not getattr(theirs.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack here (no AVX-512 bf16)")
    ours = Linear4bit.from_bnb(theirs)
    assert not theirs.weight.quant_state.packing_format_for_cpu
    assert rel_error(ours.dequantize(torch.float32), w) < 0.15  # NF4's own error: the layout is read right
    with torch.no_grad():
        assert rel_error(ours(x), expected) < 2e-2  # bitsandbytes' own numbers, to bf16 rounding
