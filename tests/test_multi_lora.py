"""fastpeft::multi_lora (a LoRA adapter per token, adapters pooled by rank rows) on every backend against the
float64 per-adapter computation: mixed ranks, -1 tokens, id distributions, odd and 3-D shapes, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, DTYPES, HAS_GPU, assert_close_to_reference

from fastpeft.backends import record_backends
from fastpeft.ops.multi_lora import AdapterPool, multi_lora_linear

RANKS = [4, 8, 16, 5, 64]


@pytest.fixture(autouse=True)
def _no_cuda_kernel_yet(backend):
    if backend == "cuda":
        pytest.skip("the multi_lora family has no CUDA kernel yet (triton and torch)")


def make(k, n, ranks, dtype):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)

    adapters = [(rand(r, k, scale=k**-0.5), rand(n, r, scale=r**-0.5), 0.5 + i) for i, r in enumerate(ranks)]
    return rand(n, k, scale=k**-0.5), rand(n), adapters


def reference(x, weight, bias, adapters, ids):
    """Per-token, per-adapter PEFT math in x's dtype (float64 for the ground truth)."""
    rows = x.reshape(-1, x.shape[-1])
    y = torch.nn.functional.linear(rows, weight, bias)
    for t, adapter in enumerate(ids.reshape(-1).tolist()):
        if adapter >= 0:
            a, b, s = adapters[adapter]
            y[t] += s * (rows[t] @ a.to(x.dtype).t() @ b.to(x.dtype).t())
    return y.reshape(*x.shape[:-1], weight.shape[0])


