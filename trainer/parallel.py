"""Parallelism and memory options, applied from outside the model in one fixed order (torchtitan style):
activation checkpointing per block, then FSDP2 (`fully_shard`) per block and on the root.

The model code stays single-device. FSDP2 hooks only `forward`, so the batched entries the objectives
and the rollout call (predict_flow, forward_block_causal, forward_cached) are registered with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_PREFIX,
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from utils.dist import DistInfo
from utils.errors import UserError
from wan.modules.sequence_parallel import SequenceParallel

FORWARD_METHODS = ("predict_flow", "forward_block_causal", "forward_cached")


def clean_name(name: str) -> str:
    """A parameter name without the activation-checkpoint wrapper's prefix (the official key)."""
    return name.replace(_CHECKPOINT_PREFIX, "")


def build_mesh(info: DistInfo, sharding_strategy: str) -> DeviceMesh | None:
    """full: one dimension over all ranks; hybrid_full: (replicate across nodes, shard within a node)."""
    if info.world_size == 1:
        return None
    device_type = info.device.type
    if sharding_strategy == "full" or info.num_nodes == 1:
        return init_device_mesh(device_type, (info.world_size,), mesh_dim_names=("shard",))
    if info.world_size % info.local_world_size:
        raise UserError(
            f"train.sharding_strategy=hybrid_full needs the same number of ranks on every node: "
            f"{info.world_size} ranks are not a multiple of {info.local_world_size} per node"
        )
    return init_device_mesh(device_type, (info.num_nodes, info.local_world_size), mesh_dim_names=("replicate", "shard"))


@dataclass(frozen=True)
class DataParallel:
    """This rank's data-parallel place: ranks of one sequence group share a sample, so they share an index."""

    rank: int
    size: int
    sequence: Optional[SequenceParallel] = None  # this rank's sequence group; None when sp_size is 1


def check_sp_layout(info: DistInfo, sp_size: int, sharding_strategy: str) -> None:
    """sp_size must divide the ranks (and, when sharding within nodes, the ranks of a node: groups stay on a node)."""
    if info.world_size % sp_size:
        raise UserError(f"parallel.sp_size={sp_size} does not divide the {info.world_size} rank(s) of this run: "
                        f"launch a multiple of {sp_size} ranks")
    if sharding_strategy == "hybrid_full" and info.num_nodes > 1 and info.local_world_size % sp_size:
        raise UserError(f"parallel.sp_size={sp_size} does not divide the {info.local_world_size} ranks per node: a "
                        "sequence group must stay within a node")


def build_data_parallel(info: DistInfo, sp_size: int, sharding_strategy: str) -> DataParallel:
    """Consecutive ranks form a sequence group (within a node); data-parallel index = rank // sp_size."""
    from pipeline.parallel_sampling import build_sampling_groups

    check_sp_layout(info, sp_size, sharding_strategy)
    groups = build_sampling_groups(info, sp_size, cfg_parallel=False)
    return DataParallel(groups.index, groups.count, groups.sequence)


def attach_sequence_parallel(model: nn.Module, sequence: Optional[SequenceParallel]) -> nn.Module:
    """Split the model's forwards over the sequence group (a CPU-offloaded teacher's inner model included)."""
    inner = model.model if isinstance(model, CpuOffloaded) else model
    inner.set_sequence_parallel(sequence)
    return model


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward instead of storing them."""
    for index, block in enumerate(model.blocks):
        model.blocks[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def shard_model(model: nn.Module, mesh: DeviceMesh, mixed_precision: bool) -> nn.Module:
    """FSDP2 per transformer block, then the root; bf16 compute with fp32 gradient reduction when asked."""
    policy = MixedPrecisionPolicy()
    if mixed_precision:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        # The model computes each block's cross-attention keys/values (cached per prompt) outside the
        # block's forward, so cross_attn is its own unit with `key_value` hooked like a forward.
        fully_shard(block.cross_attn, mesh=mesh, mp_policy=policy)
        register_fsdp_forward_method(block.cross_attn, "key_value")
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root's own parameters (embeddings, head) are resharded after forward too: kept unsharded, they keep the
    # requires_grad they had when gathered, so a critic first run frozen (in the generator step) would never get
    # gradients for them again (found by the sequence-parallel equivalence test).
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    for method in FORWARD_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    # FSDP2 fixes each parameter group's gradient dtypes at its lazy initialisation, from the parameters trainable
    # then. It would run at the first forward, which for the critic is frozen (the generator step): its groups then
    # had no trainable parameter and bf16 gradients later met fp32 shards (every multi-rank mixed-precision score
    # distillation stopped at the first critic backward). Initialise now, in the training state.
    model._get_fsdp_state()._lazy_init()
    return model


def parallelize(
    model: nn.Module, mesh: DeviceMesh | None, *, mixed_precision: bool, gradient_checkpointing: bool
) -> nn.Module:
    """Activation checkpointing, then sharding; a single process keeps the model whole (bf16 via autocast)."""
    if gradient_checkpointing:
        apply_activation_checkpointing(model)
    if mesh is not None:
        shard_model(model, mesh, mixed_precision)
    return model


class CpuOffloaded(nn.Module):
    """A frozen model kept on the CPU and moved to the device only for its calls (train.real_score_cpu)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model = model.to("cpu")
        self.device = device

    def _call(self, method: str, *args, **kwargs):
        self.model.to(self.device)
        try:
            return getattr(self.model, method)(*args, **kwargs)
        finally:
            self.model.to("cpu")

    def predict_flow(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self._call("predict_flow", x, timestep, context)

    def forward(self, *args, **kwargs):
        return self._call("forward", *args, **kwargs)
