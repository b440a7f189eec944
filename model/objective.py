"""What every objective shares: the models it is handed, the batch, and the two hooks the loop calls.

The training loop is the same for ODE regression, DMD and SiD; they differ only by
`generator_loss` and `critic_loss`. Objectives never build models or optimizers.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Iterator, Optional, Union

from torch import Tensor, nn

from utils.errors import UserError

Logs = dict[str, Union[float, Tensor]]  # 0-dim tensors are read (float) by the loop, once per step


@dataclass
class Models:
    """The networks of a run (possibly FSDP-wrapped; objectives call predict_flow / forward_* directly)."""

    generator: nn.Module  # the causal student (CausalWanModel)
    real_score: Optional[nn.Module] = None  # the frozen bidirectional teacher (WanModel or MoEWanModel)
    critic: Optional[nn.Module] = None  # the critic (WanModel), trained by critic_loss


@dataclass
class Batch:
    """One micro-batch, already on the device. Latents are [B, F, C, H, W]."""

    prompts: list[str]
    context: Tensor  # [B, L, D] text embeddings of the prompts
    negative_context: Optional[Tensor] = None  # [B, L, D] embeddings of the negative prompt (the real score's CFG)
    ode_latents: Optional[Tensor] = None  # [B, P, F, C, H, W] kept teacher trajectory points, the last one clean
    ode_timesteps: Optional[Tensor] = None  # [P] timestep of each kept point (the last is 0)
    first_frame: Optional[Tensor] = None  # [B, 1, C, H, W] TI2V: the given clean first latent frame
    first_frame_rows: Optional[Tensor] = None  # [B] bool: the rows that hold first_frame (both tasks); None: every row
    switch_context: Optional[Tensor] = None  # [B, L, D] another prompt per sample (long tuning's prompt switches)

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]


class Objective(ABC):
    """A training objective: a generator loss, and a critic loss when it trains a fake score.

    Each objective declares what a run of it needs; every caller (setup, data, loop, estimates, verification)
    asks the class through `model.registry.objective_class`, never the recipe's train.trainer string.
    """

    data: ClassVar[str] = "prompts"  # what it trains on: "ode_pairs" (an ODE-pair LMDB) or "prompts" (a prompt file)
    has_critic: ClassVar[bool] = False  # trains the critic (fake score) beside the generator, one update each
    uses_teacher: ClassVar[bool] = False  # runs the frozen teacher (real score) while training
    reads_point_timesteps: ClassVar[bool] = False  # its loss uses the pairs' point timesteps (the student's steps)
    encodes_first_frames: ClassVar[bool] = False  # TI2V: encodes the prompt file's images itself (a VAE in training)
    rolls_out: ClassVar[bool] = False  # the generator rolls out block by block with a KV cache (self forcing)

    @classmethod
    def switches_prompts(cls, config) -> bool:
        """Whether its batches carry a second prompt per sample (`Batch.switch_context`, long tuning's switches)."""
        return False

    @abstractmethod
    def generator_loss(self, models: Models, batch: Batch) -> tuple[Tensor, Logs]:
        """Scalar loss to backpropagate into the generator, and float logs."""

    def critic_loss(self, models: Models, batch: Batch) -> tuple[Tensor, Logs]:
        """Scalar loss to backpropagate into the fake score (objectives with a critic only)."""
        raise UserError(f"{type(self).__name__} trains no critic: the loop must not ask for its critic loss")


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter gradients for `model` inside (activations still carry gradients to its inputs).

    The trainer holds it over a whole generator step (forward and backward), which activation checkpointing
    needs: a recomputed forward must see the same requires_grad flags as the first one.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
