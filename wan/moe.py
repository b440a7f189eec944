"""MoEWanModel: Wan2.2-A14B's two experts behind one predict_flow, switched by noise level."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from utils.errors import UserError
from utils.presets import DIFFUSERS_EXPERT_DIRS, MOE_EXPERT_DIRS, moe_expert_dirs
from wan.modules.model import WanModel

NUM_TRAIN_TIMESTEPS = 1000  # timestep = 1000 * sigma (project convention)


class MoEWanModel(nn.Module):
    """The high-noise expert runs for t >= boundary * 1000, the low-noise expert below."""

    def __init__(self, high: WanModel, low: WanModel, boundary: float, offload_idle_to_cpu: bool = False):
        super().__init__()
        if not 0.0 < boundary < 1.0:
            raise UserError(f"MoE boundary {boundary} must lie in (0, 1) (a fraction of {NUM_TRAIN_TIMESTEPS} timesteps)")
        self.high = high
        self.low = low
        self.boundary = boundary
        self.offload_idle_to_cpu = offload_idle_to_cpu

    @property
    def config(self) -> dict:
        return self.high.config

    def set_sequence_parallel(self, sequence_parallel) -> None:
        for expert in (self.high, self.low):
            expert.set_sequence_parallel(sequence_parallel)

    def expert_for(self, timestep: torch.Tensor) -> WanModel:
        """The expert for a call; every sample must fall on the same side of the boundary.

        A sample's noise level is its largest timestep (TI2V-style conditioning frames carry t = 0).
        """
        noise_level = timestep.flatten(1).amax(dim=1)
        use_high = noise_level >= self.boundary * NUM_TRAIN_TIMESTEPS
        if use_high.any() and not use_high.all():
            raise UserError(
                f"timesteps {noise_level.tolist()} straddle the MoE boundary {self.boundary * NUM_TRAIN_TIMESTEPS}: "
                "call each expert's samples separately"
            )
        return self.high if bool(use_high[0]) else self.low

    def predict_flow(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        expert = self.expert_for(timestep)
        if self.offload_idle_to_cpu:
            idle = self.low if expert is self.high else self.high
            idle.to("cpu")
            expert.to(x.device)
        return expert.predict_flow(x, timestep, context)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        boundary: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attention_backend: str = "sdpa",
        offload_idle_to_cpu: bool = False,
    ) -> "MoEWanModel":
        """Official layout high_noise_model/ + low_noise_model/, or diffusers transformer/ + transformer_2/.

        The boundary comes from the argument, else from a diffusers model_index.json's boundary_ratio.
        """
        folder = Path(folder)
        experts = moe_expert_dirs(folder)
        if experts is None:
            raise UserError(f"{folder} holds no MoE experts: expected {'/ and '.join(MOE_EXPERT_DIRS)}/ subfolders "
                            f"(or diffusers {'/ and '.join(DIFFUSERS_EXPERT_DIRS)}/)")
        high_dir, low_dir = experts
        if boundary is None:
            index = folder / "model_index.json"
            boundary = json.loads(index.read_text()).get("boundary_ratio") if index.is_file() else None
            if boundary is None:
                raise UserError(f"no MoE boundary for {folder}: pass boundary= (a model preset's moe.boundary)")
        # The idle expert can start on the CPU when offloading, so only one expert occupies the device.
        low_device = "cpu" if offload_idle_to_cpu else device
        # moe_expert_dirs gives the expert folders themselves (joined to `folder` again, a relative one would double)
        high = WanModel.from_pretrained(high_dir, dtype=dtype, device=device, attention_backend=attention_backend)
        low = WanModel.from_pretrained(low_dir, dtype=dtype, device=low_device, attention_backend=attention_backend)
        return cls(high, low, float(boundary), offload_idle_to_cpu)
