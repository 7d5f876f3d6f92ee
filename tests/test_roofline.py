"""The cost model (benchmarks/roofline.py): a pass costs the largest of its times plus a launch, the 4-bit model
follows fastpeft's own tier dispatch, every 4-bit target row gets a prediction, and a bench run's rows are put
beside the predictions."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import roofline
import targets

import fastpeft.ops.qlora as qlora_ops

H200 = roofline.H200


def test_a_pass_costs_its_largest_time_plus_a_launch():
    memory = roofline.Pass("copy", bytes=H200.bandwidth * roofline.STREAM_EFFICIENCY)
    assert memory.seconds() == pytest.approx(1.0 + H200.launch_s)
    both = roofline.Pass("gemm", bytes=memory.bytes, flops=2 * H200.tensor_flops)
    assert both.seconds() == pytest.approx(2.0 + H200.launch_s)
    half_wave = roofline.Pass("gemm", 0.0, H200.tensor_flops, ctas=H200.sms + 1)  # a second, nearly empty wave
    assert half_wave.seconds() == pytest.approx(2 * H200.sms / (H200.sms + 1) + H200.launch_s)


def test_the_4bit_model_follows_the_dispatch(monkeypatch):
    n, k = 14336, 4096
    assert roofline.matmul_4bit(1, n, k)[0].name.startswith("Triton")  # GEMV_MAX_M = 0 as shipped
    monkeypatch.setattr(qlora_ops, "GEMV_MAX_M", 1)
    assert roofline.matmul_4bit(1, n, k)[0].name == "CUDA GEMV"
    assert roofline.matmul_4bit(1, n, k, r=16)[-1].name.startswith("Triton")  # the shrink fuses in Triton's tiles
    assert roofline.matmul_4bit(4096, n, k)[0].name == "dequantize once"
    monkeypatch.setattr(qlora_ops, "DEQUANTIZE_ONCE_MIN_M", 8192)
    assert roofline.matmul_4bit(4096, n, k)[0].name.startswith("Triton")


def test_the_dense_4bit_tier_copies_x_only_for_a_wide_output():
    """The dequantize-once tier by fastpeft.ops.qlora.joins_adapter: x copied beside s x A^T for an up-projection's
    forward, the plain LoRA product elsewhere; dx never recomputes a shrink (dy B comes from the dy pass)."""
    up = [p.name for p in roofline.matmul_4bit(4096, 14336, 4096, r=16)]
    assert "[x | s x A^T]" in up and up.count("LoRA shrink") == 1
    square = [p.name for p in roofline.qlora_train(4096, 4096, 4096, 16)]
    assert "[x | s x A^T]" not in square and square.count("LoRA shrink") == 1
    assert square.count("LoRA term, no K loop") == 2  # the forward's and dx's, each before cuBLAS adds into it


def test_the_byte_limit_of_a_4bit_decode():
    # NF4 with double quantization: half a byte per weight plus 1/64 of a byte and the nested fp32 scales.
    n, k = 14336, 4096
    assert roofline.weight_4bit_bytes(n, k) == n * k / 2 + n * k / 64 + 4 * (n * k // 64 // 256)
    dense = roofline.seconds(roofline.bf16_linear(1, n, k))
    assert 3.0 < dense / roofline.seconds(roofline.matmul_4bit(1, n, k)) < 3.9  # TARGETS.md: about 3.9 at most


def test_every_4bit_target_row_is_predicted():
    """At M = 64 on an H200 bitsandbytes dequantizes and calls cuBLAS (its fused MMA tier is not dispatched
    there), so every row against it is modelled."""
    rows = [(t, case, value) for t, case, value in roofline.prediction_rows() if t.bench == "qlora"]
    assert all(value is not None and value > 0 for _, _, value in rows)
    table = roofline.prediction_table()
    assert table[0].startswith("| target |") and len(table) == 2 + len(roofline.prediction_rows())


def test_the_ideal_bounds_every_prediction_and_flags_the_rows_beyond_it():
    """The "best any design" column (fastpeft's op replaced by its compulsory bytes at the copy ceiling and its
    FLOPs at the tensor ceiling) is never worse than the model's prediction for the op as built; a row whose
    bound even the ideal misses is marked beyond any design (PEFT's bitsandbytes layer at M = 4096 takes 1.39x
    the GEMM alone), and one the ideal meets is not."""
    for target, case, value in roofline.prediction_rows():
        if value is None:
            continue
        best = roofline.predict(target, case, best=True)
        assert (best >= value * 0.999) if target.higher_is_better else (best <= value * 1.001), (target.name, case)
    table = "\n".join(roofline.prediction_table())
    assert "over PEFT's bitsandbytes layer | m=4096 4096->14336 | speedup_vs_peft >= 2 | 1.25 | 1.39 |" in table
    row = next(line for line in table.splitlines() if "over PEFT's bitsandbytes layer | m=4096" in line)
    assert row.endswith("| **no**: beyond any design |")
    prefill = next(line for line in table.splitlines() if "prefill (M>=4096)" in line)
    assert prefill.endswith("| **no** |")  # a GEMM of fastpeft's own at cuBLAS's speed could meet it
    (step,) = roofline.ideal("x", 4.3e6, 0.0)
    assert step.seconds() == pytest.approx(1e-6 + roofline.H200.launch_s)  # the copy ceiling itself


def test_compare_puts_measured_beside_predicted():
    target = next(t for t in targets.TARGETS if t.metric == "ratio_vs_bf16")
    case = target.cases[0]
    predicted = roofline.predict(target, case)
    rows = [{**case, "variant": target.variant, "ratio_vs_bf16": predicted * 1.5},
            {**case, "variant": "bf16", "ratio_vs_bf16": 1.0}]  # fmt: skip
    [header, _, line] = roofline.compare(rows)
    assert "measured / predicted" in header
    assert line.endswith(f"| {predicted * 1.5:.2f} | {predicted:.2f} | 1.50 |")


def test_the_command_line_prints_the_table(capsys):
    assert roofline.main([]) == 0
    assert "| matmul_4bit M=4096: vs bf16 cuBLAS |" in capsys.readouterr().out


def test_the_command_line_prints_the_rows_under_another_launch_gap(capsys):
    """--launch-us: the decode "over PEFT" rows (PEFT's four extra launches) grow with the gap; the assumed
    machine is back in place afterwards."""

    def over_peft(argv: list[str]) -> float:
        assert roofline.main(argv) == 0
        lines = capsys.readouterr().out.splitlines()
        row = next(line for line in lines if "over unfused PEFT | m=1 4096->4096" in line)
        return float(row.split("|")[4])

    assert over_peft(["--launch-us", "3"]) > over_peft([]) + 0.3
    assert roofline.H200 is H200


def test_the_command_line_compares_a_results_file(tmp_path, capsys):
    target = next(t for t in targets.TARGETS if t.metric == "ratio_vs_bf16")
    case = target.cases[0]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"machine": {}, "rows": [{**case, "variant": target.variant, "ratio_vs_bf16": 1.2}]}))
    assert roofline.main(["--compare", str(results)]) == 0
    assert f"| {target.name} | {targets.case_label(case)} | 1.20 |" in capsys.readouterr().out


def test_the_lora_model_follows_the_dispatch(monkeypatch):
    from fastpeft.triton_kernels import lora as kernels

    names = [p.name for p in roofline.lora_forward(1, 4096, 4096, 16)]
    assert names == ["Triton decode, shrink in the K loop"]  # one launch: 128 column tiles fill a wave
    names = [p.name for p in roofline.lora_forward(1, 14336, 4096, 16)]
    assert names == ["stream-K decode, shrink in the K loop"]  # 224 would leave 40 SMs idle in the second wave
    assert [p.name for p in roofline.lora_forward(4096, 4096, 4096, 16)] == [
        "LoRA shrink", "LoRA term, no K loop", "cuBLAS GEMM, beta = 1"]  # fmt: skip
    monkeypatch.setattr(kernels, "CUBLAS_ACCUMULATES", False)
    assert [p.name for p in roofline.lora_forward(4096, 4096, 4096, 16)] == [
        "LoRA shrink", "cuBLAS GEMM", "tiles as cuBLAS's epilogue"]  # fmt: skip
    monkeypatch.setattr(kernels, "CUBLAS_BASE_MIN_M", 10**9)
    assert [p.name for p in roofline.lora_forward(4096, 4096, 4096, 16)] == ["LoRA shrink", "Triton prefill tiles"]
    assert roofline.lora_forward(1, 4096, 4096, 64) is None  # the CUDA GEMV's rows are not modelled


def test_the_lora_training_model_reads_dy_once_and_keeps_xa():
    names = [p.name for p in roofline.lora_train(4096, 4096, 4096, 16)]
    assert names.count("LoRA shrink") == 1 and "x A^T again" not in names  # xa kept from the forward
    assert names.count("dy pass: dy B, partial dB") == 1 and "dB" not in names
    assert "x A^T again" in [p.name for p in roofline.lora_train(64, 4096, 4096, 16)]  # decode: xa not kept
    assert "dB" in [p.name for p in roofline.lora_train(16384, 4096, 4096, 64)]  # partials too big: dy read twice


def test_a_decode_tail_costs_what_its_idle_sms_do():
    """224 column tiles on 132 SMs: the busiest SM streams two tiles' share of W, so 85% of the SMs' time is used;
    128 tiles at N = 4096 fit one wave."""
    [tail] = roofline.decode_designs(1, 14336, 4096, 16)["column tiles"]
    assert tail.ctas == 224 and tail.streams
    full = roofline.Pass("even", tail.bytes)
    assert tail.seconds() - H200.launch_s == pytest.approx((full.seconds() - H200.launch_s) * 264 / 224)
    stream_k = roofline.decode_designs(1, 14336, 4096, 16)["stream-K (ships)"][-1]
    assert stream_k.seconds() < tail.seconds() * 0.9


def test_the_64_row_decode_runs_wide_tiles_on_the_stream_k_schedule():
    """At M = 64, N = 4096: 64 tiles 64 wide, each K cut in two halves over 128 programs, so one partial sum per
    tile goes through memory; x's rows are re-read from L2 by 64 tiles, not 128."""
    [decode] = roofline.lora_forward(64, 4096, 4096, 16)
    [column_tiles] = roofline.decode_designs(64, 4096, 4096, 16)["column tiles"]
    assert "stream-K" in decode.name and decode.ctas == 128
    assert decode.l2_bytes < column_tiles.l2_bytes * 0.6
    for tiles, k_iters, programs in [(64, 32, 128), (64, 32, 132), (224, 32, 132), (3, 4, 5)]:
        total = tiles * k_iters
        owners = [next(p for p in range(programs) if i < (p + 1) * total // programs) for i in range(total)]
        cut = sum(len(set(owners[t * k_iters : (t + 1) * k_iters])) - 1 for t in range(tiles))
        assert roofline.stream_k_partial_sums(tiles, k_iters, programs) == cut
    assert roofline.stream_k_partial_sums(64, 32, 128) == 64


def test_the_persistent_kernel_takes_the_shrink_into_its_pass_at_inference():
    """With x A^T in its own pass the persistent kernel needs no shrink launch (A read once more, the shrink's MMA
    in the tiles that find it unpublished): cheaper than the shrink then the kernel; a training forward keeps
    x A^T for its backward, so it runs the shrink first."""
    designs = roofline.prefill_designs(4096, 4096, 4096, 16)
    in_pass = roofline.seconds(designs["persistent kernel, x A^T in its own pass"])
    assert in_pass < roofline.seconds(designs["persistent kernel, adapter as a K step"])
    assert [p.name for p in roofline.lora_forward(4096, 4096, 4096, 16, persistent=True)] == [
        "persistent, x A^T in its pass, adapter in the K loop"
    ]
    kept = roofline.lora_forward(4096, 4096, 4096, 16, persistent=True, keeps_xa=True)
    assert kept[0].name == "LoRA shrink"


def test_every_plain_lora_target_row_is_predicted():
    rows = [(t, case, value) for t, case, value in roofline.prediction_rows() if t.bench == "lora"]
    assert all(value is not None for _t, _case, value in rows)
    designs = roofline.design_table()
    assert designs[0].startswith("| shape | design |") and any("(ships)" in line for line in designs)


def test_dropout_is_read_as_bits_inside_three_passes():
    """With nn.Dropout's mask the step adds the draw and one packing pass, and 1/8 byte per element to the three
    passes that apply it; with Philox's it adds no bytes at all."""
    plain = roofline.lora_train(4096, 4096, 4096, 16)
    torch_mode = roofline.lora_train_dropout(4096, 4096, 4096, 16, "torch")
    philox = roofline.lora_train_dropout(4096, 4096, 4096, 16, "philox")
    extra = sum(p.bytes for p in torch_mode) - sum(p.bytes for p in plain)
    assert extra == pytest.approx(4096 * 4096 * (5 + 1.125 + 3 / 8))
    assert sum(p.bytes for p in philox) == sum(p.bytes for p in plain)
    assert roofline.seconds(philox) < roofline.seconds(torch_mode)


def test_the_bottleneck_forward_model_follows_the_dispatch():
    """bf16 prefill at d = 768 runs the Triton tiles: 64 rows per program, both projections from L2 once per
    tile, x's second read from L2 (two tiles per SM fit in it), ahead of the CUDA clusters; at d = 4096 two tiles
    per SM do not fit, x would come twice from HBM, and the CUDA cluster tiles run: 64 rows over 8 blocks, x
    read once, the projections from L2 once per tile, two blocks per SM, ahead of the Triton tiles."""
    [small] = roofline.bottleneck_forward(8192, 768, 64)
    [large] = roofline.bottleneck_forward(8192, 4096, 64)
    assert small.name == "Triton bottleneck tiles" and small.ctas == 8192 // 64
    assert small.bytes == pytest.approx(4 * 8192 * 768 + 4 * 768 * 64)  # x re-read from L2
    assert large.name == "CUDA bottleneck cluster tiles" and large.ctas == 8192 // 64 * 8 and large.ctas_per_sm == 2
    assert large.bytes == pytest.approx(4 * 8192 * 4096 + 4 * 4096 * 64)  # x once, y once
    assert large.l2_bytes == pytest.approx(4 * 4096 * 64 * 8192 // 64)  # the projections once per 64 rows
    [triton] = roofline.bottleneck_forward(8192, 4096, 64, design="triton")
    assert triton.bytes == pytest.approx(6 * 8192 * 4096 + 4 * 4096 * 64)  # x re-read from HBM
    assert roofline.seconds([large]) < roofline.seconds([triton])
    [clusters] = roofline.bottleneck_forward(8192, 768, 64, design="cuda tiles")
    assert roofline.seconds([clusters]) > roofline.seconds([small])
    rows = [(t, value) for t, case, value in roofline.prediction_rows() if t.bench == "bottleneck"]
    assert all(value is not None for t, value in rows)  # forward, forward + backward, 8 adapters


def test_the_bitsandbytes_model_follows_its_dispatch_on_an_h200():
    """bitsandbytes 0.50 (backends/cuda/ops.py): its fused kernels up to 4 rows always; on sm90 up to 32 rows
    at N = 14336 (224 blocks of 64 columns: one wave of 132 SMs, not two), none past 4 rows at N = 4096 (64
    blocks: under half a wave); the SIMT kernel is modelled, its MMA tier is not."""
    assert roofline.bnb_fused_4bit(1, 14336, 4096) and roofline.bnb_fused_4bit(4, 4096, 4096)
    assert roofline.bnb_fused_4bit(32, 14336, 4096) and not roofline.bnb_fused_4bit(33, 14336, 4096)
    assert not roofline.bnb_fused_4bit(5, 4096, 4096) and roofline.bnb_fused_4bit(64, 3 * 132 * 64, 4096)
    [simt] = roofline.bnb_matmul_4bit(1, 14336, 4096)
    assert simt.name == "bnb SIMT 4-bit GEMM" and roofline.bnb_matmul_4bit(16, 14336, 4096) is None
    dense = roofline.bnb_matmul_4bit(64, 14336, 4096)
    assert [p.name for p in dense] == ["bnb nested absmax", "absmax + offset", "bnb dequantize", "cuBLAS GEMM"]


def test_the_multi_adapter_decode_tiles_start_while_the_shrink_runs():
    """On sm_90 the decode tiles after the grouped shrink are launched programmatically: no launch gap of their
    own (PROGRAMMATIC_AFTER_SHRINK), one launch for the pair."""
    shrink, tiles = roofline.multi_lora_grouped(64, 4096, 4096, 16, 32)
    assert tiles.launch_hidden and not shrink.launch_hidden
    assert tiles.seconds() == pytest.approx(dataclasses.replace(tiles, launch_hidden=False).seconds() - H200.launch_s)


def test_the_bottleneck_backward_model_follows_the_kernels_tiles():
    """The row pass: 64-row tiles (bf16, m = 64), x, dy, dx once plus z and dz; the parameter pass: 64 feature
    tiles at d = 4096, split so that about one wave of programs runs, x and dy read again."""
    _, rows, params, *_ = roofline.bottleneck_backward(8192, 4096, 64)
    assert rows.ctas == 8192 // 64 and rows.bytes == pytest.approx(6 * 8192 * 4096 + 4 * 8192 * 64 + 4 * 4096 * 64)
    assert params.ctas in range(132, 2 * 132) and params.ctas % 64 == 0
    assert params.bytes > 4 * 8192 * 4096
    # The training step: the composition's backward makes about ten passes over [M, d] tensors, the fused two.
    train = roofline.MODELS["bottleneck"]("speedup_vs_torch", {"m": 8192, "d": 4096, "bottleneck": 64,
                                                               "mode": "forward+backward"})  # fmt: skip
    assert 1.5 < train < 3


def test_the_per_adapter_loop_pays_a_host_sync_per_adapter():
    loop = roofline.bottleneck_loop(8192, 4096, 64, 8)
    assert sum(p.fixed_s for p in loop) == pytest.approx(8 * roofline.HOST_SYNC_S)
    assert roofline.seconds(loop) > roofline.seconds(roofline.bottleneck_composition(8192, 4096, 64))


def test_the_multi_adapter_model_follows_the_grouped_kernels():
    """Decode with a batch description: the grouped shrink (each adapter's A once, K split into about two
    programs per SM), then the decode tiles' base GEMM with the grouped expand in its epilogue (no pass over y of
    its own); PEFT's loop: five launches per adapter present."""
    shrink, linear = roofline.multi_lora_grouped(64, 4096, 4096, 16, 32)
    assert shrink.ctas == 32 * 8 and shrink.bytes >= 2 * 32 * 16 * 4096
    assert linear.ctas == 4096 // 32 and linear.bytes >= 2 * 4096 * 4096 + 2 * 32 * 16 * 4096
    assert len(roofline.peft_mixed_batch(64, 4096, 4096, 16, 32)) == 1 + 5 * 32
    rows = [(t, value) for t, case, value in roofline.prediction_rows() if t.bench == "multi_lora"]
    assert rows and all(value is not None for t, value in rows)


def test_the_multi_adapter_persistent_model_is_one_launch_over_x_once():
    """The multi-adapter prefill forced onto the persistent kernel: one pass, x, W and y once and each adapter's
    A and B; 8 segments of 512 tokens give each 128-row block one adapter step, as the single adapter's kernel
    has; by default (the kernel off) the prefill is the tiles and cuBLAS."""
    (fused,) = roofline.multi_lora_prefill(4096, 4096, 4096, 16, 8, persistent=True)
    assert fused.bytes >= 2 * 3 * 4096 * 4096 + 2 * 8 * 16 * 2 * 4096
    assert fused.flops == roofline.persistent_with_shrink(4096, 4096, 4096, 16).flops
    assert roofline.multi_lora_prefill(4096, 4096, 4096, 16, 8) == roofline.multi_lora_tiles(4096, 4096, 4096, 16)
    assert roofline.seconds([fused]) < roofline.seconds(roofline.multi_lora_tiles(4096, 4096, 4096, 16))
    shorter = roofline.multi_lora_persistent_pass(4096, 4096, 4096, 16, 64)  # 64 tokens: two sequences a block
    assert shorter.flops > fused.flops


def test_the_dora_model_reads_dy_and_z_once_in_its_backward():
    names = [p.name for p in roofline.dora_train(4096, 4096, 4096, 16)]
    assert names.count("dz and d magnitude (one pass)") == 1 and "tiles as cuBLAS's epilogue, z kept" in names
    assert roofline.seconds(roofline.peft_dora_train(4096, 4096, 4096, 16)) > roofline.seconds(
        roofline.dora_train(4096, 4096, 4096, 16)
    )
