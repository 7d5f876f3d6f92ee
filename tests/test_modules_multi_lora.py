"""MultiLoRALinear: adapters added, removed and looked up by name; per-token, per-sample and packed forwards
against the per-adapter float64 computation; Conv1D bases; moving with the module; bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close_to_reference
from torch import nn

from fastpeft import MultiLoRALinear, adapter_batch


def pair(r, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(r, k, generator=gen) * k**-0.5).to(DEVICE), (torch.randn(n, r, generator=gen) * 0.5).to(DEVICE)


def expected(layer_weight, bias, x, per_token, adapters):
    """x [..., k] with per-token adapter names (None: base), in float64."""
    rows = x.reshape(-1, x.shape[-1]).double()
    y = rows @ layer_weight.double().t() + bias.double()
    for t, name in enumerate(per_token):
        if name is not None:
            a, b, s = adapters[name]
            y[t] += s * (rows[t] @ a.double().t() @ b.double().t())
    return y.reshape(*x.shape[:-1], -1)


def test_add_remove_index_and_forward(backend):
    torch.manual_seed(0)
    base = nn.Linear(24, 20).to(DEVICE)
    layer = MultiLoRALinear(base)
    adapters = {"a": (*pair(4, 24, 20, 1), 2.0), "b": (*pair(16, 24, 20, 2), 0.5), "c": (*pair(8, 24, 20, 3), 1.0)}
    for name, (a, b, s) in adapters.items():
        layer.add_adapter(name, a, b, s)
    assert layer.adapter_names == ["a", "b", "c"] and layer.adapter_index("c") == 2
    assert not base.weight.requires_grad
    x = torch.randn(3, 5, 24, device=DEVICE)
    names = ["c", None, "a"]
    out = layer(x, layer.ids_for(names))  # one id per sample
    per_token = [n for n in names for _ in range(5)]
    ref = expected(base.weight, base.bias, x, per_token, adapters)
    plain = expected(base.weight, base.bias, x.double(), per_token, adapters).float()
    assert_close_to_reference(out, ref, plain)

    layer.remove_adapter("a")
    assert layer.adapter_names == ["b", "c"] and layer.adapter_index("c") == 1
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        layer.adapter_index("a")
    out = layer(x, layer.ids_for(["c", None, "b"]))
    per_token = [n for n in ["c", None, "b"] for _ in range(5)]
    assert_close_to_reference(out, expected(base.weight, base.bias, x, per_token, adapters), out)
    torch.testing.assert_close(layer(x), base(x))  # no ids: the base layer


def test_packed_layer_and_adapter_batch(backend):
    """A q/k/v-like packed layer: adapter 'x' leaves the k slice alone; adapter_batch feeds the ids."""
    torch.manual_seed(1)
    base = nn.Linear(16, 48).to(DEVICE)
    model = nn.Sequential(MultiLoRALinear(base, slice_widths=[32, 8, 8]))
    layer = model[0]
    qa, qb = pair(4, 16, 32, 4)
    va, vb = pair(2, 16, 8, 5)
    layer.add_adapter("x", [qa, None, va], [qb, None, vb], [2.0, 1.0, 3.0])
    x = torch.randn(2, 3, 16, device=DEVICE)
    with adapter_batch(model, ["x", "__base__"]):
        out = model(x)
    assert layer.batch_ids is None  # restored after the block
    ref = (x.double() @ base.weight.double().t() + base.bias.double()).clone()
    ref[0, :, :32] += 2.0 * (x[0].double() @ qa.double().t() @ qb.double().t())
    ref[0, :, 40:] += 3.0 * (x[0].double() @ va.double().t() @ vb.double().t())
    assert_close_to_reference(out, ref, ref.float())
    with pytest.raises(KeyError, match="no layer of the model has adapter 'y'"), adapter_batch(model, ["y", "x"]):
        pass


def test_conv1d_base_and_moving_the_module():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    conv = transformers.pytorch_utils.Conv1D(12, 10).to(DEVICE)  # weight [in 10, out 12]
    layer = MultiLoRALinear(conv)
    a, b = pair(4, 10, 12, 6)
    layer.add_adapter("a", a, b, 1.5)
    x = torch.randn(4, 10, device=DEVICE)
    ids = torch.tensor([0, -1, 0, 0], device=DEVICE)
    ref = expected(conv.weight.t(), conv.bias, x, ["a", None, "a", "a"], {"a": (a, b, 1.5)})
    assert_close_to_reference(layer(x, ids), ref, ref.float())
    layer.to(torch.bfloat16)
    assert layer.pool.dtype == torch.bfloat16
    out = layer(x.bfloat16(), ids)
    assert out.dtype == torch.bfloat16 and (out.float() - ref.float()).abs().max() < 0.1


def test_bad_input():
    layer = MultiLoRALinear(nn.Linear(8, 6).to(DEVICE))
    a, b = pair(2, 8, 6, 7)
    with pytest.raises(TypeError, match="base_layer must be"):
        MultiLoRALinear(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="slice_widths"):
        MultiLoRALinear(nn.Linear(8, 6), slice_widths=[4, 4])
    with pytest.raises(ValueError, match=r"lora_a must be \[r, 8\]"):
        layer.add_adapter("a", a[:, :7], b)
    assert layer.adapter_names == []  # a refused adapter leaves nothing behind
    with pytest.raises(TypeError, match="scaling must be a float"):
        layer.add_adapter("a", a, b, "2")
    with pytest.raises(TypeError, match="name must be"):
        layer.add_adapter("", a, b)
    layer.add_adapter("a", a, b)
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(IndexError, match="adapter_ids holds 1"):
        layer(x, torch.tensor([0, 1, -1], device=DEVICE))
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        layer.ids_for(["zz"])
    with pytest.raises(KeyError):
        layer.remove_adapter("zz")


def test_adapter_batch_builds_the_ids_once_and_layers_never_check_them(monkeypatch):
    """The ids are built and range-checked by adapter_batch, one tensor per distinct adapter list: the layers'
    forwards make no host-side check (a sync on a GPU) and give what explicit, checked ids give."""
    import fastpeft.ops.multi_lora as multi_lora_ops

    torch.manual_seed(3)
    layers = [MultiLoRALinear(nn.Linear(16, 16).to(DEVICE)) for _ in range(3)]
    for layer in layers[:2]:
        layer.add_adapter("x", *pair(4, 16, 16, 6), 2.0)
        layer.add_adapter("y", *pair(2, 16, 16, 7), 0.5)
    layers[2].add_adapter("y", *pair(3, 16, 16, 8), 1.5)
    model = nn.Sequential(*layers)
    x = torch.randn(3, 5, 16, device=DEVICE)
    names = ["y", "x", "__base__"]
    expected = x
    for layer in layers:  # explicit ids, checked per layer
        expected = layer(expected, layer.ids_for(names, missing_ok=True))
    checks = []
    real_check = multi_lora_ops.check_adapter_ids
    monkeypatch.setattr(multi_lora_ops, "check_adapter_ids", lambda *a: checks.append(a) or real_check(*a))
    with adapter_batch(model, names):
        assert layers[0].batch_ids is layers[1].batch_ids  # the same adapters: one tensor
        assert layers[2].batch_ids.tolist() == [0, -1, -1]
        out = model(x)
    assert checks == []
    assert torch.equal(out, expected)
