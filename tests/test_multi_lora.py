"""fastpeft::multi_lora (a LoRA adapter per token, adapters pooled by rank rows) on every backend against the
float64 per-adapter computation: mixed ranks, -1 tokens, id distributions, per-token and tile (segment) kernels,
packed slices, odd and 3-D shapes, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, DTYPES, HAS_GPU, assert_close_to_reference, force_persistent

from fastpeft.backends import record_backends
from fastpeft.ops.adapter_pool import AdapterPool
from fastpeft.ops.multi_lora import multi_lora_linear, segment_adapter_ids

RANKS = [4, 8, 16, 5, 64]


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


# Under the interpreter the per-token kernels take up to 8 rows and the tile kernels (16 rows a tile) the rest.
SHAPES = [(1, 37, 29), (5, 20, 17), (13, 24, 40), (40, 33, 19), (0, 16, 8)]
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


def test_strided_ids_batch_of_one_and_every_other_token(backend):
    """Ids that reshape to strided views (one sample's id expanded over its tokens; a strided slice)."""
    weight, bias, adapters = make(20, 12, [3, 16], torch.float32)
    pool = AdapterPool.build(adapters)
    as64 = [(a.double(), b.double(), s) for a, b, s in adapters]
    x = torch.randn(1, 11, 20, device=DEVICE)
    one = torch.tensor([1], device=DEVICE)
    per_token = one[:, None].expand(1, 11)
    ref = reference(x.double(), weight.double(), bias.double(), as64, per_token)
    for ids in (one, per_token):
        assert_close_to_reference(multi_lora_linear(x, weight, pool, ids, bias), ref, ref.float(), "batch of 1")
    strided = torch.tensor([0, 9, 1, 9, -1, 9, 1, 9, 0, 9, 1, 9] * 2, device=DEVICE)[::2].reshape(1, 12)
    x = torch.randn(1, 12, 20, device=DEVICE)
    ref = reference(x.double(), weight.double(), bias.double(), as64, strided)
    assert_close_to_reference(multi_lora_linear(x, weight, pool, strided, bias), ref, ref.float(), "strided")


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
    assert pool.lora_a.shape == (76, 16) and pool.lora_b.shape == (76 * 24,)
    assert pool.a_offsets.tolist() == [0, 4, 12, 76] and pool.max_rank == 64 and pool.num_adapters == 3
    assert pool.ranks.tolist() == [[4, 8, 64]] and pool.b_starts.tolist() == [[0, 4 * 24, 12 * 24]]
    torch.testing.assert_close(pool.lora_b_t(1), adapters[1][1].t())
    torch.testing.assert_close(pool.lora_a[4:12], adapters[1][0])


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
    with pytest.raises(ValueError, match="without adapters needs in_features"):
        AdapterPool.build([], out_features=8)
    with pytest.raises(ValueError, match="adapter 1: lora_a must be"):
        AdapterPool.build([(a, b, 1.0), (torch.randn(4, 15), b, 1.0)])
    with pytest.raises(TypeError, match=r"adapter 1: lora_b must be torch\.float32 on cpu"):
        AdapterPool.build([(a, b, 1.0), (a, b.half(), 1.0)])
    with pytest.raises(ValueError, match="adapter 1: expected 2 slices, got 1"):
        AdapterPool.build_packed([[(a, b, 1.0), None], [(a, b, 1.0)]], slice_widths=[8, 8])
    with pytest.raises(ValueError, match="every slice needs a positive output width"):
        AdapterPool.build_packed([[(a, b, 1.0), None]])
    with pytest.raises(ValueError, match=r"lora_b \[3, r\]"):
        AdapterPool.build_packed([[(a, b, 1.0), (a, b, 1.0)]], slice_widths=[8, 3])
    with pytest.raises(TypeError, match="scaling must be a float"):
        AdapterPool.build([(a, b, "2")])


def test_opcheck():
    _, _, adapters = make(16, 8, [4, 8], torch.float32)
    pool = AdapterPool.build(adapters)
    x, ids = torch.randn(5, 16, device=DEVICE), torch.tensor([0, 1, -1, 1, 0], device=DEVICE)
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_shrink.default, (x, pool.lora_a, pool.a_offsets, ids, 8))
    v = torch.ops.fastpeft.multi_lora_shrink(x, pool.lora_a, pool.a_offsets, ids, 8)
    base = torch.randn(5, 8, device=DEVICE)
    tables = (pool.ranks, pool.v_starts, pool.b_starts, pool.scalings, pool.out_starts)
    args = (base, v, pool.lora_b, ids, *tables, 8)
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_expand.default, args)


