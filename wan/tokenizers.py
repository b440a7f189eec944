"""Prompt tokenizers for the text encoder: umT5's (a local google/umt5-xxl folder) and a word-level one for
tiny encoders. Both take cleaned prompts and return `(ids, mask)` of shape [B, text_len], padded with
pad id 0 and ending each prompt with EOS (truncated to text_len, EOS kept)."""
from __future__ import annotations

import html
import re
import string
from pathlib import Path
from typing import Protocol, Sequence

import torch

from utils.errors import UserError


def clean_prompt(text: str) -> str:
    """The official Wan text cleaning: ftfy (when installed), HTML unescape twice, whitespace collapsed."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy is optional upstream too
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class PromptTokenizer(Protocol):
    def __call__(self, prompts: Sequence[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class WordTokenizer:
    """Lowercase, punctuation to spaces, split on whitespace. Ids: pad 0, eos 1, unk 2, vocab words from 3."""

    PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
    NUM_SPECIAL = 3
    _PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})

    def __init__(self, vocab: Sequence[str]) -> None:
        bad = [w for w in vocab if not isinstance(w, str)]
        if bad:  # YAML reads bare on/off/yes/no as booleans
            raise UserError(f"text encoder vocab entry {bad[0]!r} is not a string: quote it in the YAML (e.g. 'on')")
        words = [w.lower() for w in vocab]
        if len(set(words)) != len(words):
            raise UserError("text encoder vocab has repeated words: expected each word once (lowercase)")
        self.vocab = list(words)
        self._ids = {w: i + self.NUM_SPECIAL for i, w in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + self.NUM_SPECIAL

    def words(self, prompt: str) -> list[str]:
        return clean_prompt(prompt).lower().translate(self._PUNCTUATION).split()

    def __call__(self, prompts: Sequence[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(prompts), text_len), self.PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), text_len), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = [self._ids.get(w, self.UNK_ID) for w in self.words(prompt)][: text_len - 1] + [self.EOS_ID]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask


class HuggingfaceTokenizer:
    """The umT5 tokenizer from a local folder (no download), used the way Wan uses it."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise UserError(f"tokenizer folder {path} does not exist: expected a local google/umt5-xxl folder")
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise UserError(f"tokenizer folder {path} could not be loaded ({str(err).splitlines()[0][:100]})") from None

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    def __call__(self, prompts: Sequence[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._tokenizer(
            [clean_prompt(p) for p in prompts],
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=text_len,
            add_special_tokens=True,
        )
        return out.input_ids, out.attention_mask
