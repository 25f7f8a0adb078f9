"""ResBlock: the residual block of every diffunet U-Net."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffunet.model.layers.ops import conv_nd, normalization, zero_module
from diffunet.model.layers.resample import Downsample, Upsample


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv → (+ embedding) → GroupNorm → SiLU → dropout → conv, plus a skip.

    The embedding is added to the first conv's output, or applied as a scale-shift (FiLM) of
    the second norm when `use_scale_shift_norm`. With `resample="up"`/`"down"` the block also
    changes resolution (guided-diffusion's `resblock_updown`), resampling both paths without
    parameters. `emb` is the already SiLU-activated embedding shared by all blocks.
    """

    def __init__(
        self,
        dims: int,
        channels: int,
        out_channels: int,
        emb_dim: int | None,
        *,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        resample: str | None = None,
        factors: tuple[int, ...] | None = None,
        norm_groups: int = 32,
        norm_eps: float = 1e-5,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = normalization(channels, norm_groups, norm_eps)
        self.resample: nn.Module | None = None
        factors = factors or (2,) * dims
        if resample == "down":
            self.resample = Downsample(dims, channels, factors, use_conv=False)
        elif resample == "up":
            self.resample = Upsample(dims, channels, factors, mode="nearest")
        self.in_conv = conv_nd(dims, channels, out_channels, 3, padding=1)
        self.emb_proj = (
            nn.Linear(emb_dim, out_channels * (2 if use_scale_shift_norm else 1))
            if emb_dim is not None
            else None
        )
        self.out_norm = normalization(out_channels, norm_groups, norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = conv_nd(dims, out_channels, out_channels, 3, padding=1)
        if zero_init:
            zero_module(self.out_conv)
        self.skip = (
            nn.Identity() if channels == out_channels else conv_nd(dims, channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block to `x` given the activated embedding `emb` of shape `(B, emb_dim)`."""
        h = F.silu(self.in_norm(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.in_conv(h)
        if self.emb_proj is None:
            h = self.out_norm(h)
        else:
            emb_out = self.emb_proj(emb)[(...,) + (None,) * self.dims]  # (B, C, 1, ...)
            if self.use_scale_shift_norm:
                scale, shift = emb_out.chunk(2, dim=1)
                h = self.out_norm(h) * (1 + scale) + shift
            else:
                h = self.out_norm(h + emb_out)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h
