"""Linear layers that read the same input, computed as one GEMM.

Each ResBlock projects the same activated time embedding with its own `emb_proj` layer (its
FiLM input), and an attention block projects the same tokens to queries, keys and values: many
small GEMMs per forward, and as many again for their gradients, each one kernel launch, each
reading the input again. `project_all` concatenates the layers' weights (and biases) and
computes every output with one `F.linear`, then splits the result into each layer's columns:
the same dot products, one launch, one read of the input. Where the step is bound by launches
(a compiled step not replayed as a CUDA graph) that is host time saved. `settings.BATCHED_FILM`
and `settings.BATCHED_QKV` turn the two uses on.
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
    """Whether `project_all` can run `layers` as one GEMM: at least two, all with a bias or all
    without, all weights of one input width, dtype and device, none sharded."""
    if len(layers) < 2:
        return False
    first = layers[0]
    return all(
        (layer.bias is None) == (first.bias is None)
        and layer.in_features == first.in_features
        and layer.weight.dtype == first.weight.dtype
        and layer.weight.device == first.weight.device
        and not _sharded(layer.weight)
        for layer in layers
    )


def project_all(x: torch.Tensor, layers: Sequence[nn.Linear]) -> tuple[torch.Tensor, ...]:
    """`tuple(layer(x) for layer in layers)`, computed by one GEMM over the layers'
    concatenated weights (`batchable(layers)` must hold). The outputs are views of one tensor,
    each layer's columns of it."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)
