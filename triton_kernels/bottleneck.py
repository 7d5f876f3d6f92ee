"""Triton kernel for bottleneck adapters: ``y = residual + s * (act(LN(x) @ Wd.T + bd) @ Wu.T + bu)``.

One program owns BLOCK_M rows of one sample (so one adapter when adapters are chosen per sample). Pass 1 runs
over d in BLOCK_D chunks: ``x @ Wd'.T`` accumulates in fp32 through ``tl.dot`` together with the rows' sum and
sum of squares, where ``Wd' = Wd * ln_weight`` folds the LayerNorm in (``LN(x) @ Wd.T = rstd * (x @ Wd'.T -
mean * rowsum(Wd')) + Wd @ ln_bias``, the constants prepared on the host per call). The bottleneck
activations z [BLOCK_M, m] stay in registers. Pass 2 runs over d again: ``z @ Wu.T + bu``, scaled, added to
the residual, written once. x is read in pass 1 and, as the residual, in pass 2 (the second read of a tile
just read, from L2). With ``OUT_LN`` (BERT-style placements: ``LN_out(residual + adapter + out_residual)``) pass
2 also gathers the row statistics of the sum and a third pass normalises the tile it just wrote.

The backward is two launches with no float atomics, so it gives the same bits on every run:
``_bottleneck_backward_rows_kernel`` (tiles of rows, like the forward) recomputes z and writes it, writes
dz = (dy s) Wu * act'(z_pre), and writes dx in one more pass (the LayerNorm's two row sums over d follow from dz
and the first pass's results, so no pass is spent on them). ``_bottleneck_param_grads_kernel`` (tiles of
features) sums dy^T z and dz^T LN-normalised x over the rows, split across programs whose fp32 partial sums the
last to arrive adds in a fixed order, and derives every parameter gradient from those sums. HBM traffic: x and
dy twice each, dx once (the row pass's rereads of a tile come from L2), z and dz ([M, m]) once each way.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors with dot operands upcast to fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import INTERPRET, arrival_counts, dot_precision, on_device, sm_count

# The widest padded bottleneck the backward's tiles are built and checked for (no spills on sm_90: the row pass
# holds [BLOCK_M, MB_PAD] fp32 tiles of z_pre and dz, the parameter pass two [BLOCK_D, MB_PAD] accumulators);
# wider ones run the composition's backward instead (fastpeft.ops.bottleneck).
BACKWARD_MAX_MB_PAD = 256


def tile_options(mb_pad: int, dtype: torch.dtype, backward: bool, interpreter: bool = INTERPRET) -> dict:
    """BLOCK_M, BLOCK_D and warps of a launch. Each program holds [BLOCK_M, MB_PAD] fp32 tiles in registers (z
    before and after the activation, and in the backward dz too): the wider the bottleneck, the fewer rows, on
    two warpgroups, and the narrower the feature chunk (the up- and down-projection tiles are [BLOCK_D, MB_PAD]),
    so that no 16-bit launch spills (scripts/compile_triton.py checks it for sm_90). fp32 halves the chunk again:
    its full-precision dots hold both operand tiles in registers. ``interpreter``: the interpreter's tiny tiles
    (the cost model asks for a GPU's)."""
    if interpreter:
        return {"BLOCK_M": 16, "BLOCK_D": 32, "num_warps": 4}
    wide = mb_pad > 64
    rows = (16 if wide else (32 if dtype == torch.float32 else 64)) if backward else (32 if wide else 64)
    block_d = 64 // (2 if wide or not backward else 1) // (2 if dtype == torch.float32 else 1)
    return {"BLOCK_M": rows, "BLOCK_D": block_d, "num_warps": 8}


@triton.jit
def _activation(v, ACT: tl.constexpr):
    if ACT == 0:
        out = tl.maximum(v, 0.0)
    elif ACT == 1:
        out = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACT == 2:
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        out = 0.5 * v * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0))
    elif ACT == 3:
        out = v / (1.0 + tl.exp(-v))
    elif ACT == 4:
        out = 2.0 / (1.0 + tl.exp(-2.0 * v)) - 1.0
    elif ACT == 5:
        out = tl.where(v > 0, v, 0.01 * v)
    else:
        out = 1.0 / (1.0 + tl.exp(-v))
    return out


