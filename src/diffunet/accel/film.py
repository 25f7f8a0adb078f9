"""Every ResBlock's projection of the time embedding (its FiLM input) as one GEMM.

Each ResBlock projects the same activated embedding with its own `emb_proj` linear layer: a
U-Net of 20–30 blocks runs as many small GEMMs per forward, and twice as many in its backward,
each one kernel launch. `project_all` concatenates the layers' weights and biases and computes
every projection with one `F.linear`, then splits the result into each layer's columns: the
same dot products, one launch. Where the step is bound by launches (a compiled step not
replayed as a CUDA graph) that is host time saved; `settings.BATCHED_FILM` turns it on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a distributed tensor (FSDP's sharded parameters): its layer gathers
    it only when it runs, so it cannot be concatenated before."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def batchable(layers: Sequence[nn.Linear]) -> bool:
    """Whether `project_all` can run `layers` as one GEMM: at least two, each with a bias, all
    weights of one dtype and device, none sharded."""
    if len(layers) < 2:
        return False
    first = layers[0].weight
    return all(
        layer.bias is not None
        and layer.weight.dtype == first.dtype
        and layer.weight.device == first.device
        and not _sharded(layer.weight)
        for layer in layers
    )


def project_all(emb: torch.Tensor, layers: Sequence[nn.Linear]) -> tuple[torch.Tensor, ...]:
    """`tuple(layer(emb) for layer in layers)`, computed by one GEMM over the layers'
    concatenated weights (`batchable(layers)` must hold)."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers])
    return F.linear(emb, weight, bias).split([layer.out_features for layer in layers], dim=1)
