"""Many-step sampling of a causal teacher, block by block with KV caches ("causal ODE init").

Each block runs the same sampler, schedule and CFG as the bidirectional teacher (pipeline.teacher_sampling),
against the clean blocks before it: one KV cache per text context (conditional, unconditional), each filled
with the finished block at t = 0 under its own context. The kept trajectory points of every block, at the
same step indices, are put side by side, so the pairs have the bidirectional teacher's layout [B, P, F, ...].
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.teacher_sampling import TeacherSample, sample_teacher
from utils.config import SamplingConfig
from utils.errors import UserError
from utils.geometry import Geometry


class _CachedBlock:
    """predict_flow for one block at `start`, against the cache of the context it is called with."""

    def __init__(self, model: torch.nn.Module, caches: list[tuple[Tensor, object]], start: int) -> None:
        self.model, self.caches, self.start = model, caches, start

    def predict_flow(self, x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        cache = next(cache for known, cache in self.caches if known is context)
        return self.model.forward_cached(x, timestep, context, cache, self.start, commit=False)


@torch.no_grad()
def sample_causal_teacher(
    model: torch.nn.Module,
    noise: Tensor,
    cond: Tensor,
    uncond: Tensor,
    sampling: SamplingConfig,
    geometry: Geometry,
    *,
    num_train_timesteps: int,
    first_frame: Tensor | None = None,
    keep_indices: Sequence[int] | None = None,
    boundary: float | None = None,
    sigmas: Tensor | None = None,
) -> TeacherSample:
    """Like sample_teacher, for a CausalWanModel: noise [B, F, C, H, W] in the geometry's blocks."""
    from wan.modules.kv_cache import KVCache
    from wan.modules.sequence_parallel import sp_size_of

    if boundary is not None:
        raise UserError("ode.causal_teacher with a mixture-of-experts teacher is not supported: the causal teacher is "
                        "one causal model (train.trainer=teacher_forcing)")
    batch = noise.shape[0]
    dtype = next(model.parameters()).dtype
    caches = [(context, KVCache.from_geometry(geometry, batch, dtype=dtype, device=noise.device, sp_size=sp_size_of(model)))
              for context in (cond, uncond)]
    latents, trajectories, nfe, start = [], [], 0, 0
    point_timesteps = None
    for size in geometry.block_sizes:
        # 1. The block with the full sampler and CFG, attending to the clean blocks before it.
        sample = sample_teacher(
            _CachedBlock(model, caches, start), noise[:, start:start + size], cond, uncond, sampling,
            num_train_timesteps=num_train_timesteps, first_frame=first_frame if start == 0 else None,
            keep_indices=keep_indices, sigmas=sigmas,
        )
        nfe += sample.nfe
        # 2. The clean block into each cache, under its own context.
        clean_t = torch.zeros(batch, size, device=noise.device)
        for context, cache in caches:
            model.forward_cached(sample.latent.to(dtype), clean_t, context, cache, start, commit=True)
            nfe += 1
        latents.append(sample.latent)
        trajectories.append(sample.trajectory)
        point_timesteps = sample.trajectory_timesteps
        start += size
    if start != noise.shape[1]:
        raise UserError(f"noise has {noise.shape[1]} latent frames, the geometry's blocks {list(geometry.block_sizes)}")
    trajectory = torch.cat(trajectories, dim=2) if keep_indices is not None else None
    return TeacherSample(latent=torch.cat(latents, dim=1), trajectory=trajectory, trajectory_timesteps=point_timesteps,
                         nfe=nfe)
