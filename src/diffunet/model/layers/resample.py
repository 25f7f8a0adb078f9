"""Down- and upsampling between U-Net levels, per axis (anisotropic 3D included).

Nearest upsampling followed by a 3×3 convolution is also one transposed convolution of the
smaller input (`folded_upsample_weight`); `upsample_convolve` runs it that way on
`FOLDED_DEVICES`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from diffunet.accel.conv import (
    _exporting,
    _layout_for,
    _routable,
    convolve,
    convolve_split_bias,
    convolve_transposed,
)
from diffunet.model.layers.ops import avg_pool_nd, conv_nd, conv_transpose_nd

#: The environment variable naming the devices that fold (see `FOLDED_DEVICES`).
FOLDED_DEVICES_ENV = "DIFFUNET_FOLDED_UPSAMPLE"


def parse_devices(text: str, source: str = FOLDED_DEVICES_ENV) -> frozenset[str]:
    """Device types from a comma-separated list ("cpu,cuda"; "none" or nothing for none)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return frozenset()
    for name in names:
        try:
            known = torch.device(name).type == name
        except RuntimeError:
            known = False
        if not known:
            raise ValueError(
                f"{source}={text!r}: {name!r} is not a device type; expected a "
                "comma-separated list such as 'cpu' or 'cpu,cuda', or 'none'"
            )
    return frozenset(names)


#: Devices on which `Upsample` folds nearest upsampling into its convolution
#: (`folded_upsample_weight`). Both oneDNN's and cuDNN's transposed convolutions measured
#: faster than the upsampling and convolution they replace (docs/performance.md, sessions 14
#: and 15). `DIFFUNET_FOLDED_UPSAMPLE` sets it when the module is imported ("cpu,cuda" when
#: unset), `set_folded_upsample_devices` later.
FOLDED_DEVICES: frozenset[str] = frozenset({"cpu", "cuda"})


def set_folded_upsample_devices(devices: str | Iterable[str]) -> None:
    """Fold on these device types from now on: an iterable, or a comma-separated string as
    `DIFFUNET_FOLDED_UPSAMPLE` takes ("none" for none)."""
    global FOLDED_DEVICES
    FOLDED_DEVICES = parse_devices(
        devices if isinstance(devices, str) else ",".join(devices), "devices"
    )


@contextlib.contextmanager
def folding_on(devices: str | Iterable[str]) -> Iterator[None]:
    """Within the block fold on these device types only (as `set_folded_upsample_devices`
    takes them); afterwards on those before it. `folding_on("none")` runs the architecture's
    own upsampling and convolution, e.g. to count its FLOPs."""
    global FOLDED_DEVICES
    before = FOLDED_DEVICES
    set_folded_upsample_devices(devices)
    try:
        yield
    finally:
        FOLDED_DEVICES = before


if FOLDED_DEVICES_ENV in os.environ:
    try:
        FOLDED_DEVICES = parse_devices(os.environ[FOLDED_DEVICES_ENV])
    except ValueError as err:  # a process-wide knob: say so, and keep the default
        warnings.warn(f"{err}; folding on {sorted(FOLDED_DEVICES)}", stacklevel=1)


def upsample_nearest(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """Repeat each spatial axis of `x` (batch, channels, *spatial) `factors` times.

    The values of `F.interpolate(x, scale_factor=factors, mode="nearest")`. Under
    `torch.compile` this is an expand and a reshape: the backward pass is then a sum over the
    repeated axes, where Inductor lowers interpolate's backward to a scatter of atomic adds into
    a float32 buffer (1.7 ms of a 74 ms 3D training step on an H100). Eager mode keeps
    `F.interpolate`, whose output stays channels-last.
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


class Downsample(nn.Module):
    """Halve the axes whose factor is 2: a strided 3×3 conv, or average pooling.

    The conv pads 1 on each side (`padding="symmetric"`, guided-diffusion), or pads only one
    row/column at the end of each halved axis and none in the conv (`"asymmetric"`, LDM and
    diffusers' `downsample_padding=0`).
    """

    def __init__(
        self,
        dims: int,
        channels: int,
        factors: tuple[int, ...],
        use_conv: bool,
        padding: str = "symmetric",
    ) -> None:
        super().__init__()
        self.factors = factors
        self.pad: tuple[int, ...] | None = None
        if use_conv and padding == "asymmetric":
            # F.pad lists the last axis first; unhalved axes keep a plain 'same' padding.
            self.pad = tuple(p for f in reversed(factors) for p in ((0, 1) if f == 2 else (1, 1)))
            self.op = conv_nd(dims, channels, channels, 3, stride=factors, padding=0)
        elif use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=factors, padding=1)
        else:
            self.op = avg_pool_nd(dims, kernel_size=factors, stride=factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Downsample `x`."""
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return convolve(self.op, x)


def folds(conv: nn.Module, x: torch.Tensor, factors: tuple[int, ...]) -> bool:
    """Whether `upsample_convolve(conv, x, factors)` runs one folded transposed convolution: on
    one of `FOLDED_DEVICES`, axes doubled or kept, a plain 3×3 convolution with padding 1
    (`folded_upsample_weight`'s), and not being exported."""
    same = (1,) * len(factors)
    return (
        x.device.type in FOLDED_DEVICES
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
    itself would convolve in: the one it asks for (`nn.conv.prefer_channels_last`, as under
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


class Upsample(nn.Module):
    """Double the axes whose factor is 2.

    `mode` is "nearest_conv" (nearest neighbour then a 3×3 conv), "nearest" (no parameters)
    or "transposed" (a transposed conv with kernel 4, stride 2 on resampled axes). On
    `FOLDED_DEVICES`, "nearest_conv" computes the same function as one transposed convolution
    of the input (`upsample_convolve`) with the module's own parameters; exported programs
    keep the upsampling and the convolution.
    """

    def __init__(self, dims: int, channels: int, factors: tuple[int, ...], mode: str) -> None:
        super().__init__()
        self.factors = factors
        self.mode = mode
        if mode == "nearest_conv":
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)
        elif mode == "transposed":
            kernel = tuple(4 if f == 2 else 3 for f in factors)
            self.conv = conv_transpose_nd(
                dims, channels, channels, kernel, stride=factors, padding=1
            )
        elif mode != "nearest":
            raise ValueError(f"unknown upsample mode {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample `x`."""
        if self.mode == "transposed":
            return self.conv(x)
        if self.mode == "nearest":
            return upsample_nearest(x, self.factors)
        return upsample_convolve(self.conv, x, self.factors)

    def folds(self, x: torch.Tensor) -> bool:
        """Whether `forward(x)` runs the folded transposed convolution (see `folds`)."""
        return self.mode == "nearest_conv" and folds(self.conv, x, self.factors)
