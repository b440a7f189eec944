"""Flow matching's arithmetic, in one place: x_t = (1 - sigma) x0 + sigma noise, the flow v = noise - x0 a Wan DiT
predicts, x0 = x_t - sigma v, the timestep shift, and the few-step student's timesteps.

Timesteps are num_train_timesteps * sigma (Wan feeds them to the DiT); tensors of timesteps [B, F] broadcast over
the latents' C, H, W. Arithmetic runs in float32 and returns the latents' dtype.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from utils.errors import UserError


def _sigma(timestep: Tensor, num_train_timesteps: int) -> Tensor:
    """timestep [..., F] -> sigma [..., F, 1, 1, 1] in float32."""
    return (timestep.to(torch.float32) / num_train_timesteps)[..., None, None, None]


def predict_x0(x_t: Tensor, flow: Tensor, timestep: Tensor, num_train_timesteps: int) -> Tensor:
    """x0 = x_t - sigma * v with sigma = timestep / T; timestep [B, F] broadcast over C, H, W."""
    sigma = _sigma(timestep, num_train_timesteps)
    return (x_t.to(torch.float32) - sigma * flow.to(torch.float32)).to(x_t.dtype)


def add_noise(x0: Tensor, noise: Tensor, timestep: Tensor, num_train_timesteps: int) -> Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise with sigma = timestep / T; timestep [B, F]."""
    sigma = _sigma(timestep, num_train_timesteps)
    return ((1 - sigma) * x0.to(torch.float32) + sigma * noise.to(torch.float32)).to(x0.dtype)


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The flow a DiT is trained to predict at any noise level: v = noise - x0."""
    return noise - x0


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Timestep shift of flow matching: sigma' = shift*sigma / (1 + (shift-1)*sigma).

    shift > 1 spends more steps at high noise; it maps 0 -> 0 and 1 -> 1.
    """
    if shift <= 0:
        raise UserError(f"sampling shift must be positive, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def draw_shifted_timesteps(batch_size: int, shift: float, num_train_timesteps: int, device: torch.device | str = "cpu",
                           generator: Optional[torch.Generator] = None, min_sigma: float = 1e-3) -> Tensor:
    """[B] float32 training timesteps: sigma uniform in [min_sigma, 1), warped by the shift (Wan's training draw)."""
    u = torch.rand(batch_size, generator=generator, device=device if generator is None else generator.device)
    return (shift_sigmas(u.clamp_min(min_sigma), shift) * num_train_timesteps).to(device=device, dtype=torch.float32)


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
