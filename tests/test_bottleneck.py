"""The bottleneck adapter op on every backend against the float64 formula: activations, both scaling kinds, with
and without LayerNorm, odd sizes, M = 1 and 0, several adapters per batch, gradients, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_GPU, assert_close_to_reference

from fastpeft.ops.bottleneck import ACTIVATIONS, bottleneck_adapter, bottleneck_reference

# (leading shape, d, m): odd sizes, one row, no rows, a d over several of the kernel's chunks.
SHAPES = [((2, 5), 40, 12), ((1,), 33, 7), ((0, 3), 16, 4), ((3, 2), 72, 20)]
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if HAS_GPU else [])


def params(d, m, dtype, ln=False, scaling="float", adapters=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if adapters is None else (adapters,)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*lead, *shape, generator=g) * scale + shift).to(device=DEVICE, dtype=dtype)

    p = dict(down_weight=rand(m, d, scale=d**-0.5), down_bias=rand(m, scale=0.1),
             up_weight=rand(d, m, scale=m**-0.5), up_bias=rand(d, scale=0.1))  # fmt: skip
    if ln:
        p.update(ln_weight=rand(d, scale=0.2, shift=1.0), ln_bias=rand(d, scale=0.1))
    if scaling == "channel":
        p["scaling"] = rand(d, scale=0.5, shift=1.0)
    elif scaling == "learned":
        p["scaling"] = rand(1, scale=0.1, shift=0.8)
    else:
        p["scaling"] = 0.7
    return p


def _extension_loaded() -> bool:
    """Whether fastpeft._C is loaded (as the install built it; never compiled here)."""
    from fastpeft import _extension

    return _extension.extension_error(build=False) is None


def f64(p: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in p.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead, d, m", SHAPES)
def test_forward_matches_the_formula(backend, dtype, lead, d, m):
    for act, ln, scaling in [("relu", False, "float"), ("gelu", True, "channel"), ("silu", True, "learned")]:
        x = torch.randn(*lead, d, device=DEVICE).to(dtype)
        p = params(d, m, dtype, ln, scaling)
        y = bottleneck_adapter(x, **p, activation=act)
        ref = bottleneck_reference(x.double(), **f64(p), activation=act)
        assert_close_to_reference(y, ref, bottleneck_reference(x, **p, activation=act), f"{act} ln={ln} {scaling}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(backend, activation):
    x = torch.randn(3, 4, 24, device=DEVICE)
    p = params(24, 8, torch.float32, ln=True)
    y = bottleneck_adapter(x, **p, activation=activation)
    ref = bottleneck_reference(x.double(), **f64(p), activation=activation)
    assert_close_to_reference(y, ref, bottleneck_reference(x, **p, activation=activation), activation)


def test_residual_and_non_contiguous_x(backend):
    x = torch.randn(2, 24, 6, device=DEVICE).transpose(1, 2)  # [2, 6, 24], d not the unit stride
    residual = torch.randn(2, 6, 24, device=DEVICE)
    p = params(24, 8, torch.float32, ln=True, scaling="channel")
    y = bottleneck_adapter(x, **p, residual=residual, activation="gelu_new")
    ref = bottleneck_reference(x.double(), **f64(p), residual=residual.double(), activation="gelu_new")
    assert_close_to_reference(y, ref, ref.float())


@pytest.mark.parametrize("scaling", ["float", "channel", "learned"])
def test_several_adapters_per_batch(backend, scaling):
    d, m, count = 24, 8, 3
    x = torch.randn(5, 3, d, device=DEVICE)
    p = params(d, m, torch.float32, ln=True, scaling=scaling, adapters=count)
    ids = torch.tensor([2, -1, 0, 2, 1], device=DEVICE)
    y = bottleneck_adapter(x, **p, activation="tanh", adapter_ids=ids)
    ref = x.double().clone()
    for b, a in enumerate(ids.tolist()):
        if a >= 0:
            one = {k: v[a] if isinstance(v, torch.Tensor) else v for k, v in f64(p).items()}
            ref[b] = bottleneck_reference(x[b].double(), **one, activation="tanh")
    assert_close_to_reference(y, ref, ref.float())


@pytest.mark.parametrize("ln", [False, True])
@pytest.mark.parametrize("scaling", ["float", "channel"])
def test_gradients_match_the_formula(backend, ln, scaling):
    d, m = 24, 8
    x = torch.randn(2, 3, d, device=DEVICE)
    p = params(d, m, torch.float32, ln, scaling)
    dy = torch.randn_like(x)
    leaves = {k: v.clone().requires_grad_() for k, v in p.items() if isinstance(v, torch.Tensor)}
    xg = x.clone().requires_grad_()
    bottleneck_adapter(xg, **{**p, **leaves}, activation="gelu").backward(dy)
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    xr = x.double().requires_grad_()
    bottleneck_reference(xr, **{**f64(p), **ref_leaves}, activation="gelu").backward(dy.double())
    assert_close_to_reference(xg.grad, xr.grad, xr.grad.float(), "dx")
    for name, leaf in leaves.items():
        assert_close_to_reference(leaf.grad, ref_leaves[name].grad, ref_leaves[name].grad.float(), name)


def test_gradients_of_several_adapters(backend):
    d, m, count = 16, 4, 2
    x = torch.randn(3, 2, d, device=DEVICE)
    p = params(d, m, torch.float32, ln=True, scaling="channel", adapters=count)
    ids = torch.tensor([1, -1, 1], device=DEVICE)
    leaves = {k: v.clone().requires_grad_() for k, v in p.items() if isinstance(v, torch.Tensor)}
    xg = x.clone().requires_grad_()
    bottleneck_adapter(xg, **leaves, activation="relu", adapter_ids=ids).square().sum().backward()
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    xr = x.double().requires_grad_()
    outs = [bottleneck_reference(xr[b], **{k: v[a] for k, v in ref_leaves.items()}, activation="relu") if a >= 0
            else xr[b] for b, a in enumerate(ids.tolist())]  # fmt: skip
    torch.stack(outs).square().sum().backward()
    assert_close_to_reference(xg.grad, xr.grad, xr.grad.float(), "dx")
    for name, leaf in leaves.items():
        assert leaf.grad[0].abs().sum() == 0, name  # adapter 0 is used by no sample
        assert_close_to_reference(leaf.grad, ref_leaves[name].grad, ref_leaves[name].grad.float(), name)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda p: p.update(activation="mish"), ValueError, "activation"),
        (lambda p: p.update(down_weight=p["down_weight"][:, :-1]), ValueError, "down_weight"),
        (lambda p: p.update(up_bias=p["up_bias"][:-1]), ValueError, "up_bias"),
        (lambda p: p.update(up_weight=p["up_weight"].double()), ValueError, "up_weight"),
        (lambda p: p.update(scaling=torch.ones(5, device=DEVICE)), ValueError, "scaling"),
        (lambda p: p.update(scaling="2"), TypeError, "scaling"),
        (lambda p: p.update(ln_weight=torch.ones(24, device=DEVICE)), ValueError, "ln_bias"),
        (lambda p: p.update(ln_eps=0.0), ValueError, "ln_eps"),
        (lambda p: p.update(adapter_ids=torch.zeros(2, dtype=torch.long, device=DEVICE)), ValueError, "stacked"),
    ],
)
def test_bad_input(change, error, match):
    x = torch.randn(2, 3, 24, device=DEVICE)
    p = params(24, 8, torch.float32)
    change(p)
    with pytest.raises(error, match=match):
        bottleneck_adapter(x, **p)


def test_adapter_ids_out_of_range_are_refused():
    x = torch.randn(2, 3, 24, device=DEVICE)
    p = params(24, 8, torch.float32, adapters=2)
    with pytest.raises(IndexError, match="adapter_ids"):
        bottleneck_adapter(x, **p, adapter_ids=torch.tensor([0, 2], device=DEVICE))
    with pytest.raises(ValueError, match="one id per sample"):
        bottleneck_adapter(x, **p, adapter_ids=torch.tensor([0, 1, 1], device=DEVICE))


@pytest.mark.parametrize("adapters", [None, 2])
def test_fused_add_and_layer_norm_after(backend, adapters):
    """BERT-style placements: LN_out(residual + adapter + out_residual), rows without an adapter included."""
    d, m = 40, 8
    x = torch.randn(3, 4, d, device=DEVICE)
    residual, out_residual = torch.randn_like(x), torch.randn_like(x)
    g, b = torch.randn(d, device=DEVICE) * 0.2 + 1, torch.randn(d, device=DEVICE) * 0.1
    p = params(d, m, torch.float32, ln=True, scaling="channel", adapters=adapters)
    ids = None if adapters is None else torch.tensor([1, -1, 0], device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, residual, out_residual, g, b)]
    y = bottleneck_adapter(leaves[0], **p, residual=leaves[1], out_residual=leaves[2], out_ln_weight=leaves[3],
                           out_ln_bias=leaves[4], activation="gelu", adapter_ids=ids)  # fmt: skip
    y.square().sum().backward()

    def reference(dtype):
        refs = [t.detach().to(dtype).requires_grad_() for t in (x, residual, out_residual, g, b)]
        inner = []
        for i in range(3):
            a = 0 if ids is None else int(ids[i])
            one = {k: (v if adapters is None else v[a]).to(dtype) for k, v in p.items()}
            inner.append(bottleneck_reference(refs[0][i], **one, residual=refs[1][i], activation="gelu") if a >= 0
                         else refs[1][i])  # fmt: skip
        out = torch.nn.functional.layer_norm(torch.stack(inner) + refs[2], (d,), refs[3], refs[4], 1e-5)
        out.square().sum().backward()
        return out, [r.grad for r in refs]

    (ref, ref_grads), (plain, plain_grads) = reference(torch.float64), reference(torch.float32)
    assert_close_to_reference(y, ref, plain)
    for leaf, r, base, name in zip(leaves, ref_grads, plain_grads, ["x", "residual", "out_residual", "out_ln_weight",
                                                                    "out_ln_bias"], strict=True):  # fmt: skip
        assert_close_to_reference(leaf.grad, r, base, name)


def _per_sample(x, p, ids, dtype, residual, out_residual, out_ln):
    """The formula per sample in ``dtype`` (adapter ids[b], none for -1), then the add + LayerNorm after."""
    rows = []
    for b, a in enumerate(ids.tolist()):
        res = None if residual is None else residual[b].to(dtype)
        if a < 0:
            rows.append(x[b].to(dtype) if res is None else res)
            continue
        one = {k: v[a].to(dtype) if isinstance(v, torch.Tensor) else v for k, v in p.items()}
        rows.append(bottleneck_reference(x[b].to(dtype), **one, residual=res, activation="gelu"))
    out = torch.stack(rows)
    if out_residual is not None:
        out = out + out_residual.to(dtype)
    if out_ln is not None:
        out = torch.nn.functional.layer_norm(out, out.shape[-1:], out_ln[0].to(dtype), out_ln[1].to(dtype), 1e-5)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16] + ([torch.float16] if HAS_GPU else []))
@pytest.mark.parametrize("d, m", [(48, 16), (80, 48), (32, 256)])
@pytest.mark.parametrize("post", [False, True])
def test_prefill_tiles_across_samples(backend, dtype, d, m, post):
    """The CUDA tile kernel's shapes (16-bit, more than 64 rows, d and m multiples of 16): a partial last tile of
    16 rows; m of one, three and sixteen 16-wide tiles; samples of 10 rows, so tiles straddle samples of other
    adapters and of none. With ``post``: a residual that is an unaligned view, and the add + LayerNorm after."""
    ids = torch.tensor([2, -1, 0, 0, 1, 2, 1, -1, 0, 2, 2, 1, 0], device=DEVICE)
    x = torch.randn(len(ids), 10, d, device=DEVICE).to(dtype)
    p = params(d, m, dtype, ln=True, scaling="channel", adapters=3)
    residual = out_residual = out_ln = None
    if post:
        residual = torch.randn(len(ids), 10, d + 1, device=DEVICE).to(dtype)[..., 1:]  # rows of odd pitch
        out_residual = torch.randn_like(x)
        out_ln = (torch.randn(d, device=DEVICE) * 0.2 + 1).to(dtype), (torch.randn(d, device=DEVICE) * 0.1).to(dtype)
    y = bottleneck_adapter(x, **p, activation="gelu", adapter_ids=ids, residual=residual, out_residual=out_residual,
                           out_ln_weight=None if out_ln is None else out_ln[0],
                           out_ln_bias=None if out_ln is None else out_ln[1])  # fmt: skip
    ref = _per_sample(x, f64(p), ids, torch.float64, residual, out_residual, out_ln)
    assert_close_to_reference(y, ref, _per_sample(x, p, ids, dtype, residual, out_residual, out_ln))


@pytest.mark.gpu
@pytest.mark.parametrize("plan", [(16, 1), (32, 2), (64, 4), (64, 8), (16, 8), (32, 1)])
@pytest.mark.parametrize("m", [16, 48, 256])
@pytest.mark.parametrize(("ln", "post"), [(True, False), (True, True), (False, False), (False, True)])
def test_every_cuda_tile_plan(monkeypatch, plan, m, ln, post):
    """csrc/bottleneck.cu's tile kernel forced to each (rows per tile, blocks per cluster): 16 to 64 rows, one
    to eight blocks each owning a slice of d, the cluster's partial h and LayerNorm statistics added through
    distributed shared memory. Samples of 10 rows with other adapters and none straddle the tiles; the last tile
    is partial; ``ln``: the LayerNorm before; with ``post`` the residual is a view of odd pitch and the add +
    LayerNorm after runs. Without either, no block waits for the others before it leaves (the kernel's last
    cluster barrier is the run's)."""
    from fastpeft.ops import bottleneck

    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    monkeypatch.setattr(bottleneck, "FORCED_CUDA_TILE_PLAN", plan)
    d = 256  # 16 columns per block in clusters of 8
    ids = torch.tensor([2, -1, 0, 0, 1, 2, 1, -1, 0, 2, 2, 1, 0], device=DEVICE)
    x = torch.randn(len(ids), 10, d, device=DEVICE).to(torch.bfloat16)
    p = params(d, m, torch.bfloat16, ln=ln, scaling="channel", adapters=3)
    residual = out_residual = out_ln = None
    if post:
        residual = torch.randn(len(ids), 10, d + 1, device=DEVICE).to(torch.bfloat16)[..., 1:]
        out_residual = torch.randn_like(x)
        out_ln = ((torch.randn(d, device=DEVICE) * 0.2 + 1).to(torch.bfloat16),
                  (torch.randn(d, device=DEVICE) * 0.1).to(torch.bfloat16))  # fmt: skip
    y = bottleneck_adapter(x, **p, activation="gelu", adapter_ids=ids, residual=residual, out_residual=out_residual,
                           out_ln_weight=None if out_ln is None else out_ln[0],
                           out_ln_bias=None if out_ln is None else out_ln[1])  # fmt: skip
    ref = _per_sample(x, f64(p), ids, torch.float64, residual, out_residual, out_ln)
    same_dtype = _per_sample(x, p, ids, torch.bfloat16, residual, out_residual, out_ln)
    assert_close_to_reference(y, ref, same_dtype, f"plan={plan} m={m}")


@pytest.mark.gpu
def test_a_forced_tile_plan_that_cannot_run_is_refused(monkeypatch):
    from fastpeft.ops import bottleneck

    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    x = torch.randn(100, 48, device=DEVICE, dtype=torch.bfloat16)
    p = params(48, 16, torch.bfloat16)
    for plan in [(24, 1), (16, 3), (16, 2), (16, 16)]:  # 48 columns do not split in two slices of 16s
        monkeypatch.setattr(bottleneck, "FORCED_CUDA_TILE_PLAN", plan)
        with pytest.raises(RuntimeError, match="tile"):
            bottleneck_adapter(x, **p)


@pytest.mark.parametrize("d", [4096, 12288, 16384])
@pytest.mark.parametrize("m", [64, 256])
def test_which_backend_a_gpu_runs(d, m):
    """Decode takes the CUDA rows kernel, which stages a row of d + m floats (opting in past 48 KB: d = 12288 and
    16384 are real hidden sizes); with less shared memory than a row needs, Triton goes first. Prefill at these
    widths takes the CUDA cluster tiles on sm_90 (the Triton tiles in flight hold more of x than the L2 does),
    Triton without clusters (16 rows per block: the projections re-read per 16 rows) and in fp32."""
    from fastpeft.ops.bottleneck_plan import H200, preference

    no_clusters = H200._replace(max_cluster=1)
    assert preference(1, d, m, torch.bfloat16, H200)[0] == "cuda"
    assert preference(64, d, m, torch.float32, H200)[0] == "cuda"
    assert preference(1, d, m, torch.bfloat16, H200._replace(shared_optin=(d + m) * 4 - 1))[0] == "triton"
    assert preference(8192, d, m, torch.bfloat16, H200)[0] == "cuda"
    assert preference(8192, d, m, torch.float16, H200)[0] == "cuda"
    assert preference(8192, d, m, torch.bfloat16, no_clusters)[0] == "triton"
    assert preference(8192, d, m, torch.float32, H200)[0] == "triton"


@pytest.mark.parametrize("d", [768, 1024])
def test_narrow_prefill_stays_on_triton(d):
    """At d = 768 and 1024 the Triton tiles in flight fit in the L2: their second read of x costs no HBM bytes,
    and the cost model puts them ahead of the clusters (whose barriers weigh more on small tiles)."""
    from fastpeft.ops.bottleneck_plan import H200, preference

    assert preference(8192, d, 64, torch.bfloat16, H200)[0] == "triton"


@pytest.mark.parametrize("d", [16, 48, 768, 1024, 4096, 5136, 12288, 16384])
@pytest.mark.parametrize("m", [16, 48, 64, 256])
@pytest.mark.parametrize("optin, clusters", [(227 * 1024, 8), (163 * 1024, 1), (99 * 1024, 1), (48 * 1024, 8)])
def test_tile_plans_fit_and_prefer_more_rows(d, m, optin, clusters):
    """Every plan splits d into whole 16-column slices and fits the shared memory; no plan with more rows per
    tile would fit (none at all where there is no plan); at the hidden sizes of real models (multiples of 128)
    an sm_90 tile holds 32 rows or more (the projections read once per 32 rows, not 16)."""
    from fastpeft.ops.bottleneck_plan import H200, TILE_STATIC_SHARED, cuda_tile_plan, tile_layout_bytes

    gpu = H200._replace(shared_optin=optin, max_cluster=clusters)
    plan = cuda_tile_plan(d, m, gpu)

    def fits(rows: int) -> bool:
        splits = (c for c in (1, 2, 4, 8) if c <= clusters and d % (16 * c) == 0)
        return any(tile_layout_bytes(d // c, m, rows) + TILE_STATIC_SHARED <= optin for c in splits)

    if plan is None:
        assert not fits(16)
        return
    assert d % (16 * plan.cluster) == 0 and plan.cluster <= clusters
    assert tile_layout_bytes(d // plan.cluster, m, plan.rows) + TILE_STATIC_SHARED <= optin
    assert not any(fits(rows) for rows in (32, 64) if rows > plan.rows)
    if d >= 768 and d % 128 == 0 and optin == 227 * 1024 and clusters == 8:
        assert plan.rows >= 32


def test_tile_plans_refuse_what_the_kernel_cannot_take():
    from fastpeft.ops.bottleneck_plan import H200, cuda_tile_plan

    assert cuda_tile_plan(4104, 64, H200) is None  # d not a multiple of 16
    assert cuda_tile_plan(4096, 40, H200) is None  # m not a multiple of 16
    assert cuda_tile_plan(4096, 272, H200) is None  # m past kTileMaxM


@pytest.mark.skipif(not _extension_loaded(), reason="the CUDA extension is not built")
@pytest.mark.parametrize("optin, clusters", [(227 * 1024, 8), (163 * 1024, 1), (99 * 1024, 1)])
def test_the_tile_plan_mirrors_the_cuda_host_code(optin, clusters):
    """csrc/bottleneck.cu's tile_plan (host arithmetic, callable without a GPU) and its Python mirror agree."""
    from fastpeft.ops.bottleneck_plan import H200, cuda_tile_plan

    gpu = H200._replace(shared_optin=optin, max_cluster=clusters)
    for d in (16, 32, 48, 96, 768, 1024, 2048, 4096, 5120, 8192, 12288, 16384):
        for m in (0, 8, 16, 32, 48, 64, 96, 128, 192, 256, 272):
            plan = cuda_tile_plan(d, m, gpu)
            assert list(torch.ops.fastpeft.bottleneck_tile_plan_cuda(d, m, optin, clusters)) == (
                list(plan) if plan else [0, 0]), (d, m)  # fmt: skip


def test_the_plan_mirrors_the_cuda_kernels_constants():
    from pathlib import Path

    from fastpeft.ops import bottleneck_plan as plan

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    source = (csrc / "bottleneck.cu").read_text()
    assert f"constexpr int64_t kDecodeRows = {plan.CUDA_DECODE_MAX_M};" in source
    assert f"constexpr int64_t kTileMaxM = {plan.CUDA_TILE_MAX_M};" in source
    assert f"constexpr int kMaxCluster = {plan.MAX_CLUSTER};" in (csrc / "cluster.cuh").read_text()
    assert f"constexpr int64_t kTwoBlocksPerSm = {plan.TWO_BLOCKS_PER_SM // 1024} * 1024;" in source
    assert "constexpr int kRowPad = 8;" in source and "constexpr int kAccLd = 16 + 4;" in source
    assert f"constexpr int64_t kTileStaticShared = {plan.TILE_STATIC_SHARED};" in source


def test_the_fused_backward_width_mirrors_the_kernels():
    pytest.importorskip("triton")
    from fastpeft.triton_kernels import bottleneck as kernels

    from fastpeft.ops import bottleneck

    assert bottleneck._BACKWARD_MAX_MB_PAD == kernels.BACKWARD_MAX_MB_PAD


@pytest.mark.gpu
@pytest.mark.parametrize("d", [12288, 16384])
def test_decode_at_the_widest_hidden_sizes(backend, d):
    """d + m past the rows kernel's 40 KB budget: the CUDA kernel opts in to more shared memory per row."""
    m = 256
    x = torch.randn(3, d, device=DEVICE, dtype=torch.bfloat16)
    p = params(d, m, torch.bfloat16, ln=True)
    out = bottleneck_adapter(x, **p, activation="gelu")
    ref = bottleneck_reference(x.double(), **f64(p), activation="gelu")
    assert_close_to_reference(out, ref, bottleneck_reference(x, **p, activation="gelu"), f"{backend} d={d}")


def _op_args(x, p, ids=None, residual=None):
    """fastpeft::bottleneck_adapter's arguments for a single adapter stacked as one (as bottleneck_adapter does)."""
    stack = {k: v[None] if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    scaling = stack["scaling"] if isinstance(stack["scaling"], torch.Tensor) else None
    value = 0.0 if scaling is not None else float(stack["scaling"])
    return (x, residual, None, None, None, stack["down_weight"], stack["down_bias"], stack["up_weight"],
            stack["up_bias"], scaling, stack.get("ln_weight"), stack.get("ln_bias"), value, ids, 1, "gelu",
            1e-5, 1e-5)  # fmt: skip


# opcheck's schema test runs the ops under a dispatch mode that reads every tensor's storage, which the wrappers of
# torch.func.vjp (the composition's gradients inside the backward op) do not have: the others all run on the
# forward op, and the backward op's fake implementation is compared with the real one by hand.
OPCHECKS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("ln, scaling", [(False, "float"), (True, "channel")])
def test_opcheck_forward_and_backward_ops(ln, scaling):
    """Fake implementations (the shapes torch.compile traces with), the autograd registration and AOT dispatch
    of fastpeft::bottleneck_adapter, and the fake shapes of the backward op its gradient formula calls."""
    x = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    p = {k: v.requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in params(24, 8, torch.float32, ln,
                                                                                         scaling).items()}  # fmt: skip
    torch.library.opcheck(torch.ops.fastpeft.bottleneck_adapter.default, _op_args(x, p), test_utils=OPCHECKS)
    args = _op_args(x.detach(), {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in p.items()})
    tensors, constants = list(args[:12]), args[12:]
    needs = [t is not None for t in tensors]
    needs[0] = False  # one tensor without a gradient: an empty placeholder in its place
    backward = (torch.randn(6, 24, device=DEVICE), tensors, needs, *constants)
    real = torch.ops.fastpeft.bottleneck_adapter_backward(*backward)
    # opcheck's fake-tensor test runs the real op under the same storage-reading mode: its shapes, by hand.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map_only

    with FakeTensorMode() as mode:
        fake = torch.ops.fastpeft.bottleneck_adapter_backward(*tree_map_only(torch.Tensor, mode.from_tensor, backward))
    assert [(g.shape, g.dtype) for g in fake] == [(g.shape, g.dtype) for g in real]
    assert [g.numel() > 0 for g in real] == needs


@pytest.mark.parametrize("adapters", [None, 3])
def test_training_compiles_whole_and_matches_eager(adapters):
    """torch.compile(fullgraph=True) traces the custom op (no graph break) and AOT autograd its backward op:
    the compiled layer gives eager's output and gradients."""
    d, m = 32, 8
    p = params(d, m, torch.float32, ln=True, scaling="learned", adapters=adapters)
    x = torch.randn(4, 3, d, device=DEVICE)
    ids = None if adapters is None else torch.tensor([0, 2, -1, 1], device=DEVICE)

    def layer(x, p):
        return bottleneck_adapter(x, **p, activation="gelu", adapter_ids=ids)

    def train(fn):
        xs, ps = x.clone().requires_grad_(), {k: v.clone().requires_grad_() for k, v in p.items()}
        y = fn(xs, ps)
        (y * y).sum().backward()
        return [y, xs.grad, *(v.grad for v in ps.values())]

    torch._dynamo.reset()
    eager = train(layer)
    compiled = train(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------------------
# The fused backward: two Triton launches, no float atomics, the same bits on every run
# ----------------------------------------------------------------------------------------------------------


def _training_step(x, p, ids, dy, activation="gelu"):
    """dx and every parameter's gradient of one backward (fresh leaves each call)."""
    leaves = {k: v.clone().requires_grad_() for k, v in p.items() if isinstance(v, torch.Tensor)}
    xg = x.clone().requires_grad_()
    bottleneck_adapter(xg, **{**p, **leaves}, activation=activation, adapter_ids=ids).backward(dy)
    return {"x": xg.grad, **{k: v.grad for k, v in leaves.items()}}


def _formula_grads(x, p, ids, dy, dtype, activation="gelu"):
    """The same gradients from the formula as plain PyTorch computes it in ``dtype`` (float64: the ground
    truth), sample by sample."""
    cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in cast.items() if isinstance(v, torch.Tensor)}
    xr = x.detach().to(dtype).clone().requires_grad_()
    full = {**cast, **leaves}
    if ids is None:
        y = bottleneck_reference(xr, **full, activation=activation)
    else:
        y = torch.stack([bottleneck_reference(xr[b], **{k: v[a] if isinstance(v, torch.Tensor) else v
                                                        for k, v in full.items()}, activation=activation)
                         if a >= 0 else xr[b] for b, a in enumerate(ids.tolist())])  # fmt: skip
    y.backward(dy.to(dtype))
    return {"x": xr.grad, **{k: v.grad for k, v in leaves.items()}}


def _learned_scaling_terms(x, p, ids, dy) -> torch.Tensor:
    """sum |dy * (z Wu^T + bu)| per adapter, in float64 ([1] or [adapters, 1]): the size of the terms the gradient
    of a learned scaling sums."""
    full = {**f64(p), "scaling": 1.0}
    if ids is None:
        out = bottleneck_reference(x.double(), **full, residual=torch.zeros_like(x, dtype=torch.float64))
        return (dy.double() * out).abs().sum().reshape(1)
    terms = torch.zeros(p["down_weight"].shape[0], 1, dtype=torch.float64, device=x.device)
    for b, a in enumerate(ids.tolist()):
        if a >= 0:
            one = {k: v[a] if isinstance(v, torch.Tensor) else v for k, v in full.items()}
            out = bottleneck_reference(x[b].double(), **one, residual=torch.zeros_like(x[b], dtype=torch.float64))
            terms[a] += (dy[b].double() * out).abs().sum()
    return terms


@pytest.fixture
def fused_backward_calls(monkeypatch) -> list[int]:
    """Counts the Triton backward's calls (so a test knows the kernels ran, not the composition)."""
    pytest.importorskip("triton")
    from fastpeft.triton_kernels import bottleneck as kernels

    calls: list[int] = []
    real = kernels.bottleneck_backward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "bottleneck_backward", spy)
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    return calls


# (d, m, adapters, samples x rows, ids): several feature tiles and splits, a padded bottleneck of 16, 32 and 256,
# an adapter used by no sample, samples without one.
BACKWARD_CASES = [
    (72, 20, None, (3, 7), None),
    (40, 12, 3, (7, 5), [2, -1, 0, 2, 2, 0, -1]),
    (24, 130, 2, (3, 4), [1, 1, -1]),
    (33, 7, 4, (5, 3), [3, 3, 3, 3, 3]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("programs", [1, 4, 64])
@pytest.mark.parametrize("d, m, count, rows, ids", BACKWARD_CASES)
def test_fused_backward_matches_the_formula(fused_backward_calls, monkeypatch, dtype, programs, d, m, count, rows,
                                            ids):  # fmt: skip
    """Every gradient, with the parameter pass's rows split 1, a few or many ways (the splits' partial sums
    meet in the last program to arrive)."""
    from fastpeft.triton_kernels import bottleneck as kernels

    monkeypatch.setattr(kernels, "param_grad_programs", lambda device: programs)
    torch.manual_seed(d + m + programs)
    x = torch.randn(*rows, d, device=DEVICE).to(dtype)
    dy = torch.randn_like(x)
    ids = None if ids is None else torch.tensor(ids, device=DEVICE)
    for ln, scaling in [(True, "channel"), (False, "learned"), (True, "float")]:
        p = params(d, m, dtype, ln, scaling, adapters=count)
        got = _training_step(x, p, ids, dy)
        ref, plain = _formula_grads(x, p, ids, dy, torch.float64), _formula_grads(x, p, ids, dy, dtype)
        assert fused_backward_calls, "the Triton backward did not run"
        for name, grad in got.items():
            if name == "scaling" and scaling == "learned":
                # One sum over every row and feature, of terms with both signs: a rounding of z moves it by up to
                # eps * sum |dy out|, and summing in another order (per feature, per split) by a few fp32 eps.
                eps = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
                bound = (eps + 16 * torch.finfo(torch.float32).eps) * _learned_scaling_terms(x, p, ids, dy)
                assert ((grad.double() - ref[name]).abs() <= bound).all(), (grad, ref[name], bound)
                continue
            assert_close_to_reference(grad, ref[name], plain[name], f"{name} ln={ln} {scaling}")
        if count:
            for a in set(range(count)) - set(ids.tolist()):  # an unused adapter's gradients are written, as zeros
                assert all(got[k][a].abs().sum() == 0 for k in got if k != "x"), a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backward_gives_the_same_bits_twice(fused_backward_calls, monkeypatch, dtype):
    """Two backwards of one step agree bit for bit (the splits' sums meet in a fixed order, no float atomics:
    on a GPU the order in which programs arrive changes from run to run, the bits must not)."""
    from fastpeft.triton_kernels import bottleneck as kernels

    monkeypatch.setattr(kernels, "param_grad_programs", lambda device: 64)
    d, m, count = 40, 12, 3
    x = torch.randn(6, 9, d, device=DEVICE).to(dtype)
    dy = torch.randn_like(x)
    ids = torch.tensor([0, 2, 2, -1, 0, 2], device=DEVICE)
    p = params(d, m, dtype, ln=True, scaling="channel", adapters=count)
    first, second = _training_step(x, p, ids, dy), _training_step(x, p, ids, dy)
    assert len(fused_backward_calls) == 2
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("samples, rows, tiles, block, programs", [
    (1, 1, 1, 16, 4), (1, 1000, 3, 16, 132), (1, 8192, 64, 64, 132), (64, 128, 12, 64, 132), (7, 5, 9, 16, 64),
    (2, 4096, 24, 64, 132), (3, 33, 1, 16, 1),
])  # fmt: skip
def test_parameter_pass_shares_cover_every_row_once(samples, rows, tiles, block, programs):
    pytest.importorskip("triton")
    from fastpeft.triton_kernels.bottleneck import param_grad_shares

    s = param_grad_shares(samples, rows, tiles, block, programs)
    assert s.unit_rows % block == 0
    assert (s.units_per_sample - 1) * s.unit_rows < rows <= s.units_per_sample * s.unit_rows
    assert s.units == samples * s.units_per_sample
    assert (s.splits - 1) * s.units_per_split < s.units <= s.splits * s.units_per_split  # no split left empty
    assert s.splits <= max(1, -(-programs // tiles))  # about one wave of programs, never more
