"""Nearest upsampling for compiled graphs, and nearest upsampling + 3×3 conv folded into one
transposed convolution of the smaller input (`folded_upsample_weight`), run on the device types
of `settings.FOLDED_DEVICES`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffunet.accel import settings
from diffunet.accel.conv import (
    _exporting,
    _layout_for,
    _routable,
    convolve,
    convolve_split_bias,
    convolve_transposed,
)


def upsample_nearest(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """Repeat each spatial axis of `x` (batch, channels, *spatial) `factors` times.

    The values of `F.interpolate(x, scale_factor=factors, mode="nearest")`. Under
    `torch.compile` this is an expand and a reshape: the backward pass is then a sum over the
    repeated axes, where Inductor lowers interpolate's backward to a scatter of atomic adds into
    a float32 buffer. Eager mode keeps `F.interpolate`, whose output stays channels-last.
    """
    if not torch.compiler.is_dynamo_compiling():
        return F.interpolate(x, scale_factor=factors, mode="nearest")
    batch, channels, *spatial = x.shape
    index: list[slice | None] = [slice(None), slice(None)]
    repeated = [batch, channels]
    for size, factor in zip(spatial, factors):
        index += [slice(None), None]
        repeated += [size, factor]
    upsampled = [size * factor for size, factor in zip(spatial, factors)]
    return x[tuple(index)].expand(repeated).reshape(batch, channels, *upsampled)


def folded_upsample_weight(weight: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """The weight of the transposed convolution that computes `conv(upsample_nearest(x,
    factors))` from `x` itself, for the 3-tap `weight` (out, in, 3, ...) of a `padding=1`
    convolution: kernel 4, stride 2 on the doubled axes, kernel 3, stride 1 on the others, and
    padding 1 on all, laid out (in, out, ...) as transposed convolutions take it.

    Along a doubled axis output 2j reads x[j-1] through tap w0 and x[j] through w1 and w2, and
    output 2j+1 reads x[j] through w0 and w1 and x[j+1] through w2 (the zero padding of the
    upsampled input is the zero padding of `x`). A transposed convolution adds x[i] through
    its tap k into output 2i - 1 + k, so the folded kernel is (w2, w1+w2, w0+w1, w0): 2
    products per output along the axis instead of 3, 8 instead of 27 in 3D, and the upsampled
    input is never made. An axis that is not doubled only reverses its taps.
    """
    for axis, factor in enumerate(factors, start=2):
        w0, w1, w2 = weight.unbind(axis)
        taps = (w2, w1 + w2, w0 + w1, w0) if factor == 2 else (w2, w1, w0)
        weight = torch.stack(taps, dim=axis)
    return weight.transpose(0, 1)


def folds(conv: nn.Module, x: torch.Tensor, factors: tuple[int, ...]) -> bool:
    """Whether `upsample_convolve(conv, x, factors)` runs one folded transposed convolution: on
    one of `settings.FOLDED_DEVICES`, axes doubled or kept, a plain 3×3 convolution with padding 1
    (`folded_upsample_weight`'s), and not being exported."""
    same = (1,) * len(factors)
    return (
        x.device.type in settings.FOLDED_DEVICES
        and set(factors) <= {1, 2}
        and _routable(conv)
        and conv.kernel_size == (3,) * len(factors)
        and conv.padding == same
        and conv.stride == same
        and conv.dilation == same
        and conv.groups == 1
        and not _exporting()
    )


def upsample_convolve(conv: nn.Module, x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """`conv(upsample_nearest(x, factors))`, as one transposed convolution of `x` where
    `folds(conv, x, factors)`."""
    if not folds(conv, x, factors):
        return convolve(conv, upsample_nearest(x, factors))
    return _convolve_folded(conv, x, factors, conv.bias)


def upsample_convolve_split_bias(
    conv: nn.Module, x: torch.Tensor, factors: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(out, bias)` with `conv(upsample_nearest(x, factors)) == out + bias`, as
    `conv.convolve_split_bias` gives them (`bias` None where `out` holds it), folded where
    `folds(conv, x, factors)`."""
    if not folds(conv, x, factors):
        return convolve_split_bias(conv, upsample_nearest(x, factors))
    return _convolve_folded(conv, x, factors, None), conv.bias


def _convolve_folded(
    conv: nn.Module, x: torch.Tensor, factors: tuple[int, ...], bias: torch.Tensor | None
) -> torch.Tensor:
    """The transposed convolution of `x` with `conv`'s folded weight, in the layout `conv`
    itself would convolve in: the one it asks for (`conv.prefer_channels_last`, as under
    FSDP), else channels-last if its weight or `x` is (the folded weight is not, and an NCDHW
    input, as eager GroupNorm returns, would otherwise run cuDNN's slow NCDHW kernels)."""
    return convolve_transposed(
        x,
        folded_upsample_weight(conv.weight, factors),
        bias,
        factors,
        [1] * len(factors),
        _layout_for(conv, x, conv.weight),
    )
