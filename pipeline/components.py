"""Build the recipe's components (DiTs, VAE, text encoder) from resolved specs, through the registries of
`utils.registry`: the framework's own kinds are registered here, other packages register theirs.

Training, inference, ODE-pair generation and verification all build through here, so a model is loaded
the same way everywhere: weights from the checkpoint when one is named, a seeded random init otherwise
(tiny recipes and benchmarks).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from utils.config import Config
from utils.errors import UserError
from utils.fake import fake_mode_active
from utils.presets import ModelSpec, VaeSpec, load_text_encoder_preset
from utils.registry import DITS, TEXT_ENCODERS, VAES

# Seed offsets keep the random init of each role distinct but reproducible.
ROLE_SEED = {"generator": 0, "real_score": 1, "critic": 2}


DIT_FAMILY = "wan"  # every DiT of this framework; benchmarks replace its builder with random weights made on the GPU


def build_dit(
    spec: ModelSpec,
    *,
    causal: bool,
    attention_backend: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> nn.Module:
    """A WanModel (bidirectional), CausalWanModel (causal) or MoEWanModel (MoE teacher) for one role."""
    return DITS.get(DIT_FAMILY)(spec, causal=causal, attention_backend=attention_backend, device=device, dtype=dtype,
                                seed=seed)


@DITS.register(DIT_FAMILY)
def build_wan_dit(spec: ModelSpec, *, causal: bool, attention_backend: str, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The Wan DiT of the spec: from its checkpoint, or a seeded random init (meta tensors on device "meta")."""
    from wan.modules.causal_model import CausalWanModel
    from wan.modules.model import WanModel

    cls = CausalWanModel if causal else WanModel
    if spec.is_moe:
        if causal:
            raise UserError(f"{spec.role} '{spec.name}' is a mixture of experts: it can only be a (bidirectional) teacher")
        from wan.moe import MoEWanModel

        if not spec.checkpoint and fake_mode_active():  # a memory estimate: both experts, no weights
            return MoEWanModel(WanModel(**spec.arch, attention_backend=attention_backend),
                               WanModel(**spec.arch, attention_backend=attention_backend), spec.moe_boundary)
        if not spec.checkpoint:
            raise UserError(f"{spec.role} '{spec.name}' is a mixture of experts: set {spec.role}.checkpoint to its folder")
        return MoEWanModel.from_pretrained(
            spec.checkpoint, boundary=spec.moe_boundary, dtype=dtype, device=device, attention_backend=attention_backend
        )
    if spec.checkpoint:
        # a folder carries its config.json; a bare weights file takes the resolved architecture
        arch = spec.arch if Path(spec.checkpoint).is_file() else None
        return cls.from_pretrained(spec.checkpoint, dtype=dtype, device=device, attention_backend=attention_backend,
                                   arch=arch)
    if str(device) == "meta":
        with torch.device("meta"):
            return cls(**spec.arch, attention_backend=attention_backend)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + ROLE_SEED.get(spec.role, 0))
        model = cls(**spec.arch, attention_backend=attention_backend)
    return place(model, device, dtype)


