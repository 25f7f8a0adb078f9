"""Gradients averaged across replicas after the backward, in buckets (`--grad-sync after-backward`).

DDP all-reduces gradients from hooks that fire while the backward runs, overlapping the
communication with the rest of the backward. A backward replayed as a CUDA graph fires no
hooks in between: the graph writes every gradient at once. :class:`GradientAllReduce` then
averages them in a few large all-reduces once the backward has finished, which keeps the
graphs free of communication and so valid on every rank. Its cost is the overlap: the
all-reduces run after the backward instead of during it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from diffunet.training.distributed import DistInfo

#: The most bytes of gradients one all-reduce carries: large enough for full bandwidth, small
#: enough that the flattened bucket costs little memory beside the gradients.
BUCKET_BYTES = 64 * 2**20


def gradient_buckets(
    parameters: Iterable[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES
) -> list[list[torch.nn.Parameter]]:
    """The trainable `parameters` in consecutive buckets of one dtype and at most
    `bucket_bytes` each (a larger parameter fills a bucket alone)."""
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in parameters:
        if not p.requires_grad:
            continue
        nbytes = p.numel() * p.element_size()
        current = buckets[-1] if buckets else None
        if current is None or current[0].dtype != p.dtype or size + nbytes > bucket_bytes:
            buckets.append([p])
            size = nbytes
        else:
            current.append(p)
            size += nbytes
    return buckets


class GradientAllReduce:
    """Average the gradients of `parameters` over every rank, one all-reduce per bucket.

    Each call flattens a bucket's gradients into one tensor, all-reduces its sum, divides by
    the world size and copies the averages back into the gradients. A parameter without a
    gradient gets zeros, so every rank reduces the same buckets. In a world of one it only
    launches what it would launch with more ranks.
    """

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        info: DistInfo,
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        self.buckets = gradient_buckets(parameters, bucket_bytes)
        self.world_size = info.world_size

    def __call__(self) -> None:
        """Replace every gradient with its mean over the ranks."""
        for bucket in self.buckets:
            grads = [_gradient(p) for p in bucket]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            if self.world_size > 1:
                flat.div_(self.world_size)
            pieces = flat.split([g.numel() for g in grads])
            torch._foreach_copy_(grads, [piece.view(g.shape) for piece, g in zip(pieces, grads)])


def _gradient(p: torch.nn.Parameter) -> torch.Tensor:
    """The gradient of `p`, zeros where the backward left none."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad
