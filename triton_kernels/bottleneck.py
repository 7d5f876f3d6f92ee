"""Triton kernel for bottleneck adapters: ``y = residual + s * (act(LN(x) @ Wd.T + bd) @ Wu.T + bu)``.

One program owns BLOCK_M rows of one sample (so one adapter when adapters are chosen per sample). Pass 1 runs
over d in BLOCK_D chunks: ``x @ Wd'.T`` accumulates in fp32 through ``tl.dot`` together with the rows' sum and
sum of squares, where ``Wd' = Wd * ln_weight`` folds the LayerNorm in (``LN(x) @ Wd.T = rstd * (x @ Wd'.T -
mean * rowsum(Wd')) + Wd @ ln_bias``, the constants prepared on the host per call). The bottleneck
activations z [BLOCK_M, m] stay in registers. Pass 2 runs over d again: ``z @ Wu.T + bu``, scaled, added to
the residual, written once. x is read in pass 1 and, as the residual, in pass 2 (the second read of a tile
just read, from L2).

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors with dot operands upcast to fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora import _INTERPRET, _dot_precision, _on_device

ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_new": 2, "silu": 3, "swish": 3, "tanh": 4, "leakyrelu": 5,
                    "sigmoid": 6}  # fmt: skip
BLOCK_M = 16 if _INTERPRET else 64
BLOCK_D = 32 if _INTERPRET else 64


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
def _bottleneck_kernel(
    x_ptr, res_ptr, wd_ptr, c1_ptr, c0_ptr, wu_ptr, bu_ptr, scale_ptr, ids_ptr, y_ptr,
    T, D, MB, num_adapters,
    stride_xr, stride_rr, stride_yr,
    ln_eps, scale_value,
    HAS_LN: tl.constexpr, HAS_IDS: tl.constexpr, SCALE_KIND: tl.constexpr,  # 0: float, 1: one per adapter, 2: [d]
    ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    MB_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    sample = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_t = offs_t < T
    rows = (sample * T + offs_t).to(tl.int64)
    offs_b = tl.arange(0, MB_PAD)
    mask_b = offs_b < MB
    offs_d = tl.arange(0, BLOCK_D)
    adapter = 0
    if HAS_IDS:
        adapter = tl.load(ids_ptr + sample * T)  # ids are per row, equal within a sample
    active = (adapter >= 0) & (adapter < num_adapters)
    a = tl.where(active, adapter, 0).to(tl.int64)
    operand = tl.float32 if UPCAST else x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, MB_PAD), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    wd_base = wd_ptr + a * MB * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask_t[:, None] & mask_d[None, :],
                    other=0.0)  # fmt: skip
        if HAS_LN:
            xf = x.to(tl.float32)
            row_sum += tl.sum(xf, axis=1)
            row_sq += tl.sum(xf * xf, axis=1)
        wd = tl.load(wd_base + offs_b[None, :] * D + cols[:, None], mask=mask_d[:, None] & mask_b[None, :],
                     other=0.0)  # fmt: skip
        acc = tl.dot(x.to(operand), wd.to(operand), acc, input_precision=DOT_PRECISION)
    c0 = tl.load(c0_ptr + a * MB + offs_b, mask=mask_b, other=0.0).to(tl.float32)
    if HAS_LN:
        mean = row_sum / D
        rstd = 1.0 / tl.sqrt(tl.maximum(row_sq / D - mean * mean, 0.0) + ln_eps)
        c1 = tl.load(c1_ptr + a * MB + offs_b, mask=mask_b, other=0.0).to(tl.float32)
        acc = rstd[:, None] * (acc - mean[:, None] * c1[None, :])
    z = _activation(acc + c0[None, :], ACT)
    z = tl.where(mask_b[None, :], z, 0.0).to(operand)  # padded bottleneck columns contribute nothing

    wu_base = wu_ptr + a * D * MB
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        mask = mask_t[:, None] & mask_d[None, :]
        res = tl.load(res_ptr + rows[:, None] * stride_rr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        wu = tl.load(wu_base + cols[None, :] * MB + offs_b[:, None], mask=mask_b[:, None] & mask_d[None, :],
                     other=0.0)  # fmt: skip
        out = tl.dot(z, wu.to(operand), input_precision=DOT_PRECISION)
        out += tl.load(bu_ptr + a * D + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        if SCALE_KIND == 0:
            out = out * scale_value
        elif SCALE_KIND == 1:
            out = out * tl.load(scale_ptr + a).to(tl.float32)
        else:
            out = out * tl.load(scale_ptr + a * D + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        y = tl.where(active, res + out, res)
        tl.store(y_ptr + rows[:, None] * stride_yr + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _folded(adapters, stacked: bool):
    """(Wd', rowsum(Wd'), c0) per adapter, fp32 where it is a sum: the LayerNorm folded into the down-projection."""
    down_w, down_b = adapters.down_weight, adapters.down_bias
    if not stacked:
        down_w, down_b = down_w[None], down_b[None]
    if adapters.ln_weight is None:
        return down_w.contiguous(), down_b, down_b.float().contiguous()
    g, b = adapters.ln_weight, adapters.ln_bias
    if not stacked:
        g, b = g[None], b[None]
    w_eff = (down_w.float() * g.float()[:, None, :]).to(down_w.dtype)
    c1 = w_eff.float().sum(-1)
    c0 = torch.einsum("amd,ad->am", down_w.float(), b.float()) + down_b.float()
    return w_eff.contiguous(), c1.contiguous(), c0.contiguous()


def bottleneck_forward(
    x, residual, adapters, ids, rows_per_sample: int, activation: str, ln_eps: float
) -> torch.Tensor:
    """Rows x [M, d] (unit inner stride or a copy is made), residual like x or None, the (stacked when ids is
    given) parameters, ids int32 [M] constant over each run of ``rows_per_sample`` rows (one sample), or None.
    Returns y [M, d] in x's dtype."""
    m_rows, d = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    res = x if residual is None else (residual if residual.stride(-1) == 1 else residual.contiguous())
    y = torch.empty_like(x)
    if m_rows == 0:
        return y
    stacked = ids is not None
    w_eff, c1, c0 = _folded(adapters, stacked)
    up_w = (adapters.up_weight if stacked else adapters.up_weight[None]).contiguous()
    up_b = (adapters.up_bias if stacked else adapters.up_bias[None]).contiguous()
    num_adapters, mb = w_eff.shape[0], w_eff.shape[1]
    scaling = adapters.scaling
    if isinstance(scaling, torch.Tensor):
        scale = scaling.reshape(num_adapters, -1).contiguous()
        kind, value = (1 if scale.shape[1] == 1 else 2), 1.0
    else:
        scale, kind, value = c0, 0, float(scaling)
    # Samples of T rows: ids are per sample, so a program's rows share one adapter. Without ids, one "sample".
    t = rows_per_sample if stacked else m_rows
    grid = (m_rows // t, triton.cdiv(t, BLOCK_M))
    with _on_device(x):
        _bottleneck_kernel[grid](
            x, res, w_eff, c1, c0, up_w, up_b, scale, ids if stacked else c0, y,
            t, d, mb, num_adapters,
            x.stride(0), res.stride(0), y.stride(0),
            float(ln_eps), value,
            HAS_LN=adapters.ln_weight is not None, HAS_IDS=stacked, SCALE_KIND=kind,
            ACT=ACTIVATION_CODES[activation], DOT_PRECISION=_dot_precision(x.dtype), UPCAST=_INTERPRET,
            MB_PAD=max(16, triton.next_power_of_2(mb)), BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    return y
