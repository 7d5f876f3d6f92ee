"""bitsandbytes' 4-bit weight format (NF4 and FP4), bit for bit, without needing bitsandbytes.

A weight ``[N, K]`` is flattened row-major; every run of ``blocksize`` elements shares one fp32 ``absmax`` and
each element is stored as the 4-bit index of the nearest value of a 16-entry code (``w / absmax`` rounded to the
nearest code value): ``w = code[q] * absmax[i // blocksize]``. Element 2i is the high nibble and 2i+1 the low
nibble of byte i; the bytes are stored as ``[ceil(N*K/2), 1]`` uint8. With double quantization the absmax
vector itself is quantized: ``absmax - mean`` in blocks of 256 against bitsandbytes' signed dynamic 8-bit code.
tests/test_quant_4bit.py checks every byte against bitsandbytes (the README's QLoRA section: where it differs).

:class:`QuantState` carries bitsandbytes' fields (and converts to and from ``bitsandbytes.functional.QuantState``
and transformers' checkpoint keys); :func:`quantize_4bit` and :func:`dequantize_4bit` are the format's two
directions. The matmul that reads it lives in :mod:`fastpeft.ops.qlora`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the double quantization of absmax
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# E2M1 with bias 2 and bit 3 the sign, in bitsandbytes' index order (not sorted), divided by the largest, 12.
FP4_CODE = tuple(v / 12 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3))


@functools.cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    return torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32)


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 values of ``quant_type``'s code, fp32 [16], indexed by the 4-bit value (a new tensor: the
    canonical one stays unchanged whatever its user does)."""
    check_quant_type(quant_type)
    return _code_cpu(quant_type).to(device, copy=True)


