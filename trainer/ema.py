"""Exponential moving average of the generator's trainable parameters, kept in fp32.

The averages live beside the parameters with the same placement (plain tensors, or DTensor shards under
FSDP2), so torch.distributed.checkpoint saves and restores them like any model state. They exist from
the start (a fixed checkpoint layout); before `start_step` they are not yet meaningful (`started`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from trainer.parallel import clean_name


class ParameterEMA:
    def __init__(self, model: nn.Module, decay: float, start_step: int) -> None:
        self.decay = decay
        self.start_step = start_step
        self.started = False
        self._params = {clean_name(name): p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().clone().float() for name, p in self._params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average after the generator step of iteration `step`; the first call at or after start_step copies."""
        if step < self.start_step:
            return
        for name, param in self._params.items():
            if self.started:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)
            else:
                self.shadow[name].copy_(param.detach().float())
        self.started = True

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the averages into the model (for exporting the EMA generator)."""
        backup = {name: p.detach().clone() for name, p in self._params.items()}
        for name, param in self._params.items():
            param.copy_(self.shadow[name].to(param.dtype))
        try:
            yield
        finally:
            for name, param in self._params.items():
                param.copy_(backup[name])

    # torch.distributed.checkpoint Stateful protocol
    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "started": self.started}

    def load_state_dict(self, state: dict) -> None:
        for name, tensor in state["shadow"].items():
            if tensor is not self.shadow[name]:
                self.shadow[name].copy_(tensor)
        self.started = bool(state["started"])
