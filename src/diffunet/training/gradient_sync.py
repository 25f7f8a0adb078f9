"""Gradients averaged across replicas after the backward (`--grad-sync after-backward`).

DDP all-reduces gradients from hooks that fire while the backward runs, overlapping the
communication with the rest of the backward. A backward replayed as a CUDA graph fires no
hooks in between: the graph writes every gradient at once. :class:`GradientAllReduce` then
averages them once the backward has finished, which keeps the graphs free of communication
and so valid on every rank. Its cost is the overlap: the all-reduces run after the backward
instead of during it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from diffunet.training.distributed import DistInfo


def gradient_buckets(parameters: Iterable[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """The trainable `parameters` grouped by dtype (one all-reduce each), in order."""
    buckets: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in parameters:
        if p.requires_grad:
            buckets.setdefault(p.dtype, []).append(p)
    return list(buckets.values())


def dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """`t`'s strides where they cover exactly `t.numel()` elements without overlap (contiguous,
    channels-last, any permutation), else the contiguous ones."""
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), -d))
    expected = 1
    for d in order:
        if t.size(d) != 1 and t.stride(d) != expected:
            return torch.empty(t.shape, device="meta").stride()
        expected *= t.size(d)
    return t.stride()


class GradientBuffer:
    """One dtype's gradients, reduced in one persistent flat buffer.

    `views` lays each parameter's gradient over the buffer with the parameter's own strides,
    so gradients go in with one fused copy and come back as these views, in the layout the
    optimizer expects. The buffer lives outside any CUDA-graph pool and is the only tensor
    the process group holds on to, so a replayed backward's outputs are free once the step
    has copied them.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        first = self.params[0]
        self.buffer = torch.zeros(
            sum(p.numel() for p in self.params), dtype=first.dtype, device=first.device
        )
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in self.params:
            self.views.append(self.buffer.as_strided(p.shape, dense_strides(p), offset))
            offset += p.numel()

    def gather(self) -> None:
        """Copy every gradient into the buffer, zeros where the backward left none."""
        sources, targets, missing = [], [], []
        for p, view in zip(self.params, self.views, strict=True):
            if p.grad is None:
                missing.append(view)
            else:
                sources.append(p.grad)
                targets.append(view)
        if targets:
            torch._foreach_copy_(targets, sources)
        if missing:
            torch._foreach_zero_(missing)

    def scatter(self) -> None:
        """Make the buffer's views the parameters' gradients."""
        for p, view in zip(self.params, self.views, strict=True):
            p.grad = view


class GradientAllReduce:
    """Average the gradients of `parameters` over every rank.

    Each dtype's gradients are copied into one persistent buffer (one fused copy), the buffer
    is all-reduced as one tensor and divided by the world size, and the parameters' gradients
    become views of it, laid out as the parameters are. A parameter without a gradient gets
    zeros, so every rank reduces the same tensors. In a world of one the all-reduce still runs.
    The buffers cost one gradient's worth of memory, allocated once.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], info: DistInfo) -> None:
        self.buffers = [GradientBuffer(bucket) for bucket in gradient_buckets(parameters)]
        self.world_size = info.world_size

    def __call__(self) -> None:
        """Replace every gradient with its mean over the ranks."""
        group = dist.group.WORLD
        assert group is not None, "the process group is joined before training starts"
        for grads in self.buffers:
            grads.gather()
            dist.all_reduce(grads.buffer, op=dist.ReduceOp.SUM, group=group)
            if self.world_size > 1:
                grads.buffer.div_(self.world_size)
            grads.scatter()
