"""The training side of the rollout: Self-Forcing's generator sample.

Exit steps are drawn on rank 0 and broadcast (every rank rolls out alike, so FSDP's collectives line
up), then the shared BlockRollout runs with gradient at each block's exit step. The sample also
carries the timestep range each frame's exit step denoised (from its step's timestep down to the next
one, 0 after the last step), for score objectives that tie their timestep to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from pipeline.rollout import BlockRollout, CausalGenerator, PromptSwitch, draw_exit_steps
from utils.config import Config
from utils.geometry import Geometry
from wan.modules.kv_cache import KVCache


@dataclass
class SelfForcingSample:
    latents: Tensor  # [B, F, C, H, W], differentiable through the exit steps (when gradients are on)
    exit_steps: list[int]  # one step index per block, identical on every rank
    exit_timesteps: Tensor  # [B, F]: the timestep each frame's exit step started from (0: a given first frame)
    next_timesteps: Tensor  # [B, F]: the timestep that step denoised towards (the next in the list; 0 after the last)
    nfe: int
    start_frame: int = 0  # where these frames start in the rollout (a window of a longer one: > 0)
    switched: bool = False  # the prompt switched (to the switch context) where these frames start


class SelfForcingRollout:
    """Draw exit steps, run the block-wise rollout with gradient at the exit steps."""

    def __init__(self, rollout: BlockRollout, *, same_step_across_blocks: bool, last_step_only: bool):
        self.rollout = rollout
        self.same_step_across_blocks = same_step_across_blocks
        self.last_step_only = last_step_only

    @classmethod
    def from_config(cls, config: Config, geometry: Geometry) -> "SelfForcingRollout":
        return cls(
            BlockRollout.from_config(config, geometry),
            same_step_across_blocks=config.rollout.same_step_across_blocks,
            last_step_only=config.rollout.last_step_only,
        )

    @property
    def geometry(self) -> Geometry:
        return self.rollout.geometry

    def noise(self, batch_size: int, device: torch.device, num_frames: Optional[int] = None) -> Tensor:
        """Start noise [B, F, C, H, W] in float32 at the geometry's latent size (F: the training length by default)."""
        _, frames, channels, height, width = self.geometry.latent_shape
        shape = (batch_size, num_frames or frames, channels, height, width)
        return torch.randn(shape, device=device, dtype=torch.float32)

    def generate(
        self,
        generator: CausalGenerator,
        noise: Tensor,
        context: Tensor,
        *,
        first_frame: Optional[Tensor] = None,
        first_frame_rows: Optional[Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        switch_context: Optional[Tensor] = None,
    ) -> SelfForcingSample:
        """One self-forcing sample; under an outer torch.no_grad() it is the detached sample the critic trains on.

        A rollout longer than the training length keeps gradient only in its last training-length frames, and returns
        only those (`start_frame` says where they start). switch_context [B, L, D] (long rollouts only): the prompt
        switches to it at the block where those frames start, the cached frames re-encoded under it first.
        """
        # 1. Exit steps: drawn once on rank 0, broadcast.
        num_frames = noise.shape[1]
        num_blocks = len(self.rollout.block_sizes(num_frames))
        exit_steps = draw_exit_steps(
            num_blocks, self.rollout.num_steps, self.same_step_across_blocks, self.last_step_only
        )
        # 2. The shared rollout, gradient at each exit step.
        training_frames = self.geometry.num_latent_frames
        longer = num_frames > training_frames
        switch_hook = None
        if switch_context is not None:
            if not longer:
                raise ValueError("a prompt switch needs a rollout longer than the training length")
            switch_frame = num_frames - training_frames
            starts = [sum(self.rollout.block_sizes(num_frames)[:n]) for n in range(num_blocks)]
            switch_block = starts.index(switch_frame)  # whole blocks (long tuning refuses a one-frame head block)
            switch = PromptSwitch(switch_context, recache=True)
            switch_hook = lambda index: switch if index == switch_block else None  # noqa: E731
        output = self.rollout.run(
            generator,
            noise,
            context,
            exit_steps=exit_steps,
            grad_last_frames=training_frames if longer else None,
            first_frame=first_frame,
            first_frame_rows=first_frame_rows,
            kv_cache=kv_cache,
            keep_last_frames=training_frames if longer else None,
            prompt_switch=switch_hook,
        )
        # 3. The timestep range each frame's exit step covered.
        next_timesteps = self._next_timesteps(output.exit_timesteps)
        start = num_frames - output.latents.shape[1]
        return SelfForcingSample(output.latents, exit_steps, output.exit_timesteps, next_timesteps, output.nfe, start,
                                 switched=switch_hook is not None)

    def _next_timesteps(self, exit_timesteps: Tensor) -> Tensor:
        """Map each exit timestep to the following one in the student's list (0 after the last; 0 stays 0)."""
        steps = self.rollout.timesteps.to(exit_timesteps.device)
        following = torch.cat([steps[1:], steps.new_zeros(1)])
        # Exact lookup: exit timesteps are copies of list entries (or 0 for a held first frame).
        matches = exit_timesteps[..., None] == steps
        return torch.where(matches.any(-1), (matches.to(following.dtype) * following).sum(-1), torch.zeros_like(exit_timesteps))
