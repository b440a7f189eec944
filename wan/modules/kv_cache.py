"""The self-attention KV cache of the causal DiT, with a rolling window and an attention sink.

Storage per layer is `[B, max_frames * frame_seq_length, heads, head_dim]` for k and for v, in
frame-sized slots. Slots fill in order; once full, committing a frame overwrites the slot of the
oldest non-sink frame. Attention does not care about key order and RoPE was applied when a key
was written (absolute frame positions), so slots never need to be shifted.

A block always attends to exactly the frames the cache would hold after committing it: the sink,
the most recent frames, and itself. The slots a block writes are free slots or the slots of the
frames it evicts, so "kept slots + the block's slots" is always the filled prefix of the storage
plus the next free slots: a contiguous range. Two ways to attend, with the same result:
  - in place (no gradient through the block's keys: inference, the rollout's no-grad steps and
    context passes): the block's k, v are written into its slots first and attention reads the
    storage prefix as a view; no copy of the cache is made. With commit=False the written slots
    are scratch: slot_frames does not change, so the frames the cache holds are unchanged, and a
    later forward (commit or not) of a block at the same place rewrites them.
  - with gradient (the exit step of a training rollout): the kept slots are gathered and the
    block's own (differentiable) k, v appended. When the cache can evict, the gathered part is made of
    copies taken on first use, so activation checkpointing recomputes the attention against the
    frames the forward saw, not against slots that later blocks overwrote. The copies are per frame and
    shared: every gradient-path block that sees a frame uses the one copy of it (a long rollout's scored
    window keeps the sink and the frames its blocks see once, not once per block).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

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
        may_evict: bool = True,
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
        # False when the cache holds the whole video: no slot a block saw is overwritten later, so the
        # gradient path needs no snapshot of it.
        self.may_evict = may_evict
        shape = (num_layers, batch_size, max_frames * frame_seq_length, num_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.reset()

    @classmethod
    def from_geometry(
        cls, geometry, batch_size: int, dtype: torch.dtype, device: torch.device | str, sp_size: int = 1
    ) -> "KVCache":
        """Sized from a `utils.geometry.Geometry` (cache_frames is the video, or the local window); under sequence
        parallelism over `sp_size` ranks each holds all tokens of its num_heads / sp_size heads."""
        return cls(
            num_layers=geometry.num_layers,
            batch_size=batch_size,
            max_frames=geometry.cache_frames,
            frame_seq_length=geometry.frame_seq_length,
            num_heads=geometry.num_heads // sp_size,
            head_dim=geometry.head_dim,
            dtype=dtype,
            device=device,
            sink_frames=geometry.sink_frames,
            may_evict=geometry.cache_frames < geometry.num_latent_frames,
        )

    def reset(self, num_frames: Optional[int] = None) -> None:
        """Forget every committed frame and the cross-attention cache (storage is reused, not zeroed).

        num_frames: the frames the coming rollout commits; more than the cache holds means it evicts, so the gradient
        path copies what it attends to (a long rollout through a cache sized for the training length).
        """
        if num_frames is not None:
            self.may_evict = num_frames > self.max_frames
        self.slot_frames: list[int] = []  # absolute frame index held by slot i; filled slots are a prefix
        self.next_frame = 0  # first frame index not yet committed
        self._scratch: set[int] = set()  # filled slots overwritten by an uncommitted in-place write
        self._cross: list[KeyValue] | None = None
        self._cross_context: tuple[torch.Tensor, int] | None = None
        # per layer: frame -> a copy of its (k, v), for the gradient path of a cache that evicts (_snapshot); a frame
        # is committed once between resets (plan refuses an earlier start), so its copy stays its own
        self._frame_copies: list[dict[int, KeyValue]] = [{} for _ in range(self.num_layers)]

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
        if self._scratch.intersection(kept):
            raise RuntimeError(
                f"KV cache slots {sorted(self._scratch.intersection(kept))} were overwritten by an uncommitted forward "
                f"of another block size; commit that block (or reset the cache) before planning {num_frames} frames"
            )
        return CachePlan(start_frame, num_frames, tuple(slots), kept)

    def _token_range(self, slot: int) -> slice:
        return slice(slot * self.frame_seq_length, (slot + 1) * self.frame_seq_length)

    def _gather(self, storage: torch.Tensor, slots: tuple[int, ...]) -> torch.Tensor:
        """Tokens of the given slots; a view when they are the leading prefix (the common case)."""
        if slots == tuple(range(len(slots))):
            return storage[:, : len(slots) * self.frame_seq_length]
        return torch.cat([storage[:, self._token_range(slot)] for slot in slots], dim=1)

    def _write(self, layer: int, plan: CachePlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy the block's (detached) k, v [B, f*S, H, D] into its slots, one copy per run of consecutive slots."""
        first = 0
        while first < len(plan.slots):
            last = first
            while last + 1 < len(plan.slots) and plan.slots[last + 1] == plan.slots[last] + 1:
                last += 1
            tokens = slice(first * self.frame_seq_length, (last + 1) * self.frame_seq_length)
            storage = slice(plan.slots[first] * self.frame_seq_length, (plan.slots[last] + 1) * self.frame_seq_length)
            self.keys[layer][:, storage] = k[:, tokens].detach()
            self.values[layer][:, storage] = v[:, tokens].detach()
            first = last + 1

    def layer_view(self, layer: int, plan: CachePlan, commit: bool) -> "LayerView":
        """What layer `layer` of one forward attends to (see LayerView)."""
        return LayerView(self, layer, plan, commit)

    def _visible_in_place(self, layer: int, plan: CachePlan, k: torch.Tensor, v: torch.Tensor, commit: bool) -> KeyValue:
        """Write the block into its slots, then return the storage prefix holding kept slots + the block (views)."""
        self._write(layer, plan, k, v)
        if not commit:
            self._scratch.update(slot for slot in plan.slots if slot < len(self.slot_frames))
        end = (len(plan.kept_slots) + len(plan.slots)) * self.frame_seq_length
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def _snapshot(self, layer: int, plan: CachePlan) -> Optional[list[KeyValue]]:
        """The kept frames' (k, v) pieces, in slot order, safe from later writes (None when nothing is kept).

        When the cache cannot evict, kept slots are never rewritten and a view of the storage will do; otherwise
        each frame's copy, made the first time a gradient-path block sees it and shared with every later one.
        """
        if len(plan.kept_slots) == 0:
            return None
        if not self.may_evict:
            return [(self._gather(self.keys[layer], plan.kept_slots), self._gather(self.values[layer], plan.kept_slots))]
        copies = self._frame_copies[layer]
        pieces = []
        for slot in plan.kept_slots:
            frame = self.slot_frames[slot]
            if frame not in copies:
                tokens = self._token_range(slot)
                copies[frame] = (self.keys[layer][:, tokens].clone(), self.values[layer][:, tokens].clone())
            pieces.append(copies[frame])
        return pieces

    def commit(self, plan: CachePlan) -> None:
        """Record the block's frames as cached (call once, after every layer has written via `visible`)."""
        self._scratch.clear()
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


class LayerView:
    """One layer's view of the cache in one forward: `view(k, v)` -> the keys and values the block attends to.

    The same object answers the first forward and activation checkpointing's recompute of it, so the
    gradient path's snapshot of the kept frames is taken once, when the forward first runs.
    """

    def __init__(self, cache: KVCache, layer: int, plan: CachePlan, commit: bool):
        self.cache, self.layer, self.plan, self.commit = cache, layer, plan, commit
        self._kept: Optional[list[KeyValue]] = None
        self._taken = False

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> KeyValue:
        cache = self.cache
        if not (k.requires_grad or v.requires_grad):
            return cache._visible_in_place(self.layer, self.plan, k, v, self.commit)
        # Gradient path: the block's own k, v stay differentiable, appended to the (detached) kept frames.
        if not self._taken:
            self._kept, self._taken = cache._snapshot(self.layer, self.plan), True
            if self.commit:
                cache._write(self.layer, self.plan, k, v)
        if self._kept is None:
            return k, v
        dtype = self._kept[0][0].dtype
        return (torch.cat([piece for piece, _ in self._kept] + [k.to(dtype)], dim=1),
                torch.cat([piece for _, piece in self._kept] + [v.to(dtype)], dim=1))
