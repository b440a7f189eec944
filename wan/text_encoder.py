"""The umT5 text encoder on transformers' UMT5EncoderModel: the official umt5-xxl file, or a tiny preset.

`encode(prompts)` returns `[B, text_len, dim]` where each prompt keeps its true tokens (EOS included) and
the rest is zero, which is what Wan's DiT sees after it zero-pads the trimmed embeddings to text_len.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import UMT5Config, UMT5EncoderModel

from utils.errors import UserError
from utils.weights import read_weight_file
from wan.t5_convert import TIED_EMBEDDING, hf_to_official_names, infer_t5_size, official_to_hf_names
from wan.tokenizers import HuggingfaceTokenizer, PromptTokenizer, WordTokenizer

_SIZE_FIELDS = ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "relative_attention_num_buckets")


def _load_preset(name_or_dict: str | dict) -> dict:
    if isinstance(name_or_dict, dict):
        return name_or_dict
    from utils.presets import load_text_encoder_preset

    return load_text_encoder_preset(name_or_dict)


def _umt5_config(size: dict, vocab_size: int, max_distance: int) -> UMT5Config:
    return UMT5Config(
        vocab_size=vocab_size,
        **{k: int(size[k]) for k in _SIZE_FIELDS},
        relative_attention_max_distance=max_distance,
        feed_forward_proj="gated-gelu",  # gelu_new (tanh) gate, as the official GELU
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
    )


def _read_official(path: Path) -> dict[str, torch.Tensor]:
    state = read_weight_file(path, "text encoder checkpoint", "models_t5_umt5-xxl-enc-bf16.pth or .safetensors")
    if not isinstance(state, dict) or "token_embedding.weight" not in state:
        first = ", ".join(sorted(state)[:3]) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path} is not an official umT5 encoder file (no token_embedding.weight; first keys: {first})")
    return state


def _read_transformers_folder(path: Path, dtype: torch.dtype) -> UMT5EncoderModel:
    """A transformers UMT5EncoderModel folder (config.json + model*.safetensors [+ index]), read offline."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"text encoder folder {path} has no config.json: expected a diffusers text_encoder/ folder "
                        "(transformers UMT5EncoderModel) or the official models_t5_umt5-xxl-enc-bf16.pth")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except ValueError:
        raise UserError(f"{config_file} is not valid JSON") from None
    if model_type != "umt5":
        raise UserError(f"text encoder folder {path} holds model_type {model_type!r}: expected 'umt5' (UMT5EncoderModel)")
    try:
        return UMT5EncoderModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        first = " ".join(str(err).split())[:200]
        raise UserError(f"text encoder folder {path} cannot be loaded ({first}): a shard missing or truncated?") from None


def _official_to_model(state: dict[str, torch.Tensor], model: UMT5EncoderModel, path: Path, dtype: torch.dtype) -> None:
    """Load official-named weights into `model` (built on meta): every key used, none missing, shapes right."""
    mapping, unmapped = official_to_hf_names(state)
    hf = {mapping[k]: v.to(dtype) for k, v in state.items() if k in mapping}
    hf[TIED_EMBEDDING] = hf["shared.weight"]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in hf]
    wrong = [k for k, v in hf.items() if k in expected and tuple(v.shape) != expected[k]]
    unmapped += [k for k in hf if k not in expected]
    if unmapped or missing or wrong:
        parts = [f"{label} {', '.join(keys[:3])}" for label, keys in (("unused keys", unmapped), ("missing keys", missing),
                                                                         ("wrong shapes", wrong)) if keys]
        raise UserError(f"text encoder checkpoint {path} does not match the umT5 layout read from it: {'; '.join(parts)}")
    model.load_state_dict(hf, strict=True, assign=True)
    model.tie_weights()


