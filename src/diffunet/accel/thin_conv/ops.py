"""The `diffunet::thin_conv3d` operators and their `autograd.Function`: what eager calls and
compiled graphs run (`thin_conv3d`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffunet.accel.layout import dense_memory_format, pin_layout
from diffunet.accel.library import define_op
from diffunet.accel.thin_conv import launchers
from diffunet.accel.thin_conv.launchers import TAPS


def _thin_conv3d_kernel(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`F.conv3d(x, weight, bias, padding=1)` for a 3×3×3 weight with a thin side: a thin input
    by the gather kernel, into channels-last if `x` or the weight is; a thin output by cuDNN
    or the tap-product kernels (`settings.TAP_PRODUCT_FORWARD`), in `x`'s layout. All three
    share one dtype."""
    out_channels, in_channels = weight.shape[:2]
    if not launchers.runs_kernels(x.device):
        return launchers.empty_activation(
            x, out_channels, launchers.output_layout(x, weight)
        ).copy_(F.conv3d(x, weight, bias, padding=1))
    if not launchers.gathers_input(in_channels, out_channels):
        return launchers.thin_output(x, weight, bias)
    return launchers.gather_conv(
        x,
        launchers.packed_weight(weight, gathered_input=True),
        bias,
        out_channels,
        launchers.output_layout(x, weight),
        mirrored=False,
    )


def thin_conv3d_fake(x, weight, bias):
    """`thin_conv3d_op`'s output as tracing sees it."""
    return launchers.empty_activation(x, weight.shape[0], launchers.output_layout(x, weight))


#: `_thin_conv3d_kernel` as an operator (`thin_conv3d` is the differentiable call).
thin_conv3d_op = define_op(
    "thin_conv3d",
    "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    _thin_conv3d_kernel,
    thin_conv3d_fake,
)


def _weight_from(matrix: torch.Tensor, weight: torch.Tensor, gathered_input: bool) -> torch.Tensor:
    """The (out, in, 3, 3, 3) weight gradient from the kernels' (27 × thin, wide) matrix."""
    out_channels, in_channels = weight.shape[:2]
    if gathered_input:
        taps = matrix.view(TAPS, in_channels, out_channels).permute(2, 1, 0)
    else:
        taps = matrix.view(TAPS, out_channels, in_channels).permute(1, 2, 0)
    return taps.reshape(weight.shape).to(weight.dtype).contiguous()


def _thin_conv3d_backward_kernel(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool, bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `thin_conv3d_op` for x (if `input_grad`), the weight, and the bias (if
    `bias_grad`); empty tensors stand for those not asked for. The thin side is gathered and
    the wide one read once: a stem's weight gradient reads the output gradient, a head's reads
    x, and a head's input gradient is the gather kernel over its thin output gradient. (A stem's
    input gradient, which a U-Net never needs, is ATen's.)"""
    out_channels, in_channels = weight.shape[:2]
    gathered_input = launchers.gathers_input(in_channels, out_channels)
    if not launchers.runs_kernels(x.device):
        return _aten_backward(grad, x, weight, input_grad, True, bias_grad)
    grad_x = x.new_empty(0)
    if gathered_input:
        matrix, grad_bias = launchers.gather_weight_grad(
            x, grad, mirrored=False, sum_wide=bias_grad
        )
        if input_grad:
            grad_x = _aten_backward(grad, x, weight, True, False, False)[0]
    else:
        matrix, _ = launchers.gather_weight_grad(grad, x, mirrored=True, sum_wide=False)
        grad_bias = grad.sum((0, 2, 3, 4), dtype=torch.float32) if bias_grad else None
        if input_grad:
            grad_x = launchers.gather_conv(
                grad,
                launchers.packed_weight(weight, gathered_input=False),
                None,
                in_channels,
                dense_memory_format(x),
                mirrored=True,
            )
    return (
        grad_x,
        _weight_from(matrix, weight, gathered_input),
        grad_bias.to(weight.dtype) if bias_grad else weight.new_empty(0),
    )


def _aten_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ATen's gradients (empty where not asked for), laid out as `thin_conv3d_backward_op`
    says."""
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad,
        x,
        weight,
        [weight.shape[0]],
        [1] * 3,
        [1] * 3,
        [1] * 3,
        False,
        [0] * 3,
        1,
        [input_grad, weight_grad, bias_grad],
    )
    return (
        launchers.empty_activation(x, x.shape[1], dense_memory_format(x)).copy_(grad_x)
        if input_grad
        else x.new_empty(0),
        grad_weight.contiguous() if weight_grad else weight.new_empty(0),
        grad_bias if bias_grad else weight.new_empty(0),
    )


def thin_conv3d_backward_fake(grad, x, weight, input_grad, bias_grad):
    """`thin_conv3d_backward_op`'s outputs as tracing sees them."""
    grad_x = (
        launchers.empty_activation(x, x.shape[1], dense_memory_format(x))
        if input_grad
        else x.new_empty(0)
    )
    grad_weight = weight.new_empty(weight.shape)  # contiguous, as `_weight_from` makes it
    return grad_x, grad_weight, weight.new_empty(weight.shape[0] if bias_grad else 0)


thin_conv3d_backward_op = define_op(
    "thin_conv3d_backward",
    "(Tensor grad, Tensor x, Tensor weight, bool input_grad, bool bias_grad) "
    "-> (Tensor, Tensor, Tensor)",
    _thin_conv3d_backward_kernel,
    thin_conv3d_backward_fake,
)


class ThinConv3d(torch.autograd.Function):
    """`thin_conv3d_op` and its derivative (eager, and traced into compiled graphs)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        out = thin_conv3d_op(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.layout = dense_memory_format(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        want_x, want_weight, want_bias = ctx.needs_input_grad
        want_bias = want_bias and ctx.has_bias
        grad = pin_layout(grad, ctx.layout)
        grad_x, grad_weight, grad_bias = thin_conv3d_backward_op(grad, x, weight, want_x, want_bias)
        return (
            grad_x if want_x else None,
            grad_weight if want_weight else None,
            grad_bias if want_bias else None,
        )


def thin_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv3d(x, weight, bias, padding=1)` by the kernels (see `_thin_conv3d_kernel`),
    differentiable."""
    return ThinConv3d.apply(x, weight, bias)
