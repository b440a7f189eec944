"""Process-group helpers: the same code runs as one process or under torchrun (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single process. CUDA when present."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, local_world, dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_int_list(values: list[int], src: int = 0) -> list[int]:
    """Every rank gets rank `src`'s list (e.g. the exit steps of a rollout, drawn once)."""
    if not is_distributed():
        return list(values)
    holder = [list(values)]
    dist.broadcast_object_list(holder, src=src)
    return list(holder[0])


def all_reduce_mean(value: float, device: torch.device | None = None) -> float:
    if not is_distributed():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device or "cpu")
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def shard_indices(num_items: int, rank_: int | None = None, world: int | None = None) -> list[int]:
    """Round-robin share of `num_items` for one rank (the ODE-pair script's prompts, for example)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(range(r, num_items, w))


def cleanup() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
