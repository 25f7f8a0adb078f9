"""Gradients averaged across replicas after the backward (`--grad-sync after-backward`).

DDP all-reduces gradients from hooks that fire while the backward runs, overlapping the
communication with the rest of the backward. A backward replayed as a CUDA graph fires no
hooks in between: the graph writes every gradient at once. :class:`GradientAllReduce` then
averages them once the backward has finished, which keeps the graphs free of communication
and so valid on every rank. Its cost is the overlap: the all-reduces run after the backward
instead of during it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from diffunet.training.distributed import DistInfo


def gradient_buckets(parameters: Iterable[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """The trainable `parameters` grouped by dtype (one coalesced all-reduce each), in order."""
    buckets: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in parameters:
        if p.requires_grad:
            buckets.setdefault(p.dtype, []).append(p)
    return list(buckets.values())


class GradientAllReduce:
    """Average the gradients of `parameters` over every rank.

    Each dtype's gradients go to the process group as one coalesced all-reduce: the backend
    reduces them in place, as they are laid out (channels-last ones too), with no flattened
    copy and one host call for all of them (NCCL runs them as one group), and a fused division
    by the world size follows. A parameter without a gradient gets zeros, so every rank
    reduces the same tensors. In a world of one the all-reduce still runs.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], info: DistInfo) -> None:
        self.buckets = gradient_buckets(parameters)
        self.world_size = info.world_size
        self.options = dist.AllreduceCoalescedOptions()
        self.options.reduceOp = dist.ReduceOp.SUM

    def __call__(self) -> None:
        """Replace every gradient with its mean over the ranks."""
        group = dist.group.WORLD
        assert group is not None, "the process group is joined before training starts"
        for bucket in self.buckets:
            grads = [_gradient(p) for p in bucket]
            group.allreduce_coalesced(grads, self.options).wait()
            if self.world_size > 1:
                torch._foreach_div_(grads, self.world_size)


def _gradient(p: torch.nn.Parameter) -> torch.Tensor:
    """The gradient of `p`, zeros where the backward left none."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad
