"""Timestep / noise-level embeddings: sinusoidal features and the MLP that follows them."""

from __future__ import annotations

import math

import torch
from torch import nn


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


class AddedConditionEmbedding(nn.Module):
    """SDXL's added conditioning: a vector (the pooled text embedding) joined by the sinusoidal
    features of scalar ids (original size, crop corner, target size), through a two-layer SiLU
    MLP (`linear_1`, `linear_2`) whose output is added to the time embedding.

    Without `time_id_dim` the vector goes to the MLP as it is (diffusers'
    `class_embed_type="projection"`, SGM's `adm_in_channels` with an embedded `y`).
    """

    def __init__(
        self,
        input_dim: int,
        embed_dim: int,
        *,
        time_id_dim: int | None = None,
        flip_sin_to_cos: bool = True,
        freq_shift: float = 0.0,
    ) -> None:
        super().__init__()
        self.time_id_dim = time_id_dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.linear_1 = nn.Linear(input_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, added_cond: torch.Tensor, time_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embed `added_cond` (B, D) and `time_ids` (B, n): `D + n · time_id_dim` features."""
        features = added_cond
        if self.time_id_dim is not None and time_ids is not None:
            batch, count = time_ids.shape
            ids = sinusoidal_embedding(
                time_ids.flatten(),
                self.time_id_dim,
                flip_sin_to_cos=self.flip_sin_to_cos,
                freq_shift=self.freq_shift,
            )
            features = torch.cat([features, ids.reshape(batch, count * self.time_id_dim)], dim=-1)
        features = features.to(self.linear_1.weight.dtype)
        return self.linear_2(nn.functional.silu(self.linear_1(features)))
