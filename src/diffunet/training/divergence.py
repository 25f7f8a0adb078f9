"""Catching a diverged run before it reaches the disk.

:class:`NonFiniteWatch` notes, on the device, the first step whose loss or gradient norm is
not finite; reading it costs one host sync, so the trainer reads it only where it syncs anyway
(log lines and checkpoints). :func:`nonfinite_tensors` checks a training state before it is
written, so no checkpoint or state ever holds NaN or inf, whatever the detection missed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from diffunet.training.distributed import DistInfo


class NonFiniteWatch:
    """The first step with a non-finite loss or gradient norm, kept on the device."""

    NONE = torch.iinfo(torch.int64).max  # no bad step yet

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Record `step` if its loss (or gradient norm, when given) is NaN or inf; no sync."""
        finite = torch.isfinite(loss.detach().float())
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm.detach().float().to(finite.device))
        bad_here = torch.where(finite, self.NONE, step)
        torch.minimum(self.first_bad, bad_here, out=self.first_bad)

    def first_bad_step(self, info: DistInfo) -> int | None:
        """The earliest bad step on any rank, or None (one host sync, a collective under torchrun)."""
        value = self.first_bad
        if info.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        step = int(value)
        return None if step == self.NONE else step


def _tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _tensors(value, f"{prefix}.{index}")


def nonfinite_tensors(tree: Any) -> list[str]:
    """The names (dotted paths) of the floating tensors in `tree` that hold NaN or inf."""
    named = [(name, t) for name, t in _tensors(tree) if t.is_floating_point() and t.numel()]
    if not named:
        return []
    flags = [(~torch.isfinite(t)).any() for _, t in named]
    by_device: dict[torch.device, list[int]] = {}
    for index, flag in enumerate(flags):
        by_device.setdefault(flag.device, []).append(index)
    bad = set()
    for indices in by_device.values():  # one host sync per device
        values = torch.stack([flags[i] for i in indices]).tolist()
        bad.update(i for i, value in zip(indices, values, strict=True) if value)
    return [name for index, (name, _) in enumerate(named) if index in bad]
