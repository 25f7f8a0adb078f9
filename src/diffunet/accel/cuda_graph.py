"""CUDA graphs for inference: replay a model's forward instead of launching it kernel by kernel.

A sampling loop calls the network 20–1000 times with inputs of one shape. In eager PyTorch each
call costs the host time of launching a few hundred kernels, which at small batches is longer
than the GPU needs to run them. :class:`CUDAGraphModel` records the forward pass once per input
signature (shapes, dtypes, keyword names, autocast state) and afterwards only copies the new
inputs into the recorded buffers and replays the graph: one launch per call.

`Diffusion.sample` wraps a :class:`~diffunet.UNet` on a GPU in it automatically
(`cuda_graph="auto"`); any other model can be wrapped by hand. Outside inference (gradients
enabled), on the CPU, or if the forward pass cannot be recorded (it synchronises with the host,
say), the wrapper calls the model directly; a failed recording is reported once as a warning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Signature = tuple[Any, ...]
#: Where `Diffusion.sample` keeps a model's :class:`CUDAGraphModel` (not a submodule, so it
#: never shows up in `state_dict()`).
CACHE_ATTRIBUTE = "_cuda_graph_model"


@dataclass
class _Recording:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


@contextlib.contextmanager
def syncs_are_errors() -> Iterator[None]:
    """Turn PyTorch's host-synchronising calls (`.item()`, blocking copies, ...) into errors."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # "a prototype feature": it is, and it is only a pre-check
        warnings.filterwarnings("ignore", message="Synchronization debug mode")
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@contextlib.contextmanager
def on_side_stream() -> Iterator[None]:
    """Run the block on a fresh stream that first waits for the current one, and make the
    current stream wait for it afterwards: eager passes before a recording, as CUDA graphs
    require (their warm-up must not run on the stream that is captured)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


def describe(value: Any) -> Any:
    """What a recording depends on of one argument: a tensor's shape, dtype, device and
    strides, or any other value itself."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.stride())
    return ("value", value)


class GraphWrapper(nn.Module):
    """A model wrapped for CUDA-graph replays: the recordings by input signature, the signatures
    that could not be recorded, and every other attribute (e.g. `config`) the model's."""

    def __init__(self, model: nn.Module, warmup: int) -> None:
        super().__init__()
        self.model = model
        self.warmup = warmup
        self._recordings: dict[Signature, Any] = {}
        self._failed: set[Signature] = set()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    @property
    def recordings(self) -> int:
        """How many input signatures have been recorded."""
        return len(self._recordings)

    def _not_recorded(self, signature: Signature, err: Exception, what: str, instead: str) -> None:
        """Remember that `signature` cannot be recorded, and say so once, with the reason."""
        self._failed.add(signature)
        reason = " ".join(str(err).split())[:200]
        warnings.warn(
            f"{type(self).__name__}: could not record {type(self.model).__name__}'s {what} "
            f"({reason}); {instead}",
            RuntimeWarning,
            stacklevel=4,  # the caller of the wrapper's forward
        )


class CUDAGraphModel(GraphWrapper):
    """`model`'s inference forward, recorded as a CUDA graph per input signature and replayed.

    Args:
        model: a module called as `model(*tensors, **tensors)` that returns one tensor.
        warmup: eager calls (on a side stream) before recording, for lazy initialisation and
            cuDNN / Triton autotuning.

    The returned tensor is a fresh copy, so results of earlier calls stay valid. Every
    recording keeps its inputs, output and intermediate memory allocated (one shared pool).
    Attributes other than those of `nn.Module` (e.g. `config`) are the model's.
    """

    def __init__(self, model: nn.Module, warmup: int = 2) -> None:
        super().__init__(model, warmup)
        self._pool = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The model's output for these inputs: a graph replay where possible."""
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if torch.is_grad_enabled() or not tensors or not all(t.is_cuda for t in tensors):
            return self.model(*args, **kwargs)
        signature = (
            tuple(describe(a) for a in args),
            tuple((k, describe(v)) for k, v in kwargs.items()),
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
        )
        if signature in self._failed:
            return self.model(*args, **kwargs)
        recording = self._recordings.get(signature)
        if recording is None:
            recording = self._record(signature, args, kwargs)
            if recording is None:
                return self.model(*args, **kwargs)
        for static, value in zip(recording.inputs, tensors):
            static.copy_(value, non_blocking=True)
        recording.graph.replay()
        return recording.output.clone()

    def _record(self, signature: Signature, args: tuple, kwargs: dict) -> _Recording | None:
        static_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        static_kwargs = {
            k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
        }
        inputs = [a for a in (*static_args, *static_kwargs.values()) if isinstance(a, torch.Tensor)]
        graph = None
        try:
            with on_side_stream():
                for _ in range(self.warmup):
                    self.model(*static_args, **static_kwargs)
                # A host sync cannot be recorded, and a capture that fails half-way can leave
                # CUDA's random generators unusable: find syncs with one more eager call first.
                with syncs_are_errors():
                    self.model(*static_args, **static_kwargs)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = self.model(*static_args, **static_kwargs)
        except Exception as err:  # a host sync, a CPU tensor, an unsupported op ...
            self._not_recorded(signature, err, "forward as a CUDA graph", "running it eagerly")
            if graph is not None:
                graph.reset()
            torch.cuda.synchronize()
            return None
        if not isinstance(output, torch.Tensor):
            self._failed.add(signature)
            return None
        recording = _Recording(graph, inputs, output)
        self._recordings[signature] = recording
        return recording


def release_cuda_graphs(model: nn.Module) -> None:
    """Free the recordings that `Diffusion.sample(cuda_graph="auto")` keeps with `model`.

    Each recording holds the memory of one forward pass at its batch size until the model is
    deleted; call this when a model that stays alive will not sample at those shapes again.
    """
    model.__dict__.pop(CACHE_ATTRIBUTE, None)
