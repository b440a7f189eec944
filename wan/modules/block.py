"""The Wan transformer block, shared by the bidirectional and the causal DiT.

The block does not decide how self-attention sees other tokens: the caller passes `attend`, a
function of the rotated (q, k, v) of the block's tokens. Full attention, block-causal attention and
attention over a KV cache are three such functions; the weights and the math are the same.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from wan.modules.attention import attention
from wan.modules.embeddings import FP32LayerNorm, gate, linear, modulate
from wan.modules.rope import apply_rope

# attend(q, k, v) -> attended values; q, k, v [B, L, H, D] for the block's own tokens (RoPE applied).
SelfAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (q/k: across all heads), in float32, scaled by a learned weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class _Projections(nn.Module):
    """Keys q, k, v, o (Linear dim->dim) and norm_q, norm_k (RMSNorm, absent when qk_norm is off)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        return linear(self.o, attended.flatten(2))


class WanSelfAttention(_Projections):
    def project(self, x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, dim] -> q, k, v [B, L, H, D], RoPE applied to q and k."""
        q = self.heads(self.norm_q(linear(self.q, x)))
        k = self.heads(self.norm_k(linear(self.k, x)))
        v = self.heads(linear(self.v, x))
        return apply_rope(q, freqs), apply_rope(k, freqs), v


class WanCrossAttention(_Projections):
    # Under FSDP2 this module is a unit of its own with `key_value` hooked as a second forward: neither may return a
    # view (nn.Linear on [B, L, dim] returns one), because an in-place op on a view drops the unit's pre-backward
    # hook and skips its all-gather. `key_value` hands out fresh tensors and `forward` ends in the residual add.
    def key_value(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded text [B, text_len, dim] -> k, v [B, text_len, dim], split into heads by `forward` (cacheable
        per context)."""
        k, v = self.norm_k(linear(self.k, context)), linear(self.v, context)
        return tuple(t.clone() if t._base is not None else t for t in (k, v))  # text_len x dim: a small copy

    def forward(self, residual: torch.Tensor, x: torch.Tensor, key_value: tuple[torch.Tensor, torch.Tensor],
                backend: str) -> torch.Tensor:
        """residual + cross-attention of the normalised stream x [B, L, dim] to the text, in float32."""
        q = self.heads(self.norm_q(linear(self.q, x)))
        k, v = key_value
        return residual + self.output(attention(q, self.heads(k), self.heads(v), backend=backend)).float()


class WanAttentionBlock(nn.Module):
    """Keys: modulation, self_attn.*, norm3 (affine, before cross-attention), cross_attn.*, ffn.{0,2}."""

    def __init__(
        self, dim: int, ffn_dim: int, num_heads: int, qk_norm: bool, cross_attn_norm: bool, eps: float, backend: str
    ):
        super().__init__()
        self.backend = backend
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, num_heads, qk_norm, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        freqs: torch.Tensor,
        context_kv: tuple[torch.Tensor, torch.Tensor],
        attend: SelfAttend,
    ) -> torch.Tensor:
        """x [B, L, dim] float32 residual stream; e0 [B, G, 6, dim] float32; freqs [L, D/2] complex."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float()[:, None] + e0).unbind(dim=2)

        # 1. Self-attention on the modulated, normalised stream.
        q, k, v = self.self_attn.project(modulate(self.norm1(x), shift1, scale1), freqs)
        x = x + gate(self.self_attn.output(attend(q, k, v)), gate1)

        # 2. Cross-attention to the text (no modulation, no gate).
        x = self.cross_attn(x, self.norm3(x).float(), context_kv, self.backend)

        # 3. Feed-forward.
        hidden = modulate(self.norm2(x), shift2, scale2)
        y = self.ffn[2](self.ffn[1](linear(self.ffn[0], hidden)))
        return x + gate(y, gate2)
