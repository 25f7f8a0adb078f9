"""The `diffunet::` operators that compiled graphs call, defined for the least host time.

Inductor calls each of these operators from the compiled step's Python code, once per layer
and step, so their dispatch is host time that a step not replayed as a CUDA graph pays in
full. `torch.library.custom_op` wraps each call in several Python layers, and an autograd
formula registered on the operator (`register_autograd`) runs Python on every call even
where nothing is differentiated. Here an operator is a schema on a `torch.library.Library`
with one Python kernel for every device and a fake kernel for tracing; its derivative is an
`autograd.Function` around it, which Dynamo traces into the graph, so no autograd code runs
when the compiled graph calls the operator (docs/performance.md). `define_triton_op` instead
makes an operator that compiled graphs trace into (`settings.INLINE_NORM_KERNELS`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Fixed input strides: Inductor hands each operator its inputs in the strides they had while
#: tracing, which the callers choose for the kernels behind them.
FIXED_STRIDES = (torch.Tag.needs_fixed_stride_order,)

LIBRARY = torch.library.Library("diffunet", "FRAGMENT")


def define_op(
    name: str, schema: str, kernel: Callable, fake: Callable | None = None
) -> torch._ops.OpOverload:
    """Define `diffunet::name` with argument and return `schema` (e.g. `"(Tensor x) -> Tensor"`),
    computed by `kernel` on every device and shaped by `fake` (default: `kernel`) while
    tracing. Returns the operator, to call as a function."""
    LIBRARY.define(name + schema, tags=FIXED_STRIDES)
    LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"diffunet::{name}", fake or kernel, lib=LIBRARY)
    return getattr(torch.ops.diffunet, name).default


def define_triton_op(name: str, kernel: Callable) -> torch._ops.OpOverload:
    """Define `diffunet::name` as a `torch.library.triton_op`: `kernel` (type-annotated, its
    Triton launches wrapped in `torch.library.wrap_triton`) runs as it is in eager mode, and
    `torch.compile` traces into it, so the compiled code launches the kernels itself and the
    Python between them runs once, while tracing. Returns the operator, to call as a function."""
    torch.library.triton_op(f"diffunet::{name}", kernel, mutates_args=())
    return getattr(torch.ops.diffunet, name).default