@functools.cache
def _dynamic_code_cpu() -> torch.Tensor:
    # bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for exponents 10^-6 ...
    # 10^0 the midpoints of an fp32 linspace(0.1, 1) with 2^i + 1 points, both signs, then 0 and 1, sorted.
    # Computed in the same fp32 steps so that every value agrees bit for bit.
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist()
        values += (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit code (``create_dynamic_map()``): 256 sorted fp32 values in [-1, 1]."""
    return _dynamic_code_cpu().to(device, copy=True)


def check_quant_type(quant_type: object) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_blocksize(name: str, blocksize: object) -> None:
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{name} must be one of {BLOCKSIZES}, got {blocksize!r}")


# ----------------------------------------------------------------------------------------------------------
# The state
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QuantState:
    """The quantization state of one 4-bit weight, with ``bitsandbytes.functional.QuantState``'s fields.

    Fields:
        absmax: fp32 [blocks] (one per ``blocksize`` elements), or uint8 [blocks] when double-quantized.
        shape: the weight's shape (``[out_features, in_features]`` for a linear layer).
        code: fp32 [16], the code's values (:func:`code_4bit`); [256] for a nested state.
        blocksize: elements per absmax (32 ... 4096).
        quant_type: ``"nf4"`` or ``"fp4"`` (None for a nested state).
        dtype: the dtype the weight dequantizes to (the original weight's).
        offset: fp32 scalar tensor, the mean subtracted before the nested quantization (None unless nested).
        state2: the nested state (absmax fp32 [ceil(blocks / 256)], code = :func:`dynamic_code`, blocksize
            256), or None.
    """

    absmax: torch.Tensor
    shape: torch.Size | None
    code: torch.Tensor
    blocksize: int
    quant_type: str | None
    dtype: torch.dtype
    offset: torch.Tensor | None = None
    state2: QuantState | None = None

    @property
    def nested(self) -> bool:
        """True when absmax is itself quantized (double quantization)."""
        return self.state2 is not None

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def block_absmax(self) -> torch.Tensor:
        """fp32 [blocks]: every block's absmax, decoded from the nested state as bitsandbytes decodes it
        (``code2[q] * absmax2[i // 256]`` in fp32, then ``+ offset``)."""
        if not self.nested:
            return self.absmax
        nested = self.state2
        codes = torch.index_select(nested.code, 0, self.absmax.reshape(-1).int())
        return _scale_blocks(codes, nested.absmax.reshape(-1), nested.blocksize, codes.numel()) + self.offset

    def to(self, device: torch.device | str) -> QuantState:
        """A copy on ``device`` (dtypes unchanged)."""
        move = functools.partial(torch.Tensor.to, device=device)
        return dataclasses.replace(
            self,
            absmax=move(self.absmax),
            code=move(self.code),
            offset=None if self.offset is None else move(self.offset),
            state2=None if self.state2 is None else self.state2.to(device),
        )

    def check(self, packed: torch.Tensor) -> None:
        """TypeError/ValueError naming the field unless this state describes ``packed`` (the 4-bit bytes)."""
        check_quant_state(packed, self)

    # bitsandbytes -----------------------------------------------------------------------------------------

    @classmethod
    def from_bnb(cls, state: Any) -> QuantState:
        """The same state from a ``bitsandbytes.functional.QuantState`` (tensors shared, not copied)."""
        nested = None
        if getattr(state, "state2", None) is not None:
            s2 = state.state2
            nested = cls(s2.absmax, None, s2.code, int(s2.blocksize), None, s2.dtype)
        offset = state.offset if nested is not None else None
        if offset is not None and not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), device=state.absmax.device)
        shape = torch.Size(state.shape)
        return cls(state.absmax, shape, state.code, int(state.blocksize), state.quant_type, state.dtype, offset, nested)

    def to_bnb(self) -> Any:
        """This state as a ``bitsandbytes.functional.QuantState`` (needs bitsandbytes; tensors shared)."""
        try:
            from bitsandbytes.functional import QuantState as BnbQuantState
        except ImportError as exc:
            raise ImportError("QuantState.to_bnb needs bitsandbytes: pip install bitsandbytes") from exc
        state2 = None
        if self.nested:
            s2 = self.state2
            state2 = BnbQuantState(absmax=s2.absmax, code=s2.code, blocksize=s2.blocksize, dtype=s2.dtype)
        return BnbQuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.code,
                             blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype,
                             offset=self.offset, state2=state2)  # fmt: skip

    # transformers' checkpoint keys ------------------------------------------------------------------------

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The state as transformers and bitsandbytes save it next to ``weight`` (keys without the
        ``weight.`` prefix): ``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map`` and
        ``quant_state.bitsandbytes__<type>`` (uint8 JSON of the non-tensor fields, in bitsandbytes' order)."""
        fields: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        if self.nested:
            tensors |= {"nested_absmax": self.state2.absmax, "nested_quant_map": self.state2.code.clone()}
            fields |= {
                "nested_blocksize": self.state2.blocksize,
                "nested_dtype": _dtype_name(self.state2.dtype),
                "nested_offset": float(self.offset),
            }
        blob = torch.tensor(list(json.dumps(fields).encode("utf-8")), dtype=torch.uint8)
        return tensors | {f"quant_state.bitsandbytes__{self.quant_type}": blob}

    @classmethod
    def from_dict(cls, items: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> QuantState:
        """Read :meth:`as_dict`'s keys (the ``weight.`` prefix already stripped), as a transformers checkpoint
        holds them. ValueError naming what is missing or malformed."""
        blobs = [k for k in items if k.startswith("quant_state.bitsandbytes__")]
        if len(blobs) != 1:
            raise ValueError(f"a 4-bit state needs exactly one 'quant_state.bitsandbytes__<nf4|fp4>' key, "
                             f"found {blobs or 'none'} among {sorted(items)}")  # fmt: skip
        try:
            fields = json.loads(bytes(items[blobs[0]].cpu().tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{blobs[0]} does not hold bitsandbytes' JSON: {exc}") from exc
        for key in ("absmax", "quant_map"):
            if key not in items:
                raise ValueError(f"the 4-bit state has no {key!r} key (found {sorted(items)})")
        device = items["absmax"].device if device is None else device
        nested = None
        offset = None
        if "nested_absmax" in items:
            if "nested_quant_map" not in items or "nested_offset" not in fields:
                raise ValueError("a double-quantized state needs nested_quant_map and nested_offset too")
            nested = cls(items["nested_absmax"].to(device), None, items["nested_quant_map"].to(device),
                         int(fields.get("nested_blocksize", NESTED_BLOCKSIZE)), None,
                         _dtype_from_name(fields.get("nested_dtype", "float32")))  # fmt: skip
            offset = torch.tensor(float(fields["nested_offset"]), dtype=torch.float32, device=device)
        return cls(items["absmax"].to(device), torch.Size(fields["shape"]), items["quant_map"].to(device),
                   int(fields["blocksize"]), fields["quant_type"], _dtype_from_name(fields["dtype"]), offset,
                   nested)  # fmt: skip


def restore_bnb_layout(param: Any) -> None:
    """Put a bitsandbytes ``Params4bit`` back in the standard layout, in place, if bitsandbytes' CPU inference
    (AVX-512 bf16) repacked it into its private one on an eval forward; as bitsandbytes does before saving (absmax
    stays as that repacking rounded it, to bf16). A no-op for a parameter in the standard layout."""
    state = getattr(param, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        param.data, param.quant_state = _convert_weight_packed_for_cpu_inverse(param.data, state)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"the 4-bit state names an unknown dtype {name!r}")
    return dtype


def check_quant_state(packed: torch.Tensor, state: QuantState) -> None:
    """TypeError/ValueError naming the field unless ``state`` describes the 4-bit bytes ``packed``: type,
    blocksize, shape, dtype, absmax's length and dtype, the code, and the nested state."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a fastpeft QuantState (QuantState.from_bnb converts bitsandbytes'), "
                        f"got {type(state).__name__}")  # fmt: skip
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be the 4-bit weight's byte tensor, got {getattr(packed, 'dtype', packed)}")
    check_quant_type(state.quant_type)
    check_blocksize("state.blocksize", state.blocksize)
    if state.shape is None or len(state.shape) != 2 or min(state.shape) < 1:
        raise ValueError(f"state.shape must be a 2-D weight shape [out_features, in_features], got {state.shape}")
    if state.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"state.dtype must be float16, bfloat16 or float32, got {state.dtype}")
    nbytes = packed.numel() * packed.element_size()
    if nbytes != (state.numel + 1) // 2:
        raise ValueError(f"packed holds {nbytes} bytes but state.shape {tuple(state.shape)} needs "
                         f"{(state.numel + 1) // 2}")  # fmt: skip
    if state.code.dtype != torch.float32 or state.code.numel() != 16:
        raise ValueError(f"state.code must be fp32 [16], got {state.code.dtype} {tuple(state.code.shape)}")
    expected_absmax = torch.uint8 if state.nested else torch.float32
    if state.absmax.dtype != expected_absmax or state.absmax.numel() != state.num_blocks:
        raise ValueError(f"state.absmax must be {expected_absmax} [{state.num_blocks}] (blocksize "
                         f"{state.blocksize}), got {state.absmax.dtype} {tuple(state.absmax.shape)}")  # fmt: skip
    tensors = {"packed": packed, "state.absmax": state.absmax, "state.code": state.code}
    if state.nested:
        nested = state.state2
        check_blocksize("state.state2.blocksize", nested.blocksize)
        blocks2 = -(-state.num_blocks // nested.blocksize)
        if nested.absmax.dtype != torch.float32 or nested.absmax.numel() != blocks2:
            raise ValueError(f"state.state2.absmax must be fp32 [{blocks2}], got {nested.absmax.dtype} "
                             f"{tuple(nested.absmax.shape)}")  # fmt: skip
        if nested.code.dtype != torch.float32 or nested.code.numel() != 256:
            raise ValueError("state.state2.code must be fp32 [256]")
        if state.offset is None or state.offset.numel() != 1 or state.offset.dtype != torch.float32:
            raise ValueError("a nested state needs offset, an fp32 scalar tensor")
        tensors |= {
            "state.state2.absmax": nested.absmax,
            "state.state2.code": nested.code,
            "state.offset": state.offset,
        }
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"the 4-bit weight and its state must be on one device, got {devices}")


# ----------------------------------------------------------------------------------------------------------
# Quantize and dequantize
# ----------------------------------------------------------------------------------------------------------


def _nearest(scaled: torch.Tensor, sorted_code: torch.Tensor) -> torch.Tensor:
    """Index into ``sorted_code`` of the nearest value (a tie goes to the lower one, as bitsandbytes)."""
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 [blocks]: max |x| over each run of blocksize elements (the last block may be short)."""
    pad = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, blocksize).amax(dim=1)


def _scaled(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``flat / absmax`` per block, rounded as bitsandbytes rounds it: full blocks multiply by the fp32
    reciprocal, a short last block divides (the two differ in the last bit, which moves values at ties)."""
    absmax = absmax.clamp(min=1e-38)
    full = flat.numel() // blocksize * blocksize
    head = flat[:full].view(-1, blocksize) * (1.0 / absmax[: full // blocksize, None])
    scaled = torch.cat((head.reshape(-1), flat[full:] / absmax[-1])) if full < flat.numel() else head.reshape(-1)
    return torch.clamp(scaled, -1, 1)


def _quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantState]:
    """Double quantization: (uint8 [blocks], offset, the nested state)."""
    offset = absmax.mean()
    centred = absmax - offset
    absmax2 = _blockwise_absmax(centred, NESTED_BLOCKSIZE)
    code2 = dynamic_code(absmax.device)
    q = _nearest(_scaled(centred, absmax2, NESTED_BLOCKSIZE), code2).to(torch.uint8)
    return q, offset, QuantState(absmax2, None, code2, NESTED_BLOCKSIZE, None, torch.float32)


def quantize_4bit(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``weight`` as bitsandbytes' ``quantize_4bit`` does, byte for byte.

    Args:
        weight: [N, K] float16/bfloat16/float32 (any strides, any device).
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: elements per absmax: 32, 64, 128, ..., 4096.
        double_quant: quantize the absmax vector too (bitsandbytes' ``compress_statistics``, transformers'
            ``bnb_4bit_use_double_quant``).
        quant_storage: the dtype the bytes are viewed as (uint8 unless a framework asks for another).

    Returns ``(packed, state)``: packed [ceil(N*K/2), 1] of ``quant_storage`` (element 2i in the high nibble
    of byte i) and its :class:`QuantState`.
    """
    if not isinstance(weight, torch.Tensor) or weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight must be a float16, bfloat16 or float32 tensor, got {getattr(weight, 'dtype', weight)}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(
            f"weight must be a non-empty 2-D [out_features, in_features] tensor, got {tuple(weight.shape)}"
        )
    check_quant_type(quant_type)
    check_blocksize("blocksize", blocksize)
    flat = weight.reshape(-1).float()
    absmax = _blockwise_absmax(flat, blocksize)
    code = code_4bit(quant_type, weight.device)
    order = torch.argsort(code)  # NF4 is sorted; FP4's indices are not in value order
    scaled = _scaled(flat, absmax, blocksize)
    if scaled.numel() % 2:  # the last byte's low nibble holds the code of 0.0, as in bitsandbytes
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = order[_nearest(scaled, code[order])].to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.view(-1).view(quant_storage).unsqueeze(1)
    state = QuantState(absmax, torch.Size(weight.shape), code, blocksize, quant_type, weight.dtype)
    if double_quant:
        q_absmax, offset, nested = _quantize_absmax(absmax)
        state = dataclasses.replace(state, absmax=q_absmax, offset=offset, state2=nested)
    return packed, state


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int) -> torch.Tensor:
    """fp32 ``values[i] * absmax[i // blocksize]`` for the first ``numel`` of ``values`` (a temporary, scaled in
    place; it holds at least ``numel`` and at most ``absmax.numel() * blocksize``). One broadcast multiply over
    [blocks, blocksize]: no per-element copy of the scales."""
    pad = absmax.numel() * blocksize - values.numel()
    blocks = torch.nn.functional.pad(values, (0, pad)) if pad else values
    return blocks.view(-1, blocksize).mul_(absmax[:, None]).view(-1)[:numel]


class _CodeInfo(NamedTuple):
    byte_pairs: torch.Tensor  # int64 [256]: entry b holds the fp32 pair (code[b >> 4], code[b & 15])
    quant_type: str | None  # "nf4" / "fp4" when the code is bitsandbytes' own, else None


# id(code) -> (a weak reference to code, its version, what it decodes): a model's layers share few codes.
_CODE_INFO: dict[int, tuple[weakref.ref, int, _CodeInfo]] = {}


def _code_info(code: torch.Tensor) -> _CodeInfo:
    """The byte-pair table of a 16-value code, and which of bitsandbytes' codes it is. Built once per code
    tensor (again if it is modified in place; every call for an inference tensor, which has no version)."""
    cached = None if code.is_inference() else _CODE_INFO.get(id(code))
    if cached is not None and cached[0]() is code and cached[1] == code._version:
        return cached[2]
    pairs = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1)  # [256, 2] fp32
    cpu = code.cpu()
    known = [name for name in QUANT_TYPES if torch.equal(cpu, _code_cpu(name))]
    info = _CodeInfo(pairs.view(torch.int64).reshape(256), known[0] if known else None)
    if not code.is_inference():
        for key in [key for key, (ref, _, _) in _CODE_INFO.items() if ref() is None]:
            del _CODE_INFO[key]
        _CODE_INFO[id(code)] = (weakref.ref(code), code._version, info)
    return info


def _dequantize_bnb_cpu(packed: torch.Tensor, state: QuantState) -> torch.Tensor | None:
    """bitsandbytes' own C++ dequantization where it gives the format's values (tests check it bit for bit):
    on a CPU, with bitsandbytes already imported (a model it quantized), for its NF4/FP4 code, when no block
    straddles two rows (its kernel walks the blocks row by row) and rows are whole bytes. Else None. About
    2.5x faster there than the lookup below, which is what a 4-bit layer on a CPU spends its time on."""
    if packed.device.type != "cpu" or "bitsandbytes" not in sys.modules:
        return None
    in_features = state.shape[1]
    if in_features % state.blocksize or in_features % 2:
        return None
    quant_type = _code_info(state.code).quant_type
    op = getattr(getattr(torch.ops, "bitsandbytes", None), "dequantize_4bit", None)
    if quant_type is None or op is None:
        return None
    absmax = state.absmax
    if state.nested:  # its 8-bit kernel decodes the nested absmax the same way: code2[q] * absmax2, then + offset
        nested = state.state2
        absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, nested.absmax, nested.code, nested.blocksize,
                                                             torch.float32) + state.offset  # fmt: skip
    data = packed.reshape(-1).view(torch.uint8)
    return op(data, absmax, state.blocksize, quant_type, list(state.shape), state.dtype)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight [N, K] that ``packed`` and ``state`` encode: ``code[q] * absmax`` in fp32, rounded to
    ``state.dtype`` (bitsandbytes' values exactly), then to ``dtype`` when given."""
    check_quant_state(packed, state)
    return dequantize_checked(packed, state, dtype)


def dequantize_checked(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`dequantize_4bit` for a state already checked against ``packed`` (the ops' torch backend, per
    call)."""
    weight = _dequantize_bnb_cpu(packed, state)
    if weight is None:
        weight = dequantize_lookup(packed, state)
    return weight if dtype is None else weight.to(dtype)


def dequantize_lookup(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """fastpeft's own dequantization in PyTorch, on any device: one 8-byte lookup per byte (both nibbles'
    code values), then one broadcast multiply by the blocks' absmax. W [N, K] in state.dtype."""
    data = packed.reshape(-1).view(torch.uint8)
    values = torch.index_select(_code_info(state.code).byte_pairs, 0, data.int()).view(torch.float32)
    weight = _scale_blocks(values, state.block_absmax(), state.blocksize, state.numel)  # [2 * bytes] -> [N * K]
    return weight.view(state.shape).to(state.dtype)