def place(model: nn.Module, device: str | torch.device, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """model.to(device, dtype), skipped when every parameter is already there (fake tensors cannot be swapped)."""
    device = torch.device(device)
    params = list(model.parameters())
    if all(p.device == device and (dtype is None or p.dtype == dtype) for p in params):
        return model
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def build_vae(vae: VaeSpec, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The recipe's VAE, by its preset's kind: a Wan VAE here, others from the packages that register them."""
    return VAES.get(vae.kind)(vae, device=device, dtype=dtype)


@VAES.register("wan2.1", "wan2.2")
def build_wan_vae(vae: VaeSpec, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Wan VAE: the official weights, or a tiny random preset."""
    from wan.vae import WanVAEWrapper

    if vae.checkpoint:
        return WanVAEWrapper.from_pretrained(vae.checkpoint, dtype=dtype, device=device, preset=vae.preset)
    return WanVAEWrapper.from_preset(vae.preset, dtype=dtype, device=device)


def text_encoder_device(config: Config, run_device: torch.device) -> torch.device:
    choice = config.text_encoder.device
    return run_device if choice == "auto" else torch.device(choice)


def text_encoder_dtype(config: Config) -> torch.dtype:
    """bf16 for umT5-XXL (its published weights are bf16, 11 GB; fp32 would double them), fp32 for tiny presets."""
    return torch.bfloat16 if load_text_encoder_preset(config.text_encoder.preset)["kind"] == "umt5" else torch.float32


def build_text_encoder(config: Config, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       seed: int = 0) -> nn.Module:
    """The recipe's text encoder, by its preset's kind (umT5-XXL or a tiny encoder here)."""
    preset = load_text_encoder_preset(config.text_encoder.preset)
    return TEXT_ENCODERS.get(preset["kind"])(config, preset, device=device, dtype=dtype, seed=seed)


@TEXT_ENCODERS.register("umt5", "tiny")
def build_wan_text_encoder(config: Config, preset: dict, *, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """umT5-XXL from the official file, or a tiny encoder from its preset (and shipped weights when named)."""
    from wan.text_encoder import WanTextEncoder

    ref = config.text_encoder
    if preset["kind"] == "umt5":
        if not ref.checkpoint or not ref.tokenizer:
            raise UserError("text_encoder.checkpoint and text_encoder.tokenizer must name models_t5_umt5-xxl-enc-bf16.pth "
                            "and the google/umt5-xxl folder")
        return WanTextEncoder.from_pretrained(ref.checkpoint, ref.tokenizer, text_len=preset["text_len"], dtype=dtype,
                                              device=device)
    if ref.checkpoint:
        return WanTextEncoder.from_preset(preset, weights=ref.checkpoint, dtype=dtype, device=device)
    return WanTextEncoder.from_preset(preset, seed=seed, dtype=dtype, device=device)


def compile_blocks(model: nn.Module, enabled: bool | None, mode: str, device: torch.device) -> bool:
    """torch.compile each transformer block in place (regional compilation); returns whether it did.

    `enabled` None means on for CUDA and off elsewhere (a CPU compile costs tens of seconds per block
    size for little gain). The cached self-attention is excluded from the compiled regions
    (wan.modules.causal_model), so the compiled code depends only on the block's own token count: one
    compilation per block size, reused by every layer, step, block and cache fill.
    """
    if not (device.type == "cuda" if enabled is None else enabled):
        return False
    for block in model.blocks:
        block.compile(dynamic=False, mode=mode)
    return True


def check_light_decoder(config: Config, vae: VaeSpec) -> Optional[dict]:
    """The light decoder's architecture when the recipe decodes with one, checked against the VAE's latents.

    It reads only the file's shapes, so a decoder made for other latents is refused before any model loads.
    """
    if config.inference.decoder != "light":
        return None
    from wan.light_decoder import check_light_decoder_matches, read_light_decoder_arch

    path = config.inference.light_decoder
    arch = read_light_decoder_arch(path)
    check_light_decoder_matches(arch, vae.z_dim, vae.stride, path)
    return arch


def build_light_decoder(config: Config, vae: VaeSpec, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> Optional[nn.Module]:
    """The recipe's light decoder (inference.decoder: light), or None when it decodes with the full VAE.

    The file is read once here; its architecture is checked against the VAE's latents as loaded."""
    if config.inference.decoder != "light":
        return None
    from wan.light_decoder import LightDecoder, check_light_decoder_matches

    path = config.inference.light_decoder
    model = LightDecoder.from_pretrained(path, device=device, dtype=dtype)
    check_light_decoder_matches(model.arch(), vae.z_dim, vae.stride, path)
    return model


def overlap_decode_enabled(config: Config, device: torch.device) -> bool:
    """inference.overlap_decode, its empty default resolved: on for CUDA, off elsewhere."""
    choice = config.inference.overlap_decode
    return device.type == "cuda" if choice is None else bool(choice)
