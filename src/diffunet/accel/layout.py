"""Memory layouts: cuDNN convolves fastest channels-last on a GPU."""

from __future__ import annotations

import torch

_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def memory_format_for(dims: int) -> torch.memory_format:
    """The layout cuDNN convolves fastest on a GPU: channels-last in 2D and 3D (1D: contiguous).

    An accelerated `UNet` puts CUDA activations in this layout; put the weights in it too
    (`model.to(memory_format=memory_format_for(dims))`) so no convolution converts them.
    """
    return _CHANNELS_LAST.get(dims, torch.contiguous_format)


def to_cuda_layout(x: torch.Tensor, dims: int) -> torch.Tensor:
    """`x` in `memory_format_for(dims)` when it lives on a GPU, else unchanged."""
    if x.is_cuda and dims in _CHANNELS_LAST:
        return x.contiguous(memory_format=_CHANNELS_LAST[dims])
    return x
