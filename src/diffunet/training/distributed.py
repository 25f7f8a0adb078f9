"""Data-parallel training under `torchrun`: process group, devices and per-rank CPU threads.

`torchrun --nproc_per_node=N $(which diffunet) train ...` sets `RANK`, `WORLD_SIZE` and
`LOCAL_RANK`; :func:`setup` then joins the process group (NCCL on GPUs, gloo on CPUs), also
when torchrun starts one process: that run takes the data-parallel path with a world of one.
Without those variables everything runs in one process and the collectives below are no-ops.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from diffunet.errors import InvalidValueError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank, the world size, its device, and whether it joined a
    process group (`grouped`: launched by torchrun, even as its only process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    grouped: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes files (rank 0)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether this process trains data-parallel: with others, or alone in a process group
        (the collectives then run over a world of one)."""
        return self.world_size > 1 or self.grouped


def launched_by_torchrun() -> bool:
    """Whether `RANK` and `WORLD_SIZE` are set (torchrun, or a manual multi-process launch)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def joins_group(world_size: int) -> bool:
    """Whether a launched process joins a process group: always with others; alone only where
    the launcher named the group's rendezvous (`MASTER_ADDR`, as torchrun does), since a
    lone process whose environment merely says `WORLD_SIZE=1` has no group to join."""
    return world_size > 1 or "MASTER_ADDR" in os.environ


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` → this rank's CUDA device when available, else the CPU; a clear error for `cuda`."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InvalidValueError(
                "--device cuda was given but no CUDA device is available "
                "(this PyTorch build or machine has none); use --device cpu"
            )
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(device_name: str) -> DistInfo:
    """Join the process group when launched by torchrun; pick this rank's device."""
    if not launched_by_torchrun():
        return DistInfo(device=resolve_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    grouped = joins_group(world)
    if grouped and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank, world, local_rank, local_world, device, grouped=grouped)


def cleanup() -> None:
    """Leave the process group (if any).

    A sharded CPU run once aborted one gloo process at exit ("terminate called without an
    active exception"; once in about twenty runs, not reproduced since). The suspected cause:
    FSDP's modules and collective work objects sit in reference cycles, which would otherwise
    be collected only during interpreter teardown, after the group is gone. So they are
    collected first.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in one process)."""
    if info.enabled:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `value` over every rank (itself in one process)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's `flag` on every rank (used to stop all ranks together on an error)."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=info.device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, where the system has one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def even_threads(info: DistInfo) -> int:
    """The usable cores shared evenly among this node's processes (at least 1)."""
    return max(1, usable_cores() // max(1, info.local_world_size))


def default_threads(info: DistInfo, load: float | None = None) -> int:
    """CPU threads per process: the cores that other programs leave idle, shared evenly among
    this node's processes (at least 1).

    Idle cores are the usable cores less the 1-minute load average (`load`, read from the
    system when None): more threads than idle cores make each step wait for the busiest core,
    which on a loaded machine is many times slower than fewer threads.
    """
    cores = usable_cores()
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    idle = max(1, min(cores, cores - round(load)))
    return max(1, idle // max(1, info.local_world_size))
