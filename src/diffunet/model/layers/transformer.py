"""Stable Diffusion's transformer block over the spatial positions of a feature map, in 1D/2D/3D.

`SpatialTransformer` is CompVis' `SpatialTransformer` and diffusers' `Transformer2DModel`:
GroupNorm → `proj_in` (a 1×1 convolution, or a linear layer on the tokens) → `depth`
`TransformerBlock`s → `proj_out` → plus the input. Each `TransformerBlock` is pre-LayerNorm
self-attention, cross-attention to the context tokens (self-attention again when the model has
no context) and a GEGLU feed-forward, each added back to its input. The tokens are the
flattened spatial positions, as in the rest of the model's attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffunet.model.layers.attention import from_tokens, merge_heads, split_heads, to_tokens
from diffunet.model.layers.ops import conv_nd, normalization, zero_module

#: GroupNorm epsilon of the transformer's input norm (CompVis `Normalize`, diffusers alike).
GROUP_NORM_EPS = 1e-6
#: Width of the feed-forward's hidden layer, in multiples of the block's width.
FEED_FORWARD_MULT = 4


class Attention(nn.Module):
    """Multi-head softmax attention from tokens to `context` tokens (to themselves without).

    Queries, keys and values are projected without bias, the output with one, as in CompVis'
    `CrossAttention` and diffusers' `Attention`. `upcast` computes a float16 attention in
    float32 (SD 2.1's `upcast_attention`: its scores overflow float16); bfloat16 has float32's
    range and keeps its fused kernels.
    """

    def __init__(
        self, channels: int, num_heads: int, context_dim: int | None = None, upcast: bool = False
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.upcast = upcast
        source = context_dim or channels
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(source, channels, bias=False)
        self.to_v = nn.Linear(source, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from `x` (B, N, C) to `context` (B, M, context_dim), or to `x` itself."""
        q, k, v = (split_heads(p, self.num_heads) for p in self.project(x, context))
        if self.upcast and q.dtype == torch.float16:
            with torch.autocast(q.device.type, enabled=False):
                h = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            h = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(merge_heads(h))

    def project(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries of `x` and the keys and values of `context` (of `x` without one), each
        (B, tokens, C) before the heads are split."""
        source = x if context is None else context
        return self.to_q(x), self.to_k(source), self.to_v(source)


class FeedForward(nn.Module):
    """GEGLU feed-forward: `proj` to twice the hidden width, `hidden · GELU(gate)`, `out`."""

    def __init__(self, channels: int, mult: int = FEED_FORWARD_MULT) -> None:
        super().__init__()
        self.proj = nn.Linear(channels, 2 * mult * channels)
        self.out = nn.Linear(mult * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the feed-forward to tokens `x` (B, N, C)."""
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(hidden * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, each pre-LayerNorm and residual."""

    def __init__(
        self, channels: int, num_heads: int, context_dim: int | None, upcast: bool = False
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = Attention(channels, num_heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(channels)
        self.attn2 = Attention(channels, num_heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Transform tokens `x` (B, N, C), cross-attending to `context` (B, M, context_dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, `proj_in`, `depth` transformer blocks over the positions, `proj_out`, residual.

    `use_linear_projection` makes `proj_in` / `proj_out` linear layers on the tokens (SD 2.x,
    SDXL) instead of 1×1 convolutions (SD 1.x); the two compute the same function.
    """

    def __init__(
        self,
        dims: int,
        channels: int,
        num_heads: int,
        depth: int,
        *,
        context_dim: int | None,
        norm_groups: int,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.use_linear_projection = use_linear_projection
        self.norm = normalization(channels, norm_groups, GROUP_NORM_EPS)

        def projection() -> nn.Module:
            if use_linear_projection:
                return nn.Linear(channels, channels)
            return conv_nd(dims, channels, channels, 1)

        self.proj_in = projection()
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, num_heads, context_dim, upcast_attention)
            for _ in range(depth)
        )
        self.proj_out = projection()
        if zero_init:
            zero_module(self.proj_out)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Transform `x` (B, C, *spatial), cross-attending to `context` (B, M, context_dim)."""
        linear = self.use_linear_projection  # the 1×1 convolutions act on (B, C, *spatial)
        h = self.norm(x)
        h = self.proj_in(to_tokens(h)) if linear else to_tokens(self.proj_in(h))
        for block in self.transformer_blocks:
            h = block(h, context)
        h = from_tokens(self.proj_out(h), x) if linear else self.proj_out(from_tokens(h, x))
        return x + h
