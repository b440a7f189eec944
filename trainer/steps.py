"""One optimizer step of one model: gradient accumulation, loss scaling, clipping, the NaN/Inf guard."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from utils.dist import is_distributed

# Test-only: a comma list of iteration indices whose losses are made NaN (tests/test_train_distill.py).
INJECT_NAN_ENV = "SF_TEST_INJECT_NAN_STEPS"

LossFn = Callable[[object], tuple[torch.Tensor, dict[str, float]]]  # batch -> (loss, logs)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    applied: bool  # False: the loss or the gradient was not finite and the update was skipped
    logs: dict[str, float] = field(default_factory=dict)


def injected_nan_steps() -> set[int]:
    raw = os.environ.get(INJECT_NAN_ENV, "")
    return {int(part) for part in raw.split(",") if part.strip()}


def _global_mean(value: torch.Tensor) -> float:
    """Mean over ranks; a NaN on any rank makes the result NaN, so every rank takes the same decision."""
    value = value.detach().double().reshape(1).cpu()
    if is_distributed():
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return float(value.item())


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` over all ranks' shards; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm.item())


def _gradient_sync(model: nn.Module, enabled: bool) -> None:
    # FSDP2 reduce-scatters gradients in every backward unless told to wait for the last micro-step
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    next_batch: Callable[[], object],
    *,
    micro_steps: int,
    grad_clip: float,
    autocast: Callable[[], contextlib.AbstractContextManager],
    inject_nan: bool = False,
) -> StepResult:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64)
    logs_sum: dict[str, float] = {}
    # 1. Accumulate gradients over the micro-steps; each loss is scaled so the sum is a mean.
    for micro in range(micro_steps):
        _gradient_sync(model, micro == micro_steps - 1)
        with autocast():
            loss, logs = loss_fn(next_batch())
        if inject_nan:
            loss = loss * float("nan")
        (loss / micro_steps).backward()
        loss_sum += loss.detach().double().cpu()
        for key, value in logs.items():
            logs_sum[key] = logs_sum.get(key, 0.0) + float(value) / micro_steps
    # 2. One decision for all ranks: the mean loss and the global gradient norm must be finite.
    loss_mean = _global_mean(loss_sum / micro_steps)
    grad_norm = clip_gradients(params, grad_clip)
    applied = math.isfinite(loss_mean) and math.isfinite(grad_norm)
    # 3. Update, or drop the poisoned gradients.
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_mean, grad_norm=grad_norm, applied=applied, logs=logs_sum)
