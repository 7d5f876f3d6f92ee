"""Beyond one process, on the CPU with gloo and 2 processes: a PEFT model patched by fastpeft trains under
DistributedDataParallel and FSDP2 with the gradients of one process, and the fused LoRA layer runs on
tensor-parallel shards (column- and row-parallel, torch.distributed.tensor) with the whole layer's numbers and
gradients. Each test spawns its ranks; a rank's failed assertion fails the test with that rank's traceback.
Everything runs on the CPU, on a GPU machine too (gloo is the CPU backend)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from conftest import rel_error  # noqa: E402
from peft_models import peft_model, tokens  # noqa: E402

from fastpeft import patch_peft_model  # noqa: E402
from fastpeft.backends import record_backends  # noqa: E402

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _spawn(worker, *args) -> None:
    """Run ``worker(rank, *args)`` on WORLD processes joined through a file of their own (no port to race for)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(worker, str(Path(tmp) / "rendezvous"), *args), nprocs=WORLD, join=True)


def _entry(rank: int, worker, rendezvous: str, *args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def _one_process_grads(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's own model (unpatched), the whole batch in one process: the gradients to match."""
    model = peft_model().cpu().train()
    model(ids, labels=ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _half(ids: torch.Tensor, rank: int) -> torch.Tensor:
    per_rank = ids.shape[0] // WORLD  # equal halves, equal token counts: the mean of means is the mean
    return ids[rank * per_rank : (rank + 1) * per_rank]


def _check_grads(grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], calls: list) -> None:
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert rel_error(grad, expected[name]) < 1e-5, name
    assert ("lora_linear", "torch") in calls  # the fused op ran, not PEFT's forward


def _ddp_worker(rank: int, ids: torch.Tensor, expected: dict) -> None:
    model = patch_peft_model(peft_model().cpu().train())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with record_backends() as calls:
        half = _half(ids, rank)
        ddp(half, labels=half).loss.backward()
    _check_grads({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, expected, calls)


def _fsdp2_worker(rank: int, ids: torch.Tensor, expected: dict) -> None:
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    model = patch_peft_model(peft_model().cpu().train())
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    with record_backends() as calls:
        half = _half(ids, rank)
        model(half, labels=half).loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    _check_grads(grads, expected, calls)


def test_ddp_gives_the_gradients_of_one_process():
    ids = tokens(batch=4).cpu()
    _spawn(_ddp_worker, ids, _one_process_grads(ids))


def test_fsdp2_gives_the_gradients_of_one_process():
    ids = tokens(batch=4).cpu()
    _spawn(_fsdp2_worker, ids, _one_process_grads(ids))


def _tensor_parallel_worker(rank: int, out: Path) -> None:
    """An MLP block as Megatron shards it: a column-parallel layer, then a row-parallel one, each with LoRA."""
    from torch.distributed.device_mesh import init_device_mesh

    from fastpeft.ops.lora import lora_linear
    from fastpeft.ops.lora_parallel import _dtensor_api, column_parallel_lora_linear, row_parallel_lora_linear

    api = _dtensor_api()
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)  # every rank the same whole tensors; each keeps its shards
    k, hidden, n, r = 24, 40, 18, 4
    x = torch.randn(3, 5, k)
    w1, a1, b1, bias1 = torch.randn(hidden, k) / 5, torch.randn(r, k) / 5, torch.randn(hidden, r), torch.randn(hidden)
    w2, a2, b2, bias2 = torch.randn(n, hidden) / 6, torch.randn(r, hidden) / 6, torch.randn(n, r), torch.randn(n)
    shard0, shard1, shard_last, replicate = api.Shard(0), api.Shard(1), api.Shard(2), api.Replicate()

    def dt(t, placement, grad=False):
        return api.distribute_tensor(t, mesh, [placement]).requires_grad_(grad)

    lora = [dt(a1, replicate, True), dt(b1, shard0, True), dt(a2, shard1, True), dt(b2, replicate, True)]
    hidden_states = column_parallel_lora_linear(dt(x, replicate), dt(w1, shard0), lora[0], lora[1], 2.0,
                                                dt(bias1, shard0))  # fmt: skip
    assert tuple(hidden_states.placements) == (shard_last,) and hidden_states.shape == (3, 5, hidden)
    y = row_parallel_lora_linear(hidden_states, dt(w2, shard1), lora[2], lora[3], 0.5, dt(bias2, replicate))
    assert tuple(y.placements) == (replicate,)
    y.to_local().square().sum().backward()

    whole = [t.clone().requires_grad_() for t in (a1, b1, a2, b2)]
    expected = lora_linear(lora_linear(x, w1, whole[0], whole[1], 2.0, bias1), w2, whole[2], whole[3], 0.5, bias2)
    expected.square().sum().backward()
    assert rel_error(y.to_local(), expected.detach()) < 1e-5
    for got, want, name in zip(lora, whole, ("A1", "B1", "A2", "B2"), strict=True):
        assert rel_error(got.grad.full_tensor(), want.grad) < 1e-5, name
    torch.save(y.to_local(), out / f"rank{rank}.pt")


def test_column_then_row_parallel_lora_is_the_whole_layer(tmp_path):
    _spawn(_tensor_parallel_worker, tmp_path)
    outputs = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert torch.equal(outputs[0], outputs[1])  # replicated after the all-reduce


def test_misplaced_shards_are_refused_by_name():
    from fastpeft.ops.lora_parallel import column_parallel_lora_linear

    with pytest.raises(TypeError, match="weight must be a DTensor"):
        column_parallel_lora_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(1, 4), torch.randn(3, 1))
