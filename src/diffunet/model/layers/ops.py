"""Dimension-agnostic primitives: convolutions, pooling, normalization, zero init."""

from __future__ import annotations

from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """`nn.Conv1d/2d/3d` chosen by `dims`."""
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
