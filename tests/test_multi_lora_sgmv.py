"""The batch description (tokens grouped by adapter on the device, built and checked once per step) and the
grouped (SGMV) shrink and expand it feeds, on every backend against the float64 per-adapter computation: id
distributions, 128 adapters, mixed ranks, packed slices with one absent, M = 0 and 1, 3-D x, ids out of range;
and the host syncs of a whole multi-adapter forward (none after the description is built)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, DTYPES, assert_close_to_reference
from test_multi_lora import RANKS, ids_for, make, packed_reference, reference

from fastpeft.backends import record_backends
from fastpeft.ops.adapter_pool import AdapterPool
from fastpeft.ops.batch_description import describe_batch
from fastpeft.ops.multi_lora import multi_lora_linear, multi_lora_sgmv_linear


@pytest.mark.parametrize("ids", [[2, -1, 0, 2, 7, 1, 1, -3, 0], [1, 1, 1], [-1, -1], [], [0, 3, 0, 3, 0]])
def test_the_description_groups_tokens_by_adapter_stably(ids):
    count = 4
    ids = torch.tensor(ids, dtype=torch.int64, device=DEVICE)
    d = describe_batch(ids, count, check=False)
    assert d.ids.dtype == d.order.dtype == d.starts.dtype == torch.int32 and d.num_adapters == count
    order, starts = d.order.tolist(), d.starts.tolist()
    assert sorted(order) == list(range(len(ids))) and starts[0] == 0 and starts[-1] == len(ids)
    for a in range(count + 1):  # the last group: tokens without an adapter (-1, or outside the pool)
        members = [t for t, i in enumerate(ids.tolist()) if (i == a if a < count else not 0 <= i < count)]
        assert order[starts[a] : starts[a + 1]] == members, a  # in token order within a group


def test_the_description_refuses_bad_ids_once_naming_them():
    with pytest.raises(IndexError, match="adapter_ids holds 5"):
        describe_batch(torch.tensor([0, 5, -1], device=DEVICE), 3)
    with pytest.raises(IndexError, match="adapter_ids holds -2"):
        describe_batch(torch.tensor([0, -2], device=DEVICE), 3)
    with pytest.raises(TypeError, match="adapter_ids"):
        describe_batch(torch.tensor([0.0, 1.0], device=DEVICE), 3)
    with pytest.raises(ValueError, match="num_adapters"):
        describe_batch(torch.tensor([0], device=DEVICE), -1)


# Decode sizes (the grouped kernels take up to SGMV_MAX_M rows; above, the tiles run as without a description).
SHAPES = [(1, 37, 29), (6, 20, 17), (13, 24, 40), (64, 33, 19), (0, 16, 8), (70, 16, 24)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["uniform", "zipf", "one", "none"])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=str)
def test_grouped_kernels_match_the_per_adapter_reference(backend, dtype, kind, m, k, n):
    weight, bias, adapters = make(k, n, RANKS, dtype)
    pool = AdapterPool.build(adapters)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    ids = ids_for(kind, m, len(adapters))
    description = describe_batch(ids, pool.num_adapters)
    with record_backends() as calls:
        out = multi_lora_linear(x, weight, pool, description, bias)
    if m and m <= 64 and backend != "torch":  # the torch backend's loop over the adapters present groups anyway
        assert ("multi_lora_sgmv_linear", backend) in calls
    as64 = [(a.double(), b.double(), s) for a, b, s in adapters]
    ref = reference(x.double(), weight.double(), bias.double(), as64, ids)
    assert_close_to_reference(out, ref, reference(x, weight, bias, adapters, ids), f"{backend} {kind}")


def test_128_adapters_and_a_3d_batch(backend):
    weight, bias, adapters = make(16, 24, [4, 8, 16, 64] * 32, torch.float32)
    pool = AdapterPool.build(adapters)
    x = torch.randn(8, 5, 16, device=DEVICE)
    per_sample = torch.tensor([127, 3, -1, 64, 3, 0, 127, 90], device=DEVICE)
    per_token = per_sample[:, None].expand(8, 5).reshape(-1)
    out = multi_lora_linear(x, weight, pool, describe_batch(per_token, pool.num_adapters), bias)
    as64 = [(a.double(), b.double(), s) for a, b, s in adapters]
    ref = reference(x.double(), weight.double(), bias.double(), as64, per_token)
    assert_close_to_reference(out, ref, reference(x, weight, bias, adapters, per_token))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_slices_with_one_absent(backend, dtype):
    k, widths = 24, [32, 8, 8]
    gen = torch.Generator().manual_seed(3)

    def pair(r, width, scale):
        a = torch.randn(r, k, generator=gen) * k**-0.5
        return a.to(DEVICE, dtype), (torch.randn(width, r, generator=gen) * r**-0.5).to(DEVICE, dtype), scale

    packed = [[pair(4, 32, 2.0), pair(4, 8, 2.0), pair(4, 8, 2.0)], [pair(16, 32, 0.5), None, pair(8, 8, 1.5)],
              [pair(5, 32, 1.0), pair(3, 8, 3.0), None]]  # fmt: skip
    pool = AdapterPool.build_packed(packed)
    weight = (torch.randn(sum(widths), k, generator=gen) * k**-0.5).to(DEVICE, dtype)
    bias = torch.randn(sum(widths), generator=gen).to(DEVICE, dtype)
    x = torch.randn(11, k, generator=gen).to(DEVICE, dtype)
    ids = torch.tensor([1, 1, -1, 0, 2, 1, 2, 0, 0, -1, 1], device=DEVICE)
    out = multi_lora_linear(x, weight, pool, describe_batch(ids, 3), bias)
    as64 = [[None if p is None else (p[0].double(), p[1].double(), p[2]) for p in slices] for slices in packed]
    ref = packed_reference(x.double(), weight.double(), bias.double(), as64, widths, ids)
    assert_close_to_reference(out, ref, packed_reference(x, weight, bias, packed, widths, ids), "packed")


def test_ids_outside_the_pool_get_the_base_output(backend):
    """Unchecked (as inside graph capture), an id outside the pool is no adapter, never an address."""
    weight, bias, adapters = make(16, 8, [4, 8], torch.float32)
    pool = AdapterPool.build(adapters)
    x = torch.randn(4, 16, device=DEVICE)
    unchecked = describe_batch(torch.tensor([0, 1000, 1, -7], device=DEVICE), 2, check=False)
    expected = multi_lora_linear(x, weight, pool, torch.tensor([0, -1, 1, -1], device=DEVICE), bias)
    torch.testing.assert_close(multi_lora_linear(x, weight, pool, unchecked, bias), expected)


def test_a_description_for_another_batch_is_refused():
    weight, bias, adapters = make(16, 8, [4, 8], torch.float32)
    pool = AdapterPool.build(adapters)
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="describes 3 tokens over 2 adapters; x has 4 tokens"):
        multi_lora_linear(x, weight, pool, describe_batch(torch.tensor([0, 1, 0], device=DEVICE), 2), bias)
    with pytest.raises(ValueError, match="over 5 adapters"):
        multi_lora_linear(x, weight, pool, describe_batch(torch.tensor([0, 1, 0, 1], device=DEVICE), 5), bias)


def test_grouped_kernels_split_k_and_read_each_adapter_once(monkeypatch):
    """The shrink's K splits depend on the pool and K only; each adapter's tokens take one program per split."""
    pytest.importorskip("triton")
    from fastpeft.triton_kernels import multi_lora as kernels

    assert kernels.sgmv_splits(32, 4096, 132) == (5, 896) or kernels.sgmv_splits(32, 4096, 132)[0] > 1
    for adapters, k, programs in [(32, 4096, 132), (1, 4096, 132), (128, 4096, 132), (3, 40, 4), (7, 5, 64)]:
        splits, chunk = kernels.sgmv_splits(adapters, k, programs)
        assert chunk % kernels.sgmv_blocks()[0] == 0 and (splits - 1) * chunk < k <= splits * chunk
        assert adapters * splits <= max(programs, adapters) + adapters  # about one wave, never many


# ----------------------------------------------------------------------------------------------------------
# Host syncs: none inside the layers once the batch is described
# ----------------------------------------------------------------------------------------------------------

_SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


@pytest.fixture
def host_syncs(monkeypatch):
    """A spy on every Tensor method that reads values on the host (a sync on a GPU): ``host_syncs(fn)`` runs fn
    and returns the names of the methods called inside it, by anyone."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")  # the kernels' path (the torch backend loops on the host)
    seen: list[str] = []
    active = [False]
    for name in _SYNCS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _real=real, **kwargs):
            if active[0]:
                seen.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    def run(fn):
        seen.clear()
        active[0] = True
        try:
            fn()
        finally:
            active[0] = False
        return list(seen)

    return run