@triton.jit
def _tile_rows(ids_ptr, T, num_adapters, HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's rows (int64 [BLOCK_M] and their mask) of one sample, the sample's adapter clamped into
    the stack, and whether it has one (ids are per row, equal within a sample; without ids, adapter 0)."""
    sample = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    adapter = 0
    if HAS_IDS:
        adapter = tl.load(ids_ptr + sample * T)
    active = (adapter >= 0) & (adapter < num_adapters)
    return (sample * T + offs_t).to(tl.int64), offs_t < T, tl.where(active, adapter, 0).to(tl.int64), active


@triton.jit
def _pre_activation(x_ptr, w_ptr, c1_ptr, c0_ptr, rows, mask_t, a, D, MB, stride_xr, ln_eps,
                    HAS_LN: tl.constexpr, DOT_PRECISION: tl.constexpr, OPERAND: tl.constexpr, MB_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """(LN(x) @ Wd.T + bd [BLOCK_M, MB_PAD], the rows' mean, rstd) in one pass over x: ``w_ptr`` holds Wd with the
    LayerNorm's weight folded in, ``c1`` its row sums and ``c0`` = Wd @ ln_bias + bd (just bd without LN)."""
    offs_b = tl.arange(0, MB_PAD)
    mask_b = offs_b < MB
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, MB_PAD), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask_t[:, None] & mask_d[None, :],
                    other=0.0)  # fmt: skip
        if HAS_LN:
            xf = x.to(tl.float32)
            row_sum += tl.sum(xf, axis=1)
            row_sq += tl.sum(xf * xf, axis=1)
        w_ptrs = w_ptr + a * MB * D + offs_b[None, :].to(tl.int64) * D + cols[:, None]
        w = tl.load(w_ptrs, mask=mask_d[:, None] & mask_b[None, :], other=0.0)
        acc = tl.dot(x.to(OPERAND), w.to(OPERAND), acc, input_precision=DOT_PRECISION)
    c0 = tl.load(c0_ptr + a * MB + offs_b, mask=mask_b, other=0.0).to(tl.float32)
    mean = row_sum / D
    rstd = 1.0 / tl.sqrt(tl.maximum(row_sq / D - mean * mean, 0.0) + ln_eps)
    if HAS_LN:
        c1 = tl.load(c1_ptr + a * MB + offs_b, mask=mask_b, other=0.0).to(tl.float32)
        acc = rstd[:, None] * (acc - mean[:, None] * c1[None, :])
    return acc + c0[None, :], mean, rstd


@triton.jit
def _scale(scale_ptr, a, D, cols, mask_d, scale_value, SCALE_KIND: tl.constexpr, BLOCK_D: tl.constexpr):
    """The scaling of features ``cols`` for adapter ``a``, fp32 [BLOCK_D]."""
    if SCALE_KIND == 0:
        s = tl.zeros((BLOCK_D,), dtype=tl.float32) + scale_value
    elif SCALE_KIND == 1:
        s = tl.zeros((BLOCK_D,), dtype=tl.float32) + tl.load(scale_ptr + a).to(tl.float32)
    else:
        s = tl.load(scale_ptr + a * D + cols, mask=mask_d, other=0.0).to(tl.float32)
    return s


