"""Tiny DiT architectures and random weights shared by the tests/test_dit_*.py files."""
from __future__ import annotations

import torch

from utils.presets import ARCH_FIELDS, load_model_preset
from wan.modules.model import WanModel


def tiny_arch(preset: str = "tiny-t2v") -> dict:
    """The official config.json fields of a tiny preset (head_dim 128: the real 44/42/42 RoPE split)."""
    spec = load_model_preset(preset)
    return {key: spec[key] for key in ARCH_FIELDS}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere (norm weights too), so every key matters in a comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.02 if param.ndim >= 2 and "modulation" not in name else 0.1
            base = 1.0 if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")) else 0.0
            param.copy_(base + scale * torch.randn(param.shape, generator=generator))
    return model


def tiny_model(cls=WanModel, preset: str = "tiny-t2v", seed: int = 0, **overrides) -> WanModel:
    return randomize(cls(**{**tiny_arch(preset), **overrides}), seed).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
