"""Score distillation's shared parts: score timesteps, the real and fake x0 predictions, the critic's loss.

DMD and SiD differ only by how the real and fake predictions turn into a generator loss
(`distribution_loss`); the self-forcing sample, the noise level and the critic are the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
from abc import abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from model.objective import Batch, Logs, Models, Objective, frozen
from pipeline.flow_matching import add_noise, predict_x0, shift_sigmas
from pipeline.guidance import combine_cfg, guidance_is_identity
from pipeline.self_forcing_training import SelfForcingRollout, SelfForcingSample
from utils.config import Config
from utils.dist import broadcast_int_list
from utils.errors import UserError
from utils.fake import real_values


@dataclass(frozen=True)
class ScoreTimesteps:
    """One timestep per sample: U[0, 1) shifted by the flow shift, clamped to [min, max] * T."""

    shift: float
    min_ratio: float
    max_ratio: float
    num_train_timesteps: int

    @classmethod
    def from_config(cls, config: Config) -> "ScoreTimesteps":
        distill = config.distill
        if not 0.0 <= distill.min_score_timestep_ratio < distill.max_score_timestep_ratio <= 1.0:
            raise UserError(
                f"distill.min_score_timestep_ratio={distill.min_score_timestep_ratio} and max_score_timestep_ratio="
                f"{distill.max_score_timestep_ratio}: expected 0 <= min < max <= 1"
            )
        shift = config.flow.timestep_shift if distill.score_timestep_shift is None else distill.score_timestep_shift
        return cls(shift, distill.min_score_timestep_ratio, distill.max_score_timestep_ratio,
                   config.flow.num_train_timesteps)

    def sample(self, batch_size: int, device: torch.device, generator: Optional[torch.Generator] = None) -> Tensor:
        """[B] float32 timesteps."""
        sigma = torch.rand(batch_size, dtype=torch.float64, generator=generator).to(device)
        timestep = shift_sigmas(sigma, self.shift) * self.num_train_timesteps
        low, high = self.min_ratio * self.num_train_timesteps, self.max_ratio * self.num_train_timesteps
        return timestep.clamp(low, high).to(torch.float32)


def check_long_rollout(geometry, factor: int) -> None:
    """Long tuning's longest rollout must fit the RoPE table and leave the rolling cache room past its sink."""
    from utils.presets import ROPE_MAX_POSITIONS

    longest = factor * geometry.num_latent_frames
    if longest > ROPE_MAX_POSITIONS:
        raise UserError(f"distill.long_rollout_factor={factor} rolls out up to {longest} latent frames: the RoPE table "
                        f"places at most {ROPE_MAX_POSITIONS}; expected a factor up to "
                        f"{ROPE_MAX_POSITIONS // geometry.num_latent_frames}")
    if geometry.block_sizes[0] != geometry.num_frame_per_block:
        raise UserError("distill.long_rollout_factor > 1 rolls out in whole blocks of video.num_frame_per_block frames: "
                        "expected rollout.independent_first_frame false")
    if geometry.sink_frames >= geometry.cache_frames:
        raise UserError(f"rollout.sink_size={geometry.sink_frames} leaves no room in the {geometry.cache_frames}-frame "
                        "cache window that long tuning rolls through")


def frame_timesteps(timestep: Tensor, num_frames: int, held_first_frame: bool, rows: Optional[Tensor] = None) -> Tensor:
    """[B] -> [B, F]: every frame at the sample's timestep, a held (given) first frame at 0 (in `rows` [B] bool only,
    a batch of both tasks; None: every row)."""
    per_frame = timestep[:, None].expand(-1, num_frames).clone()
    if held_first_frame:
        per_frame[:, 0] = 0.0 if rows is None else torch.where(rows, 0.0, per_frame[:, 0])
    return per_frame


def combine_rows(parts: list[tuple[int, Tensor, Logs]]) -> tuple[Tensor, Logs]:
    """Losses and logs of row groups (rows, loss, logs) -> their mean weighted by rows (a batch of both tasks)."""
    total = sum(rows for rows, _, _ in parts)
    loss = sum(rows * part for rows, part, _ in parts) / total
    logs = {key: sum(rows * part_logs[key] for rows, _, part_logs in parts) / total for key in parts[0][2]}
    return loss, logs


def real_score_x0(real_score: nn.Module, x_t: Tensor, timestep: Tensor, batch: Batch, scale: float, form: str,
                  num_train_timesteps: int) -> Tensor:
    """The frozen teacher's guided x0 (a MoE teacher picks its expert from the timestep itself)."""
    flow = real_score.predict_flow(x_t, timestep, batch.context)
    if not guidance_is_identity(scale, form):
        if batch.negative_context is None:
            raise UserError("the real score's CFG needs the negative prompt's context (batch.negative_context)")
        flow = combine_cfg(flow, real_score.predict_flow(x_t, timestep, batch.negative_context), scale, form)
    return predict_x0(x_t, flow, timestep, num_train_timesteps)


