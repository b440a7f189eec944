"""`verify.py vae` and `verify.py text`: shapes of a VAE round trip and of the text embedding at the recipe's size.

Without weights the real-size modules run on the meta device (shapes only, no memory); with weights (named
in the recipe, or found in --ckpt_dir under their official names) the computation is real. Each check is
(name, passed, detail).
"""
from __future__ import annotations

from pathlib import Path

import torch

from utils.config import Config
from utils.geometry import resolve_recipe
from utils.presets import load_text_encoder_preset

Check = tuple[str, "bool | None", str]  # passed: True, False, or None when it could not run (SKIP)

# Names looked for in --ckpt_dir when the recipe names no weights: official files, then diffusers subfolders.
VAE_FILES = {"wan2.1": ("Wan2.1_VAE.pth", "vae"), "wan2.2": ("Wan2.2_VAE.pth", "vae")}
T5_FILE, T5_TOKENIZER = "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl"
T5_NAMES, TOKENIZER_NAMES = (T5_FILE, "text_encoder"), (T5_TOKENIZER, "tokenizer")
PROBE_PROMPT = "a red fox runs through fresh snow at dawn"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _find(named: str | None, ckpt_dir: str | None, names: tuple[str, ...]) -> tuple[str | None, str]:
    """Weights the recipe names (when they exist here), else the official names in --ckpt_dir; and a note."""
    if named and Path(named).exists():
        return named, ""
    for name in names if ckpt_dir else ():
        if (Path(ckpt_dir) / name).exists():
            return str(Path(ckpt_dir) / name), ""
    return None, f" (named {named} not found here)" if named else ""


# --------------------------------------------------------------------------------------------- VAE
def check_vae(config: Config, ckpt_dir: str | None = None) -> list[Check]:
    from wan.vae import WanVAEWrapper

    recipe = resolve_recipe(config, need_scores=False, check_weights=False)
    spec, geometry = recipe.vae, recipe.geometry
    if spec.kind not in VAE_FILES:
        return [("vae.kind", None, f"{spec.kind} VAE: not a Wan VAE, checked by its own tests")]
    weights, note = _find(spec.checkpoint, ckpt_dir, VAE_FILES[spec.kind])
    checks: list[Check] = []
    if weights:
        device, dtype = _device(), torch.bfloat16 if _device().type == "cuda" else torch.float32
        vae = WanVAEWrapper.from_pretrained(weights, dtype=dtype, device=device, preset=spec.preset)
        checks.append(("vae.weights", True, f"{weights}: {vae.version}, every key used"))
    elif spec.preset.get("arch"):
        device, dtype = torch.device("meta"), torch.float32
        vae = WanVAEWrapper.from_preset(spec.preset, device="meta")
        checks.append(("vae.weights", None, f"no weights{note}: nothing read; preset '{spec.name}' shapes checked on the "
                                            "meta device only"))
    else:
        return [("vae.weights", False, f"VAE preset '{spec.name}' has no arch and no weights were found")]

    # 1. the VAE the recipe names has the latent space the geometry was derived for
    same_space = (vae.z_dim, vae.stride) == (spec.z_dim, tuple(spec.stride))
    detail = f"z_dim {vae.z_dim} stride {vae.stride} (preset: {spec.z_dim} {tuple(spec.stride)})"
    checks.append(("vae.latent_space", same_space, detail))

    # 2. encode -> decode round trip at the recipe's size
    frames, height, width = geometry.num_pixel_frames, geometry.height, geometry.width
    expected_latent = (1, *geometry.latent_shape[1:])
    with torch.no_grad():
        video = torch.zeros(1, 3, frames, height, width, device=device, dtype=dtype)
        if device.type != "meta":  # a smooth ramp, so the round trip error means something
            ramp = torch.linspace(-0.8, 0.8, width, device=device, dtype=dtype)
            video += ramp.view(1, 1, 1, 1, -1)
        latents = vae.encode_to_latent(video)
        shape = tuple(latents.shape)
        checks.append(("vae.encode_shape", shape == expected_latent, f"{shape} expected {expected_latent}"))
        pixels = vae.decode_to_pixel(latents)
        expected_pixels = (1, frames, 3, height, width)
        shape = tuple(pixels.shape)
        checks.append(("vae.decode_shape", shape == expected_pixels, f"{shape} expected {expected_pixels}"))

        # 3. streaming decode over the rollout's blocks gives the same frames
        decoder, start, parts = vae.stream_decoder(), 0, []
        for size in geometry.block_sizes:
            parts.append(decoder.decode(latents[:, start:start + size]))
            start += size
        streamed = torch.cat(parts, dim=1)
        same = tuple(streamed.shape) == expected_pixels
        detail = f"blocks {list(geometry.block_sizes)} -> {streamed.shape[1]} frames"
        if device.type != "meta":
            error = (streamed.float() - pixels.float()).abs().max().item()
            recon = (pixels.float().permute(0, 2, 1, 3, 4) - video.float()).abs().mean().item()
            same = same and error < 1e-2 and torch.isfinite(pixels).all().item()
            detail += f", max |stream - full| {error:.2e}, mean reconstruction error {recon:.3f}"
        checks.append(("vae.streaming_decode", same, detail))
    return checks


