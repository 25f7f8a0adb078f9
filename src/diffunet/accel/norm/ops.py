"""The `diffunet::` operators around the norm kernels, and their `autograd.Function`: what
eager calls and compiled graphs run (`GroupNormAct`)."""

from __future__ import annotations

import torch

from diffunet.accel import settings
from diffunet.accel.layout import dense_memory_format, pin_layout
from diffunet.accel.library import define_op, define_triton_op
from diffunet.accel.norm import launchers
from diffunet.accel.triton_runtime import interpreting, triton


def _group_norm_act_kernel(x, weight, bias, scale, shift, add, num_groups, eps, film, act):
    return launchers.forward(x, weight, bias, scale, shift, add, num_groups, eps, film, act)


def group_norm_act_fake(x, weight, bias, scale, shift, add, num_groups, eps, film, act):
    """`group_norm_act_op`'s outputs as tracing sees them: y like x, float32 (B, C) statistics."""
    stats = x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


#: The fused kernels as an operator `torch.compile` calls as it is: (output, centre, rstd).
#: `scale` and `shift` are (B, C) when `film`, else empty; `add` is (B, C) or empty; centre
#: (the group mean minus `add`) and rstd are (B, C) float32.
group_norm_act_op = define_op(
    "group_norm_act",
    "(Tensor x, Tensor weight, Tensor bias, Tensor scale, Tensor shift, Tensor add, "
    "int num_groups, float eps, bool film, bool act) -> (Tensor, Tensor, Tensor)",
    _group_norm_act_kernel,
    group_norm_act_fake,
)


def _group_norm_act_backward_kernel(
    grad,
    x,
    weight,
    bias,
    scale,
    shift,
    add,
    mean,
    rstd,
    num_groups,
    film,
    act,
    kernel=launchers.direct,
):
    dx, dparams, ds, dsh, dadd = launchers.backward(
        grad, x, weight, bias, scale, shift, add, mean, rstd, num_groups, film, act, kernel=kernel
    )
    # An operator returns tensors, never None.
    ds, dsh, dadd = (
        t.new_empty(0) if g is None else g for t, g in ((scale, ds), (shift, dsh), (add, dadd))
    )
    return dx, dparams, ds, dsh, dadd


def group_norm_act_backward_fake(
    grad, x, weight, bias, scale, shift, add, mean, rstd, num_groups, film, act
):
    """`group_norm_act_backward_op`'s outputs as tracing sees them."""
    dparams = weight.new_empty(
        (2, *weight.shape), dtype=torch.promote_types(weight.dtype, bias.dtype)
    )
    return (torch.empty_like(x), dparams, *(torch.empty_like(t) for t in (scale, shift, add)))


#: Gradients of `group_norm_act_op` for x, (weight, bias) as one (2, C) tensor, scale, shift
#: and add (each of the last three empty where it is).
group_norm_act_backward_op = define_op(
    "group_norm_act_backward",
    "(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor scale, Tensor shift, "
    "Tensor add, Tensor mean, Tensor rstd, int num_groups, bool film, bool act) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _group_norm_act_backward_kernel,
    group_norm_act_backward_fake,
)


def _group_norm_act_inline(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    add: torch.Tensor,
    num_groups: int,
    eps: float,
    film: bool,
    act: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launchers.forward(
        x, weight, bias, scale, shift, add, num_groups, eps, film, act, torch.library.wrap_triton
    )


def _group_norm_act_backward_inline(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    add: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    film: bool,
    act: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _group_norm_act_backward_kernel(
        grad,
        x,
        weight,
        bias,
        scale,
        shift,
        add,
        mean,
        rstd,
        num_groups,
        film,
        act,
        kernel=torch.library.wrap_triton,
    )


#: `group_norm_act_op` and its backward as operators whose kernels Inductor launches itself
#: (`settings.COMPILED_INLINE_NORM_KERNELS`): tracing runs their launch shapes once and records
#: each Triton launch, instead of a call into Python on every step. Only where they can run (a
#: GPU, or Triton's interpreter): defining them imports Inductor, seconds of start-up.
group_norm_act_inline_op = group_norm_act_backward_inline_op = None
if triton is not None and (torch.cuda.is_available() or interpreting()):
    group_norm_act_inline_op = define_triton_op("group_norm_act_inline", _group_norm_act_inline)
    group_norm_act_backward_inline_op = define_triton_op(
        "group_norm_act_backward_inline", _group_norm_act_backward_inline
    )


def inline_wanted(x: torch.Tensor) -> bool:
    """Whether a graph being traced records the kernels' launches themselves: switched on for
    its grad mode (Dynamo guards the graph on it), on a GPU (Triton's interpreter runs no traced
    launches) and with static sizes (the launch shapes are computed from them)."""
    switched_on = (
        settings.COMPILED_INLINE_NORM_KERNELS
        if torch.is_grad_enabled()
        else settings.COMPILED_INLINE_NORM_KERNELS_INFERENCE
    )
    return (
        switched_on
        and group_norm_act_inline_op is not None
        and x.is_cuda
        and torch.compiler.is_dynamo_compiling()
        and all(isinstance(size, int) for size in x.shape)
    )


class GroupNormAct(torch.autograd.Function):
    """`group_norm_act_op` and its derivative: eager, and traced by Dynamo into the graph
    (where `inline`, as the inline operators)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, add, num_groups, eps, film, act, inline):
        op = group_norm_act_inline_op if inline else group_norm_act_op
        y, mean, rstd = op(x, weight, bias, scale, shift, add, num_groups, eps, film, act)
        ctx.save_for_backward(x, weight, bias, scale, shift, add, mean, rstd)
        ctx.num_groups, ctx.film, ctx.act, ctx.inline = num_groups, film, act, inline
        # Read here, not in backward: a traced backward that asks a tensor for its strides gets
        # every incoming gradient copied to NCHW first (Dynamo), a full pass per call.
        ctx.memory_format = dense_memory_format(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, scale, shift, add, mean, rstd = ctx.saved_tensors
        grad = pin_layout(grad, ctx.memory_format)
        op = group_norm_act_backward_inline_op if ctx.inline else group_norm_act_backward_op
        dx, dparams, ds, dsh, dadd = op(
            grad, x, weight, bias, scale, shift, add, mean, rstd, ctx.num_groups, ctx.film, ctx.act
        )
        dw, db = launchers.split_parameter_gradients(dparams, weight, bias)
        if not ctx.film:
            ds = dsh = None
        if add.numel() == 0:
            dadd = None
        return dx, dw, db, ds, dsh, dadd, None, None, None, None, None
