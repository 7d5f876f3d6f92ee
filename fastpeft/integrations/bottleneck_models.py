"""Bottleneck adapters in transformers models without AdapterHub: ``add_bottleneck_adapters(model, config)``.

AdapterHub's placements, reproduced for BERT/RoBERTa (the sublayer output modules ``*SelfOutput`` and
``*Output``: ``h = dropout(dense(x))`` then ``LayerNorm(h + input)``) and for Llama, Mistral and Qwen2 (decoder
layers ``residual + self_attn(...)`` and ``residual + mlp(...)``, no layer norm after). With h the sublayer's
output, r its input (the residual stream), LN the layer's own norm where it has one, A the adapter:

    seq_bn (Pfeiffer, after the feed-forward block):  BERT  LN(h + r + A(LN(h + r)))        Llama  h + A(h + r) + r
    double_seq_bn (Houlsby, after both blocks):       BERT  LN(h + A(h) + r)                Llama  h + A(h) + r
    par_bn (parallel, the feed-forward block):        BERT  LN(h + A(r) + r)                Llama  h + A(r) + r

The adapters of one placement live in a :class:`BottleneckLayer` at AdapterHub's module path (BERT:
``...attention.output.adapters.<name>`` and ``...output.adapters.<name>``; Llama: ``layers.<i>.attention_adapters
.adapters.<name>`` and ``layers.<i>.output_adapters.adapters.<name>``), so parameter names match AdapterHub's.
One adapter is active at a time, or one per sample with :func:`bottleneck_batch` (one fused launch per
placement for the whole batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from fastpeft.modules.bottleneck import BottleneckAdapter, out_args
from fastpeft.ops.bottleneck import bottleneck_adapter


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    """AdapterHub's bottleneck configuration fields that fastpeft expresses (others must keep their defaults)."""

    mh_adapter: bool
    output_adapter: bool
    reduction_factor: float
    non_linearity: str
    original_ln_before: bool
    is_parallel: bool = False
    scaling: float | str = 1.0
    ln_before: bool = False
    init_weights: str = "bert"

    @classmethod
    def preset(cls, name: str, **changes) -> BottleneckConfig:
        """``"seq_bn"`` (Pfeiffer), ``"double_seq_bn"`` (Houlsby) or ``"par_bn"`` (parallel), AdapterHub's
        defaults, with ``changes`` (e.g. ``reduction_factor=8``)."""
        if name not in _PRESETS:
            raise ValueError(f"config must be one of {sorted(_PRESETS)} or a BottleneckConfig, got {name!r}")
        return dataclasses.replace(_PRESETS[name], **changes)

    @classmethod
    def from_adapterhub(cls, fields: dict) -> BottleneckConfig:
        """From AdapterHub's ``adapter_config.json`` ``config`` dict; ValueError for what fastpeft does not do."""
        unsupported = {"ln_after": False, "use_gating": False, "phm_layer": False, "adapter_residual_before_ln": False,
                       "residual_before_ln": True, "original_ln_after": True, "dropout": 0.0,
                       "stochastic_depth": 0.0, "inv_adapter": None}  # fmt: skip
        for key, default in unsupported.items():
            if key in fields and fields[key] != default:
                raise ValueError(f"bottleneck config {key}={fields[key]!r} is not supported (only {default!r})")
        if isinstance(fields.get("reduction_factor"), dict):
            raise ValueError("a per-layer reduction_factor mapping is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in names})


_PRESETS = {
    "seq_bn": BottleneckConfig(False, True, 16, "relu", original_ln_before=True),
    "double_seq_bn": BottleneckConfig(True, True, 16, "swish", original_ln_before=False),
    "par_bn": BottleneckConfig(
        False, True, 2, "relu", original_ln_before=False, is_parallel=True, scaling=4.0, init_weights="mam_adapter"
    ),
}


class BottleneckLayer(nn.Module):
    """The adapters of one placement (``adapters``: name -> :class:`BottleneckAdapter`) and which runs:
    ``active`` (a name or None) or, inside :func:`bottleneck_batch`, one name per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.batch_names: Sequence[str | None] | None = None
        self._stack_cache: tuple | None = None

    def apply_adapter(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        out_residual: torch.Tensor | None = None,
        out_norm: nn.LayerNorm | None = None,
    ) -> torch.Tensor:
        """``out_norm(residual + A(x) + out_residual)`` for the active adapter(s), without A where none is active
        (out_residual and out_norm optional)."""
        if self.batch_names is not None:
            return self._per_sample(x, residual, out_residual, out_norm)
        if self.active is None or self.active not in self.adapters:
            return _without_adapter(residual, out_residual, out_norm)
        return self.adapters[self.active](x, residual, out_residual, out_norm)

    def _per_sample(self, x, residual, out_residual, out_norm) -> torch.Tensor:
        """One launch per group of the batch's adapters that share activation, bottleneck size and ln_before
        (usually one group): each group adds its adapters on its samples to what the previous groups left, and
        the last applies the add and LayerNorm after the adapter to every sample."""
        names = [n for n in self.adapters if any(b == n for b in self.batch_names)]
        if not names:
            return _without_adapter(residual, out_residual, out_norm)
        groups: dict[tuple, list[str]] = {}
        for n in names:
            m = self.adapters[n]
            groups.setdefault((m.activation, m.adapter_norm_before is None, m.bottleneck_size), []).append(n)
        y = residual
        for i, group in enumerate(groups.values()):
            last = i == len(groups) - 1
            post = (out_residual, out_norm) if last else (None, None)
            y = self._group(x, y, group, *post)
        return y

    def _group(self, x, residual, names: list[str], out_residual, out_norm) -> torch.Tensor:
        """The fused op for the samples whose adapter is in ``names`` (one configuration); others get residual."""
        modules = [self.adapters[n] for n in names]
        first = modules[0]
        index = {n: i for i, n in enumerate(names)}
        ids = torch.tensor([index.get(n, -1) for n in self.batch_names], dtype=torch.int32, device=x.device)

        def stack(get):
            return torch.stack([get(m) for m in modules])

        scalings = [m.scaling for m in modules]
        if all(isinstance(s, float) for s in scalings):
            scaling = torch.tensor(scalings, dtype=x.dtype, device=x.device)[:, None]
        else:
            scaling = torch.stack([s.expand(x.shape[-1]) if isinstance(s, torch.Tensor)
                                   else torch.full((x.shape[-1],), s, dtype=x.dtype, device=x.device)
                                   for s in scalings])  # fmt: skip
        norm = first.adapter_norm_before is not None
        return bottleneck_adapter(
            x, stack(lambda m: m.down.weight), stack(lambda m: m.down.bias), stack(lambda m: m.adapter_up.weight),
            stack(lambda m: m.adapter_up.bias), activation=first.activation, scaling=scaling, residual=residual,
            ln_weight=stack(lambda m: m.adapter_norm_before.weight) if norm else None,
            ln_bias=stack(lambda m: m.adapter_norm_before.bias) if norm else None, adapter_ids=ids,
            **out_args(out_residual, out_norm),
        )  # fmt: skip


def _without_adapter(residual, out_residual, out_norm) -> torch.Tensor:
    y = residual if out_residual is None else residual + out_residual
    return y if out_norm is None else out_norm(y)


def _bert_output_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    """BERT's *SelfOutput / *Output forward with AdapterHub's placement of the layer's adapters."""
    h = self.dropout(self.dense(hidden_states))
    layer, config = self.adapters_layer, self._fastpeft_bottleneck_config
    if not layer.adapters or (layer.active is None and layer.batch_names is None):
        return self.LayerNorm(h + input_tensor)
    # The add of the sublayer's input and the layer's LayerNorm run inside the fused op.
    if config.is_parallel:
        return layer.apply_adapter(input_tensor, h, input_tensor, self.LayerNorm)
    x = self.LayerNorm(h + input_tensor) if config.original_ln_before else h
    return layer.apply_adapter(x, h, input_tensor, self.LayerNorm)


def _capture_input(store: dict, key: str, module: nn.Module, args: tuple) -> None:
    store[key] = args[0]


def _llama_block_hook(layer: BottleneckLayer, config: BottleneckConfig, store: dict, key: str, module, args, output):
    """The block's output h made ``h + A(...)`` (the decoder layer then adds the residual r itself)."""
    h = output[0] if isinstance(output, tuple) else output
    r = store.pop(key)
    if config.is_parallel:
        new = layer.apply_adapter(r, h)
    elif config.original_ln_before:
        new = layer.apply_adapter(h + r, h)
    else:
        new = layer.apply_adapter(h, h)
    return (new, *output[1:]) if isinstance(output, tuple) else new


_BERT_FAMILY = ("Bert", "Roberta")
_LLAMA_FAMILY = ("Llama", "Mistral", "Qwen2")


def _placements(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(kind, module, where) for every sublayer the adapters attach to: kind "bert-attn", "bert-ffn",
    "llama-layer"."""
    for module in model.modules():
        name = type(module).__name__
        if any(name == f"{family}SelfOutput" for family in _BERT_FAMILY):
            yield "bert", module, "mh_adapter"
        elif any(name == f"{family}Output" for family in _BERT_FAMILY) and hasattr(module, "LayerNorm"):
            yield "bert", module, "output_adapter"
        elif any(name == f"{family}DecoderLayer" for family in _LLAMA_FAMILY):
            yield "llama", module, "layer"


def _placement(config: BottleneckConfig) -> tuple[bool, bool]:
    """What decides where an adapter reads and adds (the placement hooks and forwards are built once per model)."""
    return config.is_parallel, config.original_ln_before


def _check_placement(model: nn.Module, config: BottleneckConfig, name: str) -> None:
    """ValueError before anything is attached when ``config`` places adapters differently from the adapters
    already in ``model``: its placements run one configuration's wiring for all their adapters."""
    for _, module, _ in _placements(model):
        placed = module.__dict__.get("_fastpeft_bottleneck_config")
        if placed is not None and _placement(placed) != _placement(config):
            keys = ("is_parallel", "original_ln_before")
            raise ValueError(f"adapter {name!r} is placed as {dict(zip(keys, _placement(config), strict=True))}, the "
                             f"adapters already in the model as {dict(zip(keys, _placement(placed), strict=True))}: "
                             "fastpeft wires one placement per model (e.g. seq_bn and double_seq_bn do not mix); "
                             "adapters of different sizes, activations or scalings under one placement do")  # fmt: skip


def _new_adapter(config: BottleneckConfig, hidden_size: int, like: torch.Tensor) -> BottleneckAdapter:
    return BottleneckAdapter(hidden_size, reduction_factor=config.reduction_factor, activation=config.non_linearity,
                             scaling=config.scaling, ln_before=config.ln_before, init_weights=config.init_weights,
                             device=like.device, dtype=like.dtype)  # fmt: skip


def _attach_llama(layer: nn.Module, config: BottleneckConfig, name: str) -> list[BottleneckLayer]:
    store = layer.__dict__.setdefault("_fastpeft_residuals", {})
    layer.__dict__.setdefault("_fastpeft_bottleneck_config", config)  # the hooks keep the first one's placement
    attached = []
    hidden = layer.self_attn.o_proj.out_features
    like = layer.self_attn.o_proj.weight
    for where, block, norm, wanted in (
        ("attention_adapters", layer.self_attn, layer.input_layernorm, config.mh_adapter),
        ("output_adapters", layer.mlp, layer.post_attention_layernorm, config.output_adapter),
    ):
        if not wanted:
            continue
        if not hasattr(layer, where):
            setattr(layer, where, BottleneckLayer())
            norm.register_forward_pre_hook(functools.partial(_capture_input, store, where))
            block.register_forward_hook(
                functools.partial(_llama_block_hook, getattr(layer, where), config, store, where)
            )
        bl = getattr(layer, where)
        bl.adapters[name] = _new_adapter(config, hidden, like)
        attached.append(bl)
    return attached


def _attach_bert(module: nn.Module, config: BottleneckConfig, name: str, where: str) -> list[BottleneckLayer]:
    if not getattr(config, where):
        return []
    if not hasattr(module, "adapters_layer"):
        module.adapters_layer = BottleneckLayer()
        module.forward = types.MethodType(_bert_output_forward, module)
    module.__dict__.setdefault("_fastpeft_bottleneck_config", config)  # equal placement: _check_placement
    module.adapters_layer.adapters[name] = _new_adapter(config, module.dense.out_features, module.dense.weight)
    return [module.adapters_layer]


def add_bottleneck_adapters(
    model: nn.Module, config: BottleneckConfig | str = "seq_bn", name: str = "default", *, activate: bool = True
) -> nn.Module:
    """Insert bottleneck adapter ``name`` into a transformers BERT, RoBERTa, Llama, Mistral or Qwen2 model (in
    place; returns it), at AdapterHub's placements for ``config`` (a :class:`BottleneckConfig` or a preset name:
    ``"seq_bn"``, ``"double_seq_bn"``, ``"par_bn"``). New adapters start near the identity (AdapterHub's
    initialisations) and are trainable; ``activate`` makes ``name`` the active adapter. Several adapters may be
    added, of any sizes, activations and scalings, as long as they share one placement (``is_parallel``,
    ``original_ln_before``): ValueError otherwise, before anything is attached."""
    if isinstance(config, str):
        config = BottleneckConfig.preset(config)
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    _check_placement(model, config, name)
    layers: list[BottleneckLayer] = []
    for kind, module, where in list(_placements(model)):
        layers += _attach_llama(module, config, name) if kind == "llama" else _attach_bert(module, config, name, where)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no layers fastpeft places bottleneck adapters in (BERT, "
                         "RoBERTa, Llama, Mistral, Qwen2)")  # fmt: skip
    if activate:
        set_active_bottleneck(model, name)
    return model


def bottleneck_layers(model: nn.Module) -> list[BottleneckLayer]:
    """Every :class:`BottleneckLayer` of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, BottleneckLayer)]


def set_active_bottleneck(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` (None: none) the one every placement of ``model`` runs."""
    for layer in bottleneck_layers(model):
        layer.active = name


@contextlib.contextmanager
def bottleneck_batch(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block every placement runs ``names[b]`` on sample b (None: no adapter), all in one fused
    launch per placement (AdapterHub's ``BatchSplit``, without its loop)."""
    layers = bottleneck_layers(model)
    for layer in layers:
        layer.batch_names = list(names)
    try:
        yield
    finally:
        for layer in layers:
            layer.batch_names = None
