"""Tiny PEFT models built from configs (no downloads), shared by the PEFT integration tests."""

from __future__ import annotations

import copy

import peft
import torch
import transformers
from conftest import DEVICE, rel_error
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 97


def tiny_llama(dtype=torch.float32) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=DEVICE, dtype=dtype)


def randomize_lora_b(model: nn.Module) -> None:
    """PEFT starts B at zero, which would make every LoRA test pass vacuously."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.normal_(std=0.3)


def peft_model(dtype=torch.float32, **config) -> nn.Module:
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "lora_dropout": 0.0, **config}
    model = peft.get_peft_model(tiny_llama(dtype), peft.LoraConfig(**config))
    randomize_lora_b(model)
    return model


def tokens(batch=2, seq=9):
    return torch.randint(0, VOCAB, (batch, seq), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))


def logits(model, ids=None, **kwargs):
    with torch.no_grad():
        return model(ids if ids is not None else tokens(), **kwargs).logits


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training_step(model: nn.Module, reference: nn.Module, tolerance: float = 1e-4) -> None:
    """One loss and backward on both models: equal losses and equal gradients for every trainable parameter."""
    ids = tokens()
    losses = [m.train()(ids, labels=ids).loss for m in (model, reference)]
    for loss in losses:
        loss.backward()
    assert rel_error(losses[0], losses[1]) < tolerance
    grads, ref_grads = trainable_grads(model), trainable_grads(reference)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert grad is not None and ref_grads[name] is not None, name
        assert rel_error(grad, ref_grads[name]) < tolerance, name


def twin(model: nn.Module) -> nn.Module:
    """An independent copy to run PEFT's own forward beside the patched model."""
    return copy.deepcopy(model)
