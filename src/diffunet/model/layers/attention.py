"""Attention over the spatial positions of a feature map, in 1D, 2D or 3D.

Each module normalizes its input, attends, projects and adds the result back (pre-norm,
residual); `norm=False` leaves the input as it is (diffusers' `UNet2DModel` builds its middle
attention so with scale-shift ResBlocks). Full attention uses `scaled_dot_product_attention` (flash / memory-efficient
kernels, softmax in float32); linear attention is the O(N) kernel of LDM / lucidrains with
its softmaxes in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffunet.model.layers.ops import normalization, zero_module


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """`(B, C, *spatial)` → `(B, N, C)`."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`(B, N, C)` → the shape of `like`, `(B, C, *spatial)`."""
    return h.transpose(1, 2).reshape(like.shape)


def split_heads(h: torch.Tensor, heads: int) -> torch.Tensor:
    """`(B, N, heads * d)` → `(B, heads, N, d)`."""
    b, n, c = h.shape
    return h.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(h: torch.Tensor) -> torch.Tensor:
    """`(B, heads, N, d)` → `(B, N, heads * d)`."""
    b, heads, n, d = h.shape
    return h.transpose(1, 2).reshape(b, n, heads * d)


def _pre_norm(channels: int, groups: int, eps: float, enabled: bool) -> nn.Module:
    """The GroupNorm before an attention, or the identity without one."""
    return normalization(channels, groups, eps) if enabled else nn.Identity()


class SelfAttention(nn.Module):
    """Multi-head softmax self-attention with one fused QKV projection."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        *,
        norm_groups: int,
        norm_eps: float,
        zero_init: bool = True,
        norm: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = _pre_norm(channels, norm_groups, norm_eps, norm)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)
        if zero_init:
            zero_module(self.proj_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over all positions of `x` (shape `(B, C, *spatial)`)."""
        b, c, n = x.shape[0], x.shape[1], math.prod(x.shape[2:])
        qkv = self.qkv(to_tokens(self.norm(x)))
        q, k, v = qkv.view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        h = self.attend(q, k, v)
        return x + from_tokens(self.proj_out(merge_heads(h)), x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ / √d) v per head, (B, heads, N, d) each."""
        return F.scaled_dot_product_attention(q, k, v)


class LinearAttention(nn.Module):
    """Multi-head linear attention: softmax(q) over features, softmax(k) over positions.

    Cost is linear in the number of positions, so it fits high-resolution sites (EfficientUNetND's
    encoder/decoder attention, LDM's `attn_type="linear"`).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        *,
        norm_groups: int,
        norm_eps: float,
        zero_init: bool = True,
        norm: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = _pre_norm(channels, norm_groups, norm_eps, norm)
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.proj_out = nn.Linear(channels, channels)
        if zero_init:
            zero_module(self.proj_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over all positions of `x` in O(N)."""
        b, c, n = x.shape[0], x.shape[1], math.prod(x.shape[2:])
        qkv = self.qkv(to_tokens(self.norm(x)))
        q, k, v = qkv.view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        scale = (c // self.num_heads) ** -0.5
        compute = torch.promote_types(qkv.dtype, torch.float32)  # never below float32
        q = q.to(compute).softmax(dim=-1) * scale
        k = k.to(compute).softmax(dim=-2)
        context = k.transpose(-1, -2) @ v.to(compute)  # (B, heads, d, d)
        h = (q @ context).to(qkv.dtype)
        return x + from_tokens(self.proj_out(merge_heads(h)), x).to(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention from the feature map's positions to `context` tokens."""

    def __init__(
        self,
        channels: int,
        context_dim: int,
        num_heads: int,
        *,
        norm_groups: int,
        norm_eps: float,
        zero_init: bool = True,
        norm: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = _pre_norm(channels, norm_groups, norm_eps, norm)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj_out = nn.Linear(channels, channels)
        if zero_init:
            zero_module(self.proj_out)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Attend from `x` (B, C, *spatial) to `context` (B, M, context_dim)."""
        q = split_heads(self.q(to_tokens(self.norm(x))), self.num_heads)
        k, v = (split_heads(t, self.num_heads) for t in self.kv(context).chunk(2, dim=-1))
        h = self.attend(q, k, v)
        return x + from_tokens(self.proj_out(merge_heads(h)), x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ / √d) v per head: queries (B, heads, N, d), keys and values
        (B, heads, M, d)."""
        return F.scaled_dot_product_attention(q, k, v)


class AttentionBlock(nn.Module):
    """Self-attention (full or linear) followed, when `context_dim` is set, by cross-attention."""

    def __init__(
        self,
        channels: int,
        kind: str,
        num_heads: int,
        *,
        context_dim: int | None,
        norm_groups: int,
        norm_eps: float,
        zero_init: bool = True,
        norm: bool = True,
    ) -> None:
        super().__init__()
        attention = {"full": SelfAttention, "linear": LinearAttention}[kind]
        self.self_attn = attention(
            channels,
            num_heads,
            norm_groups=norm_groups,
            norm_eps=norm_eps,
            zero_init=zero_init,
            norm=norm,
        )
        self.cross_attn = None
        if context_dim:
            self.cross_attn = CrossAttention(
                channels,
                context_dim,
                num_heads,
                norm_groups=norm_groups,
                norm_eps=norm_eps,
                zero_init=zero_init,
                norm=norm,
            )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Apply self-attention, then cross-attention to `context` if this block has it."""
        x = self.self_attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, context)
        return x
