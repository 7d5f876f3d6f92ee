"""MultiLoRALinear: one frozen linear layer serving many LoRA adapters at once, a different one per token or per
sample, computed by ``fastpeft::multi_lora_*`` (the base GEMM, one shrink and one expand launch)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from fastpeft._base_layers import is_linear_like, linear_weight
from fastpeft.modules.qlora import Linear4bit
from fastpeft.ops.adapter_pool import AdapterPool
from fastpeft.ops.batch_description import BatchDescription, describe_batch
from fastpeft.ops.common import FLOAT_DTYPES
from fastpeft.ops.multi_lora import multi_lora_add, multi_lora_linear
from fastpeft.ops.multi_lora_4bit import multi_lora_linear_4bit

# One slice's pair as given to add_adapter: (lora_a [r, in], lora_b [width, r]); None where an adapter has none.
_Pair = tuple[torch.Tensor, torch.Tensor]


class MultiLoRALinear(nn.Module):
    """``y[t] = base_layer(x[t]) + scaling_i * x[t] @ A_i.T @ B_i.T`` with adapter ``i = adapter_ids[t]``.

    Args:
        base_layer: the frozen ``nn.Linear`` or GPT-2 ``Conv1D`` (fp16/bf16/fp32), or a 4-bit
            :class:`~fastpeft.Linear4bit` (many adapters on one quantized base: the fused 4-bit product, then one
            shrink and one expand; adapters then take its compute dtype). Its parameters are frozen.
        slice_widths: for a packed projection (q/k/v or gate/up in one weight), the output width of each slice
            in order; default one slice, the whole output.

    Adapters are kept in the base weight's dtype and device (``.to()`` moves them with the module) and pooled
    (:class:`~fastpeft.ops.adapter_pool.AdapterPool`) on first use after a change, so adding or removing one
    costs one copy of the adapters, not one per call. Indices are dense, in the order adapters were added;
    removing one shifts the indices after it (look them up again with :meth:`adapter_index`). Inference only.
    """

    def __init__(self, base_layer: nn.Module, *, slice_widths: Sequence[int] | None = None) -> None:
        super().__init__()
        if not (is_linear_like(base_layer) or isinstance(base_layer, Linear4bit)):
            kind = type(base_layer).__name__
            raise TypeError(f"base_layer must be an nn.Linear, a transformers Conv1D or a Linear4bit, got {kind}")
        if not isinstance(base_layer, Linear4bit) and linear_weight(base_layer).dtype not in FLOAT_DTYPES:
            raise TypeError(f"base_layer.weight must be float16, bfloat16 or float32, got {base_layer.weight.dtype}")
        self.base_layer = base_layer.requires_grad_(False)
        out_features = self.out_features
        widths = [out_features] if slice_widths is None else [int(w) for w in slice_widths]
        if any(w < 1 for w in widths) or sum(widths) != out_features:
            raise ValueError(f"slice_widths {widths} must be positive and sum to out_features={out_features}")
        self.slice_widths = tuple(widths)
        self._adapters: dict[str, tuple[_Pair | None, ...]] = {}
        self._scalings: dict[str, tuple[float, ...]] = {}
        self._pool: AdapterPool | None = None
        self.batch_ids: torch.Tensor | None = None  # set for a whole model's call by fastpeft.adapter_batch
        self._batch: _SharedBatch | None = None  # the description of those ids, shared by the model's layers

    @property
    def in_features(self) -> int:
        base = self.base_layer
        return base.in_features if isinstance(base, Linear4bit) else linear_weight(base).shape[1]

    @property
    def out_features(self) -> int:
        base = self.base_layer
        return base.out_features if isinstance(base, Linear4bit) else linear_weight(base).shape[0]

    def _adapter_like(self) -> dict:
        """The adapters' dtype and device: the base weight's, or a 4-bit base's compute dtype (else the dtype
        it dequantizes to)."""
        base = self.base_layer
        if isinstance(base, Linear4bit):
            return {"dtype": base.compute_dtype or base.quant_state.dtype, "device": base.weight.device}
        weight = linear_weight(base)
        return {"dtype": weight.dtype, "device": weight.device}

    @property
    def adapter_names(self) -> list[str]:
        """Adapter names in index order."""
        return list(self._adapters)

    def add_adapter(
        self,
        name: str,
        lora_a: torch.Tensor | Sequence[torch.Tensor | None],
        lora_b: torch.Tensor | Sequence[torch.Tensor | None],
        scaling: float | Sequence[float] = 1.0,
    ) -> int:
        """Add (or replace) adapter ``name``: ``lora_a`` [r, in_features], ``lora_b`` [out_features, r] and its
        scaling (PEFT's ``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA); for a packed layer one of each per
        slice (None for a slice the adapter leaves alone; ``lora_b`` [width_s, r_s]). Copied into the base
        weight's dtype and device. Returns the adapter's index."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        slices = len(self.slice_widths)
        packed = slices > 1
        a_list = list(lora_a) if packed else [lora_a]
        b_list = list(lora_b) if packed else [lora_b]
        s_list = list(scaling) if packed and not isinstance(scaling, (int, float)) else [scaling] * slices
        if not (len(a_list) == len(b_list) == len(s_list) == slices):
            raise ValueError(f"a packed layer of {slices} slices needs {slices} lora_a, lora_b (and scalings)")
        like = self._adapter_like()
        pairs: list[_Pair | None] = []
        for s, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
            if (a is None) != (b is None):
                raise ValueError(f"slice {s}: lora_a and lora_b must both be given or both be None")
            if a is None:
                pairs.append(None)
                continue
            for arg, t in (("lora_a", a), ("lora_b", b)):
                if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
                    raise TypeError(f"{arg} must be a 2-D floating-point tensor, got {getattr(t, 'shape', t)!r}")
            pairs.append((a.detach().to(**like), b.detach().to(**like)))
        for value in s_list:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"scaling must be a float (one per slice), got {type(value).__name__}")
        candidate = {**self._adapters, name: tuple(pairs)}
        scalings = {**self._scalings, name: tuple(float(v) for v in s_list)}
        pool = self._build(candidate, scalings)  # checks the shapes before anything changes
        self._adapters, self._scalings, self._pool = candidate, scalings, pool
        return self.adapter_index(name)

    def remove_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (KeyError if absent); the indices after it shift down by one."""
        if name not in self._adapters:
            raise KeyError(f"no adapter named {name!r}; adapters: {self.adapter_names}")
        del self._adapters[name], self._scalings[name]
        self._pool = None

    def adapter_index(self, name: str) -> int:
        """The index ``forward``'s ``adapter_ids`` use for adapter ``name`` (KeyError if absent)."""
        try:
            return self.adapter_names.index(name)
        except ValueError:
            raise KeyError(f"no adapter named {name!r}; adapters: {self.adapter_names}") from None

    def ids_for(self, names: Sequence[str | None], *, missing_ok: bool = False) -> torch.Tensor:
        """int32 ids for ``names`` (None -> -1, no adapter) on the base weight's device; a name this layer does
        not have raises KeyError, or gives -1 with ``missing_ok`` (an adapter that targets other modules)."""
        index = {name: i for i, name in enumerate(self._adapters)}
        if not missing_ok and (unknown := [n for n in names if n is not None and n not in index]):
            raise KeyError(f"no adapter named {unknown[0]!r}; adapters: {self.adapter_names}")
        ids = [index.get(n, -1) for n in names]
        return torch.tensor(ids, dtype=torch.int32, device=self._adapter_like()["device"])

    @property
    def pool(self) -> AdapterPool:
        """The adapters pooled for the kernels (built on first use after a change)."""
        if self._pool is None:
            self._pool = self._build(self._adapters, self._scalings)
        return self._pool

    def _build(self, adapters, scalings) -> AdapterPool:
        packed = [
            [None if pair is None else (*pair, scale) for pair, scale in zip(pairs, scalings[name], strict=True)]
            for name, pairs in adapters.items()
        ]
        return AdapterPool.build_packed(
            packed, slice_widths=self.slice_widths, in_features=self.in_features, **self._adapter_like()
        )

    def forward(
        self, x: torch.Tensor, adapter_ids: torch.Tensor | BatchDescription | None = None, *, check_ids: bool = True
    ):
        """x [..., in_features] -> [..., out_features]. ``adapter_ids``: int32/int64, one per token
        (``x.shape[:-1]``) or one per sample (``[batch]`` for a 3-D x), -1 for none; or a
        :class:`~fastpeft.ops.batch_description.BatchDescription` of x's tokens for this layer's pool; None takes
        the ids set by :func:`fastpeft.adapter_batch` around a whole model's call (checked there once, and
        described once per model call for every layer: the layer neither checks nor syncs), or else runs the
        base layer. ``check_ids=False`` skips the host-side range check of given ids (for CUDA-graph capture;
        out-of-range ids then get the base output, never a read outside the pool)."""
        if adapter_ids is None:
            if self._batch is None:
                return self.base_layer(x)
            adapter_ids, check_ids = self._batch.description(x), False
        base = self.base_layer
        if isinstance(base, Linear4bit) and base.dtype_for(x) == x.dtype:  # the adapters on the 4-bit product
            bias = None if base.bias is None else base.bias.to(x.dtype)
            return multi_lora_linear_4bit(x, base.kernel_weight(), bias, self.pool, adapter_ids, check_ids=check_ids)
        if isinstance(base, Linear4bit):  # x cast to another compute dtype and back: the product, then the adapters
            return multi_lora_add(base(x), x, self.pool, adapter_ids, check_ids=check_ids)
        weight = linear_weight(self.base_layer)
        return multi_lora_linear(x, weight, self.pool, adapter_ids, self.base_layer.bias, check_ids=check_ids)

    def _apply(self, fn, recurse=True):
        # Adapters are plain tensors, not parameters: move and cast them with the module, then re-pool.
        super()._apply(fn, recurse)
        self._adapters = {
            name: tuple(None if pair is None else (fn(pair[0]), fn(pair[1])) for pair in pairs)
            for name, pairs in self._adapters.items()
        }
        self._pool = None
        return self

    def extra_repr(self) -> str:
        return f"slices={list(self.slice_widths)}, adapters={self.adapter_names}"