def packed_reference(x, weight, bias, packed, widths, ids):
    """Slice by slice: each slice's columns get that slice's LoRA pair of the token's adapter."""
    y = torch.nn.functional.linear(x, weight, bias)
    bounds = [0, *torch.tensor(widths).cumsum(0).tolist()]
    for t, adapter in enumerate(ids.tolist()):
        for s, pair in enumerate(packed[adapter] if adapter >= 0 else []):
            if pair is not None:
                a, b, scale = pair
                y[t, bounds[s] : bounds[s + 1]] += scale * (x[t] @ a.to(x.dtype).t() @ b.to(x.dtype).t())
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [3, 37], ids=lambda m: f"m{m}")
def test_packed_slices_in_one_launch(backend, dtype, m):
    """q/k/v-like slices of different widths, each adapter with its own rank per slice, one slice left out."""
    k, widths = 24, [32, 8, 8]
    gen = torch.Generator().manual_seed(m)

    def pair(r, width, scale):
        a = torch.randn(r, k, generator=gen) * k**-0.5
        return a.to(DEVICE, dtype), (torch.randn(width, r, generator=gen) * r**-0.5).to(DEVICE, dtype), scale

    packed = [
        [pair(4, 32, 2.0), pair(4, 8, 2.0), pair(4, 8, 2.0)],
        [pair(16, 32, 0.5), None, pair(8, 8, 1.5)],  # adapter 1 leaves slice 1 (k) alone
        [pair(5, 32, 1.0), pair(3, 8, 3.0), None],
    ]
    pool = AdapterPool.build_packed(packed)
    assert pool.slice_widths == (32, 8, 8) and pool.max_rank == 24 and pool.ranks.tolist()[1] == [4, 0, 3]
    weight = (torch.randn(sum(widths), k, generator=gen) * k**-0.5).to(DEVICE, dtype)
    bias = torch.randn(sum(widths), generator=gen).to(DEVICE, dtype)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    ids = torch.randint(-1, 3, (m,), generator=gen).to(DEVICE)
    with record_backends() as calls:
        out = multi_lora_linear(x, weight, pool, ids, bias)
    assert {used for _, used in calls} == {backend}
    as64 = [[None if p is None else (p[0].double(), p[1].double(), p[2]) for p in slices] for slices in packed]
    ref = packed_reference(x.double(), weight.double(), bias.double(), as64, widths, ids)
    assert_close_to_reference(out, ref, packed_reference(x, weight, bias, packed, widths, ids), f"{backend} packed")


def test_segments_of_a_prefill(backend):
    """Packed sequences of different lengths, one adapter per sequence: the tile kernels' runs cross tiles."""
    weight, bias, adapters = make(32, 24, [8, 16, 4, 64], torch.float32)
    pool = AdapterPool.build(adapters)
    lengths = torch.tensor([7, 20, 1, 0, 13, 9], device=DEVICE)
    per_segment = torch.tensor([2, 0, -1, 3, 3, 1], device=DEVICE)
    ids = segment_adapter_ids(lengths, per_segment, 50)
    assert ids.tolist() == [2] * 7 + [0] * 20 + [-1] + [3] * 13 + [1] * 9 and ids.dtype == torch.int32
    x = torch.randn(50, 32, device=DEVICE)
    ref = reference(x.double(), weight.double(), bias.double(), [(a.double(), b.double(), s) for a, b, s in adapters],
                    ids)  # fmt: skip
    out = multi_lora_linear(x, weight, pool, ids, bias)
    assert_close_to_reference(out, ref, reference(x, weight, bias, adapters, ids), "segments")
    with pytest.raises(ValueError, match="sum to 50, not num_tokens=49"):
        segment_adapter_ids(lengths, per_segment, 49)


def test_pool_without_adapters_runs_the_base_layer(backend):
    weight, bias, _ = make(16, 8, [4], torch.float32)
    pool = AdapterPool.build([], in_features=16, out_features=8, dtype=torch.float32, device=DEVICE)
    assert pool.num_adapters == 0 and pool.max_rank == 0
    x = torch.randn(3, 16, device=DEVICE)
    out = multi_lora_linear(x, weight, pool, torch.full((3,), -1, device=DEVICE), bias)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias))
    with pytest.raises(IndexError, match="adapter_ids holds 0"):
        multi_lora_linear(x, weight, pool, torch.zeros(3, dtype=torch.int64, device=DEVICE), bias)


