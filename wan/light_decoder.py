"""A light decoder for Wan latents: the TAEHV decoder architecture (taew2_1 for Wan2.1 latents, taew2_2 for the 5B).

The published TAEHV decoders turn the diffusion model's own latents into pixels with 2-D convolutions and a
one-frame memory per block, about 20x faster than the full Wan VAE decoder. This module reads the published
checkpoints exactly as downloaded (`.pth` state dict or `.safetensors`, `decoder.*` keys; the encoder's keys
are not used) and tells the variant from the weights' shapes, never from the file name:

  - latent channels: the first decoder convolution's input (16: Wan2.1 latents; 48: the 5B's Wan2.2 latents);
  - pixel patch: the last convolution's output, 3 x patch^2 (1 for Wan2.1, 2 for Wan2.2);
  - base or "super" decoder: whether decoder.0 holds weights (super: a 1x1 input projection) or is the clamp;
  - the channel widths of its three stages.

Semantics (the published decoder's): latents `[B, F, C, h, w]` as the DiT makes them, no scale or shift;
every frame goes through the same per-frame layers, each memory block also sees its input of the previous
frame (zeros before the first), and each temporal-growth layer turns one frame into `stride` frames. The
first `t_upscale - 1` output frames are start-up frames and are dropped, so F latents give 4F - 3 frames,
the Wan VAE's count. Output pixels are mapped from the published [0, 1] to the project's [-1, 1].

`LightDecoder.decode(latents)` decodes a whole video; `LightDecoder.stream()` returns a per-video decoder
whose `decode(block)` carries each memory block's last input across blocks, so the blocks' frames
concatenated equal the whole decode (frames 4f - 3 for the first block, 4f after).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.errors import UserError
from utils.weights import read_weight_file

BASE_WIDTHS = (256, 128, 64, 64)  # the published base decoder's channels per stage
SUPER_WIDTHS = (512, 256, 128, 64)  # the published "super" decoder's
WAN_TIME_UPSCALE = (False, True, True)  # per stage: Wan VAEs make 4 frames per latent after the first
WAN_SPACE_UPSCALE = (True, True, True)  # per stage: 2x each, 8x before the pixel patch
VARIANTS = ("base", "super")
# Our own exports (scripts/train_light_decoder.py) keep the published key layout and say in the safetensors
# metadata which stages upscale (no weights tell it); published files hold none and are Wan's.
METADATA_FORMAT = "taehv-decoder"


# ---------------------------------------------------------------------------------------------------- layers
def _conv3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class _SoftClamp(nn.Module):
    """tanh(x / 3) * 3: keeps stray latents in range before the first convolution."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class _MemoryBlock(nn.Module):
    """Residual block that sees its own input of the previous frame beside the current one."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3(2 * channels, channels), nn.ReLU(), _conv3(channels, channels), nn.ReLU(),
                                  _conv3(channels, channels))

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        return torch.relu(self.conv(torch.cat([x, past], 1)) + x)


class _SuperMemoryBlock(nn.Module):
    """The super decoder's memory block: 7x7 depthwise convolution, then an inverted bottleneck."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(2 * channels, 2 * channels, 7, padding=3, groups=2 * channels, bias=False),
            nn.Conv2d(2 * channels, 4 * channels, 1), nn.ReLU(),
            nn.Conv2d(4 * channels, channels, 1, bias=False),
        )

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        return self.conv(torch.cat([x, past], 1)) + x


