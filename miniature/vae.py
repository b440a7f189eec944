"""The miniature VAE: a fixed, weight-free stand-in for the Wan VAE with the same interface.

Encoding is an exact space-to-depth of each (4 frames x 4 x 4 pixels x 3 colours) cell followed by a
fixed linear map to 6 channels: the 4x4 spatial mean of every frame, then the two lowest terms of an
orthonormal polynomial basis across the cell's 4 frames (channel = colour * 2 + degree: the cell's
mean and its linear trend). Decoding is that map's pseudo-inverse: block means repeated over their
4x4 pixels. It keeps the colour at 4x4-pixel resolution, the shape's position and its sub-block motion
(through partial coverage and the trend term); it loses detail inside a block (the circle/square
outline) and curvature within a 4-frame cell (the dropped terms carry < 1% of the energy).
Like Wan's causal VAE, latent frame 0 holds pixel frame 0 alone
(as four copies) and latent frame k >= 1 holds pixel frames 4k-3 .. 4k; latents are normalised with
a per-channel mean/std measured on world clips (configs/miniature/vae.yaml).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError
from utils.geometry import vae_latent_shape

VERSION = "miniature"
# Floor of the per-channel normalisation std. The trend channels vary only at moving edges (std ~0.08,
# |value| up to 0.73): divided by their own std, edges become +-8 spikes that dominate a flow-matching
# loss; divided by 0.5 they were so faint (|value| ~0.5 at edges, 0.04 on average) that the teacher left
# them to the last sampling steps and moved fast shapes in 4-frame stairs. At 0.2 edges sit at about
# +-1.3 (at most 3.6), the scale of the colour channels and of the noise they are mixed with.
LATENT_STD_FLOOR = 0.2


def temporal_polynomial_basis(length: int) -> torch.Tensor:
    """Orthonormal discrete polynomial basis [degree, time] (mean, linear trend, ...); transpose = inverse."""
    time = torch.linspace(-1.0, 1.0, length, dtype=torch.float64)
    vandermonde = torch.stack([time**degree for degree in range(length)], dim=1)  # [time, degree]
    q, r = torch.linalg.qr(vandermonde)
    q = q * torch.sign(torch.diagonal(r))  # each basis vector points along +t^degree
    return q.T.float()


class MiniatureVAE(nn.Module):
    """Pixels `[B, 3, T, H, W]` <-> normalised latents `[B, F, C, h, w]`, with C = 3 * temporal_terms."""

    def __init__(self, stride: Sequence[int], temporal_terms: int, latents_mean: Sequence[float],
                 latents_std: Sequence[float]) -> None:
        super().__init__()
        self._stride = tuple(int(s) for s in stride)
        if len(self._stride) != 3 or min(self._stride) < 1:
            raise UserError(f"miniature VAE stride {tuple(stride)}: expected three positive integers (t, h, w)")
        if not 1 <= temporal_terms <= self._stride[0]:
            raise UserError(f"miniature VAE temporal_terms {temporal_terms}: expected 1 .. {self._stride[0]} (the time stride)")
        self._terms = int(temporal_terms)
        z_dim = self.z_dim
        mean = torch.tensor(list(latents_mean), dtype=torch.float32)
        std = torch.tensor(list(latents_std), dtype=torch.float32)
        if mean.shape != (z_dim,) or std.shape != (z_dim,) or bool((std <= 0).any()):
            raise UserError(
                f"miniature VAE latents_mean/std have {mean.numel()}/{std.numel()} entries: expected z_dim={z_dim} "
                "entries each, std > 0"
            )
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)
        # The fixed linear map's temporal part: the lowest-degree rows [degree, time].
        self.register_buffer("temporal_basis", temporal_polynomial_basis(self._stride[0])[: self._terms], persistent=False)

    @classmethod
    def from_preset(cls, name_or_dict: str | dict) -> "MiniatureVAE":
        """Build from configs/miniature/vae.yaml's content (or a path to such a YAML)."""
        preset = _load_preset(name_or_dict)
        if preset.get("kind") != VERSION:
            raise UserError(f"VAE preset kind '{preset.get('kind')}' is not a miniature VAE: expected kind: {VERSION}")
        vae = cls(preset["stride"], preset["temporal_terms"], preset["latents_mean"], preset["latents_std"])
        if int(preset["z_dim"]) != vae.z_dim:
            raise UserError(f"miniature VAE preset says z_dim {preset['z_dim']} but stride {vae.stride} gives {vae.z_dim}")
        return vae

    # ----------------------------------------------------------------------------------------- properties
    @property
    def version(self) -> str:
        return VERSION

    @property
    def z_dim(self) -> int:
        return 3 * self._terms

    @property
    def temporal_terms(self) -> int:
        """Polynomial terms kept per colour across a cell's frames (channel = colour * terms + degree)."""
        return self._terms

    @property
    def stride(self) -> tuple[int, int, int]:
        return self._stride  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(F, C, h, w) of a video of `num_frames` pixel frames at height x width."""
        return vae_latent_shape(self._stride, self.z_dim, num_frames, height, width, self.version)

    # ----------------------------------------------------------------------------------------- raw maps
    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels `[B, 3, T, H, W]` -> unnormalised latents `[B, F, C, h, w]`."""
        st, sh, sw = self._stride
        # Causal in time: frame 0 stands alone, padded to a full cell by repeating it.
        video = torch.cat([video[:, :, :1].expand(-1, -1, st - 1, -1, -1), video], dim=2).float()
        batch, _, frames, height, width = video.shape
        block_means = F.avg_pool3d(video, kernel_size=(1, sh, sw))  # [B, 3, T', h, w]
        cells = block_means.view(batch, 3, frames // st, st, height // sh, width // sw)
        coefficients = torch.einsum("kt,bcfthw->bfckhw", self.temporal_basis, cells)
        return coefficients.reshape(batch, frames // st, self.z_dim, height // sh, width // sw)

    def decode_raw(self, raw: torch.Tensor, first_frame_alone: bool) -> torch.Tensor:
        """Unnormalised latents `[B, F, C, h, w]` -> pixels `[B, T, 3, H, W]` (not clamped).

        With `first_frame_alone` the first latent frame gives one pixel frame (the mean of its cell).
        """
        st, sh, sw = self._stride
        batch, frames, _, h, w = raw.shape
        coefficients = raw.float().view(batch, frames, 3, self._terms, h, w)
        cells = torch.einsum("kt,bfckhw->bftchw", self.temporal_basis, coefficients)  # [B, F, st, 3, h, w]
        if first_frame_alone:
            first = cells[:, :1].mean(dim=2)
            cells = cells[:, 1:].reshape(batch, (frames - 1) * st, 3, h, w)
            block_means = torch.cat([first, cells], dim=1)
        else:
            block_means = cells.reshape(batch, frames * st, 3, h, w)
        return block_means.repeat_interleave(sh, dim=-2).repeat_interleave(sw, dim=-1)

    # ----------------------------------------------------------------------------------------- normalisation
    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.latents_mean.view(1, 1, -1, 1, 1)) / self.latents_std.view(1, 1, -1, 1, 1)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 5 or latents.shape[2] != self.z_dim:
            raise UserError(f"latents of shape {tuple(latents.shape)}: expected [B, F, {self.z_dim}, h, w]")
        return latents.float() * self.latents_std.view(1, 1, -1, 1, 1) + self.latents_mean.view(1, 1, -1, 1, 1)

    # ----------------------------------------------------------------------------------------- public interface
    def encode_to_latent(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels `[B, 3, T, H, W]` in [-1, 1] -> normalised latents `[B, F, C, h, w]`, F = (T-1)/4 + 1."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise UserError(f"video of shape {tuple(video.shape)}: expected [B, 3, T, H, W] pixels in [-1, 1]")
        self.latent_shape(video.shape[2], video.shape[3], video.shape[4])
        return self.normalize(self.encode_raw(video))

    def decode_to_pixel(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents `[B, F, C, h, w]` -> pixels `[B, T, 3, H, W]` in [-1, 1], T = 4(F-1) + 1."""
        return self.decode_raw(self.denormalize(latents), first_frame_alone=True).clamp(-1.0, 1.0)

    def stream_decoder(self) -> "MiniatureStreamDecoder":
        return MiniatureStreamDecoder(self)


class MiniatureStreamDecoder:
    """Block-by-block decoding; the miniature decoder has no temporal context, only the first-frame rule."""

    def __init__(self, vae: MiniatureVAE) -> None:
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Start a new video."""
        self._first = True

    def decode(self, latent_block: torch.Tensor) -> torch.Tensor:
        """Normalised latents `[B, f, C, h, w]` -> pixels `[B, t, 3, H, W]`: t = 4f - 3 for the first block, else 4f."""
        pixels = self.vae.decode_raw(self.vae.denormalize(latent_block), first_frame_alone=self._first)
        self._first = False
        return pixels.clamp(-1.0, 1.0)


def _load_preset(name_or_dict: str | dict) -> dict:
    if isinstance(name_or_dict, dict):
        return name_or_dict
    from utils.presets import load_vae_preset

    return load_vae_preset(name_or_dict)


def latent_statistics(vae: MiniatureVAE, videos: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (floored at LATENT_STD_FLOOR) of the raw latents of world clips `[N, T, 3, H, W]`.

    These are the preset's latents_mean / latents_std (configs/miniature/vae.yaml).
    """
    raw = vae.encode_raw(videos.permute(0, 2, 1, 3, 4))
    per_channel = raw.transpose(0, 2).reshape(vae.z_dim, -1)
    return per_channel.mean(dim=1).tolist(), per_channel.std(dim=1).clamp_min(LATENT_STD_FLOOR).tolist()
