"""How the trained model and its EMA are laid out across processes (`--parallel`).

:class:`Replicated` keeps a full copy in every process (gradients all-reduced under `torchrun`,
by DDP during the backward or all at once after it; a single process is its one-copy case).
:class:`Sharded` splits parameters, gradients, optimizer state and EMA across processes (FSDP,
:mod:`diffunet.training.sharding`). The trainer talks to either through the same methods, so
it never asks which one it has.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from diffunet.accel.conv import prefer_channels_last
from diffunet.accel.layout import memory_format_for
from diffunet.model.checkpoint import clean_state_dict
from diffunet.model.unet import UNet
from diffunet.training.distributed import DistInfo
from diffunet.training.ema import ema_tensors, update_ema
from diffunet.training.gradient_sync import GradientAllReduce


def place_model(model: UNet, device: torch.device, *, sharded: bool = False) -> None:
    """On a GPU, give the convolutions channels-last activations: by converting the weights to
    that layout, or, for a model about to be sharded (FSDP shards only contiguous parameters),
    by asking each convolution for it (:func:`diffunet.accel.conv.prefer_channels_last`)."""
    if device.type != "cuda":
        return
    if sharded:
        prefer_channels_last(model)
    else:
        model.to(memory_format=memory_format_for(model.config.dims))


class Replicated:
    """A full copy of the model and its EMA in every process.

    `net` is what the training step calls: the model, wrapped in DDP under `torchrun` with
    `grad_sync="ddp"`; with `"after-backward"` the model itself, and :meth:`sync_gradients`
    averages the gradients (:class:`~diffunet.training.gradient_sync.GradientAllReduce`).
    """

    parallel = "replicated"
    gathers = False  # building the training state is no collective

    def __init__(self, model: UNet, dist: DistInfo, grad_sync: str = "ddp") -> None:
        place_model(model, dist.device)
        self.model, self.dist = model, dist
        self.ema = AveragedModel(model)
        self.ema.module.eval()
        # Gathered once: walking the module trees every step costs the host milliseconds.
        self._parameters = list(model.parameters())
        self._ema_tensors = ema_tensors(self.ema, model)
        self.net: torch.nn.Module = model
        self.grad_sync = grad_sync if dist.enabled else None
        self._all_reduce: GradientAllReduce | None = None
        if self.grad_sync == "ddp":
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
            # The diffusion layer reads the model's config (time input, aleatoric head).
            self.net.config = model.config
        elif self.grad_sync == "after-backward":
            self._all_reduce = GradientAllReduce(self._parameters, dist)

    def prepare_compile(self) -> None:
        """Nothing to prepare: the whole model compiles as one graph."""

    def sync_gradients(self) -> None:
        """Average the gradients over the ranks where the backward did not (after-backward)."""
        if self._all_reduce is not None:
            self._all_reduce()

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients' global norm to `max_norm`; the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self._parameters, max_norm)

    def gradient_norm(self) -> torch.Tensor:
        """The gradients' global norm, without clipping."""
        grads = [p.grad for p in self._parameters if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads)

    def update_ema(self, decay: float) -> None:
        """One EMA step towards the current weights."""
        update_ema(self.ema, self.model, decay, self._ema_tensors)

    def ema_model(self) -> UNet | None:
        """The EMA weights as a :class:`UNet` on this process's device."""
        return self.ema.module

    def states(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The "model", "ema" and "optimizer" entries of the training state."""
        return {
            "model": clean_state_dict(self.model.state_dict()),
            "ema": {
                "weights": clean_state_dict(self.ema.module.state_dict()),
                "n_averaged": self.ema.n_averaged.detach().cpu(),
            },
            "optimizer": optimizer.state_dict(),
        }

    def load_states(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        """Load what :meth:`states` wrote."""
        self.model.load_state_dict(state["model"])
        self.ema.module.load_state_dict(state["ema"]["weights"])
        self.ema.n_averaged.copy_(state["ema"]["n_averaged"])
        optimizer.load_state_dict(state["optimizer"])

    def checkpoint_model(self, state: dict[str, Any]) -> UNet:
        """The EMA model to save as the run's checkpoint (rank 0)."""
        return self.ema.module

    def describe(self) -> str:
        """What the start-of-run banner adds: how replicas average their gradients."""
        if self.grad_sync == "after-backward":
            return ", gradients all-reduced after the backward"
        return ""


class Sharded:
    """Parameters, gradients, optimizer state and EMA sharded across processes (FSDP2).

    Checkpoints and training states hold full tensors, gathered to rank 0; the optimizer
    state is keyed by parameter name. Building them is a collective every rank calls.
    """

    parallel = "fsdp"
    gathers = True

    def __init__(self, model: UNet, dist: DistInfo) -> None:
        # Imported here: FSDP's import would cost every CLI call half a second otherwise.
        from diffunet.training import sharding

        self._sharding = sharding
        place_model(model, dist.device, sharded=True)
        sharding.shard_unet(model)  # in place: the parameters become shards
        self.model, self.dist = model, dist
        self.ema = sharding.ShardedEMA(model)
        self.net: torch.nn.Module = model

    def prepare_compile(self) -> None:
        """Let every sharded block compile: Dynamo does not trace FSDP's hooks, so each block
        is a frame of its own, and blocks of every shape share one code object."""
        blocks = len(self.model.input_blocks) + 1 + len(self.model.output_blocks)
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, blocks)

    def sync_gradients(self) -> None:
        """Nothing to do: FSDP reduce-scatters the gradients during the backward."""

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients' global norm to `max_norm`; the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return self._sharding.full_tensor(norm)  # the norm of sharded gradients is a DTensor

    def gradient_norm(self) -> torch.Tensor:
        """The global norm of the sharded gradients, without clipping."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return self._sharding.full_tensor(torch.nn.utils.get_total_norm(grads))

    def update_ema(self, decay: float) -> None:
        """One EMA step of the local shards."""
        self.ema.update(self.model, decay)

    def ema_model(self) -> UNet | None:
        """The EMA weights gathered into a :class:`UNet` on rank 0 (None elsewhere); a
        collective that every rank calls."""
        return self.ema.unet(self.model.config, self.dist.device, build=self.dist.is_main)

    def states(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The "model", "ema" and "optimizer" entries of the training state, as full tensors
        on rank 0 (the other ranks get none)."""
        model = self._sharding.model_state(self.model)
        weights = self.ema.full_state()  # every rank gathers; rank 0 keeps them
        return {
            "model": model,
            "ema": {
                "weights": weights if self.dist.is_main else {},
                "n_averaged": torch.tensor(self.ema.n_averaged),
            },
            "optimizer": self._sharding.optimizer_state(self.model, optimizer),
        }

    def load_states(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        """Load what :meth:`states` wrote, each rank taking its shards."""
        self._sharding.load_model_state(self.model, state["model"])
        self.ema.load_full_state(state["ema"]["weights"], int(state["ema"]["n_averaged"]))
        self._sharding.load_optimizer_state(self.model, optimizer, state["optimizer"])

    def checkpoint_model(self, state: dict[str, Any]) -> UNet:
        """The EMA model to save as the run's checkpoint (rank 0), from the gathered state."""
        ema = UNet(self.model.config)
        ema.load_state_dict(state["ema"]["weights"])
        return ema

    def describe(self) -> str:
        """The banner's note on sharding."""
        local = self._sharding.local_parameters(self.model)
        return f", sharded (FSDP: {local:,} parameters on rank 0)"
