"""WanModel: the bidirectional Wan DiT (Wan2.1 / Wan2.2 t2v and ti2v), official state_dict names.

The constructor arguments are the official config.json fields; the model's shape is declared
there and nowhere else. Two entries: the official list-based `forward` and the batched
`predict_flow` the pipelines use ([B, F, C, H, W] latents, frames before channels).
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn as nn

from utils.errors import UserError
from utils.geometry import check_sequence_parallel
from wan.modules.attention import attention, check_backend
from wan.modules.block import SelfAttend, WanAttentionBlock
from wan.modules.embeddings import (
    Head,
    embed_time,
    linear,
    make_text_embedding,
    make_time_embedding,
    make_time_projection,
    pad_context,
    patchify,
    unpatchify,
)
from wan.modules.rope import rope_grid
from wan.modules.sequence_parallel import SequenceParallel

MODEL_TYPES = ("t2v", "ti2v")


class WanModel(nn.Module):
    def __init__(
        self,
        *,
        model_type: str,
        patch_size: Sequence[int],
        text_len: int,
        in_dim: int,
        dim: int,
        ffn_dim: int,
        freq_dim: int,
        text_dim: int,
        out_dim: int,
        num_heads: int,
        num_layers: int,
        window_size: Sequence[int],
        qk_norm: bool,
        cross_attn_norm: bool,
        eps: float,
        attention_backend: str = "sdpa",
    ):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise UserError(f"model_type {model_type!r} is not supported; expected one of {', '.join(MODEL_TYPES)}")
        if tuple(window_size) != (-1, -1):
            raise UserError(f"window_size {list(window_size)} is not supported; expected [-1, -1] (global attention)")
        if dim % num_heads:
            raise UserError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.config = dict(
            model_type=model_type, patch_size=list(patch_size), text_len=text_len, in_dim=in_dim, dim=dim,
            ffn_dim=ffn_dim, freq_dim=freq_dim, text_dim=text_dim, out_dim=out_dim, num_heads=num_heads,
            num_layers=num_layers, window_size=list(window_size), qk_norm=qk_norm,
            cross_attn_norm=cross_attn_norm, eps=eps,
        )  # fmt: skip
        self.patch_size = tuple(patch_size)
        self.text_len = text_len
        self.out_dim = out_dim
        self.freq_dim = freq_dim
        self.head_dim = dim // num_heads
        self.attention_backend = check_backend(attention_backend)

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = make_text_embedding(text_dim, dim)
        self.time_embedding = make_time_embedding(freq_dim, dim)
        self.time_projection = make_time_projection(dim)
        self.blocks = nn.ModuleList(
            WanAttentionBlock(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, self.attention_backend)
            for _ in range(num_layers)
        )
        self.head = Head(dim, out_dim, self.patch_size, eps)
        # Ulysses sequence parallelism (set by `set_sequence_parallel`); None: the whole sequence on this rank.
        self.sequence_parallel: SequenceParallel | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attention_backend: str = "sdpa",
        arch: dict | None = None,
    ) -> "WanModel":
        """Build from a checkpoint folder (config.json + weights) or a single weights file plus `arch`."""
        from wan.loading import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, attention_backend=attention_backend, arch=arch)

    # ---- sequence parallelism -----------------------------------------------------------------

    def set_sequence_parallel(self, sequence_parallel: SequenceParallel | None) -> None:
        """Split every forward's tokens over a sequence group (None: off); heads must divide by its size."""
        if sequence_parallel is not None and self.config["num_heads"] % sequence_parallel.size:
            raise UserError(f"parallel.sp_size={sequence_parallel.size} does not divide the model's "
                            f"{self.config['num_heads']} attention heads")
        self.sequence_parallel = sequence_parallel

    @property
    def heads_per_rank(self) -> int:
        """Self-attention heads this rank attends (and caches): all of them, or its share under sequence parallelism."""
        size = 1 if self.sequence_parallel is None else self.sequence_parallel.size
        return self.config["num_heads"] // size

    def shard_sequence(
        self, tokens: torch.Tensor, freqs: torch.Tensor, e: torch.Tensor, e0: torch.Tensor, grid: tuple[int, int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's tokens, RoPE angles and (per-token) time conditioning; everything when not sequence-parallel."""
        sp = self.sequence_parallel
        if sp is None:
            return tokens, freqs, e, e0
        frame_tokens = grid[1] * grid[2]
        check_sequence_parallel(sp.size, self.config["num_heads"], frame_tokens)
        if e.shape[1] == tokens.shape[1]:  # one timestep per token: split like the tokens
            e, e0 = sp.shard(e, frame_tokens), sp.shard(e0, frame_tokens)
        return sp.shard(tokens, frame_tokens), sp.shard_frames(freqs, frame_tokens), e, e0

    def self_attention_rule(self, attend: SelfAttend, grid: tuple[int, int, int]) -> SelfAttend:
        """`attend` over all tokens; under sequence parallelism wrapped in the Ulysses all-to-alls."""
        sp = self.sequence_parallel
        return attend if sp is None else sp.wrap(attend, grid[1] * grid[2])

    def gather_sequence(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """The head's output of every token, on every rank of the sequence group."""
        sp = self.sequence_parallel
        return tokens if sp is None else sp.gather(tokens, grid[1] * grid[2])

    # ---- pieces shared with the causal model -------------------------------------------------

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """[B, L <= text_len, text_dim] -> [B, text_len, dim], zero-padded before the embedding (official)."""
        if context.shape[1] > self.text_len:
            raise UserError(f"text context has {context.shape[1]} tokens; this model takes at most {self.text_len}")
        hidden = linear(self.text_embedding[0], pad_context(context, self.text_len))
        return linear(self.text_embedding[2], self.text_embedding[1](hidden))

    def embed_time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [B, G] -> e [B, G, dim], e0 [B, G, 6, dim] (fp32); G groups of consecutive tokens."""
        return embed_time(self.time_embedding, self.time_projection, timestep, self.freq_dim)

    def rope(self, grid: tuple[int, int, int], device: torch.device, start_frame: int = 0) -> torch.Tensor:
        return rope_grid(self.head_dim, *grid, device=device, start_frame=start_frame)

    def run_blocks(
        self,
        tokens: torch.Tensor,
        e0: torch.Tensor,
        freqs: torch.Tensor,
        context_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
        attend: Sequence[SelfAttend],
    ) -> torch.Tensor:
        """The block stack, with one cross-attention (k, v) and one self-attention rule per layer."""
        for block, kv, attend_layer in zip(self.blocks, context_kv, attend, strict=True):
            tokens = block(tokens, e0, freqs, kv, attend_layer)
        return tokens

    def context_key_values(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention (k, v) of a raw text context [B, L, text_dim]."""
        embedded = self.embed_text(context)
        return [block.cross_attn.key_value(embedded) for block in self.blocks]

    def timestep_groups(self, timestep: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Check timestep [B, G]: one per latent frame (G = f) or one per token (G = f*h*w)."""
        frames, height, width = grid
        if timestep.ndim != 2 or timestep.shape[1] not in (frames, frames * height * width):
            raise UserError(
                f"timestep shape {list(timestep.shape)} must be [B, {frames}] (per frame) "
                f"or [B, {frames * height * width}] (per token)"
            )
        return timestep

    # ---- entries ------------------------------------------------------------------------------

    def predict_flow(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Flow prediction v for x [B, F, C, H, W], timestep [B, F] or [B, seq_len], context [B, L, text_dim]."""
        # 1. Tokens, time and text conditioning.
        tokens, grid = patchify(self.patch_embedding, x)
        e, e0 = self.embed_time(self.timestep_groups(timestep, grid))
        context_kv = self.context_key_values(context)

        tokens, freqs, e, e0 = self.shard_sequence(tokens, self.rope(grid, x.device), e, e0, grid)

        # 2. Blocks with full bidirectional attention.
        full = self.self_attention_rule(functools.partial(attention, backend=self.attention_backend), grid)
        tokens = self.run_blocks(tokens, e0, freqs, context_kv, [full] * len(self.blocks))

        # 3. Head and unpatchify.
        return unpatchify(self.gather_sequence(self.head(tokens, e), grid), grid, self.patch_size, self.out_dim)

    def forward(
        self, x: list[torch.Tensor], t: torch.Tensor, context: list[torch.Tensor], seq_len: int
    ) -> list[torch.Tensor]:
        """Official call: x list of [C, F, H, W], t [B] or [B, seq_len], context list of [L_i, text_dim]."""
        if len({tuple(u.shape) for u in x}) > 1:
            # Mixed sizes: run each sample alone (the official model pads to seq_len and masks; same result).
            return [
                self.forward([u], t[i : i + 1], [c], seq_len)[0] for i, (u, c) in enumerate(zip(x, context, strict=True))
            ]
        latents = torch.stack(x).transpose(1, 2)  # [B, F, C, H, W]
        pt, ph, pw = self.patch_size
        _, frames, _, height, width = latents.shape
        num_tokens = (frames // pt) * (height // ph) * (width // pw)
        if num_tokens > seq_len:
            raise UserError(f"the latent has {num_tokens} tokens, more than seq_len {seq_len}")
        # [B] -> the same t for every frame; [B, seq_len] -> per token, padding positions dropped.
        timestep = t[:, None].expand(-1, frames // pt) if t.ndim == 1 else t[:, :num_tokens]
        padded = torch.stack([pad_context(c[None], self.text_len)[0] for c in context])
        flow = self.predict_flow(latents, timestep, padded)
        return list(flow.transpose(1, 2).unbind(0))