class ScoreDistillation(Objective):
    """Self-forcing sample -> real/fake scores at a random noise level -> `distribution_loss`; flow-matching critic."""

    has_critic = True
    uses_teacher = True
    encodes_first_frames = True
    rolls_out = True
    # DMD treats the scores' x0 as fixed targets; SiD differentiates through them (to x, via x_t)
    scores_carry_gradient = False

    @classmethod
    def from_config(cls, config: Config, geometry) -> "ScoreDistillation":
        distill = config.distill
        return cls(SelfForcingRollout.from_config(config, geometry), ScoreTimesteps.from_config(config),
                   distill.guidance_scale, distill.guidance_form, long_rollout_factor=distill.long_rollout_factor,
                   prompt_switch_share=distill.prompt_switch_share,
                   both_tasks=config.video.task == "ti2v" and config.train.image_share < 1, **cls.loss_settings(config))

    @classmethod
    def switches_prompts(cls, config: Config) -> bool:
        return config.distill.prompt_switch_share > 0

    @classmethod
    def loss_settings(cls, config: Config) -> dict:
        """The distribution loss's own settings from the recipe (none by default)."""
        return {}

    def __init__(self, rollout: SelfForcingRollout, score_timesteps: ScoreTimesteps, guidance_scale: float,
                 guidance_form: str, long_rollout_factor: int = 1, prompt_switch_share: float = 0.0,
                 both_tasks: bool = False):
        self.rollout = rollout
        self.both_tasks = both_tasks  # batches mix image-to-video and text-to-video rows: their share is logged
        self.long_rollout_factor = long_rollout_factor
        self.prompt_switch_share = prompt_switch_share
        # set: every rollout this long, switching prompt whenever switches are on (memory estimates: the longest)
        self.fixed_rollout_frames: Optional[int] = None
        if long_rollout_factor > 1:
            check_long_rollout(rollout.geometry, long_rollout_factor)
        self.score_timesteps = score_timesteps
        self.guidance_scale = guidance_scale
        self.guidance_form = guidance_form

    @abstractmethod
    def distribution_loss(self, x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> tuple[Tensor, Logs]:
        """The generator loss from its output x (with gradient) and the scores' x0 (without), generated frames only."""

    def _sample(self, models: Models, batch: Batch) -> tuple[SelfForcingSample, Batch]:
        """The self-forcing sample the scores see, and the batch they score it under.

        The training length; or with long tuning the last training-length window of a longer rollout (the frames
        before it ran without gradient, their keys in the rolling cache), and with a prompt switch drawn, that window
        made and scored under the batch's switch prompt.
        """
        frames, switch = self._draw_rollout()
        if switch and batch.switch_context is None:
            raise UserError("distill.prompt_switch_share > 0: the batch carries no switch prompt (Batch.switch_context)")
        noise = self.rollout.noise(batch.batch_size, batch.context.device, num_frames=frames)
        switch_context = batch.switch_context if switch else None
        sample = self.rollout.generate(models.generator, noise, batch.context, first_frame=batch.first_frame,
                                       first_frame_rows=batch.first_frame_rows, switch_context=switch_context)
        return sample, (dataclasses.replace(batch, context=switch_context) if switch else batch)

    def _draw_rollout(self) -> tuple[int, bool]:
        """Latent frames to roll out and whether the prompt switches: the training length, or (long tuning) whole
        blocks up to N times it, switching in a share of the longer ones; drawn on rank 0 and broadcast so every rank
        rolls out alike."""
        geometry = self.rollout.geometry
        switching = self.prompt_switch_share > 0
        if self.fixed_rollout_frames is not None:
            frames = self.fixed_rollout_frames
            return frames, switching and frames > geometry.num_latent_frames
        if self.long_rollout_factor == 1:
            return geometry.num_latent_frames, False
        block = geometry.num_frame_per_block
        extra_blocks = (self.long_rollout_factor - 1) * geometry.num_latent_frames // block
        with real_values():
            drawn = [int(torch.randint(0, extra_blocks + 1, (1,)))]
            if switching:  # drawn only when switches are on: a run without them keeps its random stream
                drawn.append(int(torch.rand(()) < self.prompt_switch_share))
        drawn = broadcast_int_list(drawn)
        switch = switching and drawn[0] > 0 and bool(drawn[1])
        return geometry.num_latent_frames + drawn[0] * block, switch

    @property
    def longest_rollout_frames(self) -> int:
        """The longest rollout `_rollout_frames` draws: the training length times the factor, in whole blocks."""
        geometry = self.rollout.geometry
        block = geometry.num_frame_per_block
        return geometry.num_latent_frames + (self.long_rollout_factor - 1) * geometry.num_latent_frames // block * block

    def _holds_first_frame(self, batch: Batch, sample: SelfForcingSample) -> bool:
        """Whether the scored window starts with the given (TI2V) first frame: only a rollout of the training length."""
        return batch.first_frame is not None and sample.start_frame == 0

    def _noisy(self, x: Tensor, held_first_frame: bool, rows: Optional[Tensor] = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x_t at a fresh score timestep: (x_t, per-frame timesteps [B, F], noise, timestep [B])."""
        timestep = self.score_timesteps.sample(x.shape[0], x.device)
        per_frame = frame_timesteps(timestep, x.shape[1], held_first_frame, rows)
        noise = torch.randn_like(x)
        return add_noise(x, noise, per_frame, self.score_timesteps.num_train_timesteps), per_frame, noise, timestep

    def generator_loss(self, models: Models, batch: Batch) -> tuple[Tensor, Logs]:
        # 1. The generator's self-forcing sample, with gradient at the exit steps (and the batch it is scored under).
        sample, batch = self._sample(models, batch)
        x = sample.latents
        # 2. Real (guided) and fake (conditional) x0 at a random noise level. Score parameters never get
        #    gradients; with scores_carry_gradient (SiD) the gradient reaches x through the scores' inputs.
        num_train_timesteps = self.score_timesteps.num_train_timesteps
        carry = self.scores_carry_gradient
        held = self._holds_first_frame(batch, sample)
        rows = batch.first_frame_rows if held else None  # a batch of both tasks: the rows that hold it
        with (contextlib.nullcontext() if carry else torch.no_grad()), frozen(models.critic):
            x_t, per_frame, _, timestep = self._noisy(x if carry else x.detach(), held, rows)
            real_x0 = real_score_x0(models.real_score, x_t, per_frame, batch, self.guidance_scale, self.guidance_form,
                                    num_train_timesteps)
            fake_flow = models.critic.predict_flow(x_t, per_frame, batch.context)
            fake_x0 = predict_x0(x_t, fake_flow, per_frame, num_train_timesteps)
        # 3. The objective's loss on the generated frames (each task's rows on their own, weighted by rows).
        if rows is None:
            frames = slice(1, None) if held else slice(None)
            loss, logs = self.distribution_loss(x[:, frames], real_x0[:, frames], fake_x0[:, frames])
        else:
            parts = []
            for group, frames in ((rows, slice(1, None)), (~rows, slice(None))):
                if bool(group.any()):
                    parts.append((int(group.sum()), *self.distribution_loss(x[group, frames], real_x0[group, frames],
                                                                            fake_x0[group, frames])))
            loss, logs = combine_rows(parts)
        logs.update(score_timestep=timestep.mean(), exit_step=sum(sample.exit_steps) / len(sample.exit_steps))
        if self.long_rollout_factor > 1:
            logs["rollout_frames"] = float(sample.start_frame + x.shape[1])
        if self.prompt_switch_share > 0:
            logs["prompt_switched"] = float(sample.switched)
        if self.both_tasks:  # every step, so a window's mean is the share of rows given their image
            logs["image_rows"] = float(held) if rows is None else float(rows.float().mean())
        return loss, logs

    def critic_loss(self, models: Models, batch: Batch) -> tuple[Tensor, Logs]:
        # 1. A detached self-forcing sample (no gradient into the generator).
        with torch.no_grad():
            sample, batch = self._sample(models, batch)
            x, held = sample.latents, self._holds_first_frame(batch, sample)
            rows = batch.first_frame_rows if held else None
            x_t, per_frame, noise, timestep = self._noisy(x, held, rows)
        # 2. Flow matching: the fake score regresses v = noise - x at the fresh timestep, on the generated frames.
        flow = models.critic.predict_flow(x_t, per_frame, batch.context)
        if rows is None:
            frames = slice(1, None) if held else slice(None)
            target = noise[:, frames] - x[:, frames]
            loss = (flow[:, frames].float() - target.float()).pow(2).mean()
        else:  # a batch of both tasks: the held frames weigh nothing
            weights = torch.ones(x.shape[:2], device=x.device)
            weights[:, 0] = (~rows).float()
            squared = (flow.float() - (noise - x).float()).pow(2).mean(dim=(2, 3, 4))  # [B, F]
            loss = (squared * weights).sum() / weights.sum()
        return loss, {"critic_loss": loss.detach(), "critic_timestep": timestep.mean()}
