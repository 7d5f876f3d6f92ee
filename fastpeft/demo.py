"""``fastpeft demo``: what fastpeft does to a model, on the device present, as one table.

A small Llama built from a config (random weights, nothing downloaded; ``--model PATH`` loads a local
transformers checkpoint instead) runs four scenarios, each first as users run it today and then patched by
fastpeft, with the largest difference between the two logits and the time of both:

    LoRA           PEFT, three adapters of ranks 8, 16 and 32, one active      patch_peft_model
    mixed batch    the same model, one adapter per sample (PEFT's adapter_names, the base model for one)
    QLoRA          the base loaded in 4 bits by transformers + bitsandbytes (NF4, double quantization), PEFT
                   LoRA on top (skipped without bitsandbytes)                    patch_peft_model
    bottleneck     AdapterHub's seq_bn (Pfeiffer) adapters in every block; "before" is the unfused PyTorch
                   composition AdapterHub computes                               add_bottleneck_adapters

Every LoRA B and bottleneck up-projection is random: at PEFT's zero initialisation the adapters would add
nothing and the comparison would test nothing.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastpeft.backends import use_backend

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: rank. Names that are no substring of PEFT's "lora_" prefix (PEFT warns about "a").
ADAPTERS = {"task8": 8, "task16": 16, "task32": 32}
# The largest relative difference from the unpatched model's logits a scenario may show, per dtype: fp32 is
# summation order only; 16-bit logits of a model carry the rounding of every layer.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}
ROUNDS = 3  # alternating timing rounds of the unpatched and the patched model


class DemoError(ValueError):
    """Bad input to the demo (a --model path that is not a checkpoint, an unknown device): one line."""


@dataclass
class Scenario:
    """One row of the demo's table."""

    name: str
    layers: int  # layers fastpeft runs
    max_abs_diff: float  # max |fastpeft - before| over the logits
    rel_diff: float  # ||fastpeft - before|| / ||before||
    before_ms: float
    fastpeft_ms: float
    tolerance: float
    skipped: str = ""  # why the scenario did not run
    round_speedups: tuple[float, ...] = ()  # before / fastpeft per timing round: how much the machine's load moves it

    @property
    def passed(self) -> bool:
        return bool(self.skipped) or (self.layers > 0 and self.rel_diff <= self.tolerance)


@dataclass
class DemoResult:
    """The demo's rows and where they ran."""

    device: str
    dtype: torch.dtype
    scenarios: list[Scenario]

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.scenarios)


def _time_ms(fn: Callable[[], object], steps: int, device: torch.device) -> float:
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


def tiny_llama_checkpoint(path: Path, hidden: int = 256, layers: int = 2, vocab: int = 512) -> Path:
    """Save a small random LlamaForCausalLM at ``path`` (in_features are multiples of 64, bitsandbytes'
    blocksize: its CPU dequantization is wrong when blocks straddle rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    intermediate = (hidden * 11 // 4 + 63) // 64 * 64
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def check_checkpoint(path: str | Path) -> Path:
    """``path`` as a Path when it is a local transformers checkpoint (a folder with config.json), else DemoError."""
    path = Path(path)
    if not path.is_dir():
        raise DemoError(f"--model {path}: no such folder")
    if not (path / "config.json").is_file():
        raise DemoError(f"--model {path}: not a transformers checkpoint (no config.json)")
    return path


def _vocab_size(path: Path) -> int:
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(path).vocab_size)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise DemoError(f"--model {path}: transformers cannot read its config ({type(exc).__name__})") from None


def load_model(path: Path, device: torch.device, dtype: torch.dtype, **kwargs) -> nn.Module:
    """The causal LM at ``path`` on ``device`` in ``dtype``, in eval mode; DemoError when transformers cannot
    load it."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device), **kwargs)
    except TypeError:  # transformers 4.x names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, device_map=str(device), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise DemoError(f"--model {path}: transformers cannot load it ({type(exc).__name__}: {exc})") from None
    return model.eval()


