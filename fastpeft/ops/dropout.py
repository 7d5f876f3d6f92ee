"""Dropout masks drawn exactly as ``nn.Dropout`` draws them, and kept as bits.

A LoRA layer in training drops elements of A's input only. To give PEFT's numbers under the same seed, the
mask must be the one PEFT's ``nn.Dropout`` would draw: same generator, same state consumed, same order. torch
draws it differently per device (``at::dropout``): on CUDA ``native_dropout``'s fused kernel (its mask
depends on the shape and dtype of the tensor), elsewhere ``bernoulli_(1 - p)`` on a tensor like the input.
:func:`draw_mask` makes the same call on an empty tensor of that shape and dtype, so the RNG advances exactly as
it would for PEFT. The backward keeps the mask as packed bits (:func:`pack_bits`), 1/16 of a bf16 copy of x.
"""

from __future__ import annotations

import functools

import torch


def check_p(p: object, name: str = "dropout_p") -> float:
    """``p`` as a float in [0, 1); ValueError/TypeError naming ``name`` otherwise."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p!r}")
    return float(p)


def draw_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The keep-mask ``nn.Dropout(p)`` would draw for a ``dtype`` tensor of ``shape`` on ``device`` (bool).

    Consumes torch's default generator for ``device`` exactly as that dropout call would.
    """
    like = torch.empty(shape, dtype=dtype, device=device)
    if device.type == "cuda":
        return torch.native_dropout(like, p, True)[1]
    return like.bernoulli_(1.0 - p).bool()


def keep_scale(p: float, dtype: torch.dtype, device: torch.device) -> float:
    """The factor torch multiplies kept elements by: ``1/(1-p)``, rounded to ``dtype`` off CUDA as torch does."""
    if device.type == "cuda":
        return 1.0 / (1.0 - p)  # native_dropout scales in fp32
    return _rounded_keep_scale(p, dtype)


@functools.lru_cache(maxsize=64)
def _rounded_keep_scale(p: float, dtype: torch.dtype) -> float:
    return torch.tensor(1.0, dtype=dtype).div_(1.0 - p).item()  # bernoulli noise divided in the input dtype


def apply_mask(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``x * mask * scale`` rounded once to x's dtype: what the dropout call returns (selecting is exact; the
    scale is applied in fp32 and rounded, as torch's dropout multiplies by its noise). On CUDA one kernel,
    torch's dropout backward (x and the mask read once, the result written: 5 bytes an element for bf16, where
    selecting and then scaling moves 9)."""
    if x.is_cuda:
        return torch.ops.aten.native_dropout_backward(x, mask, scale)
    return torch.where(mask, x, 0.0).mul_(scale)


def _bit_positions(device: torch.device) -> torch.Tensor:
    return torch.arange(8, device=device, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[M, K] bool -> [M, ceil(K / 8)] uint8, bit j of byte i holding column 8 i + j. Two passes (the bools read
    as bytes in place: a shift, then a sum of each 8)."""
    m, k = mask.shape
    if k % 8:
        mask = torch.nn.functional.pad(mask, (0, -k % 8))
    as_bytes = mask.contiguous().view(torch.uint8).view(m, -(-k // 8), 8)
    return as_bytes.bitwise_left_shift(_bit_positions(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: [M, ceil(K / 8)] uint8 -> [M, K] bool. Two passes (a shift, then a masking
    in place that leaves 0 or 1 in each byte, read as bools without a copy)."""
    shifted = bits.unsqueeze(-1).bitwise_right_shift(_bit_positions(bits.device))
    return shifted.bitwise_and_(1).view(torch.bool).view(bits.shape[0], bits.shape[1] * 8)[:, :k]


DROPOUT_MODES = ("torch", "philox")


def draw_seed() -> int:
    """A seed for dropout_mode='philox', from torch's default CPU generator: reproducible under
    ``torch.manual_seed``, and no GPU synchronisation."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def philox_keep_scale(p: float) -> float:
    """The scale of kept elements for the in-kernel (Philox) mask: 1 / (1 - p) as a Python float."""
    return 1.0 / (1.0 - p)  # applied in fp32 by the kernels


def seeded_mask(seed: int, p: float, m: int, k: int, device: torch.device) -> torch.Tensor:
    """dropout_mode='philox''s [m, k] keep-mask for ``seed``: the Triton kernels' Philox mask wherever Triton can
    run on ``device`` (so every backend drops the same elements), else one drawn from a torch generator seeded
    with ``seed``."""
    from fastpeft.backends import backend_unavailable_reason

    if backend_unavailable_reason("triton", device) is None:
        from fastpeft.triton_kernels.lora import PhiloxDropout, keep_mask

        return keep_mask(PhiloxDropout(seed, p, philox_keep_scale(p), k, 1), m, k, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand((m, k), generator=generator, device=device) >= p
