"""The Wan2.1 / Wan2.2 video VAE, built on diffusers' AutoencoderKLWan (the network is not rewritten here).

The wrapper adds what the project needs around it: loading the official checkpoints (key maps in
wan/vae_convert.py), the per-channel latent normalisation, the project's latent layout `[B, F, C, h, w]`,
and a streaming decoder that keeps the causal cache between latent blocks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify
from torch import nn

from utils.errors import UserError
from utils.geometry import vae_latent_shape
from utils.weights import read_weight_file
from wan.vae_convert import infer_vae_arch, official_to_diffusers_names

VAE_VERSIONS = ("wan2.1", "wan2.2")
_OFFICIAL_MARKER = "encoder.conv1.weight"
_DIFFUSERS_MARKER = "encoder.conv_in.weight"


# ---------------------------------------------------------------------------------------------------------
# reading weights
# ---------------------------------------------------------------------------------------------------------
def _first(keys: Sequence[str], n: int = 3) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch file loaded with weights_only (state dict at top or under 'state_dict')."""
    return read_weight_file(path, "VAE checkpoint", "a Wan VAE .pth or .safetensors")


def _read_diffusers_folder(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers `vae/` folder (or its parent): every diffusion_pytorch_model*.safetensors shard."""
    if (folder / "vae").is_dir() and not (folder / "config.json").exists():
        folder = folder / "vae"
    shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not shards:
        raise UserError(f"VAE folder {folder} holds no diffusion_pytorch_model*.safetensors: expected a diffusers vae/ folder")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(_read_weight_file(shard))
    return state


def _to_diffusers_names(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    if _OFFICIAL_MARKER in state:
        mapping, unmapped = official_to_diffusers_names(state)
        if unmapped:
            raise UserError(f"VAE checkpoint {path} has keys outside the official Wan VAE layout: {_first(unmapped)}")
        return {mapping[k]: v for k, v in state.items()}
    if _DIFFUSERS_MARKER in state:
        return state
    raise UserError(
        f"{path} is not a Wan VAE checkpoint (no {_OFFICIAL_MARKER} or {_DIFFUSERS_MARKER}; first keys: {_first(sorted(state))})"
    )


def _check_against_model(state: dict[str, torch.Tensor], model: nn.Module, path: Path, version: str) -> None:
    """Every key used, none left over, every shape right; otherwise one line naming the file and keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unused = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    wrong = [
        f"{k} {tuple(v.shape)} != {expected[k]}" for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]
    ]
    problems = []
    if unused:
        problems.append(f"unused keys {_first(unused)}")
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if wrong:
        problems.append(f"wrong shapes {_first(wrong, 2)}")
    if problems:
        raise UserError(f"VAE checkpoint {path} does not match the {version} VAE layout read from it: {'; '.join(problems)}")


# ---------------------------------------------------------------------------------------------------------
# architecture helpers
# ---------------------------------------------------------------------------------------------------------
def arch_stride(arch: dict) -> tuple[int, int, int]:
    """(t, h, w) compression of an AutoencoderKLWan architecture: one 2x per resampler, times the pixel patch."""
    spatial_downs = len(arch["dim_mult"]) - 1
    temporal = 2 ** sum(bool(t) for t in arch["temperal_downsample"][:spatial_downs])
    spatial = 2**spatial_downs * (arch["patch_size"] or 1)
    return temporal, spatial, spatial


def _version_of(arch: dict) -> str:
    return "wan2.2" if arch["is_residual"] else "wan2.1"


def _build(arch: dict, device: str | torch.device) -> AutoencoderKLWan:
    with torch.device(device):
        return AutoencoderKLWan(**arch)


def _place(model: AutoencoderKLWan, device: str | torch.device, dtype: torch.dtype) -> AutoencoderKLWan:
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-kept modules, of which this VAE has none
    return nn.Module.to(model, device=device, dtype=dtype).eval()


def _default_stats(version: str, arch: dict) -> tuple[list[float] | None, list[float] | None]:
    """The version's published latent mean/std apply to a file of the real architecture, not to tiny ones."""
    from utils.presets import load_vae_preset

    preset = load_vae_preset(version)
    real_arch = preset.get("arch")  # optional in full-size presets; when given it must match to apply the stats
    same_size = arch["z_dim"] == int(preset["z_dim"]) and (
        real_arch is None or all(arch[k] == real_arch[k] for k in ("base_dim", "z_dim") if k in real_arch)
    )
    return (preset["latents_mean"], preset["latents_std"]) if same_size else (None, None)


