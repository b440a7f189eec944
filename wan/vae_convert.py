"""Key maps between the official Wan VAE checkpoints (Wan2.1_VAE.pth, Wan2.2_VAE.pth) and diffusers'
AutoencoderKLWan, plus the architecture read back from a state dict's names and shapes.

Official layouts:
- Wan2.1 ("flat"): `encoder.downsamples.K` and `decoder.upsamples.K` are flat lists where a resampler
  (it owns `resample.*` / `time_conv.*`) closes each stage.
- Wan2.2 ("residual"): `encoder.downsamples.I.downsamples.J` and `decoder.upsamples.I.upsamples.J`, one
  group per stage, the resampler last in its group.
Both: residual blocks hold `residual.{0,2,3,6}` (norm, conv, norm, conv) and an optional `shortcut`;
`middle.{0,1,2}` is resnet, attention, resnet; `head.{0,2}` is norm and conv; top-level `conv1`/`conv2`
are the (post-)quant convs. The maps are derived from the key set itself, so tiny files map too.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Iterable

# residual block parts: official -> diffusers
_RESNET_PARTS = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
    "shortcut.": "conv_shortcut.",
}
_RESNET_PARTS_INV = {v: k for k, v in _RESNET_PARTS.items()}
_MIDDLE = {"0": "resnets.0.", "1": "attentions.0.", "2": "resnets.1."}
_MIDDLE_INV = {v: k for k, v in _MIDDLE.items()}
_HEAD = {"head.0.": "norm_out.", "head.2.": "conv_out."}
_HEAD_INV = {v: k for k, v in _HEAD.items()}
_TOP = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
_TOP_INV = {v: k for k, v in _TOP.items()}
_RESAMPLE_PREFIXES = ("resample.", "time_conv.")

_FLAT = re.compile(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(.+)$")
_NESTED = re.compile(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(?:downsamples|upsamples)\.(\d+)\.(.+)$")


def _rename_prefix(rest: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def _is_resample(rest: str) -> bool:
    return rest.startswith(_RESAMPLE_PREFIXES)


def is_residual_official(keys: Iterable[str]) -> bool:
    """True for the Wan2.2 (nested, residual) official layout."""
    return any(_NESTED.match(k) for k in keys)


# ---------------------------------------------------------------------------------------------------------
# 1. official -> diffusers
# ---------------------------------------------------------------------------------------------------------
def _flat_decoder_stages(keys: Iterable[str]) -> dict[int, tuple[int, int | None]]:
    """Flat decoder index K -> (stage, index of the resnet within the stage, or None for the resampler)."""
    indices: dict[int, bool] = {}
    for key in keys:
        m = _FLAT.match(key)
        if m and m.group(1) == "decoder.upsamples" and not _NESTED.match(key):
            k = int(m.group(2))
            indices[k] = indices.get(k, False) or _is_resample(m.group(3))
    placement: dict[int, tuple[int, int | None]] = {}
    stage, within = 0, 0
    for k in sorted(indices):
        if indices[k]:
            placement[k] = (stage, None)
            stage, within = stage + 1, 0
        else:
            placement[k] = (stage, within)
            within += 1
    return placement


def _map_side_official(side: str, rest: str, flat_decoder: dict[int, tuple[int, int | None]],
                       full_key: str) -> str | None:
    if rest.startswith("conv1."):
        return f"{side}.conv_in." + rest[len("conv1."):]
    head = _rename_prefix(rest, _HEAD)
    if head is not None:
        return f"{side}.{head}"
    m = re.match(r"^middle\.(\d)\.(.+)$", rest)
    if m and m.group(1) in _MIDDLE:
        sub = m.group(2) if m.group(1) == "1" else _rename_prefix(m.group(2), _RESNET_PARTS)
        return None if sub is None else f"{side}.mid_block.{_MIDDLE[m.group(1)]}{sub}"
    nested = _NESTED.match(full_key)
    if nested:
        stage, j, tail = nested.group(2), nested.group(3), nested.group(4)
        blocks = "down_blocks" if side == "encoder" else "up_blocks"
        if _is_resample(tail):
            sampler = "downsampler" if side == "encoder" else "upsampler"
            return f"{side}.{blocks}.{stage}.{sampler}.{tail}"
        sub = _rename_prefix(tail, _RESNET_PARTS)
        return None if sub is None else f"{side}.{blocks}.{stage}.resnets.{j}.{sub}"
    flat = _FLAT.match(full_key)
    if flat:
        k, tail = int(flat.group(2)), flat.group(3)
        if side == "encoder":  # diffusers keeps Wan2.1's encoder list flat
            sub = tail if _is_resample(tail) else _rename_prefix(tail, _RESNET_PARTS)
            return None if sub is None else f"encoder.down_blocks.{k}.{sub}"
        stage, within = flat_decoder[k]
        if within is None:
            return f"decoder.up_blocks.{stage}.upsamplers.0.{tail}" if _is_resample(tail) else None
        sub = _rename_prefix(tail, _RESNET_PARTS)
        return None if sub is None else f"decoder.up_blocks.{stage}.resnets.{within}.{sub}"
    return None


def official_to_diffusers_names(keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Map official VAE key names to diffusers names. Returns (mapping, keys that map to nothing)."""
    keys = list(keys)
    flat_decoder = _flat_decoder_stages(keys)
    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    for key in keys:
        new: str | None = None
        side, _, rest = key.partition(".")
        if side in ("encoder", "decoder"):
            new = _map_side_official(side, rest, flat_decoder, key)
        else:
            new = _rename_prefix(key, _TOP)
        if new is None:
            unmapped.append(key)
        else:
            mapping[key] = new
    return mapping, unmapped