# --------------------------------------------------------------------------------------------- text
def check_text(config: Config, ckpt_dir: str | None = None) -> list[Check]:
    from wan.text_encoder import WanTextEncoder

    ref = config.text_encoder
    preset = load_text_encoder_preset(ref.preset)
    text_dim = resolve_recipe(config, need_scores=False, check_weights=False).geometry.text_dim
    checks: list[Check] = []
    if preset["kind"] == "umt5":
        weights, note = _find(ref.checkpoint, ckpt_dir, T5_NAMES)
        tokenizer, tokenizer_note = _find(ref.tokenizer, ckpt_dir, TOKENIZER_NAMES)
        if weights and tokenizer:
            dtype = torch.bfloat16 if _device().type == "cuda" else torch.float32
            encoder = WanTextEncoder.from_pretrained(weights, tokenizer, dtype=dtype, device=_device(), preset=preset)
            checks.append(("text.weights", True, f"{weights} + tokenizer {tokenizer}: read, every key used"))
        else:
            encoder = WanTextEncoder.from_preset(preset, device="meta")
            checks.append(("text.weights", None, f"no weights{note or tokenizer_note}: nothing read; umT5 shapes checked "
                                                 "on the meta device only"))
    else:
        encoder = WanTextEncoder.from_preset(preset, weights=ref.checkpoint)
        shipped = f" with {ref.checkpoint}" if ref.checkpoint else " (random weights)"
        checks.append(("text.weights", True, f"tiny preset '{ref.preset}'{shipped}"))

    checks.append(("text.dim", encoder.dim == text_dim, f"encoder dim {encoder.dim}, generator text_dim {text_dim}"))
    expected = (2, encoder.text_len, encoder.dim)
    if encoder.tokenizer is None:  # meta: ids stand in for prompts
        ids = torch.zeros(2, encoder.text_len, dtype=torch.long, device="meta")
        out = encoder.encode_ids(ids, torch.ones_like(ids))
        checks.append(("text.embedding_shape", tuple(out.shape) == expected, f"{tuple(out.shape)} expected {expected}"))
        return checks
    out = encoder.encode([PROBE_PROMPT, ref.negative_prompt])
    checks.append(("text.embedding_shape", tuple(out.shape) == expected, f"{tuple(out.shape)} expected {expected}"))
    _, mask = encoder.tokenizer([PROBE_PROMPT, ref.negative_prompt], encoder.text_len)
    lengths = mask.sum(1).tolist()
    zero_tail = all(out[i, n:].eq(0).all().item() and out[i, :n].abs().sum(-1).gt(0).all().item() for i, n in enumerate(lengths))
    checks.append(("text.trimmed", zero_tail and torch.isfinite(out).all().item(), f"true lengths {lengths}, zero beyond"))
    return checks
