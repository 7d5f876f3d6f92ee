"""Triton kernel for bottleneck adapters: ``y = residual + s * (act(LN(x) @ Wd.T + bd) @ Wu.T + bu)``.

One program owns BLOCK_M rows of one sample (so one adapter when adapters are chosen per sample). Pass 1 runs
over d in BLOCK_D chunks: ``x @ Wd'.T`` accumulates in fp32 through ``tl.dot`` together with the rows' sum and
sum of squares, where ``Wd' = Wd * ln_weight`` folds the LayerNorm in (``LN(x) @ Wd.T = rstd * (x @ Wd'.T -
mean * rowsum(Wd')) + Wd @ ln_bias``, the constants prepared on the host per call). The bottleneck
activations z [BLOCK_M, m] stay in registers. Pass 2 runs over d again: ``z @ Wu.T + bu``, scaled, added to
the residual, written once. x is read in pass 1 and, as the residual, in pass 2 (the second read of a tile
just read, from L2). With ``OUT_LN`` (BERT-style placements: ``LN_out(residual + adapter + out_residual)``) pass
2 also gathers the row statistics of the sum and a third pass normalises the tile it just wrote.

``_bottleneck_backward_kernel`` recomputes z the same way, then: dz = (dy s) Wu * act'(z_pre) with dWu, dbu and
d(scaling) from the same pass over dy, dh = dz Wd with dWd and the LayerNorm's dg, db, and (with LN, after the
rows' sums are known) dx in a last pass. Parameter gradients are summed over the row tiles with fp32 atomics.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors with dot operands upcast to fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import INTERPRET, dot_precision, on_device

BLOCK_D = 32 if INTERPRET else 64
# The backward kernel holds three [BLOCK_M, MB_PAD] fp32 tiles (z before and after the activation, dz) beside the
# projections' chunks: beyond this padded bottleneck it spills on sm_90 at any tile, and the composition runs
# the backward instead (fastpeft.ops.bottleneck).
BACKWARD_MAX_MB_PAD = 128


def tile_options(mb_pad: int, dtype: torch.dtype, backward: bool) -> dict:
    """BLOCK_M, BLOCK_D and warps of a launch. Each program holds [BLOCK_M, MB_PAD] fp32 tiles in registers (z
    before and after the activation, and in the backward dz too): the wider the bottleneck, the fewer rows, on
    two warpgroups, and the narrower the feature chunk (the up- and down-projection tiles are [BLOCK_D, MB_PAD]),
    so that no 16-bit launch spills (scripts/compile_triton.py checks it for sm_90). fp32 halves the chunk again:
    its full-precision dots hold both operand tiles in registers."""
    if INTERPRET:
        return {"BLOCK_M": 16, "BLOCK_D": BLOCK_D, "num_warps": 4}
    wide = mb_pad > 64
    rows = (16 if wide else 32) if backward else (32 if wide else 64)
    block_d = BLOCK_D // (2 if wide or not backward else 1) // (2 if dtype == torch.float32 else 1)
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
        if SCALE_KIND == 0:
            out = out * scale_value
        elif SCALE_KIND == 1:
            out = out * tl.load(scale_ptr + a).to(tl.float32)
        else:
            out = out * tl.load(scale_ptr + a * D + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
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
def _bottleneck_backward_kernel(
    x_ptr, dy_ptr, weff_ptr, wd_ptr, c1_ptr, c0_ptr, wu_ptr, bu_ptr, scale_ptr, lnw_ptr, lnb_ptr, ids_ptr, dx_ptr,
    dwd_ptr, dbd_ptr, dwu_ptr, dbu_ptr, dscale_ptr, dlnw_ptr, dlnb_ptr,
    T, D, MB, num_adapters,
    stride_xr, stride_dyr, stride_dxr,
    ln_eps, scale_value,
    HAS_LN: tl.constexpr, HAS_IDS: tl.constexpr, SCALE_KIND: tl.constexpr, IDENTITY: tl.constexpr,
    ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    MB_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Gradients of y = [x +] s * (act(LN(x) Wd^T + bd) Wu^T + bu) for one tile of rows of one sample: z is
    # recomputed as in the forward; parameter gradients are summed over the tiles with fp32 atomics.
    rows, mask_t, a, active = _tile_rows(ids_ptr, T, num_adapters, HAS_IDS, BLOCK_M)
    offs_b = tl.arange(0, MB_PAD)
    mask_b = offs_b < MB
    offs_d = tl.arange(0, BLOCK_D)
    on = tl.where(active, 1.0, 0.0)  # rows without an adapter pass dy through and add to no parameter
    operand = tl.float32 if UPCAST else x_ptr.dtype.element_ty

    # Pass 1: z_pre as in the forward (LayerNorm folded in), and the rows' statistics.
    z_pre, mean, rstd = _pre_activation(x_ptr, weff_ptr, c1_ptr, c0_ptr, rows, mask_t, a, D, MB, stride_xr, ln_eps,
                                        HAS_LN, DOT_PRECISION, operand, MB_PAD, BLOCK_M, BLOCK_D)  # fmt: skip
    zq = tl.where(mask_b[None, :], _activation(z_pre, ACT), 0.0).to(x_ptr.dtype.element_ty)

    # Pass 2: dz = (dy s) Wu * act'(z_pre); dWu, dbu and d(scaling) from this tile.
    dz = tl.zeros((BLOCK_M, MB_PAD), dtype=tl.float32)
    dscale_all = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        mask = mask_t[:, None] & mask_d[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dyr + cols[None, :], mask=mask, other=0.0).to(tl.float32) * on
        wu_ptrs = wu_ptr + a * D * MB + cols[:, None].to(tl.int64) * MB + offs_b[None, :]
        wu = tl.load(wu_ptrs, mask=mask_d[:, None] & mask_b[None, :], other=0.0)
        if SCALE_KIND == 0:
            s = tl.zeros((BLOCK_D,), dtype=tl.float32) + scale_value
        elif SCALE_KIND == 1:
            s = tl.zeros((BLOCK_D,), dtype=tl.float32) + tl.load(scale_ptr + a).to(tl.float32)
        else:
            s = tl.load(scale_ptr + a * D + cols, mask=mask_d, other=0.0).to(tl.float32)
        d_out = dy * s[None, :]
        dz = tl.dot(d_out.to(operand), wu.to(operand), dz, input_precision=DOT_PRECISION)
        dwu = tl.dot(tl.trans(d_out.to(operand)), zq.to(operand), input_precision=DOT_PRECISION)
        tl.atomic_add(dwu_ptr + a * D * MB + cols[:, None].to(tl.int64) * MB + offs_b[None, :], dwu,
                      mask=mask_d[:, None] & mask_b[None, :])  # fmt: skip
        tl.atomic_add(dbu_ptr + a * D + cols, tl.sum(d_out, axis=0), mask=mask_d)
        if SCALE_KIND != 0:
            bu = tl.load(bu_ptr + a * D + cols, mask=mask_d, other=0.0).to(tl.float32)
            out = tl.dot(zq.to(operand), tl.trans(wu.to(operand)), input_precision=DOT_PRECISION) + bu[None, :]
            if SCALE_KIND == 1:
                dscale_all += tl.sum(dy * out, axis=1)
            else:
                tl.atomic_add(dscale_ptr + a * D + cols, tl.sum(dy * out, axis=0), mask=mask_d)
    if SCALE_KIND == 1:
        tl.atomic_add(dscale_ptr + a, tl.sum(dscale_all, axis=0))
    dz = dz * _activation_grad(z_pre, ACT)
    dz = tl.where(mask_b[None, :], dz, 0.0)
    tl.atomic_add(dbd_ptr + a * MB + offs_b, tl.sum(dz, axis=0), mask=mask_b)

    # Pass 3: dh = dz Wd; dWd from h = LN(x); the LayerNorm's backward needs the rows' sums of dh g and
    # dh g xhat first, so with LN a fourth pass writes dx.
    sum_g = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        mask = mask_t[:, None] & mask_d[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        wd_ptrs = wd_ptr + a * MB * D + offs_b[:, None].to(tl.int64) * D + cols[None, :]
        wd = tl.load(wd_ptrs, mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        dh = tl.dot(dz.to(operand), wd.to(operand), input_precision=DOT_PRECISION)
        if HAS_LN:
            g = tl.load(lnw_ptr + a * D + cols, mask=mask_d, other=0.0).to(tl.float32)
            b = tl.load(lnb_ptr + a * D + cols, mask=mask_d, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            h = xhat * g[None, :] + b[None, :]
            tl.atomic_add(dlnw_ptr + a * D + cols, tl.sum(dh * xhat, axis=0), mask=mask_d)
            tl.atomic_add(dlnb_ptr + a * D + cols, tl.sum(dh, axis=0), mask=mask_d)
            sum_g += tl.sum(dh * g[None, :], axis=1)
            sum_gx += tl.sum(dh * g[None, :] * xhat, axis=1)
        else:
            h = x
            dx = dh
            if IDENTITY:
                dx += tl.load(dy_ptr + rows[:, None] * stride_dyr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + rows[:, None] * stride_dxr + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        h = tl.where(mask, h, 0.0)
        dwd = tl.dot(tl.trans(dz.to(operand)), h.to(operand), input_precision=DOT_PRECISION)
        tl.atomic_add(dwd_ptr + a * MB * D + offs_b[:, None].to(tl.int64) * D + cols[None, :], dwd,
                      mask=mask_b[:, None] & mask_d[None, :])  # fmt: skip
    if HAS_LN:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            mask_d = cols < D
            mask = mask_t[:, None] & mask_d[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            wd = tl.load(wd_ptr + a * MB * D + offs_b[:, None].to(tl.int64) * D + cols[None, :],
                         mask=mask_b[:, None] & mask_d[None, :], other=0.0)  # fmt: skip
            dh = tl.dot(dz.to(operand), wd.to(operand), input_precision=DOT_PRECISION)
            g = tl.load(lnw_ptr + a * D + cols, mask=mask_d, other=0.0).to(tl.float32)
            xhat = (x - mean[:, None]) * rstd[:, None]
            dx = rstd[:, None] * (dh * g[None, :] - (sum_g[:, None] + xhat * sum_gx[:, None]) / D)
            if IDENTITY:
                dx += tl.load(dy_ptr + rows[:, None] * stride_dyr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + rows[:, None] * stride_dxr + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def bottleneck_backward(
    x, dy, adapters, ids, rows_per_sample: int, activation_code: int, ln_eps: float, identity: bool
):
    """Gradients of the fused forward without the add + LayerNorm after, for stacked parameters as in
    :func:`bottleneck_forward`: dx [M, d] (x's dtype; includes dy when the residual is x itself, ``identity``)
    and fp32 gradients of every adapter tensor, stacked like the parameters. Returns (dx, grads dict)."""
    m_rows, d = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    setup = _setup(x, adapters, ids, rows_per_sample, backward=True)  # pass 1 recomputes z as the forward does
    num_adapters, mb = setup.w_eff.shape[:2]
    grads = {name: torch.zeros(t.shape, dtype=torch.float32, device=x.device)
             for name, t in zip(adapters._fields, adapters, strict=True) if isinstance(t, torch.Tensor)}  # fmt: skip
    dx = torch.empty_like(x)
    has_ln = adapters.ln_weight is not None
    if m_rows:
        c0 = setup.c0
        with on_device(x):
            _bottleneck_backward_kernel[setup.grid](
                x, dy, setup.w_eff, adapters.down_weight.contiguous(), setup.c1, c0, adapters.up_weight.contiguous(),
                adapters.up_bias.contiguous(), setup.scale, adapters.ln_weight.contiguous() if has_ln else c0,
                adapters.ln_bias.contiguous() if has_ln else c0, ids if ids is not None else c0, dx,
                grads["down_weight"], grads["down_bias"], grads["up_weight"], grads["up_bias"],
                grads.get("scaling", c0), grads.get("ln_weight", c0), grads.get("ln_bias", c0),
                setup.rows_per_program_group, d, mb, num_adapters,
                x.stride(0), dy.stride(0), dx.stride(0),
                float(ln_eps), setup.scale_value,
                HAS_LN=has_ln, HAS_IDS=ids is not None, SCALE_KIND=setup.scale_kind, IDENTITY=identity,
                ACT=activation_code, DOT_PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET,
                MB_PAD=setup.mb_pad, **setup.options,
            )  # fmt: skip
    return dx, grads
