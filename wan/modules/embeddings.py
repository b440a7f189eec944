"""Inputs and outputs of the Wan DiT: patch, time and text embeddings, and the output head.

Precision policy shared by the whole DiT: the time embedding, the modulation vectors and the
residual stream stay float32 whatever the weight dtype; a linear layer casts its input to its own
weight dtype. `linear_fp32` runs a linear layer in float32 with its weights upcast on the fly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer applied in float32 (for the time path and the head, which the official model runs in fp32)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer applied in its weight dtype (the fp32 residual stream is cast down at the input)."""
    return layer(x.to(layer.weight.dtype))


def sinusoidal_embedding(timesteps: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """[N] -> [N, freq_dim] float32: cat(cos, sin) of t * 10000^(-j/half), computed in float64."""
    half = freq_dim // 2
    exponents = torch.arange(half, dtype=torch.float64, device=timesteps.device) / half
    angles = torch.outer(timesteps.to(torch.float64), torch.pow(10000.0, -exponents))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def make_time_embedding(freq_dim: int, dim: int) -> nn.Sequential:
    """Keys time_embedding.{0,2}: Linear(freq_dim, dim), SiLU, Linear(dim, dim)."""
    return nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


def make_time_projection(dim: int) -> nn.Sequential:
    """Key time_projection.1: SiLU, Linear(dim, 6*dim) -> the six per-block modulation vectors."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))


def make_text_embedding(text_dim: int, dim: int) -> nn.Sequential:
    """Keys text_embedding.{0,2}: Linear(text_dim, dim), GELU(tanh), Linear(dim, dim)."""
    return nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))


def embed_time(
    time_embedding: nn.Sequential, time_projection: nn.Sequential, timestep: torch.Tensor, freq_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """timestep [B, G] (G groups of consecutive tokens) -> e [B, G, dim], e0 [B, G, 6, dim], both fp32."""
    batch, groups = timestep.shape
    sinusoid = sinusoidal_embedding(timestep.flatten(), freq_dim)
    hidden = F.silu(linear_fp32(time_embedding[0], sinusoid))
    e = linear_fp32(time_embedding[2], hidden)
    e0 = linear_fp32(time_projection[1], F.silu(e))
    return e.view(batch, groups, -1), e0.view(batch, groups, 6, -1)


def pad_context(context: torch.Tensor, text_len: int) -> torch.Tensor:
    """[B, L, text_dim] -> [B, text_len, text_dim], zero rows appended (the DiT attends to all text_len rows)."""
    length = context.shape[1]
    if length > text_len:
        raise ValueError(f"text context has {length} tokens, more than text_len {text_len}")
    return F.pad(context, (0, 0, 0, text_len - length))


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32; returns float32 (the residual stream's dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class Head(nn.Module):
    """Keys head.head [out*prod(patch), dim] and head.modulation [1, 2, dim]; runs in float32."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * patch_size[0] * patch_size[1] * patch_size[2])
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], e [B, G, dim] -> [B, L, out*prod(patch)] float32."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(dim=2)  # [B, G, dim] each
        return linear_fp32(self.head, modulate(self.norm(x), shift, scale))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] * (1 + scale) + shift, with shift/scale [B, G, D] shared by L/G consecutive tokens."""
    batch, length, dim = x.shape
    grouped = x.view(batch, shift.shape[1], -1, dim)
    return (grouped * (1 + scale[:, :, None]) + shift[:, :, None]).view(batch, length, dim)


def gate(y: torch.Tensor, gate_values: torch.Tensor) -> torch.Tensor:
    """y [B, L, D] * gate [B, G, D] in float32, groups as in `modulate`."""
    batch, length, dim = y.shape
    return (y.float().view(batch, gate_values.shape[1], -1, dim) * gate_values[:, :, None]).view(batch, length, dim)


def patchify(patch_embedding: nn.Conv3d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x [B, F, C, H, W] -> tokens [B, f*h*w, dim] float32 in (frame, h, w) raster order, and the grid (f, h, w)."""
    weight = patch_embedding.weight
    tokens = patch_embedding(x.transpose(1, 2).to(weight.dtype))  # Conv3d wants [B, C, F, H, W]
    grid = tuple(tokens.shape[2:])
    return tokens.flatten(2).transpose(1, 2).float(), grid


def unpatchify(
    tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int], out_dim: int
) -> torch.Tensor:
    """tokens [B, f*h*w, prod(patch)*C] (channel last within a patch) -> [B, f*pt, C, h*ph, w*pw]."""
    frames, height, width = grid
    pt, ph, pw = patch_size
    batch = tokens.shape[0]
    x = tokens.view(batch, frames, height, width, pt, ph, pw, out_dim)
    x = x.permute(0, 1, 4, 7, 2, 5, 3, 6)  # B, f, pt, C, h, ph, w, pw
    return x.reshape(batch, frames * pt, out_dim, height * ph, width * pw)
