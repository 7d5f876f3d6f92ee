"""torch.compile, CUDA graphs and autocast with fastpeft's layers.

- Inductor (not only aot_eager) with ``fullgraph=True`` over models and modules that fastpeft runs: no graph
  break may come from fastpeft, and the compiled numbers are the eager ones. On the CPU inductor emits C++; on
  a GPU the same tests compile Triton through the custom ops' fake implementations.
- A multi-adapter decode step captured in a CUDA graph replays new tokens and new adapter ids (GPU only).
- Autocast (bf16, fp16): every patched layer returns the dtype PEFT's returns, and the numbers PEFT gives.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_GPU, rel_error
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft_models import TARGETS, peft_model, randomize_lora_b, tokens  # noqa: E402

from fastpeft import (  # noqa: E402
    BottleneckAdapter,
    Linear4bit,
    LoRALinear,
    MultiLoRALinear,
    QLoRALinear,
    adapter_batch,
    patch_peft_model,
    quantize_4bit,
)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def fastpeft_breaks(fn, *args) -> list[str]:
    """The graph breaks dynamo meets in ``fn(*args)`` whose stack passes through fastpeft's code."""
    explanation = torch._dynamo.explain(fn)(*args)
    return [
        str(reason.reason)
        for reason in explanation.break_reasons
        if any("/fastpeft/" in frame.filename for frame in reason.user_stack)
    ]


def test_patched_peft_model_compiles_whole_with_inductor():
    model = patch_peft_model(peft_model().eval())
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(lambda t: model(t).logits, fullgraph=True, backend="inductor")
        assert rel_error(compiled(ids), expected) < 1e-5


def test_patched_peft_training_step_compiles_with_inductor():
    """Forward and backward through the fused op's autograd formula, compiled: PEFT's gradients."""
    model = peft_model().train()
    ids = tokens()
    model(ids, labels=ids).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    patch_peft_model(model)
    compiled = torch.compile(lambda t: model(t, labels=t).loss, fullgraph=True, backend="inductor")
    compiled(ids).backward()
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and len(got) == 2 * 2 * len(TARGETS)
    for name, grad in got.items():
        assert rel_error(grad, expected[name]) < 1e-4, name


def test_mixed_batch_breaks_no_graph_in_fastpeft():
    """PEFT's adapter_names path registers hooks per call (a break of PEFT's own); fastpeft's multi_lora call
    inside it traces whole, and the compiled model gives the eager numbers."""
    model = patch_peft_model(peft_model().eval())
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    randomize_lora_b(model)
    ids = tokens()
    names = [("default", "other", "__base__")[i % 3] for i in range(ids.shape[0])]
    run = lambda t: model(t, adapter_names=names).logits
    with torch.no_grad():
        expected = run(ids)
        assert fastpeft_breaks(run, ids) == []
        torch._dynamo.reset()
        assert rel_error(torch.compile(run, backend="inductor")(ids), expected) < 1e-5


def _modules() -> dict[str, tuple[nn.Module, dict]]:
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(48, 40, device=DEVICE), r=8, lora_alpha=16)
    nn.init.normal_(lora.lora_B)
    multi = MultiLoRALinear(nn.Linear(48, 40, device=DEVICE))
    for name, rank in (("a", 4), ("b", 16)):
        multi.add_adapter(name, torch.randn(rank, 48, device=DEVICE) / 7, torch.randn(40, rank, device=DEVICE), 2.0)
    packed, state = quantize_4bit(torch.randn(40, 48, device=DEVICE) / 7, "nf4", 64, double_quant=True)
    qlora = QLoRALinear(Linear4bit(packed, state), r=8, lora_alpha=16).to(DEVICE)
    nn.init.normal_(qlora.lora_B)
    bottleneck = BottleneckAdapter(48, 12, ln_before=True, device=DEVICE)
    nn.init.normal_(bottleneck.adapter_up.weight, std=0.05)
    ids = torch.tensor([0, 1, -1], device=DEVICE)
    return {
        "LoRALinear": (lora, {}),
        "MultiLoRALinear": (multi, {"adapter_ids": ids, "check_ids": False}),
        "QLoRALinear": (qlora, {}),
        "BottleneckAdapter": (bottleneck, {}),
    }


