"""Ulysses sequence parallelism for the Wan DiT: `size` ranks share one sample, each holding a slice of its tokens.

Between attentions a rank holds the same slice of every latent frame (frame f's tokens
[r*S/n, (r+1)*S/n) for rank r of n, S tokens per frame), so the per-frame modulation groups, RoPE and
the KV cache's frame slots keep their meaning. Around self-attention an all-to-all trades tokens for
heads: q, k, v [B, L/n, H, D] become [B, L, H/n, D] in the model's own token order, so any attention rule
(full, block-causal with its mask, a KV cache holding all frames of H/n heads) runs unchanged; a second
all-to-all brings the result back. Cross-attention needs nothing: local queries against the whole text.
The head's output is gathered at the end, so callers see the full prediction on every rank.

Gradients. Every rank of a sequence group computes the same loss from the gathered output. The gather's
backward sums the ranks' output gradients and keeps the local slice, so the sum over the group of each
parameter's gradient is `size` times the single-process gradient; FSDP, which averages over data-parallel
and sequence ranks together, then yields exactly the data-parallel mean. Without FSDP, `size` ranks of one
group hold partial gradients to be summed (`all_reduce`), which is what the tests check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _AllToAll(torch.autograd.Function):
    """All-to-all over dim 0 (one chunk per rank); its own adjoint, so backward is the same exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)  # after contiguous(): empty_like keeps strides, the collective writes linearly
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _Gather(torch.autograd.Function):
    """All-gather along a new dim 0; backward sums the ranks' gradients and keeps this rank's chunk."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
        ctx.group, ctx.rank = group, rank
        out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_single(out, x.contiguous(), group=group)
        return out.view(size, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None


@dataclass(frozen=True)
class SequenceParallel:
    """One rank's place in its sequence group: the process group, the group's size and this rank's index in it."""

    group: object
    size: int
    rank: int

    @classmethod
    def from_group(cls, group) -> "SequenceParallel":
        return cls(group=group, size=dist.get_world_size(group), rank=dist.get_rank(group))

    # ---- tokens ------------------------------------------------------------------------------

    def shard(self, x: torch.Tensor, frame_tokens: int) -> torch.Tensor:
        """[B, F*S, ...] (model order) -> this rank's [B, F*S/n, ...]: its slice of every frame. Plain slicing."""
        batch, length = x.shape[:2]
        frames = length // frame_tokens
        chunk = frame_tokens // self.size
        local = x.reshape(batch, frames, self.size, chunk, *x.shape[2:])[:, :, self.rank]
        return local.reshape(batch, frames * chunk, *x.shape[2:])

    def shard_frames(self, x: torch.Tensor, frame_tokens: int) -> torch.Tensor:
        """A per-token tensor without the batch dim ([F*S, ...], e.g. RoPE angles) -> this rank's tokens."""
        return self.shard(x[None], frame_tokens)[0]

    def gather(self, x: torch.Tensor, frame_tokens: int) -> torch.Tensor:
        """This rank's [B, F*S/n, ...] -> the whole [B, F*S, ...] in model order, on every rank."""
        batch, local = x.shape[:2]
        chunk = frame_tokens // self.size
        frames = local // chunk
        parts = _Gather.apply(x, self.group, self.rank, self.size)  # [n, B, F*chunk, ...]
        parts = parts.reshape(self.size, batch, frames, chunk, *x.shape[2:])
        parts = parts.movedim(0, 2)  # [B, F, n, chunk, ...]
        return parts.reshape(batch, frames * frame_tokens, *x.shape[2:])

    # ---- heads <-> sequence around self-attention ---------------------------------------------

    def to_heads(self, x: torch.Tensor, frame_tokens: int) -> torch.Tensor:
        """[B, F*S/n, H, D] (local tokens, all heads) -> [B, F*S, H/n, D] (all tokens, this rank's heads)."""
        batch, local, heads, dim = x.shape
        chunk = frame_tokens // self.size
        frames = local // chunk
        send = x.reshape(batch, local, self.size, heads // self.size, dim).movedim(2, 0)  # [n, B, F*chunk, H/n, D]
        received = _AllToAll.apply(send, self.group)  # chunk s: rank s's tokens of this rank's heads
        received = received.reshape(self.size, batch, frames, chunk, heads // self.size, dim).movedim(0, 2)
        return received.reshape(batch, frames * frame_tokens, heads // self.size, dim)

    def to_tokens(self, x: torch.Tensor, frame_tokens: int) -> torch.Tensor:
        """[B, F*S, H/n, D] -> [B, F*S/n, H, D], the inverse of `to_heads`."""
        batch, length, local_heads, dim = x.shape
        chunk = frame_tokens // self.size
        frames = length // frame_tokens
        send = x.reshape(batch, frames, self.size, chunk, local_heads, dim).movedim(2, 0)  # [n, B, F, chunk, H/n, D]
        received = _AllToAll.apply(send, self.group)  # chunk s: this rank's tokens of head group s
        received = received.movedim(0, 4)  # [B, F, chunk, n, H/n, D]
        return received.reshape(batch, frames * chunk, self.size * local_heads, dim)

    def wrap(self, attend: Attend, frame_tokens: int) -> Attend:
        """An attention rule over all tokens, run on this rank's heads: all-to-all, attend, all-to-all back."""

        def attend_sharded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k, v = (self.to_heads(t, frame_tokens) for t in (q, k, v))
            return self.to_tokens(attend(q, k, v), frame_tokens)

        return attend_sharded


def sp_size_of(model) -> int:
    """Ranks sharing one sample in `model`'s forwards (1 without sequence parallelism)."""
    sp = getattr(model, "sequence_parallel", None)
    return 1 if sp is None else sp.size
