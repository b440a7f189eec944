"""SiD (score identity distillation): the generator loss from the real and fake x0 predictions."""
from __future__ import annotations

import torch
from torch import Tensor

from model.dmd import SAMPLE_DIMS
from model.objective import Logs
from model.score import ScoreDistillation


def sid_loss(x: Tensor, real_x0: Tensor, fake_x0: Tensor, alpha: float) -> Tensor:
    """mean((real - fake) * ((real - x) - alpha * (real - fake)) / mean|x - real|), float64, normaliser without gradient."""
    x64, real, fake = x.double(), real_x0.detach().double(), fake_x0.detach().double()
    with torch.no_grad():
        normaliser = (x64 - real).abs().mean(dim=SAMPLE_DIMS, keepdim=True)
    per_element = (real - fake) * ((real - x64) - alpha * (real - fake)) / normaliser
    return torch.nan_to_num(per_element).mean()


class SiD(ScoreDistillation):
    name = "sid"

    def __init__(self, *args, alpha: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def distribution_loss(self, x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> tuple[Tensor, Logs]:
        loss = sid_loss(x, real_x0, fake_x0, self.alpha)
        return loss, {"sid_loss": float(loss.detach())}
