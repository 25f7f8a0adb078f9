"""Fully sharded data parallel training (FSDP2) for models whose training state outgrows a GPU.

With `--parallel fsdp` under `torchrun`, each process keeps 1/N of every parameter, gradient,
AdamW moment and EMA weight; a block's parameters are gathered just before it runs and freed
after (`torch.distributed.fsdp.fully_shard`, one unit per U-Net block plus the root). The
arithmetic is the same as DDP's (autocast over float32 master weights, gradients averaged over
the processes), so a run matches single-process training up to floating-point reduction order,
and its training state has the same full (unsharded) tensors, gathered to rank 0 on saving.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from diffunet.accel import accelerate
from diffunet.model.config import UNetConfig
from diffunet.model.unet import UNet
from diffunet.training.ema import ema_step

#: Full tensors on the CPU of rank 0 (the others get empty dicts): what a checkpoint holds.
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
#: Full tensors on every rank, each taking its own shard: how a training state is loaded.
SCATTER = StateDictOptions(full_state_dict=True)


def shard_unet(model: UNet) -> UNet:
    """Shard `model` in place: one FSDP unit per encoder block (the stem is the first), the
    middle block and each decoder block, plus the root (time embedding and head)."""
    for block in (*model.input_blocks, model.middle_block, *model.output_blocks):
        fully_shard(block)
    fully_shard(model)
    return model


def local_parameters(model: torch.nn.Module) -> int:
    """How many parameter elements this process holds (its shards of every parameter)."""
    return sum(_local(p).numel() for p in model.parameters())


def _local(value: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (sharing its storage), or `value` itself."""
    return value.to_local() if isinstance(value, DTensor) else value


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """`value` itself, or the whole of a DTensor (a collective: every rank must call it)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full float32 weights on rank 0's CPU (collective)."""
    return get_model_state_dict(model, options=GATHER)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full weights (present on every rank) into the sharded `model`."""
    set_model_state_dict(model, state, options=SCATTER)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state, keyed by parameter name, on rank 0's CPU (collective)."""
    return get_optimizer_state_dict(model, optimizer, options=GATHER)


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a full optimizer state (present on every rank) into the sharded optimizer."""
    set_optimizer_state_dict(model, optimizer, state, options=SCATTER)


class ShardedEMA:
    """The EMA of a sharded model: float32 copies of this rank's parameter shards.

    The same step as :func:`diffunet.training.ema.update_ema` (the count stays on the host), so a
    sharded run averages exactly like an unsharded one.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.names = [name for name, _ in model.named_parameters()]
        self.shards = [p.detach().clone() for p in model.parameters()]
        self.n_averaged = 0

    def update(self, model: torch.nn.Module, decay: float) -> None:
        """One EMA step towards `model`'s current shards (:func:`diffunet.training.ema.ema_step`,
        which warms `decay` up)."""
        # On the local shards, in one foreach call: per-DTensor ops would each pay DTensor's
        # dispatch on every training step.
        ema_step(
            [_local(shard) for shard in self.shards],
            [_local(p.detach()) for p in model.parameters()],
            self.n_averaged,
            decay,
        )
        self.n_averaged += 1

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every averaged weight, whole, on the CPU of every rank (collective)."""
        return {
            name: full_tensor(shard).cpu()
            for name, shard in zip(self.names, self.shards, strict=True)
        }

    def load_full_state(self, weights: dict[str, torch.Tensor], n_averaged: int) -> None:
        """Take this rank's shards of full `weights` (present on every rank)."""
        missing = sorted(set(self.names) - set(weights))
        if missing:
            raise KeyError(f"the EMA weights lack {missing[:3]}")
        with torch.no_grad():
            for name, shard in zip(self.names, self.shards, strict=True):
                full = weights[name].to(device=shard.device, dtype=shard.dtype)
                if isinstance(shard, DTensor):
                    full = distribute_tensor(full, shard.device_mesh, shard.placements)
                shard.copy_(full)
        self.n_averaged = int(n_averaged)

    def unet(self, config: UNetConfig, device: torch.device, *, build: bool = True) -> UNet | None:
        """A plain (unsharded) :class:`UNet` on `device` holding the averaged weights.

        A collective: every rank must call it; ranks that only help gather pass `build=False`
        and get None.
        """
        weights = self.full_state()
        if not build:
            return None
        model = accelerate(UNet(config).to(device))
        model.load_state_dict(weights)
        return model.eval()
