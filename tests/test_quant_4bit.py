"""bitsandbytes' 4-bit format: packing byte for byte against bitsandbytes (CPU), dequantization against the
format's definition in float64, states, checkpoint keys and bad input."""

from __future__ import annotations

import pytest
import torch

from fastpeft.ops.quant_4bit import (
    BLOCKSIZES,
    FP4_CODE,
    NF4_CODE,
    QuantState,
    _dequantize_bnb_cpu,
    code_4bit,
    dequantize_4bit,
    dequantize_lookup,
    dynamic_code,
    quantize_4bit,
)

bnb_functional = pytest.importorskip("bitsandbytes.functional")

# Odd element counts, K not a multiple of the block, one row shorter than a block, N odd.
SHAPES = [(33, 70), (7, 129), (64, 256), (5, 3), (1, 4100)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, 0] = 0.0  # an exact zero, and a block whose absmax sits far above the rest
    w.view(-1)[min(w.numel() - 1, 37)] = 0.9
    return w.to(dtype)


def definition(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """The format as nf4.md states it, element by element in float64 (fp32 product, rounded to the dtype)."""
    n = state.numel
    data = packed.reshape(-1).view(torch.uint8).long()
    q = torch.stack((data >> 4, data & 15), dim=1).reshape(-1)[:n]
    if state.nested:
        s2 = state.state2
        idx = torch.arange(state.absmax.numel())
        absmax = (s2.code[state.absmax.long()] * s2.absmax[idx // s2.blocksize]) + state.offset
    else:
        absmax = state.absmax
    values = state.code[q] * absmax[torch.arange(n) // state.blocksize]
    return values.to(state.dtype).view(state.shape)


def test_code_tables_are_bitsandbytes():
    for quant_type, table in (("nf4", NF4_CODE), ("fp4", FP4_CODE)):
        assert torch.equal(code_4bit(quant_type), bnb_functional.get_4bit_type(quant_type, device="cpu")), quant_type
        assert torch.equal(code_4bit(quant_type), torch.tensor(table, dtype=torch.float32))
    assert torch.equal(dynamic_code(), bnb_functional.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_packing_is_byte_identical_to_bitsandbytes(quant_type, blocksize):
    for shape in SHAPES:
        for dtype in DTYPES:
            w = weight(shape, dtype, seed=blocksize)
            ours, state = quantize_4bit(w, quant_type, blocksize)
            theirs, bnb_state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
            what = f"{quant_type} blocksize {blocksize} {shape} {dtype}"
            assert ours.dtype == torch.uint8 and ours.shape == theirs.shape, what
            assert torch.equal(ours, theirs), what
            assert torch.equal(state.absmax, bnb_state.absmax), what
            assert (state.shape, state.dtype, state.blocksize) == (bnb_state.shape, dtype, blocksize), what


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_double_quantization_matches_bitsandbytes(quant_type, blocksize):
    """The 4-bit bytes, the nested absmax and the offset are bitsandbytes' exactly. The 8-bit codes of absmax
    are the exactly nearest ones: bitsandbytes' CPU and CUDA searches differ from each other and from nearest
    at a few values within one fp32 step of a midpoint, so there they may differ by one code."""
    w = weight((300, 520), torch.float32, seed=blocksize)
    ours, state = quantize_4bit(w, quant_type, blocksize, double_quant=True)
    theirs, bnb_state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                     compress_statistics=True)  # fmt: skip
    assert torch.equal(ours, theirs)
    assert state.nested and state.absmax.dtype == torch.uint8
    assert torch.equal(state.offset, bnb_state.offset)
    assert torch.equal(state.state2.absmax, bnb_state.state2.absmax)
    assert torch.equal(state.state2.code, bnb_state.state2.code)
    differ = (state.absmax.long() - bnb_state.absmax.long()).abs()
    assert differ.max() <= 1 and (differ > 0).float().mean() < 0.01


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_follows_the_format(quant_type, double_quant):
    for blocksize in (32, 64, 128, 4096):
        for shape in SHAPES:
            for dtype in DTYPES:
                packed, state = quantize_4bit(weight(shape, dtype), quant_type, blocksize, double_quant)
                out = dequantize_4bit(packed, state)
                assert out.dtype == dtype and out.shape == shape
                assert torch.equal(out, definition(packed, state)), (blocksize, shape, dtype)
                assert torch.equal(dequantize_4bit(packed, state, torch.float64), out.double())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_both_cpu_dequantizations_give_the_format(quant_type, double_quant):
    """fastpeft's lookup everywhere, and bitsandbytes' C++ kernel (which dequantize_4bit takes on a CPU once
    bitsandbytes is imported) where it applies: rows of whole blocks. Both are the definition, bit for bit."""
    used_bnb = 0
    for blocksize in (32, 64, 128):
        for shape in [*SHAPES, (24, 384)]:
            for dtype in DTYPES:
                packed, state = quantize_4bit(weight(shape, dtype, seed=5), quant_type, blocksize, double_quant)
                expected = definition(packed, state)
                assert torch.equal(dequantize_lookup(packed, state), expected), (blocksize, shape, dtype)
                fast = _dequantize_bnb_cpu(packed, state)
                assert (fast is not None) == (shape[1] % blocksize == 0), (blocksize, shape)
                if fast is not None:
                    used_bnb += 1
                    assert torch.equal(fast, expected), (blocksize, shape, dtype)
    assert used_bnb >= 6


def test_a_code_changed_in_place_is_read_again():
    """The byte-pair table is cached per code tensor: an in-place change (a new version) rebuilds it."""
    packed, state = quantize_4bit(weight((8, 64), torch.float32), "nf4", 64)
    before = dequantize_lookup(packed, state)
    state.code.mul_(2)
    assert torch.equal(dequantize_lookup(packed, state), before * 2)
    assert _dequantize_bnb_cpu(packed, state) is None  # no longer bitsandbytes' code: the lookup decodes it


@pytest.mark.parametrize("double_quant", [False, True])
def test_weights_quantized_by_bitsandbytes_dequantize_to_its_values(double_quant):
    """Read bitsandbytes' own state. Blocks that straddle rows are compared with the definition only: bitsandbytes'
    CPU dequantization kernel (AVX-512) disagrees with its own reference implementation there."""
    for quant_type in ("nf4", "fp4"):
        for blocksize in (32, 64, 128, 256, 512):
            for dtype in DTYPES:
                w = weight((48, 256), dtype, seed=3)
                packed, bnb_state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                                 compress_statistics=double_quant)  # fmt: skip
                state = QuantState.from_bnb(bnb_state)
                ours = dequantize_4bit(packed, state)
                assert torch.equal(ours, definition(packed, state))
                if w.shape[1] % blocksize == 0:
                    assert torch.equal(ours, bnb_functional.dequantize_4bit(packed, bnb_state)), (quant_type, blocksize)


def test_quant_storage_views_the_same_bytes():
    w = weight((16, 64), torch.bfloat16)
    packed, state = quantize_4bit(w, quant_storage=torch.bfloat16)
    bytes_, _ = quantize_4bit(w)
    assert packed.dtype == torch.bfloat16 and torch.equal(packed.view(torch.uint8).reshape(-1), bytes_.reshape(-1))
    assert torch.equal(dequantize_4bit(packed, state), dequantize_4bit(bytes_, state))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_checkpoint_keys_are_bitsandbytes(quant_type, double_quant):
    w = weight((24, 128), torch.bfloat16)
    packed, state = quantize_4bit(w, quant_type, 64, double_quant)
    bnb_items = state.to_bnb().as_dict(packed=True)
    items = state.as_dict()
    assert set(items) == set(bnb_items)
    for key, value in bnb_items.items():
        assert torch.equal(items[key], value), key  # the JSON blob byte for byte, too
    back = QuantState.from_dict(items)
    assert torch.equal(dequantize_4bit(packed, back), dequantize_4bit(packed, state))
    from_bnb_dict = bnb_functional.QuantState.from_dict(dict(items), device=torch.device("cpu"))
    assert torch.equal(bnb_functional.dequantize_4bit(packed, from_bnb_dict), dequantize_4bit(packed, state))


def test_state_round_trips_through_bitsandbytes():
    packed, state = quantize_4bit(weight((8, 64), torch.float16), "fp4", 32, True)
    back = QuantState.from_bnb(state.to_bnb())
    assert back.quant_type == "fp4" and back.blocksize == 32 and back.nested and back.dtype == torch.float16
    assert torch.equal(dequantize_4bit(packed, back), dequantize_4bit(packed, state))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda s: setattr(s, "shape", torch.Size([9, 64])), ValueError, "bytes"),
        (lambda s: setattr(s, "shape", torch.Size([512])), ValueError, "state.shape"),
        (lambda s: setattr(s, "blocksize", 48), ValueError, "state.blocksize"),
        (lambda s: setattr(s, "blocksize", 32), ValueError, "state.absmax"),
        (lambda s: setattr(s, "dtype", torch.int8), TypeError, "state.dtype"),
        (lambda s: setattr(s, "quant_type", "int4"), ValueError, "quant_type"),
        (lambda s: setattr(s, "absmax", s.absmax.half()), ValueError, "state.absmax"),
        (lambda s: setattr(s, "code", s.code[:8]), ValueError, "state.code"),
    ],
)
def test_bad_states_are_refused(change, error, match):
    packed, state = quantize_4bit(weight((8, 64), torch.float32))
    change(state)
    with pytest.raises(error, match=match):
        dequantize_4bit(packed, state)


def test_bad_quantize_arguments():
    w = weight((8, 64), torch.float32)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(w, blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(w, "int4")
    with pytest.raises(TypeError, match="weight"):
        quantize_4bit(w.to(torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_4bit(w.reshape(-1))
    with pytest.raises(ValueError, match="quant_state"):
        QuantState.from_dict({"absmax": torch.ones(8)})
    with pytest.raises(TypeError, match="QuantState"):
        dequantize_4bit(quantize_4bit(w)[0], object())
