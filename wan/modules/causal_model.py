"""CausalWanModel: the Wan DiT run frame-block by frame-block, for Self-Forcing students.

Same blocks, same weights and the same state_dict keys as WanModel; only the self-attention rule
differs, and each rule is its own method (nothing is inferred from tensor shapes):
  - forward_block_causal: the whole video at once, each token seeing its own block and earlier ones;
  - forward_cached: one block against a KVCache of committed frames (commit=True writes the block).
"""
from __future__ import annotations

import functools

import torch

from utils.errors import UserError
from wan.modules.attention import BlockCausalMask, attention
from wan.modules.block import SelfAttend
from wan.modules.embeddings import patchify, unpatchify
from wan.modules.kv_cache import CachePlan, KVCache
from wan.modules.model import WanModel


class CausalWanModel(WanModel):
    def __init__(self, **config):
        super().__init__(**config)
        if self.patch_size[0] != 1:
            raise UserError(f"the causal model needs patch_size[0] == 1 (a token frame per latent frame), got {self.patch_size}")

    def _check_frame_timesteps(self, timestep: torch.Tensor, num_frames: int) -> None:
        if timestep.shape != (timestep.shape[0], num_frames):
            raise UserError(f"causal timestep shape {list(timestep.shape)} must be [B, {num_frames}] (one per latent frame)")

    def forward_block_causal(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        num_frame_per_block: int,
        *,
        window_frames: int | None = None,
        sink_frames: int = 0,
        block_sizes: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Flow prediction for the whole video x [B, F, C, H, W] with block-causal self-attention.

        window_frames / sink_frames: the KV cache's window (rollout.local_attn_size) and sink, so each block sees
        what the rolling cache would give it at inference; block_sizes: unequal blocks (independent first frame).
        """
        num_frames = x.shape[1]
        if block_sizes is not None and sum(block_sizes) != num_frames:
            raise UserError(f"block sizes {list(block_sizes)} do not add up to {num_frames} latent frames")
        if block_sizes is None and num_frames % num_frame_per_block:
            raise UserError(f"{num_frames} latent frames are not a whole number of blocks of {num_frame_per_block}")
        self._check_frame_timesteps(timestep, num_frames)
        # 1. Tokens and conditioning (one modulation group per frame).
        tokens, grid = patchify(self.patch_embedding, x)
        e, e0 = self.embed_time(timestep)
        # 2. Blocks: a token sees the tokens of its own block and of every earlier block.
        frame_tokens = grid[1] * grid[2]
        ends = None
        if block_sizes is not None:
            ends = tuple(frame_tokens * sum(block_sizes[: i + 1]) for i in range(len(block_sizes)))
        mask = BlockCausalMask(
            block_tokens=num_frame_per_block * frame_tokens,
            window_tokens=None if window_frames is None else window_frames * frame_tokens,
            sink_tokens=sink_frames * frame_tokens,
            block_ends=ends,
        )
        attend = self.self_attention_rule(functools.partial(attention, backend=self.attention_backend, mask=mask), grid)
        context_kv = self.context_key_values(context)
        tokens, freqs, e, e0 = self.shard_sequence(tokens, self.rope(grid, x.device), e, e0, grid)
        tokens = self.run_blocks(tokens, e0, freqs, context_kv, [attend] * len(self.blocks))
        # 3. Head.
        return unpatchify(self.gather_sequence(self.head(tokens, e), grid), grid, self.patch_size, self.out_dim)

    def forward_cached(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        kv_cache: KVCache,
        start_frame: int,
        commit: bool,
    ) -> torch.Tensor:
        """Flow prediction for one block x [B, f, C, H, W] whose first frame is frame `start_frame` of the video.

        The block attends to the cached frames plus itself; RoPE frame positions are absolute. With
        commit=True its keys and values are written to the cache (the context pass).
        """
        num_frames = x.shape[1]
        self._check_frame_timesteps(timestep, num_frames)
        # 1. Tokens and conditioning; RoPE from the block's absolute frame index.
        tokens, grid = patchify(self.patch_embedding, x)
        self._check_cache(kv_cache, x.shape[0], grid)
        e, e0 = self.embed_time(timestep)
        freqs = self.rope(grid, x.device, start_frame=start_frame)
        context_kv = kv_cache.cross_attention(context, lambda: self.context_key_values(context))
        tokens, freqs, e, e0 = self.shard_sequence(tokens, freqs, e, e0, grid)
        # 2. Blocks: self-attention over the cache window plus the block itself (under sequence parallelism the
        #    cache holds every token of this rank's heads).
        plan = kv_cache.plan(start_frame, num_frames)
        attend = [self.self_attention_rule(self._cached_attend(kv_cache, layer, plan, commit), grid)
                  for layer in range(len(self.blocks))]
        tokens = self.run_blocks(tokens, e0, freqs, context_kv, attend)
        if commit:
            kv_cache.commit(plan)
        # 3. Head.
        return unpatchify(self.gather_sequence(self.head(tokens, e), grid), grid, self.patch_size, self.out_dim)

    def _cached_attend(self, kv_cache: KVCache, layer: int, plan: CachePlan, commit: bool) -> SelfAttend:
        view = kv_cache.layer_view(layer, plan, commit)

        # Cache bookkeeping is Python over slot indices: a compiled block runs it (and the attention kernel,
        # already fused) eagerly, so its compiled parts depend only on the block's own token count.
        @torch.compiler.disable
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = view(k, v)
            return attention(q, keys.to(q.dtype), values.to(q.dtype), backend=self.attention_backend)

        return attend

    def _check_cache(self, kv_cache: KVCache, batch_size: int, grid: tuple[int, int, int]) -> None:
        expected = (len(self.blocks), batch_size, grid[1] * grid[2], self.heads_per_rank, self.head_dim)
        actual = (kv_cache.num_layers, kv_cache.batch_size, kv_cache.frame_seq_length, kv_cache.num_heads, kv_cache.head_dim)
        if expected != actual:
            raise UserError(
                f"KV cache (layers, batch, frame_seq_length, heads, head_dim) = {actual} does not fit this model "
                f"and latent: expected {expected}"
            )