# ---------------------------------------------------------------------------------------------------------
# the wrapper
# ---------------------------------------------------------------------------------------------------------
class WanVAEWrapper(nn.Module):
    """AutoencoderKLWan plus latent normalisation and the project's `[B, F, C, h, w]` latent layout."""

    def __init__(self, model: AutoencoderKLWan, version: str, latents_mean: Sequence[float] | None = None,
                 latents_std: Sequence[float] | None = None) -> None:
        super().__init__()
        if version not in VAE_VERSIONS:
            raise UserError(f"VAE version '{version}' is unknown: expected one of {', '.join(VAE_VERSIONS)}")
        self.model = model
        self._version = version
        self._arch = dict(model.config)
        z_dim = int(model.config.z_dim)
        mean = torch.zeros(z_dim) if latents_mean is None else torch.tensor(latents_mean, dtype=torch.float32)
        std = torch.ones(z_dim) if latents_std is None else torch.tensor(latents_std, dtype=torch.float32)
        if mean.shape != (z_dim,) or std.shape != (z_dim,):
            raise UserError(f"VAE latents_mean/std have {mean.numel()}/{std.numel()} entries: expected z_dim={z_dim}")
        # float32 always: the normalisation is applied in float32 whatever the VAE's dtype
        self.register_buffer("latents_mean", mean.to(model.device), persistent=False)
        self.register_buffer("latents_std", std.to(model.device), persistent=False)

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        preset: str | dict | None = None) -> "WanVAEWrapper":
        """Load Wan2.1_VAE.pth / Wan2.2_VAE.pth, a .safetensors of official or diffusers names, or a diffusers folder.

        The version and base dims are read from the weights. Latent mean/std come from `preset` when given
        (a name under configs/vae/ or a dict), else from the version's preset when the file has the real
        size; tiny files get zeros/ones.
        """
        path = Path(path)
        if not path.exists():
            raise UserError(
                f"VAE checkpoint {path} does not exist: expected Wan2.x_VAE.pth, a .safetensors or a diffusers vae/ folder"
            )
        raw = _read_diffusers_folder(path) if path.is_dir() else _read_weight_file(path)
        state = _to_diffusers_names(raw, path)
        try:
            arch = infer_vae_arch({k: tuple(v.shape) for k, v in state.items()})
        except (KeyError, IndexError, ZeroDivisionError) as err:
            raise UserError(f"VAE checkpoint {path} is incomplete: cannot read its architecture (needs {err})") from None
        version = _version_of(arch)
        if preset is not None:
            preset = _load_preset(preset)
            mean, std = preset.get("latents_mean"), preset.get("latents_std")
            if int(preset["z_dim"]) != arch["z_dim"] or preset["kind"] != version:
                raise UserError(
                    f"VAE checkpoint {path} is a {version} VAE with z_dim {arch['z_dim']} but the VAE preset says "
                    f"{preset['kind']} with z_dim {preset['z_dim']}"
                )
        else:
            mean, std = _default_stats(version, arch)
        model = _build(arch, "meta")
        _check_against_model(state, model, path, version)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        model = _place(model, device, dtype)
        return cls(model, version, mean, std)

    @classmethod
    def from_preset(cls, name_or_dict: str | dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> "WanVAEWrapper":
        """Random init of a VAE whose preset carries an `arch` (tiny ones); device 'meta' builds it without memory."""
        preset = _load_preset(name_or_dict)
        if not preset.get("arch"):  # full-size presets may omit it; they need their weights anyway
            raise UserError(f"VAE preset of kind {preset['kind']} has no arch to build a random VAE from: set vae.checkpoint")
        arch = {**preset["arch"]}
        residual = bool(arch.get("is_residual"))  # AutoencoderKLWan's own default: False
        version = _version_of({"is_residual": residual})
        if preset["kind"] != version:
            raise UserError(f"VAE preset says kind {preset['kind']} but its arch is a {version} VAE (is_residual={residual})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build(arch, "meta" if str(device) == "meta" else "cpu")
        model = _place(model, device, dtype)
        wrapper = cls(model, version, preset.get("latents_mean"), preset.get("latents_std"))
        if tuple(int(s) for s in preset["stride"]) != wrapper.stride or int(preset["z_dim"]) != wrapper.z_dim:
            raise UserError(
                f"VAE preset {preset['kind']} says stride {tuple(preset['stride'])} z_dim {preset['z_dim']} but its arch gives "
                f"stride {wrapper.stride} z_dim {wrapper.z_dim}"
            )
        return wrapper

    # ----------------------------------------------------------------------------------------- properties
    @property
    def version(self) -> str:
        return self._version

    @property
    def z_dim(self) -> int:
        return int(self.model.config.z_dim)

    @property
    def stride(self) -> tuple[int, int, int]:
        return arch_stride(self._arch)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def enable_tiling(self, **tile_sizes: int) -> None:
        """Spatial tiling for memory (diffusers' tiled encode/decode); the streaming decoder does not tile."""
        self.model.enable_tiling(**tile_sizes)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(F, C, h, w) of a video of `num_frames` pixel frames at height x width."""
        return vae_latent_shape(self.stride, self.z_dim, num_frames, height, width, self.version)

    # ----------------------------------------------------------------------------------------- normalisation
    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents `[B, C, F, h, w]` -> normalised `[B, F, C, h, w]` (float32 maths, VAE dtype out)."""
        mean = self.latents_mean.view(1, -1, 1, 1, 1)
        std = self.latents_std.view(1, -1, 1, 1, 1)
        return ((raw.float() - mean) / std).permute(0, 2, 1, 3, 4).to(raw.dtype)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised `[B, F, C, h, w]` -> raw `[B, C, F, h, w]` in the VAE's dtype."""
        if latents.ndim != 5 or latents.shape[2] != self.z_dim:
            raise UserError(f"latents of shape {tuple(latents.shape)}: expected [B, F, {self.z_dim}, h, w]")
        raw = latents.float().permute(0, 2, 1, 3, 4)
        raw = raw * self.latents_std.view(1, -1, 1, 1, 1) + self.latents_mean.view(1, -1, 1, 1, 1)
        return raw.to(self.dtype)

    # ----------------------------------------------------------------------------------------- encode / decode
    def encode_to_latent(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels `[B, 3, T, H, W]` in [-1, 1] -> normalised latent means `[B, F, C, h, w]`, F = (T-1)/4 + 1."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise UserError(f"video of shape {tuple(video.shape)}: expected [B, 3, T, H, W] pixels in [-1, 1]")
        self.latent_shape(video.shape[2], video.shape[3], video.shape[4])
        posterior = self.model.encode(video.to(device=self.model.device, dtype=self.dtype)).latent_dist
        return self.normalize(posterior.mode())

    def decode_to_pixel(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents `[B, F, C, h, w]` -> pixels `[B, T, 3, H, W]` in [-1, 1], T = 4(F-1) + 1."""
        video = self.model.decode(self.denormalize(latents.to(self.model.device))).sample
        return video.permute(0, 2, 1, 3, 4)

    def stream_decoder(self) -> "StreamingDecoder":
        """A decoder that takes latent blocks one after another and keeps the causal cache between them."""
        return StreamingDecoder(self)


class StreamingDecoder:
    """Block-by-block decoding for streaming inference; the concatenated output equals one full decode.

    It drives the diffusers decoder one latent frame at a time with its own feature cache, the same
    sequence of calls a full decode makes, so blocks of any size give the same pixels.
    """

    def __init__(self, vae: WanVAEWrapper) -> None:
        self.vae = vae
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.model.decoder.modules())
        self.reset()

    def reset(self) -> None:
        """Start a new video."""
        self._cache: list = [None] * self._num_convs
        self._first = True

    def decode(self, latent_block: torch.Tensor) -> torch.Tensor:
        """Normalised latents `[B, f, C, h, w]` -> pixels `[B, t, 3, H, W]`: t = 4f - 3 for the first block, else 4f."""
        model = self.vae.model
        x = model.post_quant_conv(self.vae.denormalize(latent_block.to(model.device)))  # 1x1x1: needs no cache
        frames = []
        for i in range(x.shape[2]):
            frames.append(model.decoder(x[:, :, i:i + 1], feat_cache=self._cache, feat_idx=[0], first_chunk=self._first))
            self._first = False
        out = torch.cat(frames, dim=2)
        patch = model.config.patch_size
        if patch is not None:
            out = unpatchify(out, patch_size=patch)
        return out.clamp(-1.0, 1.0).permute(0, 2, 1, 3, 4)


def _load_preset(name_or_dict: str | dict) -> dict:
    if isinstance(name_or_dict, dict):
        return name_or_dict
    from utils.presets import load_vae_preset

    return load_vae_preset(name_or_dict)


__all__ = ["WanVAEWrapper", "StreamingDecoder", "arch_stride", "VAE_VERSIONS"]
