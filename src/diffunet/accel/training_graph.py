"""CUDA graphs for training: replay a model's forward and backward instead of launching them.

A small model on a fast GPU trains at the speed its host can launch kernels: the default digits
model runs a few milliseconds of kernels per step behind tens of milliseconds of Python.
:class:`CUDAGraphTraining` records the forward and the backward of the wrapped model once per
input signature (shapes, dtypes, keyword names, autocast state) with
`torch.cuda.make_graphed_callables`, and afterwards replays them: the gradients reach the
parameters' `.grad` as from an eager backward, so the optimizer, clipping and the EMA are
unchanged, and no compiler runs.

What it needs of a step, `make_graphed_callables`'s rules: inputs of one shape per signature,
no host synchronisation inside the model, autocast without its weight cache
(`torch.autocast(..., cache_enabled=False)`), and no gradient checkpointing (its recomputation
saves the random-generator state, which a recording cannot). A forward that cannot be recorded
runs eagerly, reported once as a warning. Dropout draws from CUDA's default generator, which
graphs advance on every replay, so a step's dropout is still seeded by `torch.manual_seed`, and
recording leaves the generator where it was: replayed steps draw the eager steps' masks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffunet.accel.cuda_graph import (
    GraphWrapper,
    Signature,
    describe,
    on_side_stream,
    syncs_are_errors,
)


class _Positional(nn.Module):
    """`model(*args, **kwargs)` called with every tensor positional, as graphs need."""

    def __init__(self, model: nn.Module, num_args: int, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.num_args = num_args
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        args, values = tensors[: self.num_args], tensors[self.num_args :]
        return self.model(*args, **dict(zip(self.names, values)))


class CUDAGraphTraining(GraphWrapper):
    """`model`'s training forward and backward, recorded as CUDA graphs and replayed.

    Args:
        model: a module called as `model(*tensors, **tensors)` that returns one tensor; its
            parameters receive the gradients of each replayed backward.
        warmup: eager forward and backward passes (on a side stream) before recording, for lazy
            initialisation and cuDNN / Triton autotuning; they leave `.grad` untouched.

    Called with gradients disabled, on CPU tensors or with non-tensor arguments, it calls the
    model directly. The output of a replay is the recording's own buffer, overwritten by the
    next call: use it (the loss, its backward) before calling again. Attributes other than those
    of `nn.Module` (e.g. `config`) are the model's.
    """

    def __init__(self, model: nn.Module, warmup: int = 3) -> None:
        super().__init__(model, warmup)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The model's output for these inputs: a graph replay where possible."""
        values = (*args, *kwargs.values())
        if (
            not torch.is_grad_enabled()
            or not values
            or not all(isinstance(v, torch.Tensor) and v.is_cuda for v in values)
        ):
            return self.model(*args, **kwargs)
        signature = (
            tuple(describe(a) for a in args),
            tuple((k, describe(v)) for k, v in kwargs.items()),
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
            self.model.training,
        )
        if signature in self._failed:
            return self.model(*args, **kwargs)
        graphed = self._recordings.get(signature)
        if graphed is None:
            graphed = self._record(signature, args, kwargs)
            if graphed is None:
                return self.model(*args, **kwargs)
        return graphed(*values)

    def _record(self, signature: Signature, args: tuple, kwargs: dict) -> nn.Module | None:
        positional = _Positional(self.model, len(args), tuple(kwargs))
        sample = tuple(
            v.detach().clone().requires_grad_(v.requires_grad) for v in (*args, *kwargs.values())
        )
        # The eager passes below draw dropout masks; the step being recorded must not lose them.
        rng_state = torch.cuda.get_rng_state()
        try:
            if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
                raise RuntimeError("autocast's weight cache is on; use cache_enabled=False")
            # A host sync cannot be recorded, and a capture that fails half-way can leave
            # CUDA's random generators unusable: find syncs with one eager pass first.
            with on_side_stream(), syncs_are_errors():
                params = [p for p in positional.parameters() if p.requires_grad]
                torch.autograd.grad(positional(*sample).float().sum(), params, allow_unused=True)
            graphed = torch.cuda.make_graphed_callables(
                positional, sample, num_warmup_iters=self.warmup, allow_unused_input=True
            )
        except Exception as err:  # a host sync, a checkpointed block, an unsupported op ...
            self._not_recorded(
                signature, err, "forward and backward as CUDA graphs", "training it eagerly"
            )
            torch.cuda.synchronize()
            torch.cuda.set_rng_state(rng_state)
            return None
        torch.cuda.set_rng_state(rng_state)
        self._recordings[signature] = graphed
        return graphed
