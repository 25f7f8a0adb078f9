"""A decoder ResBlock's entry on `(h, skip)` without keeping their concatenation.

A decoder block's first ResBlock normalizes `cat([h, skip])` (GroupNorm, SiLU) and projects it
with its 1×1 skip convolution. Autograd would keep that concatenation for both backwards, and
in a checkpointed step its recomputation, the concatenation and its gradient are the largest
tensors alive at the peak. `norm_act_and_project` runs both layers from one concatenation that
lives only inside the call: backward concatenates again, takes the projection's weight
gradient from it, then overwrites it in place with the input gradient (the norm kernels read
each element before they write it) and adds the projection's input gradient into the same
buffer. Eager mode with the fused norm kernels only: compiled graphs,
`torch.export` and the reference path concatenate as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffunet.accel.conv import _routable
from diffunet.accel.layout import dense_memory_format
from diffunet.accel.norm import fused_available
from diffunet.accel.norm.launchers import backward as norm_backward
from diffunet.accel.norm.launchers import forward as norm_forward
from diffunet.accel.norm.launchers import split_parameter_gradients

_CONVOLUTIONS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def concat_fused_wanted(x: torch.Tensor, skip: torch.Tensor) -> bool:
    """Whether `norm_act_and_project` takes `(x, skip)` without a lasting concatenation: in
    eager mode, where the fused kernels would normalize their concatenation."""
    return (
        x.dtype == skip.dtype
        and x.device == skip.device
        and fused_available(x, x.numel() + skip.numel())
    )


def _concatenate(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, skip], dim=1).contiguous(memory_format=dense_memory_format(x))


def _add_projection_input_gradient(
    dx: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor
) -> None:
    """`dx += ` the input gradient of a 1×1 convolution with `weight` whose output gradient is
    `grad`, in place: a (positions, channels) matrix product in channels-last memory, a
    batched one over (channels, positions) in contiguous memory."""
    cin, cout = dx.shape[1], grad.shape[1]
    matrix = weight.reshape(cout, cin)
    # `out=` rather than `addmm_`: torch.utils.flop_counter counts only the former.
    if dx.is_contiguous():
        columns = dx.view(dx.shape[0], cin, -1)
        torch.baddbmm(
            columns,
            matrix.t().expand(dx.shape[0], cin, cout),
            grad.reshape(grad.shape[0], cout, -1),
            out=columns,
        )
    else:  # channels-last: positions are rows
        rows = dx.movedim(1, -1).view(-1, cin)
        torch.addmm(rows, grad.movedim(1, -1).reshape(-1, cout), matrix, out=rows)


class _NormActAndProject(torch.autograd.Function):
    """(SiLU(GroupNorm(cat)), conv1x1(cat)) of `cat = cat([x, skip])`, keeping x and skip."""

    @staticmethod
    def forward(ctx, x, skip, weight, bias, num_groups, eps, proj_weight, proj_bias):
        cat = _concatenate(x, skip)
        none = cat.new_zeros(0)
        y, mean, rstd = norm_forward(
            cat, weight, bias, none, none, none, num_groups, eps, False, True
        )
        projection = _CONVOLUTIONS[cat.ndim](
            cat, proj_weight.to(cat.dtype), proj_bias.to(cat.dtype)
        )
        ctx.save_for_backward(x, skip, weight, bias, proj_weight, mean, rstd)
        ctx.num_groups = num_groups
        return y, projection

    @staticmethod
    def backward(ctx, grad_y, grad_projection):
        x, skip, weight, bias, proj_weight, mean, rstd = ctx.saved_tensors
        cat = _concatenate(x, skip)
        layout = dense_memory_format(cat)
        grad_y = grad_y.contiguous(memory_format=layout)
        grad_projection = grad_projection.to(cat.dtype).contiguous(memory_format=layout)
        matrix = proj_weight.to(cat.dtype)
        spatial = cat.ndim - 2
        _, grad_proj_weight, grad_proj_bias = torch.ops.aten.convolution_backward(
            grad_projection,
            cat,
            matrix,
            [matrix.shape[0]],
            [1] * spatial,
            [0] * spatial,
            [1] * spatial,
            False,
            [0] * spatial,
            1,
            [False, True, True],
        )
        none = cat.new_zeros(0)
        dx, grad_params, *_ = norm_backward(
            grad_y,
            cat,
            weight,
            bias,
            none,
            none,
            none,
            mean,
            rstd,
            ctx.num_groups,
            False,
            True,
            out=cat,
        )
        _add_projection_input_gradient(dx, grad_projection, matrix)
        channels = x.shape[1]
        return (
            dx[:, :channels],
            dx[:, channels:],
            *split_parameter_gradients(grad_params, weight, bias),
            None,
            None,
            grad_proj_weight.to(proj_weight.dtype),
            grad_proj_bias.to(proj_weight.dtype),
        )


def takes_pair(norm: nn.GroupNorm, projection: nn.Module) -> bool:
    """Whether a ResBlock with these entry layers can use `norm_act_and_project` at all: an
    affine GroupNorm and a plain 1×1 convolution with a bias (not an identity, a subclass, a
    quantized weight or a convolution with hooks, which must see their call)."""
    return (
        _routable(projection)
        and projection.bias is not None
        and projection.groups == 1
        and all(k == 1 for k in projection.kernel_size)
        and all(s == 1 for s in projection.stride)
        and all(d == 1 for d in projection.dilation)
        and all(q == 0 for q in projection.padding)
        and norm.affine
    )


def norm_act_and_project(
    norm: nn.GroupNorm, projection: nn.Module, x: torch.Tensor, skip: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(norm_act(norm, c), projection(c))` of `c = cat([x, skip], 1)`; `c` is freed before
    this returns and made again for backward. Call where `concat_fused_wanted(x, skip)` and
    `takes_pair(norm, projection)`."""
    return _NormActAndProject.apply(
        x,
        skip,
        norm.weight,
        norm.bias,
        norm.num_groups,
        norm.eps,
        projection.weight,
        projection.bias,
    )
