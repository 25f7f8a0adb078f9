"""Down- and upsampling between U-Net levels, per axis (anisotropic 3D included).

`factors` holds one entry per spatial axis: 2 for an axis that is halved or doubled, 1 for an
axis that keeps its size (the depth of a serial-section EM volume, say).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffunet.errors import InvalidValueError
from diffunet.model.layers.ops import avg_pool_nd, conv_nd, conv_transpose_nd

UPSAMPLE_MODES = ("nearest_conv", "nearest", "transposed")


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
        return self.op(x)


class Upsample(nn.Module):
    """Double the axes whose factor is 2.

    `mode` is "nearest_conv" (nearest neighbour then a 3×3 conv), "nearest" (no parameters)
    or "transposed" (a transposed conv with kernel 4, stride 2 on resampled axes).
    """

    def __init__(self, dims: int, channels: int, factors: tuple[int, ...], mode: str) -> None:
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise InvalidValueError(
                f"unknown upsample mode {mode!r}; expected one of {UPSAMPLE_MODES}"
            )
        self.factors = factors
        self.mode = mode
        if mode == "nearest_conv":
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)
        elif mode == "transposed":
            kernel = tuple(4 if f == 2 else 3 for f in factors)
            self.conv = conv_transpose_nd(
                dims, channels, channels, kernel, stride=factors, padding=1
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample `x`."""
        if self.mode == "transposed":
            return self.conv(x)
        x = F.interpolate(x, scale_factor=self.factors, mode="nearest")
        return self.conv(x) if self.mode == "nearest_conv" else x
