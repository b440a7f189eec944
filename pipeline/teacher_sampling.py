"""Many-step sampling of a bidirectional teacher with CFG, optional first-frame (TI2V) conditioning,
optional MoE phase handling, and kept trajectory points (for ODE pairs).

nfe counts denoiser calls. Each call evaluates the whole batch at once, so it is also the number of
model evaluations per video: one conditional call per step, plus one unconditional call on each step
that `guidance.uses_uncond` allows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from pipeline.guidance import check_guidance, combine_cfg, guidance_scale_at, uses_uncond
from pipeline.samplers import make_sampler
from pipeline.schedule import sigmas_with_points, teacher_sigmas
from utils.config import OdeConfig, SamplingConfig
from utils.errors import UserError


class Denoiser(Protocol):
    def predict_flow(self, x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        """x [B, F, C, H, W], timestep [B, F] in 0..num_train_timesteps, context [B, L, D] -> v = noise - x0."""
        ...


@dataclass
class TeacherSample:
    latent: Tensor  # [B, F, C, H, W], the clean sample
    trajectory: Tensor | None  # [B, P, F, C, H, W]: point i is the latent before step i; None without keep_indices
    trajectory_timesteps: Tensor | None  # [P] float32: num_train_timesteps * sigma of each point (0 for the clean one)
    nfe: int  # denoiser calls (= model evaluations per video)


def count_high_noise_steps(model_timesteps: Tensor, boundary: float, num_train_timesteps: int) -> int:
    """Steps run by a MoE's high-noise expert: those with timestep >= boundary * num_train_timesteps.

    The schedule decreases, so they are the first ones. With 40 UniPC steps, shift 12 and boundary
    0.875 this is 26.
    """
    if not 0.0 < boundary < 1.0:
        raise UserError(f"MoE boundary must be a fraction in (0, 1), got {boundary}")
    return int((model_timesteps >= boundary * num_train_timesteps).sum().item())


def resolve_keep_indices(keep_indices: Sequence[int], num_steps: int) -> list[int]:
    """Map Python-style indices over the num_steps + 1 trajectory points (-1 = clean) to 0..num_steps."""
    num_points = num_steps + 1
    resolved = []
    for index in keep_indices:
        if not -num_points <= index < num_points:
            raise UserError(
                f"keep index {index} is out of range: {num_steps} steps give trajectory points "
                f"0..{num_steps} (or -1 for the clean latent)"
            )
        resolved.append(index % num_points)
    return resolved


def ode_sampling_plan(ode: OdeConfig, student_timesteps: Tensor, num_train_timesteps: int) -> tuple[Tensor, list[int]]:
    """The ODE teacher's schedule and the trajectory points kept: (sigmas [N + 1], keep indices).

    With ode.insert_student_steps the official schedule (num_steps at shift) gets the student's steps inserted and
    the kept points are the start, each student step and the clean end (keep_indices is not read); otherwise the
    official schedule and ode.keep_indices.
    """
    sigmas = teacher_sigmas(ode.num_steps, ode.shift, num_train_timesteps)
    if not ode.insert_student_steps:
        resolve_keep_indices(ode.keep_indices, ode.num_steps)  # out-of-range indices are refused here, before work
        return sigmas, list(ode.keep_indices)  # as written (-1: the clean end), as the pair files record them
    sigmas, indices = sigmas_with_points(sigmas, (student_timesteps.double() / num_train_timesteps).tolist())
    return sigmas, sorted(set(indices)) + [sigmas.numel() - 1]


def kept_point_timesteps(sigmas: Tensor, keep_indices: Sequence[int], num_train_timesteps: int) -> Tensor:
    """The timesteps of the trajectory points `keep_indices` keeps, as sample_teacher labels them (float32)."""
    kept = resolve_keep_indices(keep_indices, sigmas.numel() - 1)
    return (sigmas[kept] * num_train_timesteps).to(torch.float32)


def _check_inputs(noise: Tensor, cond: Tensor, uncond: Tensor, first_frame: Tensor | None) -> None:
    if noise.ndim != 5:
        raise UserError(f"teacher noise must be [B, F, C, H, W], got shape {tuple(noise.shape)}")
    batch = noise.shape[0]
    for name, context in (("cond", cond), ("uncond", uncond)):
        if context.ndim != 3 or context.shape[0] != batch:
            raise UserError(f"{name} text context must be [B={batch}, L, D], got shape {tuple(context.shape)}")
    if first_frame is not None:
        expected = (batch, 1, *noise.shape[2:])
        if tuple(first_frame.shape) != expected:
            raise UserError(f"first_frame latent must have shape {expected}, got {tuple(first_frame.shape)}")


@torch.no_grad()
def sample_teacher(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Tensor,
    uncond: Tensor,
    sampling: SamplingConfig,
    *,
    num_train_timesteps: int,
    first_frame: Tensor | None = None,
    keep_indices: Sequence[int] | None = None,
    boundary: float | None = None,
    progress: bool = False,
    sigmas: Tensor | None = None,
) -> TeacherSample:
    """Sample a clean latent from `noise` with the official Wan schedule and the configured sampler.

    sigmas: another schedule [N + 1] (e.g. the official one with the student's steps inserted, see
    ode_sampling_plan); then N steps are taken and keep_indices index its N + 1 points.

    first_frame [B, 1, C, H, W] (TI2V): latent frame 0 is that clean latent throughout; the model sees it
    at timestep 0 and it is re-imposed after every step. boundary (MoE): the expert switch as a fraction
    of num_train_timesteps; steps above it use sampling.guidance_scale_high_noise and
    sampling.cfg_truncation_high_noise_steps. The sampler works in noise's dtype (pass float32).
    """
    # 1. Validate everything before the first model call.
    _check_inputs(noise, cond, uncond, first_frame)
    check_guidance(sampling, is_moe=boundary is not None)
    if sigmas is None:
        sigmas = teacher_sigmas(sampling.num_steps, sampling.shift, num_train_timesteps)
    else:
        sampling = dataclasses.replace(sampling, num_steps=sigmas.numel() - 1)
    sampler = make_sampler(sampling.sampler, sigmas)
    step_timesteps = sampler.model_timesteps(num_train_timesteps)
    num_high_noise_steps = 0 if boundary is None else count_high_noise_steps(step_timesteps, boundary, num_train_timesteps)
    kept = resolve_keep_indices(keep_indices, sampling.num_steps) if keep_indices is not None else []

    # 2. Start latent and per-frame timestep mask (TI2V: frame 0 is clean, so its timestep is 0).
    batch, num_frames = noise.shape[:2]
    frame_mask = torch.ones(num_frames, device=noise.device, dtype=torch.float32)
    x = noise
    if first_frame is not None:
        frame_mask[0] = 0.0
        first_frame = first_frame.to(noise.dtype)
        x = torch.cat([first_frame, noise[:, 1:]], dim=1)

    # 3. Denoise, keeping the requested trajectory points.
    points: dict[int, Tensor] = {}
    nfe = 0
    for step_index in tqdm(range(sampling.num_steps), desc="teacher", disable=not progress):
        if step_index in kept:
            points[step_index] = x
        timestep = (step_timesteps[step_index].to(noise.device) * frame_mask).expand(batch, num_frames)
        if uses_uncond(step_index, sampling, num_high_noise_steps=num_high_noise_steps):
            if hasattr(denoiser, "predict_cfg_pair"):  # CFG-parallel: both passes at once on two ranks
                v, v_uncond = (out.to(x.dtype) for out in denoiser.predict_cfg_pair(x, timestep, cond, uncond))
            else:
                v = denoiser.predict_flow(x, timestep, cond).to(x.dtype)
                v_uncond = denoiser.predict_flow(x, timestep, uncond).to(x.dtype)
            nfe += 2
            scale = guidance_scale_at(step_index, sampling, num_high_noise_steps=num_high_noise_steps)
            v = combine_cfg(v, v_uncond, scale, sampling.guidance_form)
        else:
            v = denoiser.predict_flow(x, timestep, cond).to(x.dtype)
            nfe += 1
        x = sampler.step(v, step_index, x)
        if first_frame is not None:
            x = torch.cat([first_frame, x[:, 1:]], dim=1)
    points[sampling.num_steps] = x

    # 4. Package.
    if keep_indices is None:
        return TeacherSample(latent=x, trajectory=None, trajectory_timesteps=None, nfe=nfe)
    trajectory = torch.stack([points[index] for index in kept], dim=1)
    point_timesteps = (sigmas[kept] * num_train_timesteps).to(torch.float32)
    return TeacherSample(latent=x, trajectory=trajectory, trajectory_timesteps=point_timesteps, nfe=nfe)
