"""The weight gradient of a folded upsampling's transposed convolution, one output phase at a time.

A folded upsampling (`upsample.folded_upsample_weight`) is a transposed convolution with
kernel 4, stride 2 and padding 1 along each doubled axis (kernel 3, stride 1 along the others).
Along a doubled axis, output 2j reads x[j-1] and x[j] through taps 3 and 1 of the folded
kernel, output 2j+1 reads x[j] and x[j+1] through taps 2 and 0. So each output phase (even or
odd position along each doubled axis) is a stride-1 convolution of `x` with two taps per
doubled axis, and the weight gradient is one stride-1 weight gradient per phase: `x` padded by
one once, each phase of the output gradient copied dense and zero-padded to the n + 1
positions the padded `x` gives. The same sums as ATen's weight gradient of the transposed
convolution, computed by cuDNN's stride-1 kernels instead of its strided ones
(`settings.FOLDED_WEIGHT_GRADIENT_BY_PHASES`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from diffunet.accel.layout import memory_format_for

#: Per axis, by its stride: the folded kernel's taps that each output phase's products go
#: through, in reverse order of the phase convolution's taps (phase 0 of a doubled axis: taps
#: 3, 1; phase 1: taps 2, 0; an axis that is not doubled: taps 2, 1, 0).
_PHASE_TAPS = {2: (slice(1, None, 2), slice(0, None, 2)), 1: (slice(None),)}


def takes(
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> bool:
    """Whether a transposed convolution of this geometry is a folded upsampling's, which
    `weight_gradient_by_phases` computes: padding 1, kernel 4 where the stride is 2 and 3 where
    it is 1, at least one axis doubled, one group, no dilation."""
    kernel = list(weight_shape[2:])
    return (
        groups == 1
        and 2 in stride
        and all(d == 1 for d in dilation)
        and all(p == 1 for p in padding)
        and all((s, k) in ((2, 4), (1, 3)) for s, k in zip(stride, kernel, strict=True))
    )


def weight_gradient_by_phases(
    x: torch.Tensor, grad: torch.Tensor, stride: Sequence[int]
) -> torch.Tensor:
    """The weight gradient (in, out, *kernel) of the transposed convolution of `x` that `takes`
    accepts, for the output gradient `grad`, one stride-1 weight gradient per output phase."""
    n = len(stride)
    layout = memory_format_for(n)
    padded = F.pad(x, [1, 1] * n).contiguous(memory_format=layout)
    kernel = [4 if s == 2 else 3 for s in stride]
    spatial = tuple(range(2, 2 + n))
    out = x.new_zeros(x.shape[1], grad.shape[1], *kernel)
    # The phase convolutions' weight, for its shape: two taps per doubled axis, three elsewhere.
    phase_weight = x.new_empty(grad.shape[1], x.shape[1], *[2 if s == 2 else 3 for s in stride])
    for phases in itertools.product(*(range(s) for s in stride)):
        pick, pads = [slice(None), slice(None)], []
        for s, r in zip(stride, phases):
            pick.append(slice(r, None, s))
            pads = [r, 1 - r, *pads] if s == 2 else [0, 0, *pads]  # F.pad: last axis first
        phase = F.pad(grad[tuple(pick)], pads).contiguous(memory_format=layout)
        taps = [_PHASE_TAPS[s][r] for s, r in zip(stride, phases)]
        partial = torch.ops.aten.convolution_backward(
            phase,
            padded,
            phase_weight,
            None,
            [1] * n,
            [0] * n,
            [1] * n,
            False,
            [0] * n,
            1,
            [False, True, False],
        )[1]
        # Slices, not index tensors: nothing to copy from the host inside a captured graph.
        out[(slice(None), slice(None), *taps)] = partial.transpose(0, 1).flip(spatial)
    return out
