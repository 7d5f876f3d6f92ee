"""A persistent Hopper kernel for the LoRA prefill: ``y = x W^T + [s x A^T | B]`` with the adapter as one more step
of the K loop, TMA loads, and tiles visited in L2-friendly groups.

One program per SM walks the output tiles ``start, start + programs, ...`` (grouped by GROUP_M row tiles, so the
programs running together share W's column tiles and x's row tiles in L2). For each tile the K loop loads x and
W blocks through tensor descriptors (TMA on sm_90: one instruction per block, no address arithmetic in the
warps) into a pipelined loop; then one more step multiplies ``s x A^T`` ([BLOCK_M, R_PAD], from the shrink's
fp32 output, rounded to x's dtype as PEFT's ``lora_A`` output is) by B's tile ([BLOCK_N, R_PAD], TMA, zero past
the rank): the LoRA term costs r / K of the tile's work and y is written once, by TMA.

The alternative that ships by default (triton_kernels/lora.py): the tiles write the LoRA term, then cuBLAS adds
x W^T into it in place. The cost model (benchmarks/roofline.py, ``--designs``) predicts this kernel 1.07-1.11x
cuBLAS at M = 4096 if it reaches 0.95 of cuBLAS's GEMM speed, level with the shipped form; PERSISTENT_PREFILL_MIN_M
keeps it off until a GPU run ranks them (the bench's fused:triton-persistent rows).

With ``lora_a`` instead of ``xa`` (the forward, inference) the kernel computes ``x A^T`` in its own pass over x:
the tile that first reaches a row block multiplies each x block by A's block beside W's (r more columns of MMA
for that tile alone), publishes the fp32 result and a flag; a tile that finds the flag set reads it from L2
instead. The first column tile of every row block is
visited first, so after the first round every tile finds it published; one that does not computes it itself
(the same instructions on the same blocks: the same bits), so no tile ever waits on another and any schedule,
the interpreter's one program after another included, gives the same result. The last tile of a row block to
finish resets its flag, so every launch (and every replay of a CUDA graph) starts from zero. No separate shrink
reads x: the model's 1.11x of the base GEMM at 4096 -> 4096 (shrink, then this kernel) becomes 1.07x.

The backward's ``dx = dy W + s (dy B) A`` is the same product with W and B given transposed (``W^T``, a view
[K, N] of the stored [N, K]; ``A^T``, a view of the stored [R, K]): the kernel reads the stored tensors through
descriptors of their own layout (W_TRANSPOSED, B_TRANSPOSED) and multiplies without a transpose, so dx too is one
GEMM with the adapter as its last K step, on the same tiles.

Needs what TMA needs: rows of x, y and of W and B as stored, contiguous with 16-byte aligned strides and bases
(their row lengths multiples of 8 for 16-bit dtypes) and a 16-bit dtype: :func:`takes` says whether a call
qualifies. Under ``TRITON_INTERPRET=1`` the descriptors run on CPU tensors, dot operands upcast to fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    INTERPRET,
    arrival_counts,
    descriptor_scratch,
    dot_precision,
    first_columns_first,
    grouped_tile,
    on_device,
    r_pad,
    rows_for_tma,
    sm_count,
)

# Rows from which lora_linear's prefill (and so the backward's dx) takes this kernel instead of the LoRA term and
# cuBLAS: off (never) until a GPU run says it is faster; the bench's fused:triton-persistent rows set it to time it.
PERSISTENT_PREFILL_MIN_M = 2**62
MAX_R_PAD = 64  # the adapter step's tiles [BLOCK_M, R_PAD] and [BLOCK_N, R_PAD] beside the accumulator


def tile_options(interpreter: bool = INTERPRET) -> dict:
    """128 x 128 output tiles, K in steps of 64 four stages deep, on two warpgroups (wgmma); 16s in the
    interpreter."""
    if interpreter:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}


@triton.jit
def _k_loop(x_desc, w_desc, a_desc, row0, col0, k_steps, acc, xa, SHRINK: tl.constexpr, W_TRANSPOSED: tl.constexpr,
            UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """acc += x W^T over K for the tile at (row0, col0); with SHRINK also xa += x A^T on the same x blocks."""
    for step in range(k_steps):
        x = x_desc.load([row0, step * BLOCK_K])
        # [BLOCK_K, BLOCK_N] either way
        w = w_desc.load([step * BLOCK_K, col0]) if W_TRANSPOSED else w_desc.load([col0, step * BLOCK_K]).T
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if SHRINK:
            a = a_desc.load([0, step * BLOCK_K]).T  # [BLOCK_K, R_PAD], zero past the rank
            if UPCAST:
                a = a.to(tl.float32)
            xa = tl.dot(x, a, xa, input_precision=DOT_PRECISION)
    return acc, xa


@triton.jit
def _lora_persistent_kernel(
    x_ptr, w_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr, a_ptr, published_ptr, finished_ptr,
    M, N, K, R, stride_xam, scaling,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    W_TRANSPOSED: tl.constexpr, B_TRANSPOSED: tl.constexpr, FUSE_SHRINK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One program per SM over the output tiles. W_TRANSPOSED: w_ptr holds W^T's storage, [K, N] row-major (the
    backward's W), else [N, K]; B_TRANSPOSED: b_ptr holds [R, N] (the backward's A), else [N, R]. FUSE_SHRINK:
    x A^T in the kernel's own pass over x (a_ptr: A [R, K]), written to xa_ptr [M, R] fp32 for every row block;
    published_ptr and finished_ptr: one int32 count per row block, zero at launch and left zero."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    a_desc = None
    if FUSE_SHRINK:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[R, K], strides=[K, 1], block_shape=[R_PAD, BLOCK_K])
    if W_TRANSPOSED:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[N, 1], block_shape=[BLOCK_K, BLOCK_N])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    if B_TRANSPOSED:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[R, N], strides=[N, 1], block_shape=[R_PAD, BLOCK_N])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, R], strides=[R, 1], block_shape=[BLOCK_N, R_PAD])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        if FUSE_SHRINK:
            pid_m, pid_n = first_columns_first(tile, num_m, num_n, GROUP_M)
        else:
            pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        rows = row0 + tl.arange(0, BLOCK_M)
        xa_offsets = rows[:, None].to(tl.int64) * stride_xam + offs_r[None, :]
        xa_mask = (rows < M)[:, None] & (offs_r < R)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        if FUSE_SHRINK:
            if tl.atomic_add(published_ptr + pid_m, 0, sem="acquire", scope="gpu") == 0:
                acc, xa = _k_loop(x_desc, w_desc, a_desc, row0, col0, k_steps, acc, xa, True, W_TRANSPOSED,
                                  UPCAST, DOT_PRECISION, BLOCK_K)  # fmt: skip
                tl.store(xa_ptr + xa_offsets, xa, mask=xa_mask)
                tl.debug_barrier()  # every thread's part stored before the row block is flagged (release)
                tl.atomic_xchg(published_ptr + pid_m, 1, sem="release", scope="gpu")
            else:  # another tile published the row block's x A^T: read it from L2
                acc, xa = _k_loop(x_desc, w_desc, a_desc, row0, col0, k_steps, acc, xa, False, W_TRANSPOSED,
                                  UPCAST, DOT_PRECISION, BLOCK_K)  # fmt: skip
                xa = tl.load(xa_ptr + xa_offsets, mask=xa_mask, other=0.0, cache_modifier=".cg")
        else:  # the shrink's output
            acc, xa = _k_loop(x_desc, w_desc, None, row0, col0, k_steps, acc, xa, False, W_TRANSPOSED, UPCAST,
                              DOT_PRECISION, BLOCK_K)  # fmt: skip
            xa = tl.load(xa_ptr + xa_offsets, mask=xa_mask, other=0.0)
        # The adapter's K step: [s x A^T | B], s x A^T rounded to x's dtype (PEFT's lora_A output dtype).
        b = b_desc.load([0, col0]) if B_TRANSPOSED else b_desc.load([col0, 0]).T  # [R_PAD, BLOCK_N]
        xa = (xa * scaling).to(b.dtype)
        if UPCAST:
            xa = xa.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(xa, b, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            cols = col0 + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([row0, col0], acc.to(y_ptr.dtype.element_ty))
        # The row block's last tile to finish leaves its counts at zero for the next launch (the outer test is
        # the compile-time one: joined with `and`, the atomic would be built into every variant).
        if FUSE_SHRINK:  # noqa: SIM102
            if tl.atomic_add(finished_ptr + pid_m, 1, sem="relaxed", scope="gpu") == num_n - 1:
                tl.atomic_xchg(published_ptr + pid_m, 0, sem="relaxed", scope="gpu")
                tl.atomic_xchg(finished_ptr + pid_m, 0, sem="relaxed", scope="gpu")


def _stored(t: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """(t as stored, whether t is its transpose) where t or t.T has rows a descriptor reads, else None."""
    if rows_for_tma(t):
        return t, False
    return (t.t(), True) if t.dim() == 2 and rows_for_tma(t.t()) else None


def takes(x: torch.Tensor, weight: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor | None = None) -> bool:
    """Whether this kernel takes ``x W^T + s xa B^T``: a 16-bit dtype, the rank within MAX_R_PAD, x and y with
    rows as TMA reads them (contiguous, 16-byte aligned; y is allocated so), and W and B stored so themselves or
    as the transpose of such a tensor (the backward passes W^T and A^T); with ``lora_a`` (x A^T in the kernel's
    own pass), A's rows as TMA reads them too."""
    return (
        x.dtype in (torch.float16, torch.bfloat16)
        and r_pad(lora_b.shape[1]) <= MAX_R_PAD
        and (weight.shape[0] * x.element_size()) % 16 == 0
        and rows_for_tma(x)
        and _stored(weight) is not None
        and _stored(lora_b) is not None
        and (lora_a is None or rows_for_tma(lora_a))
    )


