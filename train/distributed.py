"""Data-parallel training under torchrun: process group, device, and the checks that keep replicas equal.

`torchrun --nproc_per_node=N -m train PRESET ...` sets RANK/WORLD_SIZE/LOCAL_RANK; a plain
`python -m train` run is a world of one and never touches torch.distributed. Backend: NCCL when
CUDA is there (one GPU per local rank), gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group torchrun describes in the environment, or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if size == 1:
        return World(0, 1, device)
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), size, device)


def close_world(world: World) -> None:
    if world.size > 1:
        dist.destroy_process_group()


def all_average(tensors: list[torch.Tensor], world: World) -> None:
    """Average tensors across replicas in place (used for gradients DDP does not see)."""
    if world.size == 1:
        return
    for t in tensors:
        dist.all_reduce(t)
        t.div_(world.size)


def broadcast_from_main(tensors: list[torch.Tensor], world: World) -> None:
    """Overwrite every replica's tensors with rank 0's, in place (state DDP does not manage)."""
    if world.size == 1:
        return
    for t in tensors:
        dist.broadcast(t, 0)


def gather(obj: object, world: World) -> list[object]:
    """Every replica's ``obj`` (e.g. its RNG states), in rank order."""
    if world.size == 1:
        return [obj]
    out: list[object] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def fingerprint(model: nn.Module) -> float:
    """One float64 that changes if any parameter does: compared across replicas at checkpoints."""
    return float(sum(p.detach().double().square().sum() for p in model.parameters()))


def assert_replicas_equal(model: nn.Module, world: World) -> None:
    prints = gather(fingerprint(model), world)
    if any(p != prints[0] for p in prints):
        raise RuntimeError(f"data-parallel replicas diverged: parameter fingerprints {prints}")
