"""Scaled dot-product attention behind one function, with a choice of kernel.

Tensors use the Wan layout `[B, L, num_heads, head_dim]`. The only mask the project needs is
block-causal (a token sees its own block and every earlier block); it is described by
`BlockCausalMask` rather than a dense `[L, L]` tensor, so each backend can run it its own way.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.errors import UserError

BACKENDS = ("sdpa", "flash", "flex")


@dataclass(frozen=True)
class BlockCausalMask:
    """Block-causal attention with the KV cache's window: a query in a block ending at token e sees keys
    [0, sink_tokens) and [max(sink_tokens, e - (window_tokens - sink_tokens)), e), which is what the rolling cache
    holds when that block is attended (the sink, the most recent frames, the block itself). No window: [0, e).

    `block_tokens` is the block size; `block_ends` (token offsets, ascending) replaces it for unequal blocks
    (an independent first frame)."""

    block_tokens: int
    window_tokens: int | None = None
    sink_tokens: int = 0
    block_ends: tuple[int, ...] | None = None

    def ends(self, length: int) -> tuple[int, ...]:
        if self.block_ends is not None:
            return self.block_ends
        return tuple(min(end, length) for end in range(self.block_tokens, length + self.block_tokens, self.block_tokens))

    def visible(self, end: int) -> tuple[slice, ...]:
        """Key ranges a block ending at token `end` attends to."""
        if self.window_tokens is None or end <= self.window_tokens:
            return (slice(0, end),)
        start = max(self.sink_tokens, end - (self.window_tokens - self.sink_tokens))
        return ((slice(0, self.sink_tokens),) if self.sink_tokens else ()) + (slice(start, end),)


def _flash_module():
    """flash-attn 3 (`flash_attn_interface`) if installed, else flash-attn 2 (`flash_attn`), else None."""
    for name in ("flash_attn_interface", "flash_attn"):
        if importlib.util.find_spec(name) is not None:
            return importlib.import_module(name)
    return None


def check_backend(backend: str) -> str:
    """Validate a backend name at model construction, before any work is done."""
    if backend not in BACKENDS:
        raise UserError(f"attention_backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "flash" and _flash_module() is None:
        raise UserError("attention_backend 'flash' needs flash-attn 2 or 3 installed; use 'sdpa' or 'flex'")
    return backend


def describe_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """One line for the start-of-run log saying which kernel will actually run."""
    device = torch.device(device)
    if backend == "flash":
        module = _flash_module()
        version = "3" if module is not None and module.__name__ == "flash_attn_interface" else "2"
        return f"flash-attn {version} (block-causal masks run as one call per query block)"
    if backend == "flex":
        if device.type == "cuda":
            return "flex_attention (torch.compile'd, BlockMask for block-causal)"
        return f"flex_attention eager on {device.type} (slow, unfused; for tests only)"
    return f"torch scaled_dot_product_attention on {device.type} (block-causal: one call per query block)"


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, mask: BlockCausalMask | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    With a BlockCausalMask, q and k must cover the same tokens (Lq == Lk).
    """
    if mask is not None and q.shape[1] != k.shape[1]:
        raise ValueError(f"block-causal attention needs Lq == Lk, got {q.shape[1]} and {k.shape[1]}")
    if backend == "flex":
        return _flex(q, k, v, mask)
    dense = _flash if backend == "flash" else _sdpa
    if mask is None:
        return dense(q, k, v)
    # Block-causal without a dense mask: the queries of each block against exactly the keys it sees.
    outputs, start = [], 0
    for end in mask.ends(q.shape[1]):
        ranges = mask.visible(end)
        keys = k[:, ranges[0]] if len(ranges) == 1 else torch.cat([k[:, r] for r in ranges], dim=1)
        values = v[:, ranges[0]] if len(ranges) == 1 else torch.cat([v[:, r] for r in ranges], dim=1)
        outputs.append(dense(q[:, start:end], keys, values))
        start = end
    return torch.cat(outputs, dim=1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    module = _flash_module()
    in_dtype = q.dtype
    # flash kernels take half precision only; fp32 callers get bf16 attention and an fp32 result.
    half = in_dtype if in_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out = module.flash_attn_func(q.to(half), k.to(half), v.to(half))
    if isinstance(out, tuple):  # flash-attn 3 returns (out, softmax_lse) in some releases
        out = out[0]
    return out.to(in_dtype)


@functools.lru_cache(maxsize=16)
def _block_mask(mask: BlockCausalMask, length: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    ends = torch.tensor(mask.ends(length), device=device)
    block_end = ends[torch.bucketize(torch.arange(length, device=device), ends, right=True)]  # token -> its block's end
    window = length if mask.window_tokens is None else mask.window_tokens
    sink = mask.sink_tokens

    def block_causal(batch, head, q_idx, kv_idx):
        end = block_end[q_idx]
        in_window = (kv_idx >= end - (window - sink)) | (kv_idx < sink) | (end <= window)
        return (kv_idx < end) & in_window

    return create_block_mask(block_causal, None, None, length, length, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockCausalMask | None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = None if mask is None else _block_mask(mask, q.shape[1], q.device)
    # Compiled only on CUDA, and lazily: nothing is compiled at import time.
    kernel = _compiled_flex() if q.device.type == "cuda" else flex_attention
    out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)
