"""Catching a diverged run before it reaches the disk.

:class:`NonFiniteWatch` keeps each step's loss and gradient norm on the device; finding the
first non-finite one costs one host sync, so the trainer looks only where it syncs anyway (log
lines and checkpoints). :func:`nonfinite_tensors` checks a training state before it is
written, so no checkpoint or state ever holds NaN or inf, whatever the detection missed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from diffunet.training.distributed import DistInfo


class NonFiniteWatch:
    """The losses (plus gradient norms) of the steps since the last check, kept on the device.

    A step costs one addition and one copy into a preallocated buffer; :meth:`first_bad_step`
    then finds the first non-finite one. Checks must come at least every `window` steps (the
    trainer checks at every log line); a step that would overflow the window checks first.
    """

    def __init__(self, device: torch.device, window: int, info: DistInfo | None = None) -> None:
        self.values = torch.zeros(max(1, window), device=device)
        self.info = info or DistInfo(device=device)
        self.first_step = 0  # the step of values[0]
        self.count = 0
        self.found: int | None = None  # a bad step found by an early check

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Record the loss (plus the gradient norm, when given) of `step`; no host sync."""
        if self.count == len(self.values):  # not checked for a whole window: check now
            self.found = self.first_bad_step()
        if self.count == 0:
            self.first_step = step
        value = loss.detach()
        if grad_norm is not None:  # NaN or inf in either leaves the sum non-finite
            value = value + grad_norm.detach().to(value.device)
        self.values[self.count] = value
        self.count += 1

    def first_bad_step(self) -> int | None:
        """The earliest step with a NaN/inf loss or gradient norm on any rank since the run
        started, or None; starts a new window. One host sync (a collective under torchrun)."""
        if self.found is not None:
            return self.found
        first = torch.full((), NO_STEP, dtype=torch.int64, device=self.values.device)
        if self.count:
            bad = ~torch.isfinite(self.values[: self.count])
            first = torch.where(bad.any(), bad.int().argmax() + self.first_step, first)
        if self.info.enabled:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        self.count = 0
        step = int(first)
        self.found = None if step == NO_STEP else step
        return self.found


NO_STEP = torch.iinfo(torch.int64).max  # "no bad step" in the all-reduce over ranks


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
