"""Noise schedules in sigma (flow-matching noise fraction) and timestep (= num_train_timesteps * sigma) units.

Two schedules live here: the official Wan teacher schedule used by its UniPC sampler, and Self-Forcing's
few-step student list with its optional warp onto the shifted schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from utils.errors import UserError


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Timestep shift of flow matching: sigma' = shift*sigma / (1 + (shift-1)*sigma).

    shift > 1 spends more steps at high noise; it maps 0 -> 0 and 1 -> 1.
    """
    if shift <= 0:
        raise UserError(f"sampling shift must be positive, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigmas_with_points(sigmas: Tensor, points: Sequence[float]) -> tuple[Tensor, list[int]]:
    """`sigmas` (decreasing, ending at 0) with `points` inserted where they fall: (sigmas, the index of each point).

    A point at or above the first sigma is the start itself (index 0: the start latent is the noise, sigma 1 or
    the schedule's first sigma alike); one within 1e-9 of a sigma already there is that sigma.
    """
    merged = sigmas.detach().to(torch.float64).tolist()
    for point in sorted((float(p) for p in points), reverse=True):
        if point >= merged[0] or any(abs(point - s) < 1e-9 for s in merged):
            continue
        position = next(i for i, s in enumerate(merged) if s < point)
        merged.insert(position, point)
    indices = []
    for point in (float(p) for p in points):
        indices.append(0 if point >= merged[0] else min(range(len(merged)), key=lambda i: abs(merged[i] - point)))
    return torch.tensor(merged, dtype=torch.float64), indices


def teacher_sigmas(num_steps: int, shift: float, num_train_timesteps: int) -> Tensor:
    """The official Wan sampling schedule: float64 [num_steps + 1], decreasing, ending at sigma 0.

    Wan's FlowUniPCMultistepScheduler builds a training table whose largest sigma is
    1 - 1/num_train_timesteps (not 1), spaces num_steps sigmas linearly from there down to 0
    (exclusive), shifts them, and appends a final 0. Shifting 0 gives 0, so this is one linspace
    of num_steps + 1 points, shifted.
    """
    if num_steps < 1:
        raise UserError(f"sampling.num_steps must be at least 1, got {num_steps}")
    if num_train_timesteps < 1:
        raise UserError(f"sampling.num_train_timesteps must be at least 1, got {num_train_timesteps}")
    sigma_max = 1.0 - 1.0 / num_train_timesteps
    base = torch.linspace(sigma_max, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_sigmas(base, shift)


def few_step_timesteps(denoising_step_list: Sequence[int | float], warp: bool, shift: float, num_train_timesteps: int) -> Tensor:
    """Self-Forcing's student timesteps, float32 [len(denoising_step_list)].

    With warp, each t is moved onto the shifted schedule. Upstream does this by indexing a table of
    num_train_timesteps + 1 entries (the shifted timesteps of sigma = 1, 1 - 1/T, ..., 1/T, then 0)
    at T - t; entry T - t is the shifted sigma t/T, so the warp is T * shift_sigmas(t / T).
    With shift 5, [1000, 750, 500, 250] becomes [1000, 937.5, 833.33, 625].
    """
    steps = torch.tensor([float(t) for t in denoising_step_list], dtype=torch.float64)
    if steps.numel() == 0:
        raise UserError("denoising_step_list is empty; expected timesteps such as [1000, 750, 500, 250]")
    if bool(((steps < 0) | (steps > num_train_timesteps)).any()):
        raise UserError(f"denoising_step_list {list(denoising_step_list)} must lie in [0, {num_train_timesteps}]")
    if not warp:
        return steps.to(torch.float32)
    warped = num_train_timesteps * shift_sigmas(steps / num_train_timesteps, shift)
    return warped.to(torch.float32)
