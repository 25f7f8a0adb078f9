"""Building blocks of the diffunet U-Net, each for dims = 1, 2 or 3."""

from diffunet.model.layers.attention import (
    AttentionBlock,
    CrossAttention,
    LinearAttention,
    SelfAttention,
)
from diffunet.model.layers.embedding import TimestepEmbedding, sinusoidal_embedding
from diffunet.model.layers.resample import Downsample, Upsample
from diffunet.model.layers.resblock import ResBlock

__all__ = [
    "AttentionBlock",
    "CrossAttention",
    "Downsample",
    "LinearAttention",
    "ResBlock",
    "SelfAttention",
    "TimestepEmbedding",
    "Upsample",
    "sinusoidal_embedding",
]