class _TimeGrow(nn.Module):
    """One frame's channels -> `stride` consecutive frames (a 1x1 convolution, then a reshape)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # [N*T, C, H, W] -> [N*T*stride, C, H, W]
        _, channels, height, width = x.shape
        return self.conv(x).reshape(-1, channels, height, width)


_MEMORY = (_MemoryBlock, _SuperMemoryBlock)


def _base_layers(latent_channels: int, out_channels: int, widths: Sequence[int], strides: Sequence[int],
                 scales: Sequence[int]) -> list:
    layers: list[nn.Module] = [_SoftClamp(), _conv3(latent_channels, widths[0]), nn.ReLU()]
    for stage in range(3):
        width, following = widths[stage], widths[stage + 1]
        layers += [_MemoryBlock(width), _MemoryBlock(width), _MemoryBlock(width), nn.Upsample(scale_factor=scales[stage]),
                   _TimeGrow(width, strides[stage]), _conv3(width, following, bias=False)]
    return layers + [nn.ReLU(), _conv3(widths[3], out_channels)]


def _super_layers(latent_channels: int, out_channels: int, widths: Sequence[int], strides: Sequence[int],
                  scales: Sequence[int]) -> list:
    layers: list[nn.Module] = [nn.Conv2d(latent_channels, widths[0], 1, bias=False)]
    for stage in range(3):
        width, following, scale = widths[stage], widths[stage + 1], scales[stage]
        layers += [_SuperMemoryBlock(width), _SuperMemoryBlock(width), _SuperMemoryBlock(width),
                   _conv3(width, following * scale**2), nn.ReLU(), nn.PixelShuffle(scale),
                   _TimeGrow(following, strides[stage])]
    return layers + [_conv3(widths[3], out_channels)]


# ---------------------------------------------------------------------------------------------------- model
class LightDecoder(nn.Module):
    """The TAEHV decoder for Wan latents: `decode` for a whole video, `stream()` for block-by-block decoding."""

    def __init__(self, latent_channels: int, patch_size: int = 1, variant: str = "base",
                 widths: Optional[Sequence[int]] = None, time_upscale: Sequence[bool] = WAN_TIME_UPSCALE,
                 space_upscale: Sequence[bool] = WAN_SPACE_UPSCALE):
        super().__init__()
        if variant not in VARIANTS:
            raise UserError(f"light decoder variant {variant!r}: expected one of {', '.join(VARIANTS)}")
        widths = tuple(int(w) for w in (widths or (SUPER_WIDTHS if variant == "super" else BASE_WIDTHS)))
        if len(widths) != 4 or len(time_upscale) != 3 or len(space_upscale) != 3:
            raise UserError(f"light decoder widths {widths} / time_upscale {tuple(time_upscale)} / space_upscale "
                            f"{tuple(space_upscale)}: expected 4, 3 and 3 entries")
        self.latent_channels, self.patch_size, self.variant, self.widths = latent_channels, patch_size, variant, widths
        self.time_upscale = tuple(bool(up) for up in time_upscale)
        self.space_upscale = tuple(bool(up) for up in space_upscale)
        strides = [2 if up else 1 for up in self.time_upscale]
        scales = [2 if up else 1 for up in self.space_upscale]
        build = _super_layers if variant == "super" else _base_layers
        self.decoder = nn.Sequential(*build(latent_channels, 3 * patch_size**2, widths, strides, scales))
        self.t_upscale = math.prod(strides)
        self.spatial_upscale = math.prod(scales) * patch_size  # the stages' 2x, then the pixel patch

    def arch(self) -> dict:
        """The constructor's arguments (what an export records)."""
        return {"latent_channels": self.latent_channels, "patch_size": self.patch_size, "variant": self.variant,
                "widths": self.widths, "time_upscale": self.time_upscale, "space_upscale": self.space_upscale}

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "LightDecoder":
        """A published TAEHV checkpoint (taew2_1 / taew2_2, .pth or .safetensors) or one of our own exports."""
        state = read_decoder_state(path)
        model = cls(**arch_from_state(state, path, **read_upscale_metadata(path)))
        state = _fit_time_growth(state, model.decoder.state_dict())
        expected = model.decoder.state_dict()
        wrong = [f"decoder.{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
        missing = [f"decoder.{k}" for k in expected if k not in state]
        unused = [f"decoder.{k}" for k in state if k not in expected]
        if wrong or missing or unused:
            problems = wrong[:2] + [f"missing {k}" for k in missing[:2]] + [f"unused {k}" for k in unused[:2]]
            raise UserError(f"light decoder {path} does not match the TAEHV {model.variant} decoder its shapes describe: "
                            + "; ".join(problems))
        model.decoder.load_state_dict(state, strict=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def save(self, path: str | Path) -> Path:
        """The weights in the published key layout (`decoder.*`), the upscaling stages in the metadata."""
        from utils.io import atomic_save_safetensors

        metadata = {"format": METADATA_FORMAT, "time_upscale": _flags(self.time_upscale),
                    "space_upscale": _flags(self.space_upscale)}
        state = {f"decoder.{k}": v.detach().float().cpu().contiguous() for k, v in self.decoder.state_dict().items()}
        atomic_save_safetensors(Path(path), state, metadata=metadata)
        return Path(path)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---------------------------------------------------------------------------------------------- decoding
    def check_latents(self, latents: Tensor) -> None:
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise UserError(f"latents of shape {tuple(latents.shape)}: the light decoder expects "
                            f"[B, F, {self.latent_channels}, h, w]")

    def run_layers(self, latents: Tensor, memory: list[Optional[Tensor]]) -> Tensor:
        """Latents `[N, T, C, h, w]` -> raw frames `[N, T * t_upscale, 3 p^2, 8h, 8w]`, every frame at once.

        `memory[i]` is memory block i's input of the frame before this chunk (None: zeros, a video's start);
        it is replaced by this chunk's last one, so chunks decoded one after another equal one decode.
        """
        batch = latents.shape[0]
        x = latents.to(self.dtype).flatten(0, 1)
        for index, layer in enumerate(self.decoder):
            if isinstance(layer, _MEMORY):
                frames = x.unflatten(0, (batch, -1))
                before = memory[index] if memory[index] is not None else torch.zeros_like(frames[:, :1])
                past = torch.cat([before, frames[:, :-1]], dim=1).flatten(0, 1)
                memory[index] = frames[:, -1:]
                x = layer(x, past)
            else:
                x = layer(x)
        return x.unflatten(0, (batch, -1))

    def to_pixels(self, raw: Tensor) -> Tensor:
        """Raw frames -> pixels `[N, T, 3, H, W]` in [-1, 1] (the published [0, 1] output, mapped)."""
        if self.patch_size > 1:
            raw = F.pixel_shuffle(raw, self.patch_size)
        return raw.clamp(0, 1) * 2 - 1

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents `[B, F, C, h, w]` -> pixels `[B, 4F - 3, 3, 8p h, 8p w]` in [-1, 1]."""
        return self.stream().decode(latents)

    def stream(self) -> "LightStreamDecoder":
        """A decoder for one video whose blocks arrive one after another."""
        return LightStreamDecoder(self)


class LightStreamDecoder:
    """Block-by-block light decoding: each block's frames as soon as it arrives, equal to the whole decode."""

    def __init__(self, model: LightDecoder):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self._memory: list[Optional[Tensor]] = [None] * len(self.model.decoder)
        self._to_trim = self.model.t_upscale - 1  # start-up frames of the video's first latent

    @torch.no_grad()
    def decode(self, latent_block: Tensor) -> Tensor:
        """Latents `[B, f, C, h, w]` -> pixels `[B, t, 3, H, W]`: t = 4f - 3 for the first block, else 4f."""
        self.model.check_latents(latent_block)
        raw = self.model.run_layers(latent_block.to(self.model.device), self._memory)
        raw, self._to_trim = raw[:, self._to_trim:], 0
        batch, frames = raw.shape[:2]
        pixels = self.model.to_pixels(raw.flatten(0, 1))
        return pixels.unflatten(0, (batch, frames))


# ---------------------------------------------------------------------------------------------------- shapes
def arch_from_state(state: dict[str, Tensor], path: Path | str, time_upscale: Sequence[bool] = WAN_TIME_UPSCALE,
                    space_upscale: Sequence[bool] = WAN_SPACE_UPSCALE) -> dict:
    """The decoder's architecture read from its weights (keys without the `decoder.` prefix) and upscale flags."""
    try:
        if "0.weight" in state:  # super: a 1x1 input projection; its stages end in a pixel shuffle (scale^2 channels)
            latent_channels, widths = state["0.weight"].shape[1], [state["0.weight"].shape[0]]
            widths += [state[f"{i}.weight"].shape[0] // (4 if up else 1) for i, up in zip((4, 11, 18), space_upscale)]
            variant = "super"
        else:  # base: clamp, then a 3x3 convolution
            latent_channels, widths = state["1.weight"].shape[1], [state[f"{i}.weight"].shape[0] for i in (1, 8, 14, 20)]
            variant = "base"
        out_channels = state["22.weight"].shape[0]
    except KeyError as err:
        raise UserError(f"light decoder {path} lacks decoder.{err.args[0]}: expected a TAEHV checkpoint "
                        "(taew2_1 / taew2_2)") from None
    patch = math.isqrt(out_channels // 3)
    if 3 * patch * patch != out_channels:
        raise UserError(f"light decoder {path} makes {out_channels} channels per pixel patch: expected 3 x patch^2")
    return {"latent_channels": int(latent_channels), "patch_size": patch, "variant": variant,
            "widths": tuple(int(w) for w in widths), "time_upscale": tuple(time_upscale),
            "space_upscale": tuple(space_upscale)}


def _flags(values: Sequence[bool]) -> str:
    return ",".join("1" if v else "0" for v in values)


def read_upscale_metadata(path: str | Path) -> dict:
    """The upscaling stages an export of ours records; {} for a published file (Wan's stages)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != METADATA_FORMAT:
        return {}
    try:
        return {key: tuple(part == "1" for part in metadata[key].split(",")) for key in ("time_upscale", "space_upscale")}
    except KeyError as err:
        raise UserError(f"light decoder {path} lacks the metadata {err.args[0]}: re-export it") from None


def _fit_time_growth(state: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """A time-growth layer stored for a larger stride than this decoder uses keeps its last frame's channels.

    Published checkpoints may store the first stage's growth layer at stride 2 while Wan latents use it at
    stride 1; the published loader keeps the output channels of the last frame, and so does this one.
    """
    fitted = dict(state)
    for key, want in expected.items():
        have = state.get(key)
        if have is not None and key.endswith("conv.weight") and have.ndim == 4 and have.shape[2:] == (1, 1) \
                and have.shape[1] == want.shape[1] and have.shape[0] > want.shape[0] and have.shape[0] % want.shape[0] == 0:
            fitted[key] = have[-want.shape[0]:]
    return fitted


def check_light_decoder_matches(decoder_arch: dict, z_dim: int, vae_stride: Sequence[int], path: str | Path) -> None:
    """A light decoder made for other latents than the recipe's VAE: one line naming both."""
    spatial = 2 ** sum(decoder_arch["space_upscale"]) * decoder_arch["patch_size"]
    temporal = 2 ** sum(decoder_arch["time_upscale"])
    if decoder_arch["latent_channels"] != z_dim or spatial != int(vae_stride[1]) or temporal != int(vae_stride[0]):
        raise UserError(
            f"light decoder {path} decodes {decoder_arch['latent_channels']}-channel latents at {spatial}x space and "
            f"{temporal}x time, but "
            f"the recipe's VAE makes {z_dim}-channel latents at stride {tuple(int(s) for s in vae_stride)}: use taew2_1 "
            "for Wan2.1 latents (1.3B, 14B, A14B) and taew2_2 for Wan2.2-TI2V-5B")


def read_decoder_state(path: str | Path) -> dict[str, Tensor]:
    """The `decoder.*` weights of a TAEHV file, prefix removed (the encoder's are not needed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"light decoder {path} does not exist: expected a TAEHV .pth or .safetensors file "
                        "(taew2_1 for Wan2.1 latents, taew2_2 for Wan2.2-TI2V-5B)")
    state = read_weight_file(path, "light decoder", "a TAEHV .pth or .safetensors")
    state = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    if not state:
        raise UserError(f"{path} holds no decoder.* weights: expected a TAEHV checkpoint (taew2_1 / taew2_2)")
    return state


def read_light_decoder_arch(path: str | Path) -> dict:
    """The architecture of a light-decoder file, read before any model is built (for the recipe check)."""
    return arch_from_state(read_decoder_state(path), path, **read_upscale_metadata(path))


__all__ = ["LightDecoder", "LightStreamDecoder", "arch_from_state", "check_light_decoder_matches",
           "read_decoder_state", "read_light_decoder_arch"]