def test_a_patched_peft_mixed_batch_does_not_sync_in_its_layers(host_syncs, monkeypatch):
    """Every patched layer of a PEFT model with three adapters, called with adapter_names: after the first call
    built the batch's description, a layer's forward reads nothing on the host."""
    pytest.importorskip("peft")
    from peft_models import tokens
    from test_integration_peft_mixed_batch import NAMES, three_adapter_model

    import fastpeft.integrations.peft.lora as patched_lora
    from fastpeft import patch_peft_model

    model = three_adapter_model()
    patch_peft_model(model)
    inputs = tokens(batch=len(NAMES))
    layer_syncs: list[list[str]] = []
    for name in ("mixed_batch_unsupported_reason", "mixed_batch_forward"):  # what a patched layer's call runs
        real = getattr(patched_lora, name)

        def spy(*args, _real=real):
            result = []
            layer_syncs.append(host_syncs(lambda: result.append(_real(*args))))
            return result[0]

        monkeypatch.setattr(patched_lora, name, spy)
    with torch.no_grad():
        model(inputs, adapter_names=NAMES)  # builds the pools and the description
        layer_syncs.clear()
        model(inputs, adapter_names=NAMES)
    assert layer_syncs and all(syncs == [] for syncs in layer_syncs), layer_syncs


