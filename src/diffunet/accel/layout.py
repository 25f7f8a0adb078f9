"""Memory layouts and cuDNN algorithm choice: what convolves fastest on a GPU, and how a traced
graph asks Inductor for a layout without a copy."""

from __future__ import annotations

from collections.abc import Sequence

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


def dense_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format `x` is dense in: channels-last where it is laid out so (2D or 3D),
    else contiguous."""
    channels_last = channels_last_of(x.ndim)
    if channels_last is not None and x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


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


def dense_strides(shape: Sequence[int], memory_format: torch.memory_format) -> list[int]:
    """The strides of a dense tensor of `shape` in `memory_format` (contiguous or channels-last)."""
    innermost_first = list(range(len(shape) - 1, -1, -1))
    if memory_format in (torch.channels_last, torch.channels_last_3d):
        innermost_first = [1, *range(len(shape) - 1, 1, -1), 0]
    strides = [0] * len(shape)
    step = 1
    for axis in innermost_first:
        strides[axis] = step
        step *= shape[axis]
    return strides


def pin_layout(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """`x.contiguous(memory_format=...)`, and while Dynamo traces, a layout Inductor keeps.

    Inductor takes a traced `contiguous` (a clone) as a hint only: the kernel producing `x`
    stays free to pick its strides, and its 3D convolution lowering picks them from the
    operands' current layouts, NCDHW when both are such free buffers (an autocast weight cast
    is one), and cuDNN then converts the input, the weight and the output of every such
    convolution. Inductor's own `force_stride_order` prim fixes the producer's strides, and
    where `x` has them already it costs nothing.
    """
    if not torch.compiler.is_dynamo_compiling():
        return x.contiguous(memory_format=memory_format)
    try:
        from torch._inductor import inductor_prims  # noqa: F401  (registers the prim)
    except ImportError:  # pragma: no cover - an Inductor without the prim
        return x.contiguous(memory_format=memory_format)
    return torch.ops.prims.inductor_force_stride_order(x, dense_strides(x.shape, memory_format))
