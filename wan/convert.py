"""DiT key names and config fields: official Wan <-> diffusers WanTransformer3DModel.

Renames are whole-prefix matches from a table (not substring replaces), so a key that fits no row
is reported as unknown instead of being silently mangled.
"""
from __future__ import annotations

import re
from typing import Iterable, Literal

from utils.presets import ARCH_FIELDS
from wan.modules.rope import ROPE_MAX_POSITIONS

Naming = Literal["official", "diffusers"]

# (official prefix, diffusers prefix) outside the blocks.
_TOP_LEVEL = (
    ("patch_embedding.", "patch_embedding."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
)

# (official, diffusers) after `blocks.N.`; official norm3 (affine, before cross-attention) is diffusers norm2.
_IN_BLOCK = (
    ("modulation", "scale_shift_table"),
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    *(
        (f"{official}.{src}", f"{diffusers}.{dst}")
        for official, diffusers in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for src, dst in (("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("o.", "to_out.0."),
                         ("norm_q.", "norm_q."), ("norm_k.", "norm_k."))
    ),
)

_BLOCK_KEY = re.compile(r"^(blocks\.\d+\.)(.*)$")


def _rename(key: str, to: Naming) -> str | None:
    src, dst = (0, 1) if to == "diffusers" else (1, 0)
    match = _BLOCK_KEY.match(key)
    prefix, rest, table = (match.group(1), match.group(2), _IN_BLOCK) if match else ("", key, _TOP_LEVEL)
    for row in table:
        if rest == row[src] or (row[src].endswith(".") and rest.startswith(row[src])):
            return prefix + row[dst] + rest[len(row[src]) :]
    return None


def official_to_diffusers_key(key: str) -> str | None:
    """The diffusers name of an official DiT key, or None when the key is not a Wan DiT key."""
    return _rename(key, "diffusers")


def diffusers_to_official_key(key: str) -> str | None:
    """The official name of a diffusers DiT key, or None when the key is not a Wan DiT key."""
    return _rename(key, "official")


def detect_naming(keys: Iterable[str]) -> Naming:
    """'diffusers' when any key carries a diffusers-only name, else 'official'."""
    markers = ("condition_embedder.", "proj_out.", "scale_shift_table", ".attn1.", ".attn2.")
    return "diffusers" if any(marker in key for key in keys for marker in markers) else "official"


def to_official_key(key: str, naming: Naming) -> str | None:
    return key if naming == "official" else diffusers_to_official_key(key)


def official_to_diffusers_config(arch: dict) -> dict:
    """A diffusers WanTransformer3DModel config.json for official architecture fields."""
    missing = [k for k in ARCH_FIELDS if k not in arch]
    if missing:
        raise KeyError(f"architecture lacks {', '.join(missing)}")
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(arch["patch_size"]),
        "num_attention_heads": arch["num_heads"],
        "attention_head_dim": arch["dim"] // arch["num_heads"],
        "in_channels": arch["in_dim"],
        "out_channels": arch["out_dim"],
        "text_dim": arch["text_dim"],
        "freq_dim": arch["freq_dim"],
        "ffn_dim": arch["ffn_dim"],
        "num_layers": arch["num_layers"],
        "cross_attn_norm": arch["cross_attn_norm"],
        "qk_norm": "rms_norm_across_heads" if arch["qk_norm"] else None,
        "eps": arch["eps"],
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": ROPE_MAX_POSITIONS,
        # Not a diffusers field (its pipeline pads text to 512 itself); kept so the DiT's padding survives a round trip.
        "text_len": arch["text_len"],
    }
