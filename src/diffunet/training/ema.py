"""The exponential moving average of the weights, one step at a time, with a warmed-up decay.

One update rule, :func:`ema_step` on lists of tensors, serves both layouts: :func:`update_ema`
for a full copy (an `AveragedModel`, :class:`diffunet.training.parallel.Replicated`) and
:class:`diffunet.training.sharding.ShardedEMA` for the local shards of an FSDP model, so a
sharded run averages exactly like an unsharded one. The update count stays on the host.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def ema_decay_at(decay: float, num_averaged: int) -> float:
    """The EMA decay after `num_averaged` updates, warmed up: min(decay, (1 + n) / (10 + n))."""
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged))


@torch.no_grad()
def ema_step(
    averaged: list[torch.Tensor], current: list[torch.Tensor], count: int, decay: float
) -> None:
    """Move `averaged` towards `current` in place, after `count` earlier steps: the first step
    copies, later ones interpolate with the warmed-up decay (:func:`ema_decay_at`)."""
    if count == 0:
        torch._foreach_copy_(averaged, current)
    else:
        torch._foreach_lerp_(averaged, current, 1.0 - ema_decay_at(decay, count))


#: What an EMA step reads and writes: averaged parameters, current parameters, and the
#: (averaged, current) buffer pairs.
EMATensors = tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]


def ema_tensors(ema: AveragedModel, model: torch.nn.Module) -> EMATensors:
    """The tensors :func:`update_ema` works on, gathered once so that a training step need not
    walk both module trees again."""
    return (
        [p.detach() for p in ema.module.parameters()],
        [p.detach() for p in model.parameters()],
        list(zip(ema.module.buffers(), model.buffers())),
    )


@torch.no_grad()
def update_ema(
    ema: AveragedModel, model: torch.nn.Module, decay: float, tensors: EMATensors | None = None
) -> None:
    """One EMA step of `ema` (float32) towards `model` (:func:`ema_step`); buffers are copied.

    `AveragedModel.update_parameters` would read its update count back from the GPU every
    step; here the count stays on the host, so the training step never waits for the device.
    `tensors` (:func:`ema_tensors`) saves gathering them again.
    """
    averaged, current, buffers = tensors or ema_tensors(ema, model)
    ema_step(averaged, current, int(ema.n_averaged), decay)
    for ema_buffer, buffer in buffers:
        ema_buffer.copy_(buffer)
    ema.n_averaged += 1