def test_multi_lora_layers_under_adapter_batch_do_not_sync(host_syncs):
    from torch import nn

    from fastpeft import MultiLoRALinear, adapter_batch

    layers = [MultiLoRALinear(nn.Linear(24, 24).to(DEVICE)) for _ in range(3)]
    for i, layer in enumerate(layers):
        for name, rank in (("a", 4), ("b", 8), ("c", 2)):
            a = torch.randn(rank, 24, device=DEVICE) / 5
            layer.add_adapter(name, a, torch.randn(24, rank, device=DEVICE) / 3, 1.0 + i)
    model = nn.Sequential(*layers)
    x = torch.randn(5, 3, 24, device=DEVICE)
    names = ["c", "a", "__base__", "a", "b"]
    with adapter_batch(model, names):
        model(x)  # Triton's first launches
        assert host_syncs(lambda: model(x)) == []
        out = model(x)
    checked = layers[0].ids_for([None, "a", "b", "c", None])
    assert "__int__" in host_syncs(lambda: layers[0](x, checked))  # the spy sees a per-call check's reads
    expected = x
    for layer in layers:  # explicit per-sample ids, checked per layer
        expected = layer(expected, layer.ids_for([None if n == "__base__" else n for n in names]))
    torch.testing.assert_close(out, expected)


def test_opcheck_of_the_grouped_op():
    _, _, adapters = make(16, 8, [4, 8], torch.float32)
    pool = AdapterPool.build(adapters)
    x, base = torch.randn(5, 16, device=DEVICE), torch.randn(5, 8, device=DEVICE)
    d = describe_batch(torch.tensor([0, 1, -1, 1, 0], device=DEVICE), 2)
    tables = (pool.ranks, pool.v_starts, pool.b_starts, pool.scalings, pool.out_starts)
    args = (base, x, pool.lora_a, pool.a_offsets, pool.lora_b, d.ids, d.order, d.starts, *tables, pool.max_rank, 8)
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_sgmv.default, args)


