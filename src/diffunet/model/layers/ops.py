"""Dimension-agnostic primitives: convolutions, pooling, normalization and embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """`nn.Conv1d/2d/3d` chosen by `dims` (call it through `conv.convolve`)."""
    return _CONV[dims](*args, **kwargs)


def conv_transpose_nd(dims: int, *args, **kwargs) -> nn.Module:
    """`nn.ConvTranspose1d/2d/3d` chosen by `dims`."""
    return _CONV_TRANSPOSE[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """`nn.AvgPool1d/2d/3d` chosen by `dims`."""
    return _AVG_POOL[dims](*args, **kwargs)


def normalization(channels: int, groups: int, eps: float) -> nn.GroupNorm:
    """The GroupNorm used everywhere in the model.

    Under autocast PyTorch runs `group_norm` in float32, so the statistics never overflow in
    bf16/fp16.
    """
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` and return it (guided-diffusion's output init)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def sinusoidal_embedding(
    t: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal features of timesteps or noise levels `t` (shape `(B,)`), in float32.

    Frequencies are `max_period ** (-i / (dim / 2 - freq_shift))`. guided-diffusion and
    EMDiffuse use `flip_sin_to_cos=True, freq_shift=0` (cosine half first); DDPM / LDM /
    diffusers' `google/ddpm-cifar10-32` use `flip_sin_to_cos=False, freq_shift=1`.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = (t.float() * scale)[:, None] * freqs[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of `t` followed by a two-layer SiLU MLP (`linear_1`, `linear_2`)."""

    def __init__(
        self,
        input_dim: int,
        embed_dim: int,
        *,
        flip_sin_to_cos: bool = True,
        freq_shift: float = 0.0,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.scale = scale
        self.linear_1 = nn.Linear(input_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed `t` (shape `(B,)`, integer steps or continuous noise levels)."""
        features = sinusoidal_embedding(
            t,
            self.input_dim,
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
            scale=self.scale,
        )
        features = features.to(self.linear_1.weight.dtype)
        return self.linear_2(nn.functional.silu(self.linear_1(features)))
