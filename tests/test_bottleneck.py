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


H100_OPTIN = 227 * 1024  # the shared memory a block may opt in to on sm_90


@pytest.mark.parametrize("d", [4096, 12288, 16384])
@pytest.mark.parametrize("m", [64, 256])
def test_cuda_goes_first_for_decode_only(d, m):
    """Decode takes the CUDA rows kernel, which stages a row of d + m floats (opting in past 48 KB: d = 12288 and
    16384 are real hidden sizes); with less shared memory than a row needs, and for prefill (the Triton tiles
    read the projections once per 64 rows, the CUDA tile kernel per 16), Triton goes first."""
    from fastpeft.ops.bottleneck import cuda_tile_takes, preference

    assert preference(1, d, m, torch.bfloat16, H100_OPTIN)[0] == "cuda"
    assert preference(64, d, m, torch.float32, H100_OPTIN)[0] == "cuda"
    assert preference(1, d, m, torch.bfloat16, (d + m) * 4 - 1)[0] == "triton"
    assert preference(8192, d, m, torch.bfloat16, H100_OPTIN)[0] == "triton"
    assert cuda_tile_takes(8192, d, m, torch.bfloat16, H100_OPTIN) == (16 * (d + 8) * 2 + 40 * 1024 <= H100_OPTIN)
    assert not cuda_tile_takes(8192, d, m, torch.float32, H100_OPTIN)  # the tile kernel is 16-bit only


def test_the_preference_mirrors_the_cuda_kernels_constants():
    from pathlib import Path

    from fastpeft.ops import bottleneck

    source = (Path(__file__).resolve().parents[1] / "csrc" / "bottleneck.cu").read_text()
    assert f"constexpr int64_t kDecodeRows = {bottleneck._CUDA_DECODE_MAX_M};" in source
    assert f"constexpr int64_t kTileMaxM = {bottleneck._CUDA_TILE_MAX_M};" in source


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
