"""Key maps between the official Wan umT5 encoder file (models_t5_umt5-xxl-enc-bf16.pth) and transformers'
UMT5EncoderModel, and the encoder's size read back from the official shapes.

Official names: `token_embedding.weight`, `norm.weight`, and per block `blocks.N.{norm1, attn.{q,k,v,o},
pos_embedding.embedding, norm2, ffn.gate.0, ffn.fc1, ffn.fc2}.weight` (no biases; every umT5 block owns its
relative-position table). The gated FFN is fc2(fc1(x) * gelu(gate(x))), so gate -> wi_0 and fc1 -> wi_1.
"""
from __future__ import annotations

import re
from typing import Iterable

# block part: official -> transformers (under encoder.block.N.)
_BLOCK_PARTS = {
    "norm1.": "layer.0.layer_norm.",
    "attn.q.": "layer.0.SelfAttention.q.",
    "attn.k.": "layer.0.SelfAttention.k.",
    "attn.v.": "layer.0.SelfAttention.v.",
    "attn.o.": "layer.0.SelfAttention.o.",
    "pos_embedding.embedding.": "layer.0.SelfAttention.relative_attention_bias.",
    "norm2.": "layer.1.layer_norm.",
    "ffn.gate.0.": "layer.1.DenseReluDense.wi_0.",
    "ffn.fc1.": "layer.1.DenseReluDense.wi_1.",
    "ffn.fc2.": "layer.1.DenseReluDense.wo.",
}
_BLOCK_PARTS_INV = {v: k for k, v in _BLOCK_PARTS.items()}
_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_TOP_INV = {v: k for k, v in _TOP.items()}
# transformers ties the encoder's input embedding to `shared`; both names hold the official token_embedding
TIED_EMBEDDING = "encoder.embed_tokens.weight"


def _rename_block(rest: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def official_to_hf_names(keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Official key -> UMT5EncoderModel key. Returns (mapping, keys that map to nothing)."""
    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    for key in keys:
        new = _TOP.get(key)
        m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if new is None and m:
            part = _rename_block(m.group(2), _BLOCK_PARTS)
            new = None if part is None else f"encoder.block.{m.group(1)}.{part}"
        if new is None:
            unmapped.append(key)
        else:
            mapping[key] = new
    return mapping, unmapped


def hf_to_official_names(keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """UMT5EncoderModel key -> official key (the tied embed_tokens copy is dropped). Returns (mapping, unmapped)."""
    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    for key in keys:
        if key == TIED_EMBEDDING:
            continue
        new = _TOP_INV.get(key)
        m = re.match(r"^encoder\.block\.(\d+)\.(.+)$", key)
        if new is None and m:
            part = _rename_block(m.group(2), _BLOCK_PARTS_INV)
            new = None if part is None else f"blocks.{m.group(1)}.{part}"
        if new is None:
            unmapped.append(key)
        else:
            mapping[key] = new
    return mapping, unmapped


def infer_t5_size(shapes: dict[str, tuple[int, ...]]) -> dict:
    """UMT5Config size fields read from official-named shapes. Raises KeyError naming a key it needs."""
    vocab_size, d_model = shapes["token_embedding.weight"]
    num_layers = len({int(m.group(1)) for k in shapes if (m := re.match(r"^blocks\.(\d+)\.", k))})
    num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    return {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "d_ff": shapes["blocks.0.ffn.fc1.weight"][0],
        "num_layers": num_layers,
        "num_heads": num_heads,
        "d_kv": shapes["blocks.0.attn.q.weight"][0] // num_heads,
        "relative_attention_num_buckets": num_buckets,
    }
