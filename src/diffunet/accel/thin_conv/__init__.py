"""Triton kernels for the thin 3×3×3 convolutions at the two ends of a 3D U-Net.

A 3D U-Net's input convolution turns a few channels into many and its output convolution many
into one. Each moves one full-size activation and does little arithmetic, and cuDNN runs them
far below the memory bandwidth (docs/performance.md).

Every pass here is an implicit matrix product whose reduction axis is the 27 taps × the thin
side's channels: the thin tensor is gathered (a few channels at 27 shifts, cheap), the wide
one is read or written once. The stem's forward gathers its input; its weight gradient gathers
the input again against the streamed output gradient. The head's input gradient gathers its
one-channel output gradient (taps mirrored) into the wide input gradient, and its weight
gradient gathers that output gradient against the streamed input. The head's forward, a
reduction over the wide side, is two passes where its tap products are no wider than its input
(`settings.TAP_PRODUCT_FORWARD`): each position's products with the 27 × COUT tap weights (one
read of x), then each output the sum of its 27 neighbours' products (one read of those); other
heads take cuDNN's (their output padded to `settings.CHANNEL_MULTIPLE` channels). Running each
tap as its own product over the wide side instead would read the wide tensor 27 times.

`conv.convolve` calls them for plain 3×3×3 `nn.Conv3d` layers (stride 1, padding 1) on CUDA
whose narrower side has at most `settings.THIN_CHANNELS` channels, as the operators of ops.py in
eager and compiled code, while `settings.THIN_CONV` is on (`settings.set_thin_conv_enabled`,
`DIFFUNET_THIN_CONV=0`). On a GPU older than compute capability 8.0 the ops compute with ATen.

Modules: functional.py (which convolutions the kernels take, and the call for them), ops.py
(the operators and their `autograd.Function`), launchers.py (the host side of each kernel),
kernels.py (the Triton kernels).
"""

from diffunet.accel.thin_conv import functional, kernels, launchers, ops  # noqa: F401
from diffunet.accel.thin_conv.functional import convolve, fits, takes
from diffunet.accel.thin_conv.ops import thin_conv3d, thin_conv3d_backward_op, thin_conv3d_op

__all__ = ["convolve", "fits", "takes", "thin_conv3d", "thin_conv3d_backward_op", "thin_conv3d_op"]
