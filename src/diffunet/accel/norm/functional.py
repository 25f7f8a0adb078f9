"""GroupNorm → (scale-shift) → SiLU as one call (`group_norm_act`, `norm_act`): the fused
kernels where they run and pay, else the eager reference they are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffunet.accel import settings
from diffunet.accel.layout import dense_memory_format
from diffunet.accel.norm.ops import GroupNormAct, inline_wanted
from diffunet.accel.triton_runtime import interpreting, triton


def kernels_take(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can normalize `x` at all: switched on, on a GPU (or Triton's
    interpreter) and in a floating dtype they read."""
    return (
        settings.FUSED_NORM
        and triton is not None
        and (x.is_cuda or interpreting())
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


def fused_available(x: torch.Tensor, numel: int | None = None) -> bool:
    """Whether `group_norm_act(x, ...)` would run the fused kernels in eager mode (on a tensor
    like `x` of `numel` elements where given, such as a concatenation not yet made).

    Under `torch.compile` see `compiled_fused_wanted`; `torch.export` always traces the
    reference path.
    """
    numel = x.numel() if numel is None else numel
    return (
        kernels_take(x)
        and (numel >= settings.FUSED_EAGER_MIN_ELEMENTS or interpreting())
        and not torch.compiler.is_compiling()
    )


def compiled_fused_wanted(x: torch.Tensor) -> bool:
    """Whether the `group_norm_act(x, ...)` that Dynamo traces calls the fused kernels: as the
    operator `diffunet::group_norm_act` from `settings.COMPILED_MIN_ELEMENTS`, or where the
    graph launches them itself (`inline_wanted`) from `settings.INLINE_MIN_ELEMENTS` too."""
    if not torch.compiler.is_dynamo_compiling():
        return False
    # Dynamo guards the graph on the grad mode, so each mode traces its own decision.
    threshold = (
        settings.COMPILED_MIN_ELEMENTS
        if torch.is_grad_enabled()
        else settings.COMPILED_MIN_ELEMENTS_INFERENCE
    )
    if threshold is None or not kernels_take(x):
        return False
    if inline_wanted(x):
        threshold = min(threshold, settings.INLINE_MIN_ELEMENTS)
    return x.numel() >= threshold


def group_norm_act_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: bool = True,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager `x + add`, GroupNorm, then `* (1 + scale) + shift` (all three per batch and
    channel), then SiLU."""
    view = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    if add is not None:
        x = x + add.reshape(view).to(x.dtype)
    h = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        h = h * (1 + scale.reshape(view)) + shift.reshape(view)
    return F.silu(h) if act else h


def group_norm_act(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: bool = True,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm of `x + add` (`x`: (B, C, *spatial); `add`: an optional (B, C) offset, such as
    a time embedding), optional FiLM `scale`/`shift` (B, C), optional SiLU.

    The fused kernels fold `add` into the statistics and the normalization, so `x + add` is
    never written out.
    """
    if compiled_fused_wanted(x) or fused_available(x):
        film = scale is not None
        scale, shift, add = (per_channel_operand(t, x) for t in (scale, shift, add))
        x = x.contiguous(memory_format=dense_memory_format(x))
        args = (x, weight, bias, scale, shift, add, num_groups, eps, film, act, inline_wanted(x))
        return GroupNormAct.apply(*args)
    return group_norm_act_reference(x, num_groups, weight, bias, eps, scale, shift, act, add)


def per_channel_operand(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """A per-(batch, channel) input of the kernels (`scale`, `shift`, `add`) as they read it:
    dense (B, C), since these are usually chunks of one projection, or empty for None."""
    return x.new_zeros(0) if t is None else t.reshape(x.shape[0], x.shape[1]).contiguous()


def norm_act(
    norm: torch.nn.GroupNorm,
    x: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: bool = True,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """`group_norm_act` with the groups, affine parameters and eps of the module `norm`."""
    return group_norm_act(
        x, norm.num_groups, norm.weight, norm.bias, norm.eps, scale, shift, act, add
    )
