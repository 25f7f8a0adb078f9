"""Building blocks of the diffunet U-Net, each for dims = 1, 2 or 3."""

from .attention import AttentionBlock, CrossAttention, LinearAttention, SelfAttention
from .ops import TimestepEmbedding, sinusoidal_embedding
from .resample import Downsample, Upsample
from .resblock import ResBlock

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
