"""Many adapters on one 4-bit base at decode sizes (fastpeft.ops.multi_lora_4bit): the fused op on every backend
against the float64 per-token computation on the dequantized weight (NF4 and FP4, nested and plain absmax, odd K,
packed slices with one absent, M = 0 and 1, ids without an adapter), the layer's dispatch, MultiLoRALinear on a
Linear4bit, opcheck (the fake implementation), bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close_to_reference
from test_multi_lora import RANKS, ids_for, make, packed_reference, reference

from fastpeft import Linear4bit, MultiLoRALinear
from fastpeft.backends import record_backends
from fastpeft.ops.adapter_pool import AdapterPool
from fastpeft.ops.batch_description import describe_batch
from fastpeft.ops.multi_lora_4bit import multi_lora_linear_4bit, multi_lora_sgmv_linear_4bit
from fastpeft.ops.qlora import Weight4bit
from fastpeft.ops.quant_4bit import dequantize_4bit, quantize_4bit

DTYPES = [torch.float32, torch.bfloat16]


def quantized(weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int = 64):
    """(Weight4bit, W dequantized in float64): the kernel's operand and the reference's."""
    packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant)
    return Weight4bit.from_state(packed, state), dequantize_4bit(packed, state, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant, double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 40), (9, 96, 24), (13, 63, 40), (0, 64, 16)], ids=str)
def test_the_fused_op_matches_the_dequantized_reference(backend, dtype, quant, double_quant, m, k, n):
    """Odd K (63: nibbles straddle bytes across rows) takes the kernel's element-wise K loop."""
    weight, bias, adapters = make(k, n, RANKS, dtype)
    w4, dense = quantized(weight, quant, double_quant, blocksize=64 if k % 64 == 0 else 32)
    pool = AdapterPool.build(adapters)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    ids = ids_for("uniform", m, len(adapters))
    with record_backends() as calls:
        out = multi_lora_sgmv_linear_4bit(x, w4, bias, pool, describe_batch(ids, pool.num_adapters))
    assert out.shape == (m, n) and out.dtype == dtype
    if m:
        assert ("multi_lora_sgmv_linear_4bit", backend) in calls
    as64 = [(a.double(), b.double(), s) for a, b, s in adapters]
    ref = reference(x.double(), dense, bias.double(), as64, ids)
    assert_close_to_reference(out, ref, reference(x, dense.to(dtype), bias, adapters, ids), f"{backend} {quant}")


def test_packed_slices_with_one_absent_on_a_4bit_base(backend):
    k, widths = 32, [32, 16, 16]
    gen = torch.Generator().manual_seed(5)

    def pair(r, width, scale):
        a = (torch.randn(r, k, generator=gen) * k**-0.5).to(DEVICE)
        return a, (torch.randn(width, r, generator=gen) * r**-0.5).to(DEVICE), scale

    packed = [[pair(4, 32, 2.0), pair(4, 16, 2.0), None], [pair(16, 32, 0.5), None, pair(8, 16, 1.5)]]
    pool = AdapterPool.build_packed(packed)
    w4, dense = quantized((torch.randn(sum(widths), k, generator=gen) * k**-0.5).to(DEVICE), "nf4", True)
    x = torch.randn(7, k, generator=gen).to(DEVICE)
    ids = torch.tensor([1, -1, 0, 1, 1, 0, -1], device=DEVICE)
    out = multi_lora_sgmv_linear_4bit(x, w4, None, pool, describe_batch(ids, pool.num_adapters))
    as64 = [[None if p is None else (p[0].double(), p[1].double(), p[2]) for p in slices] for slices in packed]
    ref = packed_reference(x.double(), dense, None, as64, widths, ids)
    assert_close_to_reference(out, ref, packed_reference(x, dense.float(), None, packed, widths, ids))


def test_the_layer_takes_the_fused_op_for_decode_with_a_description_only(backend):
    """A batch description at decode sizes: the fused op; plain ids, or more rows than decode: the 4-bit product
    and then the adapters. The same numbers either way."""
    weight, bias, adapters = make(64, 24, RANKS, torch.float32)
    w4, dense = quantized(weight, "nf4", True)
    pool = AdapterPool.build(adapters)
    for m in (5, 70):
        x = torch.randn(m, 64, device=DEVICE)
        ids = ids_for("zipf", m, len(adapters))
        with record_backends() as calls:
            described = multi_lora_linear_4bit(x, w4, bias, pool, describe_batch(ids, pool.num_adapters))
        fused = ("multi_lora_sgmv_linear_4bit", backend) in calls
        assert fused == (m == 5 and backend != "torch"), calls  # the torch backend's loop groups anyway
        plain = multi_lora_linear_4bit(x, w4, bias, pool, ids)
        torch.testing.assert_close(described, plain, rtol=1e-5, atol=1e-5)
        ref = reference(x.double(), dense, bias.double(), [(a.double(), b.double(), s) for a, b, s in adapters], ids)
        assert_close_to_reference(described, ref, reference(x, dense.float(), bias, adapters, ids))


def test_multi_lora_linear_on_a_4bit_base_with_a_description(backend):
    """MultiLoRALinear on a Linear4bit, given a batch description: the fused op, the layer's own numbers."""
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(64, 24).to(DEVICE), "nf4", 64, True)
    layer = MultiLoRALinear(base)
    for name, r in (("a", 4), ("b", 8)):
        layer.add_adapter(name, torch.randn(r, 64) * 0.3, torch.randn(24, r) * 0.3, 1.5)
    x = torch.randn(6, 64, device=DEVICE)
    ids = torch.tensor([1, -1, 0, 1, 0, 0], device=DEVICE)
    with torch.no_grad():
        fused = layer(x, describe_batch(ids, layer.pool.num_adapters))
        unfused = layer(x, ids)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_argument():
    weight, bias, adapters = make(64, 24, RANKS, torch.float32)
    w4, _ = quantized(weight, "nf4", True)
    pool = AdapterPool.build(adapters)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(TypeError, match="weight must be a Weight4bit"):
        multi_lora_linear_4bit(x, weight, bias, pool, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="pool is 64 features"):
        multi_lora_linear_4bit(x.double(), w4, bias, pool, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    small, _ = quantized(weight[:16], "nf4", True)
    with pytest.raises(ValueError, match="4-bit weight 64 -> 16"):
        multi_lora_linear_4bit(x, small, bias, pool, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(IndexError, match="adapter_ids"):
        multi_lora_linear_4bit(x, w4, bias, pool, torch.tensor([0, 9], device=DEVICE))


def test_opcheck_of_the_4bit_layer_op():
    from fastpeft.ops.multi_lora import grouped_args

    weight, bias, adapters = make(64, 24, [4, 8], torch.float32)
    w4, _ = quantized(weight, "nf4", True)
    pool = AdapterPool.build(adapters)
    x = torch.randn(5, 64, device=DEVICE)
    d = describe_batch(torch.tensor([0, 1, -1, 1, 0], device=DEVICE), 2)
    args = (x, *w4.forward_args(), bias, *grouped_args(pool, d))
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_sgmv_linear_4bit.default, args)
