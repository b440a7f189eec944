"""DMD (distribution matching distillation): the generator moves along fake_x0 - real_x0, normalised."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.objective import Logs
from model.score import ScoreDistillation

SAMPLE_DIMS = (1, 2, 3, 4)  # F, C, H, W of a [B, F, C, H, W] latent


def dmd_gradient(x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """(fake_x0 - real_x0) / mean|x - real_x0| per sample, float64; a sample with a zero normaliser (x equals the
    teacher's x0) gets a zero gradient. Non-finite scores stay non-finite, so the trainer's guard sees them."""
    x, real_x0, fake_x0 = x.detach().double(), real_x0.detach().double(), fake_x0.detach().double()
    normaliser = (x - real_x0).abs().mean(dim=SAMPLE_DIMS, keepdim=True)
    zero = normaliser == 0  # False for NaN: a NaN normaliser stays NaN below
    safe = torch.where(zero, torch.ones_like(normaliser), normaliser)
    return torch.where(zero, torch.zeros_like(fake_x0), (fake_x0 - real_x0) / safe)


def dmd_loss(x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> tuple[Tensor, Tensor]:
    """0.5 * MSE(x, (x - grad).detach()) in float64, whose gradient in x is grad / numel; returns (loss, grad)."""
    grad = dmd_gradient(x, real_x0, fake_x0)
    x64 = x.double()
    return 0.5 * F.mse_loss(x64, (x64 - grad).detach()), grad


class DMD(ScoreDistillation):
    name = "dmd"

    def distribution_loss(self, x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> tuple[Tensor, Logs]:
        loss, grad = dmd_loss(x, real_x0, fake_x0)
        return loss, {"dmd_loss": loss.detach(), "dmd_grad_norm": grad.norm()}
