"""Teacher forcing: the bidirectional teacher turned causal and tuned to denoise a block given the clean blocks
before it (the causal teacher of "causal ODE init": its ODE pairs have no seams to teach).

Per sample one target block is drawn, with a timestep from the shifted flow schedule; the blocks before it are
clean (t = 0) context, as the KV cache holds them at inference; the blocks after it are clean too and, behind
the block-causal mask, cannot affect it. One block-causal forward; the loss is the flow-matching MSE
(v = noise - x0) on the target block's frames. The clean videos are the last points of the ODE pairs (the
bidirectional teacher's samples), so the stage needs no other data.
"""
from __future__ import annotations

import torch
from torch import Tensor

from model.objective import Batch, Logs, Models, Objective
from pipeline.flow_matching import add_noise, draw_shifted_timesteps, flow_target
from utils.config import Config
from utils.errors import UserError
from utils.geometry import Geometry


class TeacherForcing(Objective):
    data = "ode_pairs"  # the clean ends of the pairs: no other data, no teacher running

    @classmethod
    def from_config(cls, config: Config, geometry: Geometry) -> "TeacherForcing":
        return cls(geometry, config.flow.num_train_timesteps, config.flow.timestep_shift)

    def __init__(self, geometry: Geometry, num_train_timesteps: int, timestep_shift: float):
        if len(set(geometry.block_sizes)) != 1:
            raise UserError("teacher forcing runs the block-causal forward, which needs equal blocks: "
                            "rollout.independent_first_frame must be false for train.trainer=teacher_forcing")
        self.geometry = geometry
        self.num_train_timesteps = num_train_timesteps
        self.shift = timestep_shift

    def draw_timesteps(self, batch: int, device: torch.device) -> Tensor:
        """Flow timesteps [B] in (0, num_train_timesteps]: uniform sigma warped by the schedule's shift."""
        return draw_shifted_timesteps(batch, self.shift, self.num_train_timesteps, device)

    def generator_loss(self, models: Models, batch: Batch) -> tuple[Tensor, Logs]:
        if batch.ode_latents is None:
            raise UserError("teacher forcing needs clean videos in the batch: use an ODE LMDB (its clean points)")
        clean = batch.ode_latents[:, -1]  # [B, F, C, H, W]
        g = self.geometry
        num_samples, device = clean.shape[0], clean.device
        # 1. A target block and its timestep per sample; every other frame clean at t = 0.
        block_of_frame = torch.tensor([b for b, size in enumerate(g.block_sizes) for _ in range(size)], device=device)
        target = torch.randint(0, g.num_blocks, (num_samples,), device=device)
        is_target = block_of_frame[None] == target[:, None]  # [B, F]
        if batch.first_frame is not None:  # TI2V: the given frame stays clean and is never a target (rows holding it)
            is_target[:, 0] = False if batch.first_frame_rows is None else is_target[:, 0] & ~batch.first_frame_rows
        timesteps = self.draw_timesteps(num_samples, device)
        per_frame = torch.where(is_target, timesteps[:, None], torch.zeros_like(timesteps[:, None]))
        noise = torch.randn_like(clean)
        x_t = add_noise(clean, noise, per_frame, self.num_train_timesteps)
        # 2. One block-causal forward (the rollout's window and sink), 3. flow-matching MSE on the target frames.
        rolling = g.cache_frames < g.num_latent_frames
        flow = models.generator.forward_block_causal(x_t.to(clean.dtype), per_frame, batch.context, g.num_frame_per_block,
                                                     window_frames=g.cache_frames if rolling else None,
                                                     sink_frames=g.sink_frames if rolling else 0)
        squared = (flow.float() - flow_target(clean, noise).float()).pow(2).mean(dim=(2, 3, 4))  # [B, F]
        weights = is_target.to(squared.dtype)  # a masked mean, not boolean indexing: static shapes (memory estimates)
        loss = (squared * weights).sum() / weights.sum()
        return loss, {"flow_loss": loss.detach(), "target_block": target.float().mean(),
                      "timestep": timesteps.mean()}