def _randomize(model: nn.Module, markers: tuple[str, ...], std: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(marker in name for marker in markers):
                param.normal_(std=std)


def with_lora(base: nn.Module) -> nn.Module:
    """PEFT LoRA adapters task8, task16, task32 (ranks 8, 16, 32) on every projection of ``base``, B random,
    task8 active."""
    import peft

    targets = [t for t in LORA_TARGETS if any(n.endswith(t) for n, _ in base.named_modules())]
    model = None
    for name, rank in ADAPTERS.items():
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    _randomize(model, ("lora_B",), 0.02)
    model.set_adapter("task8")
    return model.eval()


def _compare(name, run, fused, device, dtype, steps, unfused=None) -> Scenario:
    """Logits and time of ``run()`` under ``unfused()`` (a context; none by default), then under ``fused()`` (a
    context giving the number of layers fastpeft runs there). The two are timed in alternating rounds, each
    the median of ``steps`` calls, and the fastest round counts: load on the machine then weighs on both."""
    unfused = unfused or contextlib.nullcontext
    with torch.no_grad():
        with unfused():
            before = run().float()
        with fused() as layers:
            after = run().float()
        before_ms, after_ms = [], []
        for _ in range(ROUNDS):
            with unfused():
                before_ms.append(_time_ms(run, steps, device))
            with fused():
                after_ms.append(_time_ms(run, steps, device))
    diff = after - before
    rounds = tuple(b / a for b, a in zip(before_ms, after_ms, strict=True))
    return Scenario(name, layers, diff.abs().max().item(), (diff.norm() / before.norm()).item(), min(before_ms),
                    min(after_ms), TOLERANCE[dtype], round_speedups=rounds)  # fmt: skip


@contextlib.contextmanager
def peft_patched(model: nn.Module) -> Iterator[int]:
    """Inside the block the PEFT model runs patched by fastpeft (the number of layers it runs is given)."""
    from fastpeft.integrations.peft import patch_peft_model, patched_layer_count, unpatch_peft_model

    patch_peft_model(model)
    try:
        yield patched_layer_count(model)
    finally:
        unpatch_peft_model(model)


def _lora_scenarios(path: Path, tokens, device, dtype, steps) -> list[Scenario]:
    model = with_lora(load_model(path, device, dtype))
    names = [(*ADAPTERS, "__base__")[i % 4] for i in range(tokens.shape[0])]
    return [
        _compare("LoRA (PEFT, 1 of 3 adapters)", lambda: model(tokens).logits, lambda: peft_patched(model), device,
                 dtype, steps),
        _compare("mixed batch (task8, task16, task32, base)", lambda: model(tokens, adapter_names=names).logits,
                 lambda: peft_patched(model), device, dtype, steps),
    ]  # fmt: skip


def qlora_model(path: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The checkpoint loaded in 4 bits by transformers + bitsandbytes (NF4, double quantization, computing in
    ``dtype``), with :func:`with_lora`'s adapters. ImportError without bitsandbytes."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)  # fmt: skip
    base = load_model(path, device, dtype, quantization_config=quantization)
    for module in base.modules():
        # bitsandbytes' CPU inference repacks its weights into a private layout with bf16 scales (lossy): keep
        # the standard layout, whose numbers are those bitsandbytes gives on a GPU.
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return with_lora(base)


def bottleneck_model(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, int]:
    """The checkpoint with AdapterHub's seq_bn adapters (up-projections random) in every block, and the number
    of adapter layers. Unpatched means run with the torch backend forced: the composition AdapterHub computes."""
    from fastpeft.integrations.bottleneck_models import BottleneckLayer, add_bottleneck_adapters

    model = add_bottleneck_adapters(load_model(path, device, dtype), "seq_bn", "task")
    _randomize(model, ("adapter_up",), 0.02)
    return model, sum(isinstance(m, BottleneckLayer) for m in model.modules())


def _qlora_scenario(path: Path, tokens, device, dtype, steps) -> Scenario:
    name = "QLoRA (bitsandbytes NF4 + PEFT)"
    try:
        model = qlora_model(path, device, dtype)
    except ImportError:
        return Scenario(name, 0, 0.0, 0.0, 0.0, 0.0, 0.0, skipped="bitsandbytes not installed")
    return _compare(name, lambda: model(tokens).logits, lambda: peft_patched(model), device, dtype, steps)


def _bottleneck_scenario(path: Path, tokens, device, dtype, steps) -> Scenario:
    model, layers = bottleneck_model(path, device, dtype)
    # before: the composition AdapterHub computes, five PyTorch operations per adapter
    return _compare("bottleneck (seq_bn)", lambda: model(tokens).logits, lambda: contextlib.nullcontext(layers),
                    device, dtype, steps, unfused=lambda: use_backend("torch"))  # fmt: skip


def run_demo(
    device: str | None = None, steps: int = 5, batch: int = 4, seq: int = 64, model: str | Path | None = None
) -> DemoResult:
    """Run the four scenarios on ``device`` (default: cuda when available) and print the table. ``model``: a
    local transformers checkpoint (a folder with config.json); default: a small random Llama."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: no GPU visible to torch")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        path = check_checkpoint(model) if model is not None else tiny_llama_checkpoint(Path(tmp) / "llama")
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, _vocab_size(path), (batch, seq), generator=generator).to(device)
        scenarios = _lora_scenarios(path, tokens, device, dtype, steps)
        scenarios.append(_qlora_scenario(path, tokens, device, dtype, steps))
        scenarios.append(_bottleneck_scenario(path, tokens, device, dtype, steps))
    result = DemoResult(str(device), dtype, scenarios)
    print(format_table(result, path.name if model is not None else "small random Llama", batch, seq))
    return result


def format_table(result: DemoResult, model_name: str, batch: int, seq: int) -> str:
    """The demo's table: per scenario, the layers fastpeft runs, the difference and both times."""
    dtype = str(result.dtype).removeprefix("torch.")
    lines = [f"fastpeft demo: {model_name}, batch {batch} x {seq} tokens, {result.device} {dtype}", "",
             f"| {'scenario':<32} | layers | max abs diff | rel. diff | before ms | fastpeft ms | speed-up | "
             f"rounds      | ok |",
             f"|{'-' * 34}|-------:|-------------:|----------:|----------:|------------:|---------:|-------------|"
             f"----|"]  # fmt: skip
    for s in result.scenarios:
        if s.skipped:
            lines.append(f"| {s.name:<32} | skipped: {s.skipped} |")
            continue
        spread = f"{min(s.round_speedups):.2f}-{max(s.round_speedups):.2f}x" if s.round_speedups else "-"
        lines.append(f"| {s.name:<32} | {s.layers:>6} | {s.max_abs_diff:>12.2e} | {s.rel_diff:>9.2e} | "
                     f"{s.before_ms:>9.2f} | {s.fastpeft_ms:>11.2f} | {s.before_ms / s.fastpeft_ms:>7.2f}x | "
                     f"{spread:<11} | {'yes' if s.passed else 'NO'} |")  # fmt: skip
    lines.append("")
    lines.append(f"speed-up: the fastest of {ROUNDS} alternating rounds each; rounds: the range of the rounds' own "
                 "speed-ups (what the machine's load moves)")  # fmt: skip
    lines.append("PASS: every scenario within its tolerance" if result.passed else "FAIL: see the rows marked NO")
    if result.device == "cpu":
        lines.append("(CPU: fastpeft runs its PyTorch paths; the fused kernels need a GPU: --device cuda)")
    return "\n".join(lines)
