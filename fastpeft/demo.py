"""``fastpeft demo``: a small Llama (random weights, built from a config, nothing downloaded) whose projections
are wrapped in LoRALinear with random B; its logits through the fused op against the unfused PEFT math, and
the time of both on the device present.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft.modules.lora import LoRALinear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DemoResult:
    device: str
    dtype: torch.dtype
    lora_layers: int
    rel_error_fused: float  # ||fused - float64 reference|| / ||reference||
    rel_error_unfused: float  # the same for the unfused path in the model's dtype
    fused_ms: float
    unfused_ms: float

    @property
    def passed(self) -> bool:
        return self.rel_error_fused <= 2 * self.rel_error_unfused + 1e-6


def build_model(hidden: int = 256, layers: int = 2, vocab: int = 512, r: int = 16) -> nn.Module:
    """A small LlamaForCausalLM (random weights) with LoRALinear on every projection, B random."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,  # deliberately not a multiple of 16
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in PROJECTIONS:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    lora = LoRALinear(getattr(parent, name), r=r, lora_alpha=2 * r)
                    nn.init.normal_(lora.lora_B, std=0.02)  # B = 0 would test nothing
                    setattr(parent, name, lora)
    return model.eval()


def _unfused_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """PEFT's math: base layer, then the LoRA branch as two more linears, a scale and an add."""
    lora = nn.functional.linear(nn.functional.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
    return self.base_layer(x) + lora * self.scaling


@contextlib.contextmanager
def unfused(model: nn.Module) -> Iterator[None]:
    """Within the block, every LoRALinear of ``model`` computes the unfused PEFT way."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.forward = types.MethodType(_unfused_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _time_ms(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up: compilation, autotuning
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@torch.no_grad()
def run_demo(device: str | None = None, steps: int = 10, batch: int = 4, seq: int = 64) -> DemoResult:
    """Build the model, compare fused and unfused logits with a float64 reference, time both, print a table."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_model()
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq))
    with unfused(model):
        reference = model.double()(tokens).logits  # the float64 reference, before rounding the weights
    model = model.to(device=device, dtype=dtype)
    tokens = tokens.to(device)

    fused_logits = model(tokens).logits
    with unfused(model):
        unfused_logits = model(tokens).logits
        unfused_ms = _time_ms(lambda: model(tokens), steps, device)
    fused_ms = _time_ms(lambda: model(tokens), steps, device)
    result = DemoResult(
        device=str(device),
        dtype=dtype,
        lora_layers=sum(isinstance(m, LoRALinear) for m in model.modules()),
        rel_error_fused=_rel_error(fused_logits.cpu(), reference),
        rel_error_unfused=_rel_error(unfused_logits.cpu(), reference),
        fused_ms=fused_ms,
        unfused_ms=unfused_ms,
    )
    print(f"fastpeft demo: Llama ({result.lora_layers} LoRA layers), batch {batch} x {seq} tokens, "
          f"{device} {str(dtype).removeprefix('torch.')}")  # fmt: skip
    print(f"  {'path':<8} {'rel. error vs float64':>22} {'forward ms':>11}")
    print(f"  {'fused':<8} {result.rel_error_fused:>22.3e} {fused_ms:>11.3f}")
    print(f"  {'unfused':<8} {result.rel_error_unfused:>22.3e} {unfused_ms:>11.3f}")
    verdict = "PASS" if result.passed else "FAIL"
    print(f"  {verdict}: fused error within 2x of the unfused path's (speed: {unfused_ms / fused_ms:.2f}x)")
    if device.type == "cpu":
        print("  (CPU: the torch backend runs; speed-ups need a GPU, see benchmarks/)")
    return result
