"""Data-parallel training on CPU with the gloo backend: two processes, each on half of every
batch, end where one process training on the whole batches ends.

The model (tests/training_model.py) has two AttentionDispatcher layers whose connections
run every kernel family (cross, local, top-k sparse, linear, RWKV, Mamba, Hyena,
random_fixed, perceiver). It trains 3 steps of SGD with momentum, wrapped in
DistributedDataParallel or sharded with FSDP2's ``fully_shard``; the single-process run on
the combined batches is the oracle.

Tolerance: the distributed gradient is the mean of the two half-batch gradients, the
single-process one the gradient of the whole batch's mean: the same sum, rounded in another
order, so the gradients differ by float32 rounding (about 1e-7 relative). That difference
reaches the parameters only through the updates, so the test bounds the difference of the
final parameters relative to how far training moved them: 1e-4 of the norm of each
parameter's movement, plus 1e-6 of the whole movement for parameters that barely move. The
float32 error of the movement comes from gradient rounding and from storing parameters of
size ~0.1-1 after updates of size ~1e-2 (the differences measured stay below 4% of the
bound); a wrong gradient (not averaged, a rank's half missing, a parameter left out of the
reduction, a replica with another random_fixed pattern) puts them off by 1e-2 of their
movement or more. SGD rather than Adam: Adam divides by the root of the squared gradient,
which turns the rounding noise of gradients that are zero in exact arithmetic (the key
bias of softmax attention) into full-size steps of random sign, so no rounding-based
tolerance would apply.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_all_close
from training_model import KERNEL_FAMILIES, CanvasModel, training_batches

WORLD_SIZE, BATCH_PER_RANK, STEPS = 2, 2, 3
LEARNING_RATE, MOMENTUM = 0.1, 0.9
MODEL_SEED = 0


def train(
    model: nn.Module, parameters_of: Callable[[], dict[str, torch.Tensor]], share: slice
) -> dict[str, torch.Tensor]:
    """Train ``model`` STEPS steps on rows ``share`` of each batch of
    ``WORLD_SIZE * BATCH_PER_RANK``; returns ``parameters_of()`` after the last step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    for batch in training_batches(STEPS, WORLD_SIZE * BATCH_PER_RANK):
        loss = F.mse_loss(model(batch["inputs"][share]), batch["targets"][share])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return parameters_of()


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> the whole parameter (gathered from the ranks' shards under FSDP2)."""
    return {
        name: (parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter).detach().clone()
        for name, parameter in model.named_parameters()
    }


def wrap(model: nn.Module, wrapper: str) -> nn.Module:
    """``model`` under DistributedDataParallel, or sharded per layer and at the root by FSDP2."""
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


RUNS = {"ddp": ("ddp", False), "fsdp2": ("fsdp2", False), "ddp-seed-per-rank": ("ddp", True)}
"""run name -> (wrapper, whether each rank builds its model under its own seed)."""


def worker(rank: int, world_size: int, init_file: str, result_dir: str) -> None:
    """One rank: for each of RUNS, build the model (under seed MODEL_SEED, or
    MODEL_SEED + rank), wrap it, train, save the final parameters to
    ``result_dir/{run}-rank{rank}.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for run, (wrapper, seed_per_rank) in RUNS.items():
            torch.manual_seed(MODEL_SEED + rank if seed_per_rank else MODEL_SEED)
            model = wrap(CanvasModel(), wrapper)
            module = model.module if wrapper == "ddp" else model
            share = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
            torch.save(train(model, partial(full_parameters, module), share), Path(result_dir) / f"{run}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """run -> rank -> final parameters, from WORLD_SIZE spawned ranks (rendezvous through
    a file, so no port is needed)."""
    folder = tmp_path_factory.mktemp("distributed")
    mp.spawn(worker, args=(WORLD_SIZE, str(folder / "rendezvous"), str(folder)), nprocs=WORLD_SIZE)
    return {run: {rank: torch.load(folder / f"{run}-rank{rank}.pt") for rank in range(WORLD_SIZE)} for run in RUNS}


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict[str, torch.Tensor]]:
    """The oracle: the initial parameters, and the parameters after training one process on
    the whole batches."""
    torch.manual_seed(MODEL_SEED)
    model = CanvasModel()
    initial = full_parameters(model)
    return {"initial": initial, "trained": train(model, lambda: full_parameters(model), slice(None))}


def assert_trained_like_single_process(
    ranks: dict[int, dict[str, torch.Tensor]], oracle: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Every rank holds the same parameters, bit for bit (the same averaged gradients and
    optimizer steps), and they moved from the initial ones as the single process's did."""
    for rank in range(1, WORLD_SIZE):
        assert ranks[rank].keys() == ranks[0].keys()
        for name, value in ranks[0].items():
            assert torch.equal(ranks[rank][name], value), f"rank {rank} diverged from rank 0 at {name}"
    initial = oracle["initial"]
    expected_movement = {name: value - initial[name] for name, value in oracle["trained"].items()}
    for layer in range(2):
        for fn in KERNEL_FAMILIES:
            prefix = f"layers.{layer}.fn_modules.{fn}."
            moved = [movement.abs().max() for name, movement in expected_movement.items() if name.startswith(prefix)]
            assert moved and max(moved) > 0, f"training did not reach {prefix}"
    actual_movement = {name: ranks[0][name] - initial[name] for name in expected_movement}
    assert_all_close(actual_movement, expected_movement, tolerance=1e-4, zero_floor=1e-6)


@pytest.mark.parametrize("run", ["ddp", "fsdp2"])
def test_two_ranks_train_like_one_process(distributed_runs, single_process, run):
    assert_trained_like_single_process(distributed_runs[run], single_process)


def test_ddp_with_a_construction_seed_per_rank(distributed_runs, single_process):
    """Ranks seeded differently before construction draw different random_fixed seeds; DDP
    broadcasts rank 0's parameters and buffers (``pattern_seed`` among them), after which
    every rank must use rank 0's pattern."""
    assert_trained_like_single_process(distributed_runs["ddp-seed-per-rank"], single_process)
