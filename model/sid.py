"""SiD (score identity distillation): the generator loss from the real and fake x0 predictions.

Unlike DMD, SiD differentiates through both scores: real and fake x0 depend on the generator's output x
through x_t, and the gradient flows through the (frozen) score networks into x. With the scores held as
constants, SiD with alpha = 1 would give exactly DMD's gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from model.dmd import SAMPLE_DIMS
from model.objective import Logs
from model.score import ScoreDistillation


def sid_loss(x: Tensor, real_x0: Tensor, fake_x0: Tensor, alpha: float) -> Tensor:
    """mean((real - fake) * ((real - x) - alpha * (real - fake)) / mean|x - real|), float64, normaliser without gradient.

    Gradients flow through x, real_x0 and fake_x0 (pass them with their graphs to x, as the objective does).
    """
    x64, real, fake = x.double(), real_x0.double(), fake_x0.double()
    with torch.no_grad():
        normaliser = (x64 - real).abs().mean(dim=SAMPLE_DIMS, keepdim=True)
    # a zero normaliser (x equals the teacher's x0) contributes nothing; non-finite scores stay non-finite
    zero = normaliser == 0  # False for NaN: a NaN normaliser stays NaN below
    safe = torch.where(zero, torch.ones_like(normaliser), normaliser)
    per_element = (real - fake) * ((real - x64) - alpha * (real - fake)) / safe
    return torch.where(zero, torch.zeros_like(per_element), per_element).mean()


class SiD(ScoreDistillation):
    name = "sid"
    scores_carry_gradient = True

    @classmethod
    def loss_settings(cls, config) -> dict:
        return {"alpha": config.distill.sid_alpha}

    def __init__(self, *args, alpha: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def distribution_loss(self, x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> tuple[Tensor, Logs]:
        loss = sid_loss(x, real_x0, fake_x0, self.alpha)
        return loss, {"sid_loss": loss.detach()}
