"""ResBlock: the residual block of every diffunet U-Net."""

from __future__ import annotations

import torch
from torch import nn

from diffunet.accel import decoder_entry
from diffunet.accel.conv import convolve, convolve_split_bias
from diffunet.accel.fused_norm import norm_act
from diffunet.model.layers.ops import conv_nd, normalization, zero_module
from diffunet.model.layers.resample import (
    Downsample,
    Upsample,
    upsample_convolve,
    upsample_convolve_split_bias,
)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv → (+ embedding) → GroupNorm → SiLU → dropout → conv, plus a skip.

    The embedding is injected additively, or as a scale-shift (FiLM) of the second norm when
    `use_scale_shift_norm`. With `resample="up"`/`"down"` the block also changes resolution
    (guided-diffusion's `resblock_updown`), resampling both paths without parameters.
    The `emb` passed to `forward` is the already SiLU-activated embedding, shared by all blocks.
    A decoder's block also takes the encoder's `skip`, concatenated to its input along the
    channels (in eager mode with the fused kernels, without keeping the concatenation:
    `decoder_entry`).
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
        if resample == "down":
            self.resample: nn.Module | None = Downsample(dims, channels, factors, use_conv=False)
        elif resample == "up":
            self.resample = Upsample(dims, channels, factors, mode="nearest")
        else:
            self.resample = None
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

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor | None = None, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Apply the block to `x` (or to `cat([x, skip], 1)`) given the activated embedding
        `emb` of shape `(B, emb_dim)`."""
        # One name for the main branch's tensor, rebound at each step: a second reference would
        # keep a float32 SiLU output that the next convolution's bf16 copy replaces.
        h, x, residual = self._entry(x, skip)
        if self.emb_proj is None:
            h = norm_act(self.out_norm, self._in_conv(h))
        elif self.use_scale_shift_norm:
            scale, shift = self.emb_proj(emb).chunk(2, dim=1)
            h = norm_act(self.out_norm, self._in_conv(h), scale=scale, shift=shift)
        else:
            # The embedding and the convolution's bias are both constant over positions: the
            # norm adds them in its own passes, so `h + emb` is never written out.
            h, bias = (
                upsample_convolve_split_bias(self.in_conv, h, self.upsample_factors)
                if self.upsample_factors
                else convolve_split_bias(self.in_conv, h)
            )
            add = self.emb_proj(emb)
            h = norm_act(self.out_norm, h, add=add if bias is None else add + bias)
        h = convolve(self.out_conv, self.dropout(h))
        return (convolve(self.skip, x) if residual is None else residual) + h

    def _entry(
        self, x: torch.Tensor, skip: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(the normalized, resampled input of the main branch; the input of the skip
        projection; that projection where it is made before the main branch, else None)."""
        if (
            skip is not None
            and self.resample is None
            and decoder_entry.takes_pair(self.in_norm, self.skip)
            and decoder_entry.concat_fused_wanted(x, skip)
        ):
            h, residual = decoder_entry.norm_act_and_project(self.in_norm, self.skip, x, skip)
            return h, None, residual
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        h = norm_act(self.in_norm, x)
        if self.resample is not None:
            x = self.resample(x)
            # An upsampling of `h` is the first convolution's (`upsample_convolve`).
            h = h if self.upsample_factors else self.resample(h)
        # Eager autograd runs backward in reverse order of creation: made before the main
        # branch, the skip is reached last, so the gradient its convolution computes for x (as
        # large as x) is not held while the main branch's backward runs (3D checkpointed
        # training, estimated: 3.78 → 3.66 GiB at the peak). Compiled graphs schedule their
        # own backward and keep the order their speed was measured with.
        residual = None if torch.compiler.is_compiling() else convolve(self.skip, x)
        return h, x, residual

    @property
    def upsample_factors(self) -> tuple[int, ...] | None:
        """The factors of an up block's upsampling, None for other blocks."""
        return self.resample.factors if isinstance(self.resample, Upsample) else None

    def _in_conv(self, h: torch.Tensor) -> torch.Tensor:
        """The first convolution, after the upsampling of an up block."""
        if self.upsample_factors:
            return upsample_convolve(self.in_conv, h, self.upsample_factors)
        return convolve(self.in_conv, h)
