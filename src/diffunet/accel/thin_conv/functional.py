"""Which convolutions the thin kernels take (`takes`, `fits`), and the call `conv.convolve`
makes for them (`convolve`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from diffunet.accel import settings
from diffunet.accel.operands import autocast_dtype, autocast_operands
from diffunet.accel.thin_conv.ops import thin_conv3d
from diffunet.accel.triton_runtime import interpreting, triton

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def takes(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether `conv.convolve(conv, x)` runs these kernels: `settings.THIN_CONV` on, and
    `fits(conv, x)`."""
    return settings.THIN_CONV and fits(conv, x)


def fits(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether the kernels can compute `conv(x)`: Triton on a GPU (or its interpreter on the
    CPU), a 3×3×3 `nn.Conv3d` with stride 1, padding 1 and zero padding mode, a thin side of at
    most `settings.THIN_CHANNELS` and a wide side of at most `settings.THIN_MAX_CHANNELS`
    channels, whose sample has fewer than 2³¹ elements (the kernels' offsets are 32-bit within a
    sample). (Whether the module is plain enough to bypass its own call, and not being
    exported, `conv.convolve` decides.)"""
    if not (triton is not None and (x.is_cuda or (x.device.type == "cpu" and interpreting()))):
        return False  # e.g. meta tensors: `F.conv3d` computes their shapes
    if type(conv) is not nn.Conv3d or x.ndim != 5 or x.shape[1] != conv.in_channels:
        return False  # a wrong channel count gets `F.conv3d`'s own error
    if autocast_dtype(x.device.type) is None and (
        x.dtype != conv.weight.dtype or x.dtype not in _DTYPES
    ):
        return False  # leave mismatches to `F.conv3d`'s own error
    channels = (conv.in_channels, conv.out_channels)
    return (
        conv.kernel_size == (3, 3, 3)
        and conv.stride == (1, 1, 1)
        and conv.padding == (1, 1, 1)
        and conv.dilation == (1, 1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and min(channels) <= settings.THIN_CHANNELS
        and max(channels) <= settings.THIN_MAX_CHANNELS
        and math.prod(x.shape[2:]) * max(channels) < 2**31
    )


def convolve(conv: nn.Conv3d, x: torch.Tensor, *, with_bias: bool) -> torch.Tensor:
    """`conv(x)` (without its bias unless `with_bias`) by the kernels, in autocast's dtype when
    autocast is on, else in the one dtype `fits` requires; `takes(conv, x)` must hold."""
    x, weight, bias = autocast_operands(x, conv.weight, conv.bias if with_bias else None)
    with torch.autocast(x.device.type, enabled=False):
        return thin_conv3d(x, weight, bias)