@pytest.mark.gpu
def test_a_described_decode_step_replays_in_a_cuda_graph():
    """Describing the batch (sort, searchsorted) and the grouped kernels inside one captured graph: replayed with
    new ids copied into the captured ids, it gives what a fresh, checked call gives."""
    weight, bias, adapters = make(256, 192, [4, 16, 8], torch.bfloat16)
    pool = AdapterPool.build(adapters)
    x = torch.randn(8, 256, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.tensor([0, 1, 2, -1, 1, 1, 0, 2], device=DEVICE, dtype=torch.int32)

    def step():
        return multi_lora_linear(x, weight, pool, describe_batch(ids, pool.num_adapters, check=False), bias)

    step()  # Triton's compilation before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(torch.randn_like(x))
    ids.copy_(torch.tensor([2, 2, -1, 0, 0, 1, -1, 1], device=DEVICE))
    graph.replay()
    torch.testing.assert_close(out, multi_lora_linear(x, weight, pool, ids, bias))


def test_opcheck_of_the_grouped_layer_op():
    weight, bias, adapters = make(16, 8, [4, 8], torch.float32)
    pool = AdapterPool.build(adapters)
    x = torch.randn(5, 16, device=DEVICE)
    d = describe_batch(torch.tensor([0, 1, -1, 1, 0], device=DEVICE), 2)
    tables = (pool.ranks, pool.v_starts, pool.b_starts, pool.scalings, pool.out_starts)
    for b in (bias, None):
        args = (x, weight, b, pool.lora_a, pool.a_offsets, pool.lora_b, d.ids, d.order, d.starts, *tables,
                pool.max_rank, 8)  # fmt: skip
        torch.library.opcheck(torch.ops.fastpeft.multi_lora_sgmv_linear.default, args)


def test_adapters_on_a_base_computed_elsewhere_and_a_strided_weight(backend):
    """multi_lora_add (a 4-bit base's path) with a description: the grouped shrink and expand; and the fused
    layer with a transposed (non-contiguous) weight and no bias."""
    from fastpeft.ops.multi_lora import multi_lora_add

    weight, _, adapters = make(24, 20, [4, 16, 8], torch.float32)
    pool = AdapterPool.build(adapters)
    x = torch.randn(3, 3, 24, device=DEVICE)
    ids = torch.tensor([2, -1, 0], device=DEVICE)
    per_token = ids[:, None].expand(3, 3).reshape(-1)
    d = describe_batch(per_token, 3)
    as64 = [(a.double(), b.double(), s) for a, b, s in adapters]
    ref = reference(x.double(), weight.double(), None, as64, per_token)
    base = torch.nn.functional.linear(x, weight)
    with record_backends() as calls:
        added = multi_lora_add(base, x, pool, d)
    if backend != "torch":
        assert ("multi_lora_sgmv", backend) in calls
    assert_close_to_reference(added, ref, reference(x, weight, None, adapters, per_token), "add")
    strided = weight.t().contiguous().t()  # [20, 24] with strides (1, 20)
    assert not strided.is_contiguous()
    out = multi_lora_linear(x, strided, pool, d)
    assert_close_to_reference(out, ref, reference(x, weight, None, adapters, per_token), "strided weight")


def test_a_description_refreshed_in_place_keeps_its_tensors():
    from fastpeft.ops.batch_description import refresh_description_

    d = describe_batch(torch.tensor([0, 1, -1, 1], device=DEVICE), 2)
    tensors = [t.data_ptr() for t in d]
    refresh_description_(d, torch.tensor([1, 1, 0, -1], device=DEVICE))
    assert [t.data_ptr() for t in d] == tensors
    assert d.order.tolist() == [2, 0, 1, 3] and d.starts.tolist() == [0, 1, 3, 4]
    with pytest.raises(IndexError, match="adapter_ids holds 2"):
        refresh_description_(d, torch.tensor([2, 0, 0, 0], device=DEVICE))
    with pytest.raises(ValueError, match=r"must be \(4,\)"):
        refresh_description_(d, torch.tensor([0, 0], device=DEVICE))


def _peft_step_model():
    pytest.importorskip("peft")
    from test_integration_peft_mixed_batch import three_adapter_model

    from fastpeft import patch_peft_model

    model = three_adapter_model(torch.float32).to(DEVICE)
    patch_peft_model(model)
    return model


def test_reassigned_names_reuse_the_captured_descriptions():
    """The CPU half of a captured PEFT decode step (the graph itself needs a GPU): after a step with some names,
    reassigning the names rewrites the very tensors that step's layers read, and a step with the new names
    reads them again and gives PEFT's numbers."""
    from peft_models import tokens

    import fastpeft.integrations.peft.mixed_batch as mixed
    from fastpeft import reassign_adapter_names, unpatch_peft_model

    model = _peft_step_model()
    inputs = tokens(batch=4).to(DEVICE)
    before, after = ["second", "__base__", "default", "third"], ["third", "third", "__base__", "second"]
    with torch.no_grad():
        model(inputs, adapter_names=before)
        captured = {key: [t.data_ptr() for t in d] for key, d in mixed._DESCRIPTIONS.items() if list(key[0]) == before}
        assert captured and reassign_adapter_names(before, after) == len(captured)
        moved = {key: [t.data_ptr() for t in d] for key, d in mixed._DESCRIPTIONS.items() if list(key[0]) == after}
        assert sorted(moved.values()) == sorted(captured.values())  # the same tensors, now under the new names
        got = model(inputs, adapter_names=after).logits
    unpatch_peft_model(model)
    with torch.no_grad():
        expected = model(inputs, adapter_names=after).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one per sample"):
        reassign_adapter_names(after, ["default"])


@pytest.mark.gpu
def test_a_peft_mixed_decode_step_replays_in_a_cuda_graph():
    """A patched PEFT model's mixed-batch step captured once, then replayed for another assignment of adapters
    to samples (reassign_adapter_names rewrites the captured descriptions in place)."""
    from peft_models import tokens

    from fastpeft import reassign_adapter_names

    model = _peft_step_model()
    inputs = tokens(batch=4).to(DEVICE)
    before, after = ["second", "__base__", "default", "third"], ["default", "third", "third", "__base__"]
    with torch.no_grad():
        for _ in range(2):  # Triton's compilation, the pools and the descriptions, before capture
            model(inputs, adapter_names=before)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(inputs, adapter_names=before).logits
        reassign_adapter_names(before, after)
        graph.replay()
        torch.testing.assert_close(out, model(inputs, adapter_names=after).logits)


class _LaunchLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The Triton launches of the grouped kernels (name, PDL, launch_pdl) and, between them, every aten op the
    host code calls (on a GPU, an op there could launch a kernel of its own)."""

    def __init__(self, monkeypatch):
        from fastpeft.triton_kernels import multi_lora, multi_lora_4bit

        super().__init__()
        self.events: list[tuple] = []
        self.in_launch = False
        kernels = [(multi_lora, name) for name in ("_sgmv_shrink_kernel", "_sgmv_linear_kernel", "_sgmv_expand_kernel")]
        for module, name in [*kernels, (multi_lora_4bit, "_sgmv_linear_4bit_kernel")]:
            monkeypatch.setattr(module, name, self._spy(name, getattr(module, name)))

    def _spy(self, name, real):
        log = self

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, PDL, launch_pdl=False, **kwargs):
                    log.events.append((name, PDL, launch_pdl))
                    log.in_launch = True
                    try:  # the interpreter runs no PTX: the kernel itself runs without the PDL instructions
                        return real[grid](*args, PDL=False, **kwargs)
                    finally:
                        log.in_launch = False

                return launch

        return Spy()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_launch:
            self.events.append(("aten", str(func.overloadpacket)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", ["linear", "sgmv", "linear_4bit"])
def test_the_kernel_after_the_shrink_starts_early_with_nothing_between(monkeypatch, op):
    """On sm_90 the kernel after the grouped shrink is launched programmatically (it may start while the shrink
    runs, and waits for the slabs before its epilogue): it must be the very next launch (no host op between
    them, whose kernel it would overlap instead), the shrink must let it start, and the outputs are the same."""
    pytest.importorskip("triton")
    from fastpeft.triton_kernels import multi_lora as kernels

    from fastpeft.ops import multi_lora_4bit
    from fastpeft.ops.multi_lora import IMPLS, grouped_args
    from fastpeft.ops.qlora import Weight4bit
    from fastpeft.ops.quant_4bit import quantize_4bit

    weight, bias, adapters = make(24, 40, RANKS, torch.float32)
    pool = AdapterPool.build(adapters)
    x = torch.randn(9, 24, device=DEVICE)
    ids = ids_for("uniform", 9, len(adapters))
    description = describe_batch(ids, pool.num_adapters)
    base = torch.nn.functional.linear(x, weight, bias)
    expected = multi_lora_sgmv_linear(x, weight, bias, pool, description)
    *tensors, max_rank, max_width = grouped_args(pool, description)
    monkeypatch.setattr(kernels, "programmatic_launch", lambda device: True)
    w4 = Weight4bit.from_state(*quantize_4bit(weight, "nf4", 32))
    if op == "linear_4bit":  # the 4-bit product, then the adapters: the unfused form's numbers
        expected = multi_lora_4bit.IMPLS["torch"](x, w4, bias, *tensors, max_rank=max_rank, max_width=max_width)
    with _LaunchLog(monkeypatch) as log:  # the Triton implementation itself: its host ops are seen
        if op == "linear":
            out = IMPLS["multi_lora_sgmv_linear"]["triton"](x, weight, bias, *tensors, max_rank=max_rank,
                                                            max_width=max_width)  # fmt: skip
        elif op == "linear_4bit":
            out = multi_lora_4bit.IMPLS["triton"](x, w4, bias, *tensors, max_rank=max_rank, max_width=max_width)
        else:
            out = IMPLS["multi_lora_sgmv"]["triton"](base, x, *tensors, max_rank=max_rank, max_width=max_width)
    launches = [i for i, event in enumerate(log.events) if event[0] != "aten"]
    second = {"linear": "_sgmv_linear_kernel", "sgmv": "_sgmv_expand_kernel"}.get(op, "_sgmv_linear_4bit_kernel")
    assert [log.events[i] for i in launches] == [("_sgmv_shrink_kernel", True, False), (second, True, True)]
    assert launches[1] == launches[0] + 1, log.events
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert ("aten", "aten.empty") in log.events[: launches[0]]  # the outputs are allocated before the shrink


def test_no_programmatic_launch_without_a_shrink_or_off_sm90(monkeypatch):
    """A pool of no adapters launches no shrink: the kernel after it would overlap whatever ran before (x's
    producer), so it is launched plainly; so is everything under the interpreter and on CPUs."""
    pytest.importorskip("triton")
    from fastpeft.triton_kernels import common
    from fastpeft.triton_kernels import multi_lora as kernels

    assert not common.programmatic_launch(torch.device("cpu"))  # the interpreter, and no GPU
    monkeypatch.setattr(common, "INTERPRET", False)
    assert common.programmatic_launch(torch.device("meta"))  # scripts/compile_triton.py's reference GPU
    assert not common.programmatic_launch(torch.device("cpu"))
    monkeypatch.setattr(kernels, "programmatic_launch", lambda device: True)
    assert kernels.follows_the_shrink(torch.device("meta"), 3)
    assert not kernels.follows_the_shrink(torch.device("meta"), 0)
