"""Ranks that share one teacher sample (ODE pairs): sequence parallelism inside the DiT, and CFG-parallel, the
conditional and unconditional passes of each step on two halves of the group at once.

A sample group is cfg (2 with parallel.cfg_parallel, else 1) x sp_size consecutive ranks; groups take prompts
round-robin, every rank of a group samples the same prompt from the same noise, and the group's first rank
writes the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from utils.dist import DistInfo
from utils.errors import UserError
from wan.modules.sequence_parallel import SequenceParallel


@dataclass(frozen=True)
class SamplingGroups:
    index: int  # this rank's sample group
    count: int  # sample groups in the run (prompts are shared out over them)
    writer: bool  # the group's first rank writes the sample
    sequence: Optional[SequenceParallel] = None
    cfg_group: object = None  # the two ranks (one per branch) that exchange predictions; None: no CFG-parallel
    cfg_branch: int = 0  # 0: this rank computes the conditional pass, 1: the unconditional one


def build_sampling_groups(info: DistInfo, sp_size: int, cfg_parallel: bool) -> SamplingGroups:
    cfg = 2 if cfg_parallel else 1
    size = cfg * sp_size
    if info.world_size % size:
        raise UserError(f"a teacher sample takes {size} ranks (parallel.sp_size={sp_size}"
                        f"{' x 2 for parallel.cfg_parallel' if cfg_parallel else ''}), which does not divide the "
                        f"{info.world_size} rank(s) of this run")
    if size == 1:
        return SamplingGroups(info.rank, info.world_size, True)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(info.device.type, (info.world_size // size, cfg, sp_size),
                            mesh_dim_names=("sample", "cfg", "sp"))
    in_group = info.rank % size
    return SamplingGroups(
        index=info.rank // size,
        count=info.world_size // size,
        writer=in_group == 0,
        sequence=SequenceParallel.from_group(mesh.get_group("sp")) if sp_size > 1 else None,
        cfg_group=mesh.get_group("cfg") if cfg_parallel else None,
        cfg_branch=in_group // sp_size,
    )


class CfgParallelDenoiser:
    """A denoiser whose conditional and unconditional predictions are made by two ranks at once and exchanged.

    `predict_cfg_pair` (used by sample_teacher when a step applies guidance) returns both on both ranks; a step
    without guidance calls `predict_flow` with the conditional context on both."""

    def __init__(self, denoiser, group, branch: int) -> None:
        self.denoiser, self.group, self.branch = denoiser, group, branch

    def predict_flow(self, x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        return self.denoiser.predict_flow(x, timestep, context)

    def predict_cfg_pair(self, x: Tensor, timestep: Tensor, cond: Tensor, uncond: Tensor) -> tuple[Tensor, Tensor]:
        mine = self.denoiser.predict_flow(x, timestep, uncond if self.branch else cond).contiguous()
        both = torch.empty((2 * mine.shape[0], *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
        dist.all_gather_single(both, mine, group=self.group)  # group rank 0 holds the conditional branch
        return both[: mine.shape[0]], both[mine.shape[0]:]
