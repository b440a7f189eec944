"""Noise schedules in sigma (flow-matching noise fraction) and timestep (= num_train_timesteps * sigma) units.

The official Wan teacher schedule used by its UniPC sampler, and the student's points inserted into it; the
flow arithmetic itself (shift, noising, x0, the student's few-step list) is in pipeline.flow_matching.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.flow_matching import shift_sigmas
from utils.errors import UserError


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