@pytest.mark.parametrize("name", ["LoRALinear", "MultiLoRALinear", "QLoRALinear", "BottleneckAdapter"])
def test_each_module_compiles_whole_with_inductor(name):
    module, kwargs = _modules()[name]
    x = torch.randn(3, 5, 48, device=DEVICE)
    with torch.no_grad():
        expected = module(x, **kwargs)
        module(x, **kwargs)  # pools, caches: built eagerly, as before serving
        compiled = torch.compile(lambda t: module(t, **kwargs), fullgraph=True, backend="inductor")
        assert rel_error(compiled(x), expected) < 1e-5


def test_a_batch_described_inside_the_compiled_step_traces_whole():
    """describe_batch (sort, searchsorted) and the grouped multi-adapter op in one fullgraph-compiled step, with
    the ids a graph input: the compiled step gives the eager numbers for ids it was not traced with."""
    from fastpeft import describe_batch

    module, _ = _modules()["MultiLoRALinear"]
    x = torch.randn(6, 48, device=DEVICE)

    def step(t, ids):
        return module(t, adapter_ids=describe_batch(ids, 2, check=False))

    with torch.no_grad():
        compiled = torch.compile(step, fullgraph=True, backend="inductor")
        for ids in ([0, 1, -1, 1, 0, 0], [1, 1, 1, -1, -1, 0]):
            ids = torch.tensor(ids, device=DEVICE)
            assert rel_error(compiled(x, ids), step(x, ids)) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
def test_multi_adapter_decode_step_replays_in_a_cuda_graph():
    """A decode step of two MultiLoRALinear layers (one adapter per sample, set by adapter_batch) captured once,
    then replayed with new tokens and new adapter ids copied into the captured buffers."""
    torch.manual_seed(0)
    layers = [MultiLoRALinear(nn.Linear(256, 256, device=DEVICE, dtype=torch.bfloat16)) for _ in range(2)]
    for layer in layers:
        for name, rank in (("a", 8), ("b", 16), ("c", 32)):
            a = torch.randn(rank, 256, device=DEVICE, dtype=torch.bfloat16) / 16
            layer.add_adapter(name, a, torch.randn(256, rank, device=DEVICE, dtype=torch.bfloat16) / 4, 2.0)
    model = nn.Sequential(*layers).eval()
    x = torch.randn(6, 1, 256, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad(), adapter_batch(model, ["a", "b", "c", "__base__", "b", "a"]):
        ids = [layer.batch_ids for layer in layers]
        for _ in range(2):  # Triton's compilation and the pools, before capture
            model(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
        x.copy_(torch.randn_like(x))
        for layer_ids in ids:
            layer_ids.copy_(torch.tensor([2, 2, -1, 0, 1, 0], device=DEVICE, dtype=layer_ids.dtype))
        graph.replay()
    with torch.no_grad(), adapter_batch(model, ["c", "c", "__base__", "a", "b", "a"]):
        torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_gives_peft_dtypes_and_numbers(dtype):
    """Under autocast every patched layer returns the dtype PEFT's layer returns (the autocast dtype for the
    base GEMM's output), and the model's logits match PEFT's."""
    if DEVICE.type == "cpu" and dtype == torch.float16 and not torch.amp.is_autocast_available("cpu"):
        pytest.skip("no fp16 autocast on this CPU build")
    model = peft_model().eval()
    ids = tokens()
    seen: dict[str, list[torch.dtype]] = {"peft": [], "fastpeft": []}

    def record(key):
        return lambda module, args, out: seen[key].append(out.dtype)

    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.Linear)]
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=dtype):
        handles = [layer.register_forward_hook(record("peft")) for layer in layers]
        expected = model(ids).logits
        for handle in handles:
            handle.remove()
        patch_peft_model(model)
        handles = [layer.register_forward_hook(record("fastpeft")) for layer in layers]
        got = model(ids).logits
        for handle in handles:
            handle.remove()
    assert seen["fastpeft"] == seen["peft"] and set(seen["peft"]) == {dtype}
    assert got.dtype == expected.dtype
    assert rel_error(got.float(), expected.float()) < 3e-2