@triton.jit
def _bottleneck_kernel(
    x_ptr, res_ptr, wd_ptr, c1_ptr, c0_ptr, wu_ptr, bu_ptr, scale_ptr, ids_ptr, y_ptr,
    out_res_ptr, out_lnw_ptr, out_lnb_ptr,
    T, D, MB, num_adapters,
    stride_xr, stride_rr, stride_yr, stride_or,
    ln_eps, scale_value, out_ln_eps,
    HAS_LN: tl.constexpr, HAS_IDS: tl.constexpr, SCALE_KIND: tl.constexpr,  # 0: float, 1: one per adapter, 2: [d]
    OUT_RES: tl.constexpr, OUT_LN: tl.constexpr,  # y = LN_out(residual + adapter + out_residual)
    ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    MB_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows, mask_t, a, active = _tile_rows(ids_ptr, T, num_adapters, HAS_IDS, BLOCK_M)
    offs_b = tl.arange(0, MB_PAD)
    mask_b = offs_b < MB
    offs_d = tl.arange(0, BLOCK_D)
    operand = tl.float32 if UPCAST else x_ptr.dtype.element_ty

    z_pre, _, _ = _pre_activation(x_ptr, wd_ptr, c1_ptr, c0_ptr, rows, mask_t, a, D, MB, stride_xr, ln_eps, HAS_LN,
                                  DOT_PRECISION, operand, MB_PAD, BLOCK_M, BLOCK_D)  # fmt: skip
    z = tl.where(mask_b[None, :], _activation(z_pre, ACT), 0.0).to(operand)  # padded columns contribute nothing

    wu_base = wu_ptr + a * D * MB
    out_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    out_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        mask = mask_t[:, None] & mask_d[None, :]
        res = tl.load(res_ptr + rows[:, None] * stride_rr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        wu_ptrs = wu_base + cols[None, :].to(tl.int64) * MB + offs_b[:, None]
        wu = tl.load(wu_ptrs, mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        out = tl.dot(z, wu.to(operand), input_precision=DOT_PRECISION)
        out += tl.load(bu_ptr + a * D + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        out = out * _scale(scale_ptr, a, D, cols, mask_d, scale_value, SCALE_KIND, BLOCK_D)[None, :]
        y = tl.where(active, res + out, res)
        if OUT_RES:
            y += tl.load(out_res_ptr + rows[:, None] * stride_or + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty)
        if OUT_LN:  # statistics of the rounded sum, as a LayerNorm applied to the stored sum would see it
            yf = tl.where(mask, y.to(tl.float32), 0.0)
            out_sum += tl.sum(yf, axis=1)
            out_sq += tl.sum(yf * yf, axis=1)
        tl.store(y_ptr + rows[:, None] * stride_yr + cols[None, :], y, mask=mask)
    if OUT_LN:  # a third pass over the tile just written: normalise it in place
        tl.debug_barrier()
        mean = out_sum / D
        rstd = 1.0 / tl.sqrt(tl.maximum(out_sq / D - mean * mean, 0.0) + out_ln_eps)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            mask_d = cols < D
            mask = mask_t[:, None] & mask_d[None, :]
            ptrs = y_ptr + rows[:, None] * stride_yr + cols[None, :]
            v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(out_lnw_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
            b = tl.load(out_lnb_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
            v = (v - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
            tl.store(ptrs, v.to(y_ptr.dtype.element_ty), mask=mask)


def _folded(adapters):
    """(Wd', rowsum(Wd'), c0) per adapter, fp32 where it is a sum: the LayerNorm folded into the down-projection."""
    down_w, down_b = adapters.down_weight, adapters.down_bias
    if adapters.ln_weight is None:
        return down_w.contiguous(), down_b, down_b.float().contiguous()
    g, b = adapters.ln_weight, adapters.ln_bias
    w_eff = (down_w.float() * g.float()[:, None, :]).to(down_w.dtype)
    c1 = w_eff.float().sum(-1)
    c0 = torch.einsum("amd,ad->am", down_w.float(), b.float()) + down_b.float()
    return w_eff.contiguous(), c1.contiguous(), c0.contiguous()


class _Setup(NamedTuple):
    """What the forward and the backward launches share."""

    w_eff: torch.Tensor  # [A, m, d]: Wd with the LayerNorm's weight folded in (Wd itself without LN)
    c1: torch.Tensor  # fp32 [A, m]: rowsum(w_eff) (without LN: unused, bd)
    c0: torch.Tensor  # fp32 [A, m]: Wd @ ln_bias + bd (without LN: bd)
    scale: torch.Tensor  # fp32 [A, 1] or [A, d]; c0 as a placeholder for a float scaling
    scale_kind: int  # 0: scale_value, 1: one per adapter, 2: one per feature
    scale_value: float
    rows_per_program_group: int  # T: the rows of one sample (all rows without ids)
    grid: tuple[int, int]  # (samples, row tiles per sample)
    mb_pad: int
    options: dict  # tile_options: BLOCK_M, BLOCK_D, num_warps


def _setup(x: torch.Tensor, adapters, ids, rows_per_sample: int, backward: bool) -> _Setup:
    w_eff, c1, c0 = _folded(adapters)
    # A tensor scaling as the kernels read it, fp32 [A, 1] or [A, d]; None for a float.
    scale = (
        adapters.scaling.reshape(w_eff.shape[0], -1).float().contiguous() if torch.is_tensor(adapters.scaling) else None
    )
    kind = 0 if scale is None else (1 if scale.shape[1] == 1 else 2)
    value = float(adapters.scaling) if scale is None else 1.0
    # Samples of T rows: ids are per sample, so a program's rows share one adapter. Without ids, one "sample".
    t = rows_per_sample if ids is not None else x.shape[0]
    mb_pad = max(16, triton.next_power_of_2(w_eff.shape[1]))
    options = tile_options(mb_pad, x.dtype, backward)
    return _Setup(w_eff, c1, c0, c0 if scale is None else scale, kind, value, t,
                  (x.shape[0] // t, triton.cdiv(t, options["BLOCK_M"])), mb_pad, options)  # fmt: skip


def bottleneck_forward(
    x, residual, adapters, ids, rows_per_sample: int, activation_code: int, ln_eps: float, post
) -> torch.Tensor:
    """Rows x [M, d] (unit inner stride or a copy is made), residual like x or None, the parameters stacked
    ([A, ...], fastpeft.ops.bottleneck.Adapters), ids int32 [M] constant over each run of ``rows_per_sample``
    rows (one sample), or None (adapter 0 everywhere); ``activation_code`` as in
    fastpeft.ops.bottleneck.ACTIVATION_CODES (the host passes it: kernels never import the ops); ``post``
    (fastpeft.ops.bottleneck.Post): the add + LayerNorm after, if any. Returns y [M, d] in x's dtype."""
    m_rows, d = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    res = x if residual is None else (residual if residual.stride(-1) == 1 else residual.contiguous())
    y = torch.empty_like(x)
    if m_rows == 0:
        return y
    setup = _setup(x, adapters, ids, rows_per_sample, backward=False)
    num_adapters, mb = setup.w_eff.shape[:2]
    out_res = post.out_residual
    out_res = None if out_res is None else (out_res if out_res.stride(-1) == 1 else out_res.contiguous())
    out_ln = post.out_ln_weight is not None
    with on_device(x):
        _bottleneck_kernel[setup.grid](
            x, res, setup.w_eff, setup.c1, setup.c0, adapters.up_weight.contiguous(), adapters.up_bias.contiguous(),
            setup.scale, ids if ids is not None else setup.c0, y,
            out_res if out_res is not None else y, post.out_ln_weight if out_ln else y,
            post.out_ln_bias if out_ln else y,
            setup.rows_per_program_group, d, mb, num_adapters,
            x.stride(0), res.stride(0), y.stride(0), (out_res if out_res is not None else y).stride(0),
            float(ln_eps), setup.scale_value, float(post.out_ln_eps),
            HAS_LN=adapters.ln_weight is not None, HAS_IDS=ids is not None, SCALE_KIND=setup.scale_kind,
            OUT_RES=out_res is not None, OUT_LN=out_ln,
            ACT=activation_code, DOT_PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET,
            MB_PAD=setup.mb_pad, **setup.options,
        )  # fmt: skip
    return y


@triton.jit
def _activation_grad(v, ACT: tl.constexpr):
    """d act / d v at v (fp32)."""
    if ACT == 0:
        g = tl.where(v > 0, 1.0, 0.0)
    elif ACT == 1:
        g = 0.5 * (1.0 + tl.erf(v * 0.7071067811865476)) + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)
    elif ACT == 2:
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        t = 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0
        g = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * v * v)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-v))
        g = s * (1.0 + v * (1.0 - s))
    elif ACT == 4:
        t = 2.0 / (1.0 + tl.exp(-2.0 * v)) - 1.0
        g = 1.0 - t * t
    elif ACT == 5:
        g = tl.where(v > 0, 1.0, 0.01)
    else:
        s = 1.0 / (1.0 + tl.exp(-v))
        g = s * (1.0 - s)
    return g


@triton.jit
def _bottleneck_backward_rows_kernel(
    x_ptr, dy_ptr, weff_ptr, c1_ptr, c0_ptr, wu_ptr, scale_ptr, ids_ptr,
    dx_ptr, z_ptr, dz_ptr, stats_ptr,
    T, D, MB, num_adapters,
    stride_xr, stride_dyr, stride_dxr,
    ln_eps, scale_value,
    HAS_LN: tl.constexpr, HAS_IDS: tl.constexpr, SCALE_KIND: tl.constexpr, IDENTITY: tl.constexpr,
    ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    MB_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # The backward's row pass, one tile of rows of one sample: z recomputed as in the forward (written for the
    # parameter pass), dz = (dy s) Wu * act'(z_pre) (written too), and dx. Nothing is summed over rows here.
    rows, mask_t, a, active = _tile_rows(ids_ptr, T, num_adapters, HAS_IDS, BLOCK_M)
    offs_b = tl.arange(0, MB_PAD)
    mask_b = offs_b < MB
    offs_d = tl.arange(0, BLOCK_D)
    on = tl.where(active, 1.0, 0.0)  # rows without an adapter pass dy through: dz = 0
    operand = tl.float32 if UPCAST else x_ptr.dtype.element_ty
    mask_tb = mask_t[:, None] & mask_b[None, :]
    offs_tb = rows[:, None] * MB + offs_b[None, :]

    # Pass 1 (x): z_pre as in the forward (LayerNorm folded in) and the rows' statistics.
    z_pre, mean, rstd = _pre_activation(x_ptr, weff_ptr, c1_ptr, c0_ptr, rows, mask_t, a, D, MB, stride_xr, ln_eps,
                                        HAS_LN, DOT_PRECISION, operand, MB_PAD, BLOCK_M, BLOCK_D)  # fmt: skip
    tl.store(z_ptr + offs_tb, _activation(z_pre, ACT).to(z_ptr.dtype.element_ty), mask=mask_tb)
    if HAS_LN:
        tl.store(stats_ptr + 2 * rows, mean, mask=mask_t)
        tl.store(stats_ptr + 2 * rows + 1, rstd, mask=mask_t)

    # Pass 2 (dy): dz = (dy s) Wu * act'(z_pre), rounded as the parameter pass reads it.
    dz = tl.zeros((BLOCK_M, MB_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        dy = tl.load(dy_ptr + rows[:, None] * stride_dyr + cols[None, :], mask=mask_t[:, None] & mask_d[None, :],
                     other=0.0).to(tl.float32) * on  # fmt: skip
        wu = tl.load(wu_ptr + a * D * MB + cols[:, None].to(tl.int64) * MB + offs_b[None, :],
                     mask=mask_d[:, None] & mask_b[None, :], other=0.0)  # fmt: skip
        d_out = dy * _scale(scale_ptr, a, D, cols, mask_d, scale_value, SCALE_KIND, BLOCK_D)[None, :]
        dz = tl.dot(d_out.to(operand), wu.to(operand), dz, input_precision=DOT_PRECISION)
    dz = tl.where(mask_b[None, :], dz * _activation_grad(z_pre, ACT), 0.0).to(dz_ptr.dtype.element_ty)
    tl.store(dz_ptr + offs_tb, dz, mask=mask_tb)
    dz = dz.to(tl.float32)

    # The LayerNorm's backward needs two row sums over d of dh = dz Wd: sum_j dh g = dz . rowsum(Wd g) = dz . c1,
    # and sum_j dh g xhat = dz . (xhat (Wd g)^T) = dz . (z_pre - c0): known now, so dx takes one more pass.
    if HAS_LN:
        c1 = tl.load(c1_ptr + a * MB + offs_b, mask=mask_b, other=0.0).to(tl.float32)
        c0 = tl.load(c0_ptr + a * MB + offs_b, mask=mask_b, other=0.0).to(tl.float32)
        sum_g = tl.sum(dz * c1[None, :], axis=1)
        sum_gx = tl.sum(dz * (z_pre - c0[None, :]), axis=1)

    # Pass 3 (x again with LN, dy again for the identity residual; the tile was just read): dx.
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        mask = mask_t[:, None] & mask_d[None, :]
        w = tl.load(weff_ptr + a * MB * D + offs_b[:, None].to(tl.int64) * D + cols[None, :],
                    mask=mask_b[:, None] & mask_d[None, :], other=0.0)  # fmt: skip
        dx = tl.dot(dz.to(operand), w.to(operand), input_precision=DOT_PRECISION)  # dh g (dh without LN)
        if HAS_LN:
            x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean[:, None]) * rstd[:, None]
            dx = rstd[:, None] * (dx - (sum_g[:, None] + xhat * sum_gx[:, None]) / D)
        if IDENTITY:
            dx += tl.load(dy_ptr + rows[:, None] * stride_dyr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * stride_dxr + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bottleneck_param_grads_kernel(
    x_ptr, dy_ptr, z_ptr, dz_ptr, stats_ptr, ids_ptr,
    wd_ptr, wu_ptr, bu_ptr, scale_ptr, lnw_ptr, lnb_ptr,
    dwd_ptr, dbd_ptr, dwu_ptr, dbu_ptr, dscale_ptr, dlnw_ptr, dlnb_ptr,
    partial_ptr, arrivals_ptr,
    T, D, MB, unit_rows, units_per_sample, units, units_per_split, splits,
    stride_xr, stride_dyr, scale_value,
    HAS_LN: tl.constexpr, HAS_IDS: tl.constexpr, SCALE_KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    MB_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The backward's parameter pass: program (adapter a, feature tile, split) sums over its share of a's rows
    G = dy^T z [BLOCK_D, m], the column sums of dy, T = dz^T xhat [m, BLOCK_D] (x without LN) and the column
    sums of dz, in fp32 through tl.dot. Every parameter gradient follows from those four: dWu = s G, dbu = s
    colsum(dy), d(scaling) = rowsum(G Wu) + bu colsum(dy), dWd = T g + colsum(dz) b^T, dg = colsum(Wd T), db =
    colsum(dz) Wd, dbd = colsum(dz). Splits of one tile meet in fp32 partial sums, summed in split order by the
    last to arrive: no float atomics, the same bits on every run."""
    a = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2).to(tl.int64)  # unit and slot numbers in 64 bits
    offs_b = tl.arange(0, MB_PAD)
    mask_b = offs_b < MB
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    operand = tl.float32 if UPCAST else x_ptr.dtype.element_ty
    g_acc = tl.zeros((BLOCK_D, MB_PAD), dtype=tl.float32)
    t_acc = tl.zeros((MB_PAD, BLOCK_D), dtype=tl.float32)
    dy_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dz_sum = tl.zeros((MB_PAD,), dtype=tl.float32)
    # A unit: up to unit_rows rows of one sample (all rows are one sample without ids).
    for unit in range(split * units_per_split, tl.minimum((split + 1) * units_per_split, units)):
        sample = unit // units_per_sample
        lo = (unit % units_per_sample) * unit_rows
        hi = tl.minimum(lo + unit_rows, T)
        if HAS_IDS:  # another adapter's sample: no rows (ids outside the stack match no program)
            hi = tl.where(tl.load(ids_ptr + sample.to(tl.int64) * T) == a, hi, lo)
        for r0 in range(lo, hi, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < hi
            rows = sample.to(tl.int64) * T + offs_r
            mask = mask_r[:, None] & mask_d[None, :]
            mask_rb = mask_r[:, None] & mask_b[None, :]
            dy = tl.load(dy_ptr + rows[:, None] * stride_dyr + cols[None, :], mask=mask, other=0.0)
            z = tl.load(z_ptr + rows[:, None] * MB + offs_b[None, :], mask=mask_rb, other=0.0)
            g_acc = tl.dot(tl.trans(dy.to(operand)), z.to(operand), g_acc, input_precision=DOT_PRECISION)
            dy_sum += tl.sum(dy.to(tl.float32), axis=0)
            x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0)
            if HAS_LN:
                mean = tl.load(stats_ptr + 2 * rows, mask=mask_r, other=0.0)
                rstd = tl.load(stats_ptr + 2 * rows + 1, mask=mask_r, other=0.0)
                x = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            dz = tl.load(dz_ptr + rows[:, None] * MB + offs_b[None, :], mask=mask_rb, other=0.0)
            t_acc = tl.dot(tl.trans(dz.to(operand)), x.to(operand), t_acc, input_precision=DOT_PRECISION)
            dz_sum += tl.sum(dz.to(tl.float32), axis=0)

    finished = splits == 1
    if not finished:
        tile_id = a.to(tl.int64) * tl.num_programs(1) + tile
        offs_g = tl.arange(0, BLOCK_D)[:, None] * MB_PAD + offs_b[None, :]
        offs_t = offs_b[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
        slot_size = 2 * BLOCK_D * MB_PAD + BLOCK_D + MB_PAD
        slot = partial_ptr + (tile_id * splits + split) * slot_size
        tl.store(slot + offs_g, g_acc)
        tl.store(slot + BLOCK_D * MB_PAD + offs_t, t_acc)
        tl.store(slot + 2 * BLOCK_D * MB_PAD + tl.arange(0, BLOCK_D), dy_sum)
        tl.store(slot + 2 * BLOCK_D * MB_PAD + BLOCK_D + offs_b, dz_sum)
        tl.debug_barrier()  # every thread's partial stored before the arrival is counted (release)
        arrived = tl.atomic_add(arrivals_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        finished = arrived == splits - 1
        if finished:  # the last to arrive: every split's partial, in split order
            g_acc = tl.zeros((BLOCK_D, MB_PAD), dtype=tl.float32)
            t_acc = tl.zeros((MB_PAD, BLOCK_D), dtype=tl.float32)
            dy_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
            dz_sum = tl.zeros((MB_PAD,), dtype=tl.float32)
            for other in range(0, splits):
                slot = partial_ptr + (tile_id * splits + other) * slot_size
                g_acc += tl.load(slot + offs_g, cache_modifier=".cg")
                t_acc += tl.load(slot + BLOCK_D * MB_PAD + offs_t, cache_modifier=".cg")
                dy_sum += tl.load(slot + 2 * BLOCK_D * MB_PAD + tl.arange(0, BLOCK_D), cache_modifier=".cg")
                dz_sum += tl.load(slot + 2 * BLOCK_D * MB_PAD + BLOCK_D + offs_b, cache_modifier=".cg")
            tl.atomic_xchg(arrivals_ptr + tile_id, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    if finished:
        a64 = a.to(tl.int64)
        mask_db = mask_d[:, None] & mask_b[None, :]
        mask_bd = mask_b[:, None] & mask_d[None, :]
        offs_up = a64 * D * MB + cols[:, None].to(tl.int64) * MB + offs_b[None, :]  # [d, m] per adapter
        offs_down = a64 * MB * D + offs_b[:, None].to(tl.int64) * D + cols[None, :]  # [m, d] per adapter
        s = _scale(scale_ptr, a64, D, cols, mask_d, scale_value, SCALE_KIND, BLOCK_D)
        tl.store(dwu_ptr + offs_up, g_acc * s[:, None], mask=mask_db)
        tl.store(dbu_ptr + a64 * D + cols, dy_sum * s, mask=mask_d)
        if SCALE_KIND != 0:  # d(scaling) per feature: sum over rows of dy (z Wu^T + bu)
            wu = tl.load(wu_ptr + offs_up, mask=mask_db, other=0.0).to(tl.float32)
            bu = tl.load(bu_ptr + a64 * D + cols, mask=mask_d, other=0.0).to(tl.float32)
            tl.store(dscale_ptr + a64 * D + cols, tl.sum(g_acc * wu, axis=1) + bu * dy_sum, mask=mask_d)
        dwd = t_acc
        if HAS_LN:
            wd = tl.load(wd_ptr + offs_down, mask=mask_bd, other=0.0).to(tl.float32)
            g = tl.load(lnw_ptr + a64 * D + cols, mask=mask_d, other=0.0).to(tl.float32)
            b = tl.load(lnb_ptr + a64 * D + cols, mask=mask_d, other=0.0).to(tl.float32)
            dwd = t_acc * g[None, :] + dz_sum[:, None] * b[None, :]
            tl.store(dlnw_ptr + a64 * D + cols, tl.sum(wd * t_acc, axis=0), mask=mask_d)
            tl.store(dlnb_ptr + a64 * D + cols, tl.sum(wd * dz_sum[:, None], axis=0), mask=mask_d)
        tl.store(dwd_ptr + offs_down, dwd, mask=mask_bd)
        tl.store(dbd_ptr + a64 * MB + offs_b, dz_sum, mask=mask_b & (tile == 0))


def param_grad_options(mb_pad: int, dtype: torch.dtype, interpreter: bool = INTERPRET) -> dict:
    """BLOCK_R (rows per step: the dots' K), BLOCK_D and warps of the parameter pass. Its fp32 accumulators are
    two [BLOCK_D, MB_PAD] tiles, 64 registers a thread at BLOCK_D * MB_PAD = 8192 on 8 warps: the wider the
    bottleneck, the narrower the feature tile and the fewer the rows per step, so that no 16-bit launch spills
    (scripts/compile_triton.py checks it for sm_90). fp32 halves both again: its full-precision dots hold both
    operand tiles in registers."""
    if INTERPRET:
        return {"BLOCK_R": 16, "BLOCK_D": 16, "num_warps": 4}
    halve = 2 if dtype == torch.float32 else 1
    rows = 64 if mb_pad <= 64 else (32 if mb_pad <= 128 else 16)
    return {"BLOCK_R": max(16, rows // halve), "BLOCK_D": (64 if mb_pad <= 128 else 32) // halve, "num_warps": 8}


def param_grad_programs(device: torch.device) -> int:
    """The parameter pass's programs in all, about: one per SM (4 in the interpreter, so that tiny shapes split)."""
    return 4 if INTERPRET else sm_count(device)


class _Shares(NamedTuple):
    """How the parameter pass splits the rows: units of up to ``unit_rows`` rows of one sample, ``splits``
    programs per (adapter, feature tile), each summing ``units_per_split`` consecutive units."""

    unit_rows: int
    units_per_sample: int
    units: int
    units_per_split: int
    splits: int


def param_grad_shares(samples: int, rows_per_sample: int, programs_per_split: int, block_r: int,
                      programs: int) -> _Shares:  # fmt: skip
    """Enough splits that ``programs_per_split`` (adapters x feature tiles) times them is about ``programs`` (one
    wave), but no more than there are units of rows: each split adds a partial tile of fp32 sums to the reduce."""
    wanted = max(1, triton.cdiv(programs, programs_per_split))
    per_sample = max(1, min(triton.cdiv(rows_per_sample, block_r), triton.cdiv(wanted, samples)))
    unit_rows = triton.cdiv(triton.cdiv(rows_per_sample, per_sample), block_r) * block_r
    per_sample = triton.cdiv(rows_per_sample, unit_rows)
    units = samples * per_sample
    per_split = triton.cdiv(units, min(wanted, units))
    return _Shares(unit_rows, per_sample, units, per_split, triton.cdiv(units, per_split))


def bottleneck_backward(
    x, dy, adapters, ids, rows_per_sample: int, activation_code: int, ln_eps: float, identity: bool
):
    """Gradients of the fused forward without the add + LayerNorm after, for stacked parameters as in
    :func:`bottleneck_forward`: dx [M, d] (x's dtype; includes dy when the residual is x itself, ``identity``)
    and fp32 gradients of every adapter tensor, stacked like the parameters. Returns (dx, grads dict).

    Two launches, neither with float atomics (the same bits on every run): the row pass (z, dz and dx per tile
    of rows; x and dy read, the third pass's reread from L2) and the parameter pass (x, dy, z and dz read by
    feature tile, the sums over rows split across programs and met in a fixed order)."""
    m_rows, d = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    setup = _setup(x, adapters, ids, rows_per_sample, backward=True)  # pass 1 recomputes z as the forward does
    num_adapters, mb = setup.w_eff.shape[:2]
    has_ln = adapters.ln_weight is not None
    # Every gradient element is written by the parameter pass when there are rows (zeros for an unused adapter).
    alloc = torch.empty if m_rows else torch.zeros
    grads = {name: alloc(t.shape, dtype=torch.float32, device=x.device)
             for name, t in zip(adapters._fields, adapters, strict=True) if isinstance(t, torch.Tensor)}  # fmt: skip
    dx = torch.empty_like(x)
    if not m_rows:
        return dx, grads
    z = x.new_empty(m_rows, mb)
    dz = x.new_empty(m_rows, mb)
    stats = torch.empty(m_rows, 2, dtype=torch.float32, device=x.device) if has_ln else setup.c0
    ids_arg = ids if ids is not None else setup.c0
    scale_per_feature = setup.scale_kind != 0
    dscale = torch.empty(num_adapters, d, dtype=torch.float32, device=x.device) if scale_per_feature else setup.c0
    up_w, up_b = adapters.up_weight.contiguous(), adapters.up_bias.contiguous()
    common = dict(HAS_LN=has_ln, HAS_IDS=ids is not None, SCALE_KIND=setup.scale_kind,
                  DOT_PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET, MB_PAD=setup.mb_pad)  # fmt: skip
    with on_device(x):
        _bottleneck_backward_rows_kernel[setup.grid](
            x, dy, setup.w_eff, setup.c1, setup.c0, up_w, setup.scale, ids_arg, dx, z, dz, stats,
            setup.rows_per_program_group, d, mb, num_adapters,
            x.stride(0), dy.stride(0), dx.stride(0),
            float(ln_eps), setup.scale_value,
            IDENTITY=identity, ACT=activation_code, **common, **setup.options,
        )  # fmt: skip
        options = param_grad_options(setup.mb_pad, x.dtype)
        tiles = triton.cdiv(d, options["BLOCK_D"])
        t = setup.rows_per_program_group
        shares = param_grad_shares(m_rows // t, t, num_adapters * tiles, options["BLOCK_R"],
                                   param_grad_programs(x.device))  # fmt: skip
        slot = 2 * options["BLOCK_D"] * setup.mb_pad + options["BLOCK_D"] + setup.mb_pad
        partial = torch.empty(num_adapters * tiles * shares.splits * slot if shares.splits > 1 else 1,
                              dtype=torch.float32, device=x.device)  # fmt: skip
        _bottleneck_param_grads_kernel[(num_adapters, tiles, shares.splits)](
            x, dy, z, dz, stats, ids_arg,
            adapters.down_weight.contiguous(), up_w, up_b, setup.scale,
            *((adapters.ln_weight.contiguous(), adapters.ln_bias.contiguous()) if has_ln else (setup.c0, setup.c0)),
            grads["down_weight"], grads["down_bias"], grads["up_weight"], grads["up_bias"], dscale,
            grads.get("ln_weight", setup.c0), grads.get("ln_bias", setup.c0),
            partial, arrival_counts(x.device, num_adapters * tiles),
            t, d, mb, *shares,
            x.stride(0), dy.stride(0), setup.scale_value,
            **common, **options,
        )  # fmt: skip
    if scale_per_feature:
        grads["scaling"] = dscale if setup.scale_kind == 2 else dscale.sum(-1, keepdim=True)
    return dx, grads