# ---------------------------------------------------------------------------------------------------------
# 2. diffusers -> official (used to export, and by tests to write official-layout files)
# ---------------------------------------------------------------------------------------------------------
def _diffusers_block_counts(keys: Iterable[str], side: str) -> tuple[dict[int, int], dict[int, bool]]:
    """Per stage of a nested (resnets.J) diffusers side: number of resnets and whether it has a resampler."""
    blocks = "down_blocks" if side == "encoder" else "up_blocks"
    resnets: dict[int, set[int]] = defaultdict(set)
    sampler: dict[int, bool] = defaultdict(bool)
    for key in keys:
        m = re.match(rf"^{side}\.{blocks}\.(\d+)\.(resnets\.(\d+)|downsampler|upsampler|upsamplers\.0)\.", key)
        if m:
            stage = int(m.group(1))
            if m.group(3) is not None:
                resnets[stage].add(int(m.group(3)))
            else:
                sampler[stage] = True
    return {s: len(js) for s, js in resnets.items()}, dict(sampler)


def diffusers_to_official_names(keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Map diffusers AutoencoderKLWan key names to official names. Returns (mapping, unmapped keys)."""
    keys = list(keys)
    dec_resnets, dec_sampler = _diffusers_block_counts(keys, "decoder")
    enc_resnets, _ = _diffusers_block_counts(keys, "encoder")
    residual = any(re.match(r"^encoder\.down_blocks\.\d+\.resnets\.", k) for k in keys)
    # Wan2.1 decoder: flat official index = resnets and resamplers of earlier stages, then the position
    flat_offset, running = {}, 0
    for stage in sorted(dec_resnets):
        flat_offset[stage] = running
        running += dec_resnets[stage] + int(dec_sampler.get(stage, False))

    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    for key in keys:
        new: str | None = None
        side, _, rest = key.partition(".")
        if side not in ("encoder", "decoder"):
            new = _rename_prefix(key, _TOP_INV)
        elif rest.startswith("conv_in."):
            new = f"{side}.conv1." + rest[len("conv_in."):]
        elif _rename_prefix(rest, _HEAD_INV) is not None:
            new = f"{side}.{_rename_prefix(rest, _HEAD_INV)}"
        elif rest.startswith("mid_block."):
            tail = rest[len("mid_block."):]
            for part, index in _MIDDLE_INV.items():
                if tail.startswith(part):
                    sub = tail[len(part):] if index == "1" else _rename_prefix(tail[len(part):], _RESNET_PARTS_INV)
                    new = None if sub is None else f"{side}.middle.{index}.{sub}"
        else:
            new = _map_stage_diffusers(side, rest, residual, enc_resnets, dec_resnets, flat_offset)
        if new is None:
            unmapped.append(key)
        else:
            mapping[key] = new
    return mapping, unmapped


def _map_stage_diffusers(side: str, rest: str, residual: bool, enc_resnets: dict[int, int],
                         dec_resnets: dict[int, int], flat_offset: dict[int, int]) -> str | None:
    official_list = "downsamples" if side == "encoder" else "upsamples"
    m = re.match(r"^(?:down_blocks|up_blocks)\.(\d+)\.(.+)$", rest)
    if not m:
        return None
    stage, tail = int(m.group(1)), m.group(2)
    if side == "encoder" and not residual:  # flat on both sides
        sub = tail if _is_resample(tail) else _rename_prefix(tail, _RESNET_PARTS_INV)
        return None if sub is None else f"encoder.downsamples.{stage}.{sub}"
    r = re.match(r"^resnets\.(\d+)\.(.+)$", tail)
    s = re.match(r"^(?:downsampler|upsampler|upsamplers\.0)\.(.+)$", tail)
    counts = enc_resnets if side == "encoder" else dec_resnets
    if r:
        j, sub = int(r.group(1)), _rename_prefix(r.group(2), _RESNET_PARTS_INV)
    elif s and _is_resample(s.group(1)):
        j, sub = counts[stage], s.group(1)  # the resampler follows the stage's resnets
    else:
        return None
    if sub is None:
        return None
    if residual:
        return f"{side}.{official_list}.{stage}.{official_list}.{j}.{sub}"
    return f"decoder.upsamples.{flat_offset[stage] + j}.{sub}"


# ---------------------------------------------------------------------------------------------------------
# 3. architecture from diffusers-named shapes
# ---------------------------------------------------------------------------------------------------------
def infer_vae_arch(shapes: dict[str, tuple[int, ...]]) -> dict:
    """AutoencoderKLWan keyword arguments read from a diffusers-named state dict's shapes.

    Raises KeyError naming the first missing key the inference needs.
    """
    keys = list(shapes)
    residual = any(re.match(r"^encoder\.down_blocks\.\d+\.resnets\.", k) for k in keys)
    base_dim, in_channels = shapes["encoder.conv_in.weight"][:2]
    out_channels, decoder_last_dim = shapes["decoder.conv_out.weight"][:2]
    z_dim = shapes["post_quant_conv.weight"][0]

    # Encoder stages: first resnet's conv1 output per stage, resampler (with or without time_conv) per stage.
    stage_out: list[int] = []
    temporal: list[bool] = []
    num_res_blocks = 0
    if residual:
        counts, _ = _diffusers_block_counts(keys, "encoder")
        for stage in sorted(counts):
            stage_out.append(shapes[f"encoder.down_blocks.{stage}.resnets.0.conv1.weight"][0])
            if f"encoder.down_blocks.{stage}.downsampler.resample.1.weight" in shapes:
                temporal.append(f"encoder.down_blocks.{stage}.downsampler.time_conv.weight" in shapes)
        num_res_blocks = counts[0]
    else:
        flat = sorted({int(m.group(1)) for k in keys if (m := re.match(r"^encoder\.down_blocks\.(\d+)\.", k))})
        new_stage, in_stage0 = True, 0
        for k in flat:
            if f"encoder.down_blocks.{k}.resample.1.weight" in shapes:
                temporal.append(f"encoder.down_blocks.{k}.time_conv.weight" in shapes)
                new_stage = True
            else:
                if new_stage:
                    stage_out.append(shapes[f"encoder.down_blocks.{k}.conv1.weight"][0])
                    new_stage = False
                in_stage0 += int(len(stage_out) == 1)
        num_res_blocks = in_stage0
    dim_mult = [out // base_dim for out in stage_out]
    decoder_base_dim = decoder_last_dim // dim_mult[0]
    patch = int(math.isqrt(in_channels // 3))
    return {
        "base_dim": base_dim,
        "decoder_base_dim": decoder_base_dim if decoder_base_dim != base_dim else None,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": temporal,
        "is_residual": residual,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "patch_size": patch if patch > 1 else None,
        "scale_factor_temporal": 2 ** sum(temporal),
        "scale_factor_spatial": 2 ** len(temporal) * patch,
    }