@pytest.mark.gpu
def test_decode_step_captures_in_a_cuda_graph(backend):
    """Fixed grids, no host sync with check_ids=False: a captured step replays new ids and inputs correctly."""
    if backend == "torch":
        pytest.skip("capture needs the kernels (the torch backend loops over the adapters present)")
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


@pytest.mark.parametrize("m", [5, 40], ids=["per-token", "tiles"])
def test_shrink_writes_every_column_of_v(backend, m):
    """v is written whole (it starts as NaN: conftest poisons allocations): x A^T up to each token's rank, zero
    past it and on tokens without an adapter, whatever the chunking of the rank in the kernels."""
    from fastpeft.ops.multi_lora import multi_lora_shrink

    k = 24
    _, _, adapters = make(k, 9, RANKS, torch.float32)
    pool = AdapterPool.build(adapters)
    ids = ids_for("uniform", m, len(RANKS))
    x = torch.randn(m, k, device=DEVICE)
    v = multi_lora_shrink(x, pool, ids)
    assert v.shape == (m, 64) and torch.isfinite(v).all()
    for t, adapter in enumerate(ids.tolist()):
        rank = RANKS[adapter] if adapter >= 0 else 0
        if rank:
            expected = x[t].double() @ adapters[adapter][0].double().t()
            torch.testing.assert_close(v[t, :rank].double(), expected, rtol=1e-3, atol=1e-4)  # tf32 on a GPU
        assert torch.all(v[t, rank:] == 0), (t, adapter)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_kind", ["bias", "no-bias"])
@pytest.mark.parametrize("ids_kind", ["flat", "description"])
def test_prefill_writes_the_terms_then_adds_the_base(monkeypatch, backend, dtype, bias_kind, ids_kind):
    """Past the decode rows the Triton path writes the adapters' terms over the bias (or zero) broadcast to
    every row, tokens without an adapter included, then cuBLAS adds x W^T in place; packed slices and -1 ids."""
    from fastpeft import describe_batch
    from fastpeft.ops import multi_lora as ops

    ran: list[int] = []
    real = ops._terms_then_base
    monkeypatch.setattr(ops, "_terms_then_base", lambda *args: ran.append(1) or real(*args))
    k, widths, m = 24, [32, 8], 70
    gen = torch.Generator().manual_seed(3)

    def pair(r, width, scale):
        a = torch.randn(r, k, generator=gen) * k**-0.5
        return a.to(DEVICE, dtype), (torch.randn(width, r, generator=gen) * r**-0.5).to(DEVICE, dtype), scale

    packed = [[pair(4, 32, 2.0), pair(4, 8, 2.0)], [pair(16, 32, 0.5), None], [None, pair(3, 8, 3.0)]]
    pool = AdapterPool.build_packed(packed)
    weight = (torch.randn(sum(widths), k, generator=gen) * k**-0.5).to(DEVICE, dtype)
    bias = torch.randn(sum(widths), generator=gen).to(DEVICE, dtype) if bias_kind == "bias" else None
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    ids = torch.randint(-1, 3, (m,), generator=gen).to(DEVICE)
    out = multi_lora_linear(x, weight, pool, describe_batch(ids, 3) if ids_kind == "description" else ids, bias)
    assert ran == ([1] if backend == "triton" else [])
    zero = torch.zeros(sum(widths), device=DEVICE)
    as64 = [[None if p is None else (p[0].double(), p[1].double(), p[2]) for p in slices] for slices in packed]
    ref = packed_reference(x.double(), weight.double(), (zero if bias is None else bias).double(), as64, widths, ids)
    baseline = packed_reference(x, weight, zero.to(dtype) if bias is None else bias, packed, widths, ids)
    assert_close_to_reference(out, ref, baseline, f"{backend} terms, then the base")


def persistent_ids(kind: str, m: int, count: int) -> torch.Tensor:
    """Ids of a prefill past the decode rows. The interpreter's row blocks are 16 tokens: "long" gives each block
    one adapter or two; "short" up to four (the kernel's pass per adapter past the first two) and a segment
    without one; "uniform" a run per token or two; "outside" ids past the pool (no adapter, unchecked)."""
    if kind == "long":
        lengths, adapters = [24, 40, m - 64], [2, 0, 1]
    elif kind == "short":
        lengths, adapters = [5, 3, 2, 6, 7, 9, 1, m - 33], [0, 1, 2, 3, -1, 4, 1, 3]
    elif kind == "outside":
        return torch.randint(-1, count + 3, (m,), generator=torch.Generator().manual_seed(m)).to(DEVICE)
    else:
        return ids_for(kind, m, count)
    return segment_adapter_ids(torch.tensor(lengths, device=DEVICE), torch.tensor(adapters, device=DEVICE), m)


