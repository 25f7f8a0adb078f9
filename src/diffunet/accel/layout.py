"""Memory layouts and cuDNN algorithm choice: what convolves fastest on a GPU."""

from __future__ import annotations

import torch

_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def memory_format_for(dims: int) -> torch.memory_format:
    """The layout cuDNN convolves fastest on a GPU: channels-last in 2D and 3D (1D: contiguous).

    An accelerated `UNet` puts CUDA activations in this layout; put the weights in it too
    (`model.to(memory_format=memory_format_for(dims))`) so no convolution converts them.
    """
    return _CHANNELS_LAST.get(dims, torch.contiguous_format)


def channels_last_of(ndim: int) -> torch.memory_format | None:
    """The channels-last format of a tensor with `ndim` axes (4: 2D, 5: 3D), else None."""
    return _CHANNELS_LAST.get(ndim - 2)


def to_cuda_layout(x: torch.Tensor, dims: int) -> torch.Tensor:
    """`x` in `memory_format_for(dims)` when it lives on a GPU, else unchanged."""
    if x.is_cuda and dims in _CHANNELS_LAST:
        return x.contiguous(memory_format=_CHANNELS_LAST[dims])
    return x


def enable_cudnn_autotuning(device: torch.device, dims: int) -> None:
    """Have cuDNN time its convolution algorithms once per shape and keep the fastest
    (`torch.backends.cudnn.benchmark`) where that pays: 3D models on a GPU.

    For 1D and 2D models cuDNN's timed picks lose to its heuristic ones (docs/performance.md,
    "Memory format and cuDNN autotuning"), so the setting is left as it is there and off the
    GPU. The CLI commands that run a model many times call this; a library user decides for
    their own process.
    """
    if device.type == "cuda" and dims == 3:
        torch.backends.cudnn.benchmark = True
