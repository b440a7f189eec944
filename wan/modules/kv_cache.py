"""The self-attention KV cache of the causal DiT, with a rolling window and an attention sink.

Storage per layer is `[B, max_frames * frame_seq_length, heads, head_dim]` for k and for v, in
frame-sized slots. Slots fill in order; once full, committing a frame overwrites the slot of the
oldest non-sink frame. Attention does not care about key order and RoPE was applied when a key
was written (absolute frame positions), so slots never need to be shifted.

A block always attends to exactly the frames the cache would hold after committing it: the sink,
the most recent frames, and itself. A forward with commit=False reads that same window and
changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from utils.errors import UserError

KeyValue = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CachePlan:
    """Where a block of `num_frames` frames starting at `start_frame` goes, and which frames it evicts."""

    start_frame: int
    num_frames: int
    slots: tuple[int, ...]  # one slot per new frame
    kept_slots: tuple[int, ...]  # filled slots still visible to the block (evicted ones left out)


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_frames: int,
        frame_seq_length: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        sink_frames: int = 0,
    ):
        if not 0 <= sink_frames < max_frames:
            raise UserError(f"sink_frames={sink_frames} must be at least 0 and below the cache size {max_frames} frames")
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.max_frames = max_frames
        self.frame_seq_length = frame_seq_length
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.sink_frames = sink_frames
        shape = (num_layers, batch_size, max_frames * frame_seq_length, num_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.reset()

    @classmethod
    def from_geometry(cls, geometry, batch_size: int, dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        """Sized from a `utils.geometry.Geometry` (cache_frames is the video, or the local window)."""
        return cls(
            num_layers=geometry.num_layers,
            batch_size=batch_size,
            max_frames=geometry.cache_frames,
            frame_seq_length=geometry.frame_seq_length,
            num_heads=geometry.num_heads,
            head_dim=geometry.head_dim,
            dtype=dtype,
            device=device,
            sink_frames=geometry.sink_frames,
        )

    def reset(self) -> None:
        """Forget every committed frame and the cross-attention cache (storage is reused, not zeroed)."""
        self.slot_frames: list[int] = []  # absolute frame index held by slot i; filled slots are a prefix
        self.next_frame = 0  # first frame index not yet committed
        self._cross: list[KeyValue] | None = None
        self._cross_context: tuple[torch.Tensor, int] | None = None

    @property
    def num_cached_frames(self) -> int:
        return len(self.slot_frames)

    # ---- self-attention -----------------------------------------------------------------------

    def plan(self, start_frame: int, num_frames: int) -> CachePlan:
        """Slots for frames start_frame .. start_frame+num_frames-1 (free slots first, then the oldest non-sink)."""
        if start_frame < self.next_frame:
            raise ValueError(f"start_frame {start_frame} is before the next uncommitted frame {self.next_frame}")
        if num_frames > self.max_frames - self.sink_frames:
            raise UserError(
                f"a block of {num_frames} frames does not fit a KV cache of {self.max_frames} frames "
                f"with {self.sink_frames} sink frames"
            )
        free = list(range(len(self.slot_frames), self.max_frames))
        # Non-sink filled slots, oldest frame first: the eviction order.
        evictable = sorted(
            (slot for slot in range(len(self.slot_frames)) if slot >= self.sink_frames), key=self.slot_frames.__getitem__
        )
        slots = (free + evictable)[:num_frames]
        kept = tuple(slot for slot in range(len(self.slot_frames)) if slot not in slots)
        return CachePlan(start_frame, num_frames, tuple(slots), kept)

    def _token_range(self, slot: int) -> slice:
        return slice(slot * self.frame_seq_length, (slot + 1) * self.frame_seq_length)

    def _gather(self, storage: torch.Tensor, slots: tuple[int, ...]) -> torch.Tensor:
        """Tokens of the given slots; a view when they are the leading prefix (the common case)."""
        if slots == tuple(range(len(slots))):
            return storage[:, : len(slots) * self.frame_seq_length]
        return torch.cat([storage[:, self._token_range(slot)] for slot in slots], dim=1)

    def visible(self, layer: int, plan: CachePlan, k: torch.Tensor, v: torch.Tensor, commit: bool) -> KeyValue:
        """Keys and values a block attends to: kept cache frames plus its own (k, v) [B, f*S, H, D].

        With commit=True the block's (k, v) are also written (detached) into its slots.
        """
        if commit:
            for i, slot in enumerate(plan.slots):
                tokens = slice(i * self.frame_seq_length, (i + 1) * self.frame_seq_length)
                self.keys[layer][:, self._token_range(slot)] = k[:, tokens].detach()
                self.values[layer][:, self._token_range(slot)] = v[:, tokens].detach()
        if len(plan.kept_slots) == 0:
            return k, v
        cached_k = self._gather(self.keys[layer], plan.kept_slots)
        cached_v = self._gather(self.values[layer], plan.kept_slots)
        return torch.cat([cached_k, k.to(cached_k.dtype)], dim=1), torch.cat([cached_v, v.to(cached_v.dtype)], dim=1)

    def commit(self, plan: CachePlan) -> None:
        """Record the block's frames as cached (call once, after every layer has written via `visible`)."""
        for i, slot in enumerate(plan.slots):
            frame = plan.start_frame + i
            if slot < len(self.slot_frames):
                self.slot_frames[slot] = frame
            else:
                self.slot_frames.append(frame)
        self.next_frame = plan.start_frame + plan.num_frames

    # ---- cross-attention ----------------------------------------------------------------------

    def cross_attention(self, context: torch.Tensor, compute: Callable[[], list[KeyValue]]) -> list[KeyValue]:
        """Per-layer cross-attention (k, v) for `context`, computed once per context tensor.

        With gradients enabled the values are recomputed and not stored, so the text projections of a
        trained model still receive gradients.
        """
        if torch.is_grad_enabled():
            return compute()
        key = (context, context._version)
        if self._cross is None or self._cross_context is None or self._cross_context[0] is not context \
                or self._cross_context[1] != context._version:  # fmt: skip
            self._cross = [(k.detach(), v.detach()) for k, v in compute()]
            self._cross_context = key
        return self._cross