# On a GPU (128 x 128 tiles, a program per SM) the last shape has 144 tiles: past the first round of 132, tiles
# find their row block's x A^T published and read it.
PERSISTENT_SHAPES = [(70, 40, 48), (100, 24, 16), (81, 64, 40)]
if HAS_GPU:
    PERSISTENT_SHAPES += [(2048, 256, 1096)]


# The persistent kernel's module and its row threshold, forced to 0 (conftest.force_persistent).
PERSISTENT = ("multi_lora_persistent", "MULTI_PERSISTENT_PREFILL_MIN_M")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["long", "short", "uniform", "outside", "none"])
@pytest.mark.parametrize(("m", "k", "n"), PERSISTENT_SHAPES, ids=str)
def test_the_persistent_prefill_kernel_matches_the_reference(monkeypatch, dtype, kind, m, k, n):
    """The multi-adapter persistent kernel (off by default: MULTI_PERSISTENT_PREFILL_MIN_M) forced on: one launch
    and no shrink or expand kernel; row blocks of one adapter, two, more (a pass over x per adapter past the
    second), none; ids outside the pool giving the base output; tiles past M and N; with and without bias.
    Against float64, the same bits on a second call, every count back to zero."""
    persistent = force_persistent(monkeypatch, *PERSISTENT, dtype)
    from fastpeft.triton_kernels.common import arrival_counts

    from fastpeft.ops import multi_lora as ops

    calls, others = [], []
    real = persistent.multi_lora_linear_persistent
    monkeypatch.setattr(persistent, "multi_lora_linear_persistent", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(ops, "_terms_then_base", lambda *a: others.append(1))
    ranks = [4, 8, 16, 5, 32]
    weight, bias, adapters = make(k, n, ranks, dtype)
    pool = AdapterPool.build(adapters)
    ids = persistent_ids(kind, m, len(ranks))
    known = torch.where(ids < len(ranks), ids, -1)
    as64 = [(a.double(), b.double(), s) for a, b, s in adapters]
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    for b in (bias, None):
        out = multi_lora_linear(x, weight, pool, ids, b, check_ids=False)
        ref = reference(x.double(), weight.double(), None if b is None else b.double(), as64, known)
        assert_close_to_reference(out, ref, reference(x, weight, b, adapters, known), f"{kind} bias={b is not None}")
        assert torch.equal(multi_lora_linear(x, weight, pool, ids, b, check_ids=False), out)
    assert len(calls) == 4 and not others
    assert not arrival_counts(out.device, 1).any()


@pytest.mark.parametrize("case", ["packed", "rank 33", "odd K", "decode rows"])
def test_layers_the_persistent_kernel_does_not_take_run_the_other_forms(monkeypatch, case):
    """Forced on, the kernel still declines what it cannot take (several output slices, a rank past MAX_R_PAD,
    rows TMA cannot read, the decode rows): those run the terms and cuBLAS, or decode's kernels, correctly."""
    persistent = force_persistent(monkeypatch, *PERSISTENT, torch.bfloat16)
    calls = []
    real = persistent.multi_lora_linear_persistent
    monkeypatch.setattr(persistent, "multi_lora_linear_persistent", lambda *a: calls.append(1) or real(*a))
    dtype, m, k, n = torch.bfloat16, (5 if case == "decode rows" else 70), (41 if case == "odd K" else 40), 48
    ranks = [4, 33] if case == "rank 33" else [4, 16]
    weight, bias, adapters = make(k, n, ranks, dtype)
    ids = persistent_ids("uniform", m, len(ranks))
    as64 = [(a.double(), b.double(), s) for a, b, s in adapters]
    if case == "packed":  # the same pairs as two slices of the output, 24 columns each
        halves = [[(a, b[:24], s), (a, b[24:], s)] for a, b, s in adapters]
        pool = AdapterPool.build_packed(halves)
    else:
        pool = AdapterPool.build(adapters)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    out = multi_lora_linear(x, weight, pool, ids, bias)
    ref = reference(x.double(), weight.double(), bias.double(), as64, ids)
    assert_close_to_reference(out, ref, reference(x, weight, bias, adapters, ids), case)
    assert not calls