def lora_linear_persistent(
    x: torch.Tensor,
    weight: torch.Tensor,
    xa: torch.Tensor | None,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x W^T + scaling * xa B^T + bias`` on the persistent kernel. x [M, K], weight [N, K], lora_b [N, R]
    (fp16/bf16, one dtype, as :func:`takes` requires: weight and lora_b may be transposed views, as the
    backward's W^T and A^T are), xa fp32 [M, R] (the shrink's output, unit inner stride), bias [N] or None;
    or xa None and lora_a [R, K]: ``xa = x A^T`` computed in the kernel's own pass over x. Returns y [M, N] in
    x's dtype."""
    m, k = x.shape
    n, r = lora_b.shape
    (w_stored, w_transposed), (b_stored, b_transposed) = _stored(weight), _stored(lora_b)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    options = tile_options()
    row_blocks = triton.cdiv(m, options["BLOCK_M"])
    tiles = row_blocks * triton.cdiv(n, options["BLOCK_N"])
    programs = min(tiles, 4 if INTERPRET else sm_count(x.device))
    fuse = xa is None
    if fuse:  # the kernel writes x A^T (fp32) for every row block; counts per row block: published, finished
        xa = torch.empty((m, r), device=x.device, dtype=torch.float32)
        counts = arrival_counts(x.device, 2 * row_blocks)
    if x.is_cuda:
        triton.set_allocator(descriptor_scratch)
    with on_device(x):
        _lora_persistent_kernel[(programs,)](
            x, w_stored, xa, b_stored, y if bias is None else bias.contiguous(), y,
            lora_a if fuse else y, counts[:row_blocks] if fuse else y, counts[row_blocks:] if fuse else y,
            m, n, k, r, xa.stride(0), float(scaling),
            HAS_BIAS=bias is not None, R_PAD=r_pad(r), DOT_PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET,
            W_TRANSPOSED=w_transposed, B_TRANSPOSED=b_transposed, FUSE_SHRINK=fuse,
            **options,
        )  # fmt: skip
    return y
