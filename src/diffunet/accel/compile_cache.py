"""Warm starts of compiled accelerated models: AOTAutograd's on-disk cache for their graphs.

The accelerator's layers trace into `torch.compile` graphs as `autograd.Function`s (the
layout-stable convolutions, the fused norms), and AOTAutograd's cache leaves any graph holding
one out unless `torch._functorch.config.autograd_cache_allow_custom_autograd_functions` is on:
each process that compiles the model traces its forward and backward again, even when
Inductor's own cache then has every kernel. Dynamo traces a Function's forward and backward
into the graph the cache key is computed from, so the cache tells such graphs apart as it does
any other.
"""

from __future__ import annotations

import torch._functorch.config as functorch_config

#: The `torch._functorch.config` switch that lets AOTAutograd cache graphs holding
#: `autograd.Function`s (environment: `TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD=1`).
ALLOW_FUNCTIONS = "autograd_cache_allow_custom_autograd_functions"


def cache_compiled_functions() -> bool:
    """Let AOTAutograd's cache keep compiled graphs that hold `autograd.Function`s, the
    accelerator's included, for this process; returns whether this PyTorch has the switch.

    A process-wide PyTorch setting, so it applies to every such Function that Dynamo traces:
    the trainer and the benchmarks turn it on before they compile; call it before
    `torch.compile(accelerate(model))` for the same warm starts.
    """
    if not hasattr(functorch_config, ALLOW_FUNCTIONS):  # pragma: no cover - older PyTorch
        return False
    setattr(functorch_config, ALLOW_FUNCTIONS, True)
    return True
