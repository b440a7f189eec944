"""3-D rotary position embedding (frame, height, width) in the official Wan layout.

The head_dim/2 complex frequencies are split into a frame part and equal height and width parts
(head_dim 128 -> 22/21/21 complex, i.e. 44/42/42 real dims). Positions are 0-based grid indices;
frame positions can start anywhere, which is how a causal block gets its absolute frame index.
Everything is computed in float64 complex, as the official model does.
"""
from __future__ import annotations

import functools

import torch

from utils.fake import fake_mode_active
from utils.presets import ROPE_MAX_POSITIONS  # the official table's length, positions per axis

ROPE_THETA = 10000.0


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real dims per axis (frame, height, width): frame takes the remainder, h and w 2*(d//6) each."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _axis_frequencies(positions: int, dim: int) -> torch.Tensor:
    """[positions, dim/2] complex128: exp(i * p * theta^(-2j/dim))."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


@functools.lru_cache(maxsize=8)
def _cached_tables(head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_axis_frequencies(ROPE_MAX_POSITIONS, dim).to(device) for dim in rope_split(head_dim))


def rope_tables(head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis frequency tables, cached per device (not a module buffer: Module.to(dtype) would cast it).

    Never cached from inside a fake-tensor step (the memory estimate): fake tables would outlive it."""
    if fake_mode_active():
        return _cached_tables.__wrapped__(head_dim, device)
    return _cached_tables(head_dim, device)


def rope_grid(
    head_dim: int, frames: int, height: int, width: int, device: torch.device, start_frame: int = 0
) -> torch.Tensor:
    """[frames*height*width, head_dim/2] complex128 for tokens in (frame, height, width) raster order."""
    frame_table, height_table, width_table = rope_tables(head_dim, torch.device(device))
    if start_frame + frames > ROPE_MAX_POSITIONS:
        raise ValueError(f"frame position {start_frame + frames} exceeds the RoPE table ({ROPE_MAX_POSITIONS})")
    grid = torch.cat(
        [
            frame_table[start_frame : start_frame + frames].view(frames, 1, 1, -1).expand(frames, height, width, -1),
            height_table[:height].view(1, height, 1, -1).expand(frames, height, width, -1),
            width_table[:width].view(1, 1, width, -1).expand(frames, height, width, -1),
        ],
        dim=-1,
    )
    return grid.reshape(frames * height * width, -1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, D] by freqs [L, D/2]; float64 math, x's dtype out."""
    pairs = torch.view_as_complex(x.to(torch.float64).unflatten(-1, (-1, 2)))
    rotated = torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(-2)
    return rotated.to(x.dtype)