def ids_for(kind: str, m: int, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(m + count)
    if kind == "uniform":
        ids = torch.randint(-1, count, (m,), generator=generator)
    elif kind == "zipf" and m > 0:  # a few adapters take most tokens
        weights = 1.0 / torch.arange(1, count + 1, dtype=torch.float64)
        ids = torch.multinomial(weights, m, replacement=True, generator=generator)
    elif kind in ("one", "zipf"):
        ids = torch.full((m,), count - 1)
    else:
        ids = torch.full((m,), -1)
    return ids.to(device=DEVICE, dtype=torch.int32)


SHAPES = [(1, 37, 29), (13, 24, 40), (0, 16, 8)]
if HAS_GPU:  # decode batches at real sizes, N past many column blocks
    SHAPES += [(1, 4096, 4096), (64, 4096, 14336), (257, 1024, 1000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["uniform", "zipf", "one", "none"])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=str)
def test_matches_per_adapter_reference(backend, dtype, kind, m, k, n):
    weight, bias, adapters = make(k, n, RANKS, dtype)
    pool = AdapterPool.build(adapters)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    ids = ids_for(kind, m, len(adapters))
    with record_backends() as calls:
        out = multi_lora_linear(x, weight, pool, ids, bias)
    assert {used for _, used in calls} == {backend}
    as64 = [(a.double(), b.double(), s) for a, b, s in adapters]
    ref = reference(x.double(), weight.double(), bias.double(), as64, ids)
    assert_close_to_reference(out, ref, reference(x, weight, bias, adapters, ids), f"{backend} {kind}")


def test_3d_per_sample_ids_and_non_contiguous_x(backend):
    weight, bias, adapters = make(20, 12, [3, 16], torch.float32)
    pool = AdapterPool.build(adapters)
    x = torch.randn(3, 20, 5, device=DEVICE).transpose(1, 2)  # [batch 3, seq 5, 20], not contiguous
    per_sample = torch.tensor([1, -1, 0], device=DEVICE)
    out = multi_lora_linear(x, weight, pool, per_sample, bias)
    per_token = per_sample[:, None].expand(3, 5)
    ref = reference(x.double(), weight.double(), bias.double(), [(a.double(), b.double(), s) for a, b, s in adapters],
                    per_token)  # fmt: skip
    assert_close_to_reference(out, ref, reference(x, weight, bias, adapters, per_token), "3-D")
    torch.testing.assert_close(out, multi_lora_linear(x, weight, pool, per_token.contiguous(), bias))


def test_many_adapters(backend):
    weight, bias, adapters = make(16, 24, [4, 8, 16, 64] * 32, torch.float32)  # 128 adapters
    pool = AdapterPool.build(adapters)
    x = torch.randn(40, 16, device=DEVICE)
    ids = ids_for("uniform", 40, len(adapters))
    ref = reference(x.double(), weight.double(), bias.double(), [(a.double(), b.double(), s) for a, b, s in adapters],
                    ids)  # fmt: skip
    assert_close_to_reference(
        multi_lora_linear(x, weight, pool, ids, bias), ref, reference(x, weight, bias, adapters, ids)
    )


def test_pool_has_no_padding():
    _, _, adapters = make(16, 24, [4, 8, 64], torch.float32)
    pool = AdapterPool.build(adapters)
    assert pool.lora_a.shape == (76, 16) and pool.lora_b_t.shape == (76, 24)
    assert pool.offsets.tolist() == [0, 4, 12, 76] and pool.max_rank == 64 and pool.num_adapters == 3
    torch.testing.assert_close(pool.lora_b_t[4:12], adapters[1][1].t())


def test_bad_ids_are_refused_and_never_read_outside_the_pool(backend):
    weight, bias, adapters = make(16, 8, [4, 8], torch.float32)
    pool = AdapterPool.build(adapters)
    x = torch.randn(4, 16, device=DEVICE)
    for bad in (2, -2, 1000):
        ids = torch.tensor([0, bad, 1, -1], device=DEVICE, dtype=torch.int32)
        with pytest.raises(IndexError, match=f"adapter_ids holds {bad}"):
            multi_lora_linear(x, weight, pool, ids, bias)
        unchecked = multi_lora_linear(x, weight, pool, ids, bias, check_ids=False)  # as inside graph capture
        expected = multi_lora_linear(x, weight, pool, torch.tensor([0, -1, 1, -1], device=DEVICE), bias)
        torch.testing.assert_close(unchecked, expected)  # the bad id's token gets the base output


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (dict(adapter_ids=torch.zeros(3)), TypeError, "adapter_ids must be an int32 or int64"),
        (dict(adapter_ids=torch.zeros(5, dtype=torch.int64)), ValueError, "one id per token"),
        (dict(pool="pool"), TypeError, "pool must be an AdapterPool"),
        (dict(x=torch.randn(4, 15)), ValueError, "in_features"),
        (dict(bias=torch.randn(7)), ValueError, "bias must be"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input(changes, error, match):
    weight, bias, adapters = make(16, 8, [4, 8], torch.float32)
    pool = AdapterPool.build([(a.cpu(), b.cpu(), s) for a, b, s in adapters])
    args = dict(x=torch.randn(4, 16), weight=weight.cpu(), pool=pool, adapter_ids=torch.zeros(4, dtype=torch.int64),
                bias=bias.cpu())  # fmt: skip
    args.update(changes)
    with pytest.raises(error, match=match):
        multi_lora_linear(**args)


def test_bad_pool():
    a, b = torch.randn(4, 16), torch.randn(8, 4)
    with pytest.raises(ValueError, match="at least one"):
        AdapterPool.build([])
    with pytest.raises(ValueError, match="adapter 1: lora_a must be"):
        AdapterPool.build([(a, b, 1.0), (torch.randn(4, 15), b, 1.0)])
    with pytest.raises(TypeError, match="adapter 1: lora_b must match"):
        AdapterPool.build([(a, b, 1.0), (a, b.half(), 1.0)])
    with pytest.raises(TypeError, match="scaling must be a float"):
        AdapterPool.build([(a, b, "2")])


def test_opcheck():
    _, _, adapters = make(16, 8, [4, 8], torch.float32)
    pool = AdapterPool.build(adapters)
    x, ids = torch.randn(5, 16, device=DEVICE), torch.tensor([0, 1, -1, 1, 0], device=DEVICE)
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_shrink.default, (x, pool.lora_a, pool.offsets, ids, 8))
    v = torch.ops.fastpeft.multi_lora_shrink(x, pool.lora_a, pool.offsets, ids, 8)
    base = torch.randn(5, 8, device=DEVICE)
    args = (base, v, pool.lora_b_t, pool.offsets, pool.scalings, ids)
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_expand.default, args)


@pytest.mark.gpu
def test_decode_step_captures_in_a_cuda_graph(backend):
    """Fixed grids, no host sync with check_ids=False: a captured step replays new ids and inputs correctly."""
    if backend != "triton":
        pytest.skip("capture needs the kernel path (the torch backend loops over the adapters present)")
    weight, bias, adapters = make(256, 192, [4, 16, 8], torch.bfloat16)
    pool = AdapterPool.build(adapters)
    x = torch.randn(8, 256, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.tensor([0, 1, 2, -1, 1, 1, 0, 2], device=DEVICE)
    multi_lora_linear(x, weight, pool, ids, bias, check_ids=False)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = multi_lora_linear(x, weight, pool, ids, bias, check_ids=False)
    x.copy_(torch.randn_like(x))
    ids.copy_(torch.tensor([2, 2, -1, 0, 0, 1, -1, 1], device=DEVICE))
    graph.replay()
    torch.testing.assert_close(out, multi_lora_linear(x, weight, pool, ids, bias))
