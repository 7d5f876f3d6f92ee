"""Every layer type PEFT's LoRA can wrap, on every base layer it can sit on: after ``patch_peft_model`` each is
either fused with PEFT's numbers or left to PEFT's own forward with PEFT's exact numbers, never fused with
different numbers. Each case also says which of the two it expects, so a patch that silently stops fusing
plain ``nn.Linear`` layers fails here too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from conftest import DEVICE, rel_error
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft_models import randomize_lora_b  # noqa: E402

from fastpeft import patch_peft_model  # noqa: E402

IN, OUT = 16, 12


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass with a forward of its own: fusing it as a plain Linear would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class TaggedTensor(torch.Tensor):
    """A tensor subclass standing in for torchao's quantized weights or DTensor shards."""


def linear_with_subclass_weight() -> nn.Linear:
    layer = nn.Linear(IN, OUT)
    layer.weight = nn.Parameter(layer.weight.detach().as_subclass(TaggedTensor), requires_grad=False)
    return layer


class Holder(nn.Module):
    """One target layer named ``layer``; attention layers get (query, key, value)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.attention = isinstance(layer, nn.MultiheadAttention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, x, x)[0] if self.attention else self.layer(x)


@dataclass
class Case:
    build: Callable[[], nn.Module]
    fused: bool  # what the patch is expected to do with it, in eval and in training
    make_input: Callable[[], torch.Tensor] = lambda: torch.randn(2, 3, IN, device=DEVICE)
    config: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32


def _bnb(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        bnb = pytest.importorskip("bitsandbytes")
        if kind == "4bit":
            layer = bnb.nn.Linear4bit(IN, OUT, compute_dtype=torch.float32, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
        return layer.to(DEVICE)  # bitsandbytes quantizes on the move to a device

    return build


def _conv(dims: int) -> Case:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return Case(lambda: conv(4, 6, 3, padding=1), fused=False, make_input=lambda: torch.randn(2, 4, *[5] * dims))


def _ids() -> torch.Tensor:
    return torch.randint(0, IN, (2, 5), device=DEVICE)


CASES = {
    "linear-fp32": Case(lambda: nn.Linear(IN, OUT), fused=True),
    "linear-bf16": Case(lambda: nn.Linear(IN, OUT), fused=True, dtype=torch.bfloat16),
    "linear-fp16": Case(lambda: nn.Linear(IN, OUT), fused=True, dtype=torch.float16),
    "linear-no-bias": Case(lambda: nn.Linear(IN, OUT, bias=False), fused=True),
    "linear-rslora": Case(lambda: nn.Linear(IN, OUT), fused=True, config={"use_rslora": True}),
    "linear-fp64": Case(lambda: nn.Linear(IN, OUT), fused=False, dtype=torch.float64),
    "linear-subclass": Case(lambda: ScaledLinear(IN, OUT), fused=False),
    "linear-subclass-weight": Case(linear_with_subclass_weight, fused=False),
    "linear-dora": Case(lambda: nn.Linear(IN, OUT), fused=True, config={"use_dora": True}),
    "linear-dora-dropout": Case(lambda: nn.Linear(IN, OUT), fused=True, config={"use_dora": True, "lora_dropout": 0.2}),
    "linear-lora-bias": Case(lambda: nn.Linear(IN, OUT), fused=True, config={"lora_bias": True}),
    "linear-dropout": Case(lambda: nn.Linear(IN, OUT), fused=True, config={"lora_dropout": 0.3}),
    "gpt2-conv1d": Case(
        lambda: transformers.pytorch_utils.Conv1D(OUT, IN), fused=True, config={"fan_in_fan_out": True}
    ),
    "bnb-linear4bit": Case(_bnb("4bit"), fused=False),
    "bnb-linear8bit": Case(_bnb("8bit"), fused=False),
    "embedding": Case(lambda: nn.Embedding(IN, OUT), fused=False, make_input=_ids),
    "conv1d": _conv(1),
    "conv2d": _conv(2),
    "conv3d": _conv(3),
    "multihead-attention": Case(lambda: nn.MultiheadAttention(IN, 2, batch_first=True), fused=False),
    "target-parameter": Case(lambda: nn.Linear(IN, OUT), fused=False, config={"target_parameters": ["layer.weight"]}),
}


def build(case: Case) -> nn.Module:
    """The PEFT model of ``case``, B random; the same every call (seeded), so a second call is a twin."""
    torch.manual_seed(0)
    holder = Holder(case.build().to(DEVICE))
    if case.dtype != torch.float32:
        holder = holder.to(case.dtype)
    config = {"r": 3, "lora_alpha": 5, "init_lora_weights": False, **case.config}
    if "target_parameters" not in config:
        config["target_modules"] = ["layer"]
    model = peft.get_peft_model(holder, peft.LoraConfig(**config))
    randomize_lora_b(model)
    return model


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the gradients of every trainable parameter (and of x when it is floating-point)."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    torch.manual_seed(7)  # dropout in training: both sides draw from the same generator state
    y = model(x)
    y.float().square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return y.detach(), grads + ([x.grad] if x.is_floating_point() else [])


@pytest.mark.parametrize("name", list(CASES))
def test_each_peft_layer_is_fused_with_peft_numbers_or_left_to_peft(name, backend, fused_calls):
    case = CASES[name]
    model, reference = build(case), build(case)
    patch_peft_model(model)
    x = case.make_input().to(DEVICE)
    if x.is_floating_point():
        x = x.to(case.dtype)
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-12}.get(case.dtype, 2e-2)
    for training in (False, True):
        model.train(training)
        reference.train(training)
        calls_before = len(fused_calls)
        (y, grads), (ref_y, ref_grads) = run(model, x), run(reference, x)
        fused = len(fused_calls) > calls_before
        assert fused == case.fused, f"{name} (training={training}): fused={fused}, expected {case.fused}"
        if fused:
            assert rel_error(y, ref_y) < tolerance
            for grad, ref_grad in zip(grads, ref_grads, strict=True):
                assert rel_error(grad, ref_grad) < tolerance
        else:  # PEFT's own forward ran: bit-identical
            assert torch.equal(y, ref_y)
            for grad, ref_grad in zip(grads, ref_grads, strict=True):
                assert torch.equal(grad, ref_grad)


def test_the_inference_plan_follows_every_change_to_the_layer(fused_calls):
    """A patched layer keeps its inference arguments between calls; every change PEFT or a user can make to the
    layer reaches the next call: a new active adapter, a scaling, a replaced parameter, an in-place edit, a
    merge, training mode, a new dtype."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(IN, OUT)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=4, target_modules=["proj"]), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(r=2, target_modules=["proj"]))
    randomize_lora_b(model)
    model = model.to(DEVICE).eval()
    twin = peft.get_peft_model(Net(), peft.LoraConfig(r=4, target_modules=["proj"]), adapter_name="a")  # unpatched
    twin.add_adapter("b", peft.LoraConfig(r=2, target_modules=["proj"]))
    twin = twin.to(DEVICE).eval()
    twin.load_state_dict(model.state_dict())
    patch_peft_model(model)
    layer, twin_layer = model.base_model.model.proj, twin.base_model.model.proj
    x = torch.randn(3, IN, device=DEVICE)

    def same(tolerance: float = 1e-5) -> None:
        with torch.no_grad():
            assert rel_error(model(x), twin(x)) < tolerance

    same()
    for target in (model, twin):
        target.set_adapter("b")
    same()
    for target in (layer, twin_layer):
        target.scaling["b"] = 3.5
    same()
    new_b = torch.randn(OUT, 2, device=DEVICE)
    for target in (layer, twin_layer):
        target.lora_B["b"].weight = nn.Parameter(new_b.clone())
    same()
    with torch.no_grad():
        for target in (layer, twin_layer):
            target.lora_A["b"].weight.mul_(-2)
    same()
    for target in (model, twin):
        target.base_model.merge_adapter()
    same(1e-4)
    for target in (model, twin):
        target.base_model.unmerge_adapter()
    same(1e-4)
    calls = len(fused_calls)
    for target in (model, twin):
        target.to(torch.float64)
    x = x.double()
    same(1e-12)
    assert len(fused_calls) == calls  # float64 is not a fused dtype: PEFT's forward ran
    assert calls >= 5  # every call before fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dora_at_initialisation_gives_the_base_output_bit_for_bit(dtype, fused_calls, monkeypatch):
    """PEFT's own DoRA test (test_lora_use_dora_linear) asserts that a fresh DoRA layer returns its base layer's
    output; the patched layer does too, bit for bit (the torch backend composes DoRA as PEFT does)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    torch.manual_seed(0)
    model = peft.get_peft_model(Holder(nn.Linear(IN, OUT)).to(DEVICE, dtype), peft.LoraConfig(
        r=4, target_modules=["layer"], use_dora=True)).eval()  # fmt: skip
    patch_peft_model(model)
    x = torch.randn(2, 3, IN, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        out, base = model(x), model.base_model.model.layer.base_layer(x)
    assert fused_calls == ["dora_linear"]
    assert torch.equal(out, base)