class _SharedBatch:
    """One adapter_batch group's per-sample ids (layers holding the same adapters in the same order share it) and
    the description of their tokens, built by the first layer of each model call and reused by the others. A
    model call starts with a cleared description (adapter_batch's forward pre-hook), so a captured CUDA graph
    rebuilds it from ``ids`` on every replay: copy new ids into ``ids`` and replay."""

    def __init__(self, ids: torch.Tensor, num_adapters: int) -> None:
        self.ids = ids  # int32 [batch]
        self.num_adapters = num_adapters
        self._descriptions: dict[tuple, BatchDescription] = {}

    def description(self, x: torch.Tensor) -> BatchDescription:
        """The description of x's tokens ([batch, ..., in_features]: one adapter per sample)."""
        if x.dim() < 2 or x.shape[0] != self.ids.numel():
            raise ValueError(f"adapter_batch gave {self.ids.numel()} samples; this layer's input is {tuple(x.shape)}")
        key = tuple(x.shape[:-1])
        found = self._descriptions.get(key)
        if found is None:
            per_token = self.ids.repeat_interleave(math.prod(x.shape[1:-1]))
            found = self._descriptions[key] = describe_batch(per_token, self.num_adapters, check=False)
        return found

    def new_call(self) -> None:
        self._descriptions.clear()


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[None]:
    """Run ``model``'s calls inside the block with one adapter per sample: ``adapter_names[b]`` for sample b
    (None or ``"__base__"``: the base model). Every :class:`MultiLoRALinear` of the model reads its ids from
    here (a layer without that adapter runs its base output for the sample). Inputs of each layer must be
    [batch, ...] with batch = len(adapter_names).

    The ids are built and checked here, once: one tensor per distinct list of adapters (layers that hold the same
    adapters in the same order share it, as ``layer.batch_ids``). Each call of ``model`` describes the tokens
    once per such list (grouped by adapter on the device: :func:`~fastpeft.ops.batch_description.describe_batch`)
    and every layer reuses it, so the layers' forwards neither check nor wait for the host and decode runs the
    grouped kernels. Adapters added to or removed from a layer inside the block are not seen by it."""
    names = [None if n == "__base__" else n for n in adapter_names]
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    known = {n for layer in layers for n in layer.adapter_names}
    if unknown := sorted({n for n in names if n is not None and n not in known}):
        raise KeyError(f"no layer of the model has adapter {unknown[0]!r}; adapters: {sorted(known)}")
    previous = [(layer.batch_ids, layer._batch) for layer in layers]
    shared: dict[tuple, _SharedBatch] = {}
    for layer in layers:
        key = (tuple(layer.adapter_names), layer._adapter_like()["device"])
        if key not in shared:
            shared[key] = _SharedBatch(layer.ids_for(names, missing_ok=True), len(layer.adapter_names))
        layer.batch_ids, layer._batch = shared[key].ids, shared[key]

    def new_call(*_) -> None:  # a forward pre-hook: each call of the model describes its batch again
        for batch in shared.values():
            batch.new_call()

    hook = model.register_forward_pre_hook(new_call)
    try:
        yield
    finally:
        hook.remove()
        for layer, (ids, batch) in zip(layers, previous, strict=True):
            layer.batch_ids, layer._batch = ids, batch
