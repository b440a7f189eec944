"""The umT5 text encoder: official key map, an official-layout file checked against an independent
official-semantics forward written here, trimming/zeroing, tokenizers, tiny presets and user errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from utils.errors import UserError
from wan.t5_convert import hf_to_official_names, official_to_hf_names
from wan.text_encoder import WanTextEncoder
from wan.tokenizers import HuggingfaceTokenizer, WordTokenizer, clean_prompt

WORDS = ["a", "the", "cat", "dog", "red", "blue", "circle", "moving", "left", "on", "park", "night"]
TINY = dict(kind="tiny", d_model=16, d_ff=24, num_layers=2, num_heads=2, d_kv=8, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, text_len=12, vocab=WORDS)


# ----------------------------------------------------------------------------------------- helpers
def official_weights(cfg: dict, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official umT5 names and shapes (nothing from transformers)."""
    gen = torch.Generator().manual_seed(seed)
    d, f, inner, heads = cfg["d_model"], cfg["d_ff"], cfg["num_heads"] * cfg["d_kv"], cfg["num_heads"]

    def rnd(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    w = {"token_embedding.weight": rnd(vocab_size, d, scale=1.0), "norm.weight": 1 + rnd(d, scale=0.1)}
    for n in range(cfg["num_layers"]):
        b = f"blocks.{n}."
        w.update({
            b + "norm1.weight": 1 + rnd(d, scale=0.1),
            b + "attn.q.weight": rnd(inner, d), b + "attn.k.weight": rnd(inner, d),
            b + "attn.v.weight": rnd(inner, d), b + "attn.o.weight": rnd(d, inner),
            b + "pos_embedding.embedding.weight": rnd(cfg["relative_attention_num_buckets"], heads, scale=1.0),
            b + "norm2.weight": 1 + rnd(d, scale=0.1),
            b + "ffn.gate.0.weight": rnd(f, d), b + "ffn.fc1.weight": rnd(f, d), b + "ffn.fc2.weight": rnd(d, f),
        })
    return w


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def _bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 relative-position bucket, as the official umT5 computes it."""
    half = num_buckets // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    far = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return out + torch.where(rel < exact, rel, far.clamp(max=half - 1))


def official_forward(w: dict, cfg: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """An independent umT5 encoder forward on official names: no 1/sqrt(d), per-block position bias,
    gated GELU(tanh) FFN fc2(fc1(x) * gelu(gate(x)))."""
    batch, length = ids.shape
    heads = cfg["num_heads"]
    x = w["token_embedding.weight"][ids]
    pos = torch.arange(length)
    buckets = _bucket(pos[None, :] - pos[:, None], cfg["relative_attention_num_buckets"], cfg["relative_attention_max_distance"])
    for n in range(cfg["num_layers"]):
        b = f"blocks.{n}."
        bias = w[b + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)  # [heads, Lq, Lk]
        h = _rms(x, w[b + "norm1.weight"])
        q, k, v = (
            (h @ w[b + f"attn.{p}.weight"].T).view(batch, length, heads, -1) for p in "qkv"
        )
        scores = torch.einsum("binc,bjnc->bnij", q, k) + bias
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        out = torch.einsum("bnij,bjnc->binc", scores.softmax(-1), v).reshape(batch, length, -1)
        x = x + out @ w[b + "attn.o.weight"].T
        h = _rms(x, w[b + "norm2.weight"])
        gate = torch.nn.functional.gelu(h @ w[b + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + ((h @ w[b + "ffn.fc1.weight"].T) * gate) @ w[b + "ffn.fc2.weight"].T
    return _rms(x, w["norm.weight"])


def write_tokenizer_folder(folder: Path, words: list[str]) -> Path:
    """A tiny local Hugging Face tokenizer folder (word level, pad 0, eos 1, unk 2), umT5-style EOS appending."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------- 1. key map
def test_key_map_matches_transformers_names_and_inverts():
    from transformers import UMT5EncoderModel

    from wan.text_encoder import _umt5_config

    weights = official_weights(TINY, vocab_size=15)
    mapping, unmapped = official_to_hf_names(weights)
    assert unmapped == []
    assert mapping["blocks.1.ffn.gate.0.weight"] == "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
    assert mapping["blocks.1.ffn.fc1.weight"] == "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert mapping["blocks.0.pos_embedding.embedding.weight"] == bias
    with torch.device("meta"):
        model = UMT5EncoderModel(_umt5_config(TINY, 15, TINY["relative_attention_max_distance"]))
    hf_keys = set(model.state_dict())
    assert set(mapping.values()) == hf_keys - {"encoder.embed_tokens.weight"}  # the tied copy of `shared`
    assert all(tuple(model.state_dict()[mapping[k]].shape) == tuple(v.shape) for k, v in weights.items())
    back, unmapped_back = hf_to_official_names(hf_keys)
    assert unmapped_back == [] and all(back[v] == k for k, v in mapping.items())


# ----------------------------------------------------------------------------------------- 2. official file
def test_official_file_matches_an_independent_official_forward(tmp_path):
    tok_dir = write_tokenizer_folder(tmp_path / "tok", WORDS)
    vocab_size = len(WORDS) + 3
    weights = official_weights(TINY, vocab_size, seed=1)
    torch.save({k: v.to(torch.bfloat16) for k, v in weights.items()}, tmp_path / "t5.pth")  # the official file is bf16
    encoder = WanTextEncoder.from_pretrained(tmp_path / "t5.pth", tok_dir, dtype=torch.float32, preset=TINY)
    assert (encoder.dim, encoder.text_len) == (TINY["d_model"], TINY["text_len"])

    prompts = ["a red cat on the park", "the dog &amp;amp; a blue circle moving left at night zebra"]
    out = encoder.encode(prompts)
    ids, mask = HuggingfaceTokenizer(tok_dir)(prompts, TINY["text_len"])
    assert ids[0, :6].tolist() == [3, 7, 5, 12, 4, 13] and ids[0, 6] == 1 and ids[0, 7:].eq(0).all()  # words, EOS, pad
    assert mask[1].all() and ids[1, -1] == 1  # truncated to text_len, EOS kept
    reference = official_forward({k: v.to(torch.bfloat16).float() for k, v in weights.items()}, TINY, ids, mask)
    lengths = mask.sum(1)
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[row, :n], reference[row, :n], atol=1e-4, rtol=1e-4)
        assert out[row, n:].eq(0).all()
    assert out[0, : lengths[0]].abs().sum(-1).gt(0).all()