class WanTextEncoder(nn.Module):
    """umT5 encoder + tokenizer; prompts in, trimmed-and-zeroed embeddings `[B, text_len, dim]` out."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PromptTokenizer | None, text_len: int,
                 preset: dict | None = None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)  # always frozen in this project
        self.tokenizer = tokenizer
        self._text_len = int(text_len)
        self._preset = preset
        self._cached: tuple[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def from_pretrained(cls, ckpt_path: str | Path, tokenizer_path: str | Path, text_len: int | None = None,
                        dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                        preset: str | dict = "umt5-xxl") -> "WanTextEncoder":
        """The official models_t5_umt5-xxl-enc-bf16.pth (sizes read from its shapes) + a local tokenizer folder.

        `preset` gives what shapes cannot: relative_attention_max_distance, and text_len unless given.
        """
        preset = _load_preset(preset)
        path = Path(ckpt_path)
        tokenizer = HuggingfaceTokenizer(tokenizer_path)  # before the big read: a missing folder fails fast
        if path.is_dir():  # a diffusers pipeline's text_encoder/ (transformers UMT5EncoderModel, sharded safetensors)
            model = _read_transformers_folder(path, dtype)
            return cls(model.to(device), tokenizer, text_len or int(preset["text_len"]))
        state = _read_official(path)
        try:
            size = infer_t5_size({k: tuple(v.shape) for k, v in state.items()})
        except (KeyError, ValueError) as err:
            raise UserError(f"text encoder checkpoint {path} is incomplete: cannot read its size (needs {err})") from None
        config = _umt5_config(size, size["vocab_size"], int(preset["relative_attention_max_distance"]))
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        _official_to_model(state, model, path, dtype)
        return cls(model.to(device), tokenizer, text_len or int(preset["text_len"]))

    @classmethod
    def from_preset(cls, name_or_dict: str | dict, seed: int = 0, weights: str | Path | None = None,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "WanTextEncoder":
        """A tiny UMT5 with a word tokenizer from a preset (d_model, d_ff, num_layers, num_heads, d_kv,
        relative_attention_num_buckets, relative_attention_max_distance, text_len, vocab): random from `seed`,
        or the fixed official-named weights in `weights` (a .safetensors written by save_pretrained). A full-size
        preset (no vocab) builds only on device 'meta', without a tokenizer: `encode_ids` gives shapes."""
        preset = _load_preset(name_or_dict)
        tokenizer: PromptTokenizer | None = None
        if "vocab" in preset:
            tokenizer = WordTokenizer(preset["vocab"])
            vocab_size = tokenizer.vocab_size
        elif str(device) == "meta" and weights is None:  # a full-size preset, for shape checks without weights
            vocab_size = int(preset["vocab_size"])
        else:
            raise UserError("text encoder preset has no vocab: only tiny presets build without weights (set checkpoint)")
        config = _umt5_config(preset, vocab_size, int(preset["relative_attention_max_distance"]))
        if weights is not None:
            with torch.device("meta"):
                model = UMT5EncoderModel(config)
            _official_to_model(_read_official(Path(weights)), model, Path(weights), dtype)
            model = model.to(device)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                with torch.device("meta" if str(device) == "meta" else "cpu"):
                    model = UMT5EncoderModel(config)
            model = model.to(device=device, dtype=dtype)
        return cls(model, tokenizer, int(preset["text_len"]), preset=preset)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a preset encoder's weights under official names (.safetensors), its preset in the metadata."""
        from utils.io import atomic_save_safetensors

        if self._preset is None:
            raise UserError("save_pretrained is for preset (tiny) encoders; the umT5-XXL file is already official")
        state = self.model.state_dict()
        mapping, _ = hf_to_official_names(state)
        official = {mapping[k]: state[k] for k in mapping}
        return atomic_save_safetensors(path, official, metadata={"preset": json.dumps(self._preset)})

    # ----------------------------------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def text_len(self) -> int:
        return self._text_len

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    # ----------------------------------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask `[B, L]` -> `[B, L, dim]`, zero past each row's true length (its mask sum)."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        # on meta (shape checks) the mask has no values for transformers to inspect; shapes do not depend on it
        hidden = self.model(input_ids=ids, attention_mask=None if ids.is_meta else mask).last_hidden_state
        lengths = mask.sum(dim=1, keepdim=True)
        keep = torch.arange(ids.shape[1], device=self.device).unsqueeze(0) < lengths
        return hidden * keep.unsqueeze(-1).to(hidden.dtype)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> `[B, text_len, dim]`: each prompt's tokens (EOS included), the rest zero."""
        if isinstance(prompts, str):
            raise UserError("encode takes a list of prompts, not one string")
        if self.tokenizer is None:
            raise UserError("this text encoder was built without a tokenizer (meta shape check): give it a tokenizer folder")
        ids, mask = self.tokenizer(list(prompts), self.text_len)
        return self.encode_ids(ids, mask)

    def encode_cached(self, prompt: str) -> torch.Tensor:
        """`[1, text_len, dim]` for one prompt, computed once (the negative prompt is encoded every step)."""
        if self._cached is None or self._cached[0] != prompt:
            self._cached = (prompt, self.encode([prompt]))
        return self._cached[1]


__all__ = ["WanTextEncoder"]
