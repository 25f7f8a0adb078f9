"""Building blocks of the diffunet U-Net, each for dims = 1, 2 or 3."""

from diffunet.model.layers.attention import (
    AttentionBlock,
    CrossAttention,
    LinearAttention,
    SelfAttention,
)
from diffunet.model.layers.embedding import (
    AddedConditionEmbedding,
    TimestepEmbedding,
    sinusoidal_embedding,
)
from diffunet.model.layers.resample import Downsample, Upsample
from diffunet.model.layers.resblock import ResBlock
from diffunet.model.layers.transformer import (
    Attention,
    FeedForward,
    SpatialTransformer,
    TransformerBlock,
)

__all__ = [
    "AddedConditionEmbedding",
    "Attention",
    "AttentionBlock",
    "CrossAttention",
    "Downsample",
    "FeedForward",
    "LinearAttention",
    "ResBlock",
    "SelfAttention",
    "SpatialTransformer",
    "TimestepEmbedding",
    "TransformerBlock",
    "Upsample",
    "sinusoidal_embedding",
]