# ----------------------------------------------------------------------------------------- 3. tiny presets
def test_tiny_preset_encode_trims_and_zeroes_per_prompt():
    encoder = WanTextEncoder.from_preset(TINY, seed=0)
    batch = encoder.encode(["a red circle", "the dog on the park at night"])
    assert batch.shape == (2, TINY["text_len"], TINY["d_model"])
    assert batch[0, :4].abs().sum(-1).gt(0).all() and batch[0, 4:].eq(0).all()  # 3 words + EOS
    alone = encoder.encode(["a red circle"])  # padding and other rows do not change a prompt's embedding
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-5)


def test_save_and_reload_fixed_weights(tmp_path):
    encoder = WanTextEncoder.from_preset(TINY, seed=5)
    path = encoder.save_pretrained(tmp_path / "tiny_t5.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert "token_embedding.weight" in handle.keys()  # official names on disk
    again = WanTextEncoder.from_preset(TINY, weights=path)
    other = WanTextEncoder.from_preset(TINY, seed=6)
    prompt = ["a blue dog moving left"]
    assert torch.equal(again.encode(prompt), encoder.encode(prompt))
    assert not torch.allclose(other.encode(prompt), encoder.encode(prompt))


def test_encode_cached_memoises_one_prompt():
    encoder = WanTextEncoder.from_preset(TINY)
    first = encoder.encode_cached("a red cat")
    assert encoder.encode_cached("a red cat") is first
    second = encoder.encode_cached("a blue dog")
    assert second is not first and not torch.equal(second, first)


def test_full_size_preset_shapes_on_meta():
    from utils.presets import load_text_encoder_preset

    preset = load_text_encoder_preset("umt5-xxl")
    encoder = WanTextEncoder.from_preset(preset, device="meta")
    ids = torch.zeros(2, preset["text_len"], dtype=torch.long, device="meta")
    assert encoder.encode_ids(ids, torch.ones_like(ids)).shape == (2, preset["text_len"], preset["d_model"])
    with pytest.raises(UserError, match="without a tokenizer"):
        encoder.encode(["a cat"])


# ----------------------------------------------------------------------------------------- 4. tokenizers
def test_word_tokenizer_ids():
    tok = WordTokenizer(WORDS)
    ids, mask = tok(["A  Red, cat!!", "zebra"], 6)
    assert ids.tolist() == [[3, 7, 5, 1, 0, 0], [2, 1, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    long_ids, long_mask = tok(["a " * 20], 6)
    assert long_ids.tolist() == [[3, 3, 3, 3, 3, 1]] and long_mask.all()
    with pytest.raises(UserError, match="not a string"):
        WordTokenizer(["a", True])  # what YAML makes of a bare `on`


def test_clean_prompt_unescapes_twice_and_collapses_whitespace():
    assert clean_prompt("  a &amp;lt;cat&amp;gt;\n\t on   a mat ") == "a <cat> on a mat"


# ----------------------------------------------------------------------------------------- 5. errors
def test_wrong_truncated_and_mismatched_files_are_refused(tmp_path):
    tok_dir = write_tokenizer_folder(tmp_path / "tok", WORDS)
    dit = tmp_path / "dit.pth"
    torch.save({"patch_embedding.weight": torch.zeros(2, 2, 1, 2, 2)}, dit)
    weights = official_weights(TINY, len(WORDS) + 3)
    torch.save(weights, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    torch.save({k: v for k, v in weights.items() if k != "blocks.1.norm2.weight"}, tmp_path / "missing.pth")
    torch.save(dict(weights, **{"blocks.0.extra.weight": torch.zeros(1)}), tmp_path / "extra.pth")
    cases = {"dit.pth": "not an official umT5", "cut.pth": "could not be read",
             "missing.pth": "missing keys encoder.block.1.layer.1.layer_norm.weight", "extra.pth": "blocks.0.extra.weight"}
    for name, expected in cases.items():
        with pytest.raises(UserError, match=expected) as err:
            WanTextEncoder.from_pretrained(tmp_path / name, tok_dir, dtype=torch.float32, preset=TINY)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="tokenizer folder"):
        WanTextEncoder.from_pretrained(tmp_path / "ok.pth", tmp_path / "no_tokenizer", preset=TINY)
