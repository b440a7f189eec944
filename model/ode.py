"""ODE regression ("ode_init"): the causal generator regresses the teacher's clean latent from a kept trajectory point.

Per block, one kept point with t != 0 is drawn (the same for the whole batch); the block's frames take
that point's latents and its stored timestep. With train.ode_clean_context a block may also draw the
clean point: it is then context at t = 0 for later blocks (as in the KV cache at inference) and has no
loss. One block-causal forward predicts the flow, x0 = x_t - sigma * v, and the loss is the MSE to the
clean (last) point on frames whose timestep is not 0.

With train.ode_teacher_forcing (Causal Forcing's ODE stage) each sample instead regresses one block, drawn per
sample at one of its noisy points, against the clean point of every earlier block: the context is always what
the KV cache holds at inference (t = 0), never a noisy point. Later blocks sit behind the block-causal mask.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from model.objective import Batch, Logs, Models, Objective
from pipeline.flow_matching import predict_x0
from utils.config import Config
from utils.errors import UserError
from utils.fake import real_values
from utils.geometry import Geometry

STEP_TOLERANCE = 1.0  # timesteps: a kept point counts as the student's step within this


def ode_point_timesteps(stored: Tensor, config: Config, source: str) -> Tensor:
    """The timesteps ODE regression gives the kept points [P] (the last one clean), per train.ode_point_timesteps.

    stored: they must be the student's warped step list (one line naming both lists otherwise); student_steps:
    the noisy points are labelled with that list in order (Self-Forcing's published ODE init). `source` names
    where the points come from (the LMDB, or the recipe's ode settings before pairs are made).
    """
    from pipeline.flow_matching import few_step_timesteps

    rollout, flow = config.rollout, config.flow
    student = few_step_timesteps(rollout.denoising_step_list, rollout.warp_denoising_step, flow.timestep_shift,
                                 flow.num_train_timesteps)
    stored = stored.detach().cpu().to(torch.float32)
    noisy = stored[:-1]
    student_text = f"[{', '.join(f'{t:.1f}' for t in student.tolist())}]"
    stored_text = f"[{', '.join(f'{t:.1f}' for t in noisy.tolist())}]"
    if config.train.ode_point_timesteps == "student_steps":
        if noisy.numel() != student.numel():
            raise UserError(f"{source} keeps {noisy.numel()} noisy points {stored_text} but train.ode_point_timesteps="
                            f"student_steps labels them with the student's {student.numel()} steps {student_text}: "
                            "keep one point per student step")
        return torch.cat([student, stored[-1:]])
    if noisy.numel() != student.numel() or float((noisy - student).abs().max()) > STEP_TOLERANCE:
        raise UserError(
            f"{source} keeps noisy points at t = {stored_text} but the student rolls out at {student_text} "
            "(rollout.denoising_step_list, warped): sample the pairs at ode.shift = flow.timestep_shift with one kept "
            "point per student step (e.g. keep_indices [0, N/4, N/2, 3N/4, -1] of N steps), or set "
            "train.ode_point_timesteps=student_steps to label them with the student's list (Self-Forcing's published "
            "ODE init)")
    return stored


class OdeRegression(Objective):
    data = "ode_pairs"
    reads_point_timesteps = True

    @classmethod
    def from_config(cls, config: Config, geometry: Geometry) -> "OdeRegression":
        return cls(geometry, config.flow.num_train_timesteps, clean_context=config.train.ode_clean_context,
                   teacher_forcing=config.train.ode_teacher_forcing)

    def __init__(self, geometry: Geometry, num_train_timesteps: int, clean_context: bool = False,
                 teacher_forcing: bool = False):
        if len(set(geometry.block_sizes)) != 1:
            raise UserError(
                "ODE regression runs the block-causal forward, which needs equal blocks: "
                "rollout.independent_first_frame must be false for train.trainer=ode"
            )
        self.geometry = geometry
        self.num_train_timesteps = num_train_timesteps
        self.clean_context = clean_context
        self.teacher_forcing = teacher_forcing

    def _check(self, batch: Batch) -> tuple[Tensor, Tensor]:
        latents, timesteps = batch.ode_latents, batch.ode_timesteps
        if latents is None or timesteps is None:
            raise UserError("ODE regression needs ODE pairs in the batch (ode_latents, ode_timesteps): use an ODE LMDB")
        g = self.geometry
        expected = (g.num_latent_frames, g.latent_channels, g.latent_height, g.latent_width)
        if latents.ndim != 6 or tuple(latents.shape[2:]) != expected or latents.shape[1] != timesteps.numel():
            shape = ", ".join(map(str, expected))
            raise UserError(
                f"ODE latents {list(latents.shape)} with {timesteps.numel()} timesteps: expected [B, P, {shape}] "
                "with one timestep per point"
            )
        with real_values():  # the kept timesteps are given values, real even in a memory estimate's fake step
            last = float(timesteps[-1])
        if last != 0.0:
            raise UserError(f"the last ODE trajectory point must be the clean latent (t = 0), got t = {last}")
        return latents, timesteps.to(latents.device, torch.float32)

    def draw_points(self, timesteps: Tensor, generator: Optional[torch.Generator] = None) -> list[int]:
        """One kept point per block: noisy (t != 0) ones, or any with clean context; at least one block noisy."""
        with real_values():
            return self._draw_points(timesteps, generator)

    @staticmethod
    def _noisy_points(timesteps: Tensor) -> Tensor:
        """Indices of the kept points with t != 0."""
        noisy = torch.nonzero(timesteps.cpu() != 0).flatten()
        if noisy.numel() == 0:
            raise UserError("the ODE pairs keep no noisy trajectory point (every timestep is 0)")
        return noisy

    def _draw_points(self, timesteps: Tensor, generator: Optional[torch.Generator]) -> list[int]:
        noisy = self._noisy_points(timesteps)
        num_blocks = self.geometry.num_blocks
        if not self.clean_context:
            return noisy[torch.randint(0, noisy.numel(), (num_blocks,), generator=generator)].tolist()
        points = torch.randint(0, timesteps.numel(), (num_blocks,), generator=generator)
        if not bool((timesteps.cpu()[points] != 0).any()):  # nothing to regress: one block takes a noisy point
            block = int(torch.randint(0, num_blocks, (1,), generator=generator))
            points[block] = noisy[int(torch.randint(0, noisy.numel(), (1,), generator=generator))]
        return points.tolist()

    def draw_targets(self, timesteps: Tensor, batch_size: int,
                     generator: Optional[torch.Generator] = None) -> tuple[list[int], list[int]]:
        """Teacher forcing: one target block per sample and one noisy kept point for it."""
        with real_values():
            noisy = self._noisy_points(timesteps)
            blocks = torch.randint(0, self.geometry.num_blocks, (batch_size,), generator=generator)
            points = noisy[torch.randint(0, noisy.numel(), (batch_size,), generator=generator)]
            return blocks.tolist(), points.tolist()

    def _frame_points(self, timesteps: Tensor, batch_size: int) -> list[list[int]]:
        """The kept point each frame of each sample is read from."""
        g = self.geometry
        if not self.teacher_forcing:
            points = self.draw_points(timesteps)
            return [[point for point, size in zip(points, g.block_sizes) for _ in range(size)]] * batch_size
        blocks, points = self.draw_targets(timesteps, batch_size)
        last = timesteps.numel() - 1  # the clean point (checked to be at t = 0)
        return [[point if b == block else last for b, size in enumerate(g.block_sizes) for _ in range(size)]
                for block, point in zip(blocks, points)]

    def generator_loss(self, models: Models, batch: Batch) -> tuple[Tensor, Logs]:
        # 1. Noisy input: each block's frames from its drawn point, at that point's timestep.
        latents, timesteps = self._check(batch)
        frame_points_list = self._frame_points(timesteps, latents.shape[0])
        frame_points = torch.tensor(frame_points_list, device=latents.device)  # [B, F]
        frames = torch.arange(frame_points.shape[1], device=latents.device)
        samples = torch.arange(latents.shape[0], device=latents.device)[:, None]
        x_t = latents[samples, frame_points, frames[None]]  # [B, F, C, H, W]
        per_frame = timesteps[frame_points].clone()
        clean = latents[:, -1]
        if batch.first_frame is not None:  # TI2V: the given frame is clean and seen at t = 0 (in the rows holding it)
            head = batch.first_frame.to(x_t.dtype)
            rows = batch.first_frame_rows
            if rows is not None:  # a batch of both tasks: the other rows regress frame 0 like any frame
                head = torch.where(rows[:, None, None, None, None], head, x_t[:, :1])
            x_t = torch.cat([head, x_t[:, 1:]], dim=1)
            per_frame[:, 0] = 0.0 if rows is None else torch.where(rows, 0.0, per_frame[:, 0])
        # 2. One block-causal forward; x0 from the flow.
        g = self.geometry
        rolling = g.cache_frames < g.num_latent_frames  # the same window + sink the rollout's KV cache gives
        flow = models.generator.forward_block_causal(x_t, per_frame, batch.context, g.num_frame_per_block,
                                                     window_frames=g.cache_frames if rolling else None,
                                                     sink_frames=g.sink_frames if rolling else 0)
        x0 = predict_x0(x_t, flow, per_frame, self.num_train_timesteps)
        # 3. MSE to the clean latent on frames that were noisy (known from the drawn points: no data-dependent shapes).
        with real_values():
            values = timesteps.tolist()
        noisy_list = [[values[point] != 0 for point in sample] for sample in frame_points_list]
        if batch.first_frame is not None:
            holds = [True] * len(noisy_list) if batch.first_frame_rows is None else batch.first_frame_rows.tolist()
            for sample, held in zip(noisy_list, holds):
                sample[0] = sample[0] and not held
        if not any(map(any, noisy_list)):
            raise UserError("every frame of the ODE batch is at t = 0: nothing to regress")
        noisy = torch.tensor(noisy_list, device=x0.device, dtype=torch.float32)  # [B, F]
        squared = (x0.float() - clean.float()).pow(2).mean(dim=(2, 3, 4))  # [B, F]
        loss = (squared * noisy).sum() / noisy.sum()
        return loss, {"ode_loss": loss.detach(), "ode_timestep": (per_frame * noisy).sum() / noisy.sum()}
