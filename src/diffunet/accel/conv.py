"""Convolutions whose backward pass never converts layouts under `torch.compile`.

cuDNN wants a convolution's input and output gradient in the weight's memory format
(channels-last here). Inductor hands the `aten.convolution_backward` fallback its operands in
the strides the traced graph gives them (PyTorch 2.11), and a plain convolution's traced
backward gives both of them NCHW: eager CUDA GroupNorm returns NCHW, so that is what the graph
says. The backward then copies the input to channels-last and the output gradient to the
input's layout, a large share of a compiled training step (docs/performance.md).

`convolve(conv, x)` routes a plain `nn.ConvNd` through `_Convolution`, an `autograd.Function`
that Dynamo traces into the graph, while it traces a convolution that autograd will
differentiate: `convolve` asks for cuDNN's layout of the input and the function's backward for
that of the output gradient, so the kernels producing them write channels-last directly and
the copies vanish. The graph still calls ATen's convolution and its backward, with no Python
of ours at run time. The bias is added outside the convolution, where Inductor fuses it into
the next kernel. Its gradient comes, in CUDA-graph modes (`settings.COMPILED_BIAS_GRADIENT_IN_CONV`
on), from the function's backward, as a product of the output gradient it holds in cuDNN's
layout with a row of ones (faster than Inductor's sum fused into the GroupNorm-backward
reductions), and in plain-compile training graphs, bound by their launches, from that fused
sum (no launch of its own). Compiled inference is `conv(x)` on an input pinned to cuDNN's
layout (`pin_layout`), which Inductor gives only 2D convolutions by itself. In eager mode and
(non-strict) `torch.export` it is just `conv(x)`. `convolve_split_bias` is the same without
the bias, for a caller that adds it elsewhere. Thin 3D convolutions on a GPU (a 3D U-Net's
first and last) run `thin_conv`'s Triton kernels instead. `settings.ROUTED_DEVICES` and
`settings.PADDED_DEVICES` say where these apply.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffunet.accel import phase_gradient, settings, thin_conv
from diffunet.accel.layout import channels_last_of, pin_layout
from diffunet.accel.operands import autocast_dtype, autocast_operands, pad_output_channels


def bias_gradient(grad: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """A convolution's bias gradient: `grad`, dense in `memory_format`, summed over every axis
    but the channels (1).

    A channels-last `grad` is a (positions, channels) matrix, summed as its product with a row
    of ones: cuBLAS's matrix-vector product reads it faster than ATen's or Inductor's sums
    (docs/performance.md). The layout is given, not read off `grad`: a traced backward that
    asks a gradient for its strides gets every incoming gradient copied to NCHW first (Dynamo).
    """
    if memory_format != channels_last_of(grad.ndim):
        return grad.sum([0, *range(2, grad.ndim)])
    positions = grad.movedim(1, -1).reshape(-1, grad.shape[1])  # a view, no copy
    ones = torch.ones(1, positions.shape[0], dtype=grad.dtype, device=grad.device)
    return ones.mm(positions).view(-1)


class _Convolution(torch.autograd.Function):
    """`aten.convolution` without its bias, and a backward that hands cuDNN the output gradient
    in its layout, for Dynamo to trace into the graph."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, transposed, layout):
        # Eager CUDA GroupNorm hands `x` back NCHW: asked for `layout`, its producing kernel
        # writes that. Saved as asked for (the backward's traced strides); pinned for the
        # forward only, as AOTAutograd's partitioner never recomputes a pin: a saved pinned
        # copy of a tensor saved anyway (a decoder's concatenation) would live beside it.
        ctx.memory_format = layout
        x, weight = x.contiguous(memory_format=layout), weight.contiguous(memory_format=layout)
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, transposed, [0] * len(stride), groups)
        # Pinned, not just asked for: Inductor lays out a 3D convolution (and a 2D one in graphs
        # it leaves in NCHW) after its operands' current layouts, free buffers' NCDHW included.
        return torch.ops.aten.convolution.default(
            pin_layout(x, layout), pin_layout(weight, layout), None, *ctx.geometry
        )

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        want_x, want_weight, want_bias = ctx.needs_input_grad[:3]
        # Inductor hands `aten.convolution_backward` its operands in their traced strides: the
        # kernel producing `grad` writes it in cuDNN's layout, so cuDNN converts nothing. Nothing
        # here reads `grad`'s strides (see `bias_gradient`).
        grad = pin_layout(grad, ctx.memory_format)
        stride, padding, dilation, transposed, _, groups = ctx.geometry
        by_phases = (  # a folded upsampling's (`settings.FOLDED_WEIGHT_GRADIENT_BY_PHASES`)
            want_weight
            and transposed
            and settings.FOLDED_WEIGHT_GRADIENT_BY_PHASES
            and phase_gradient.takes(weight.shape, stride, padding, dilation, groups)
        )
        aten_weight = want_weight and not by_phases
        grad_x = grad_weight = None
        if want_x or aten_weight:
            grad_x, grad_weight, _ = torch.ops.aten.convolution_backward.default(
                grad, x, weight, None, *ctx.geometry, [want_x, aten_weight, False]
            )
        if by_phases:
            grad_weight = phase_gradient.weight_gradient_by_phases(x, grad, stride)
        grad_bias = bias_gradient(grad, ctx.memory_format) if want_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    transposed: bool,
    layout: torch.memory_format,
) -> torch.Tensor:
    """`aten.convolution` (transposed or not, no output padding) *without* adding `bias`,
    differentiable, with `x`, `weight` and the output gradient in `layout` (cuDNN's).

    `bias` is here only for its gradient: the caller adds `bias.detach()` to the output, where
    Inductor fuses the add into the next kernel, and the backward sums the output gradient it
    already holds in cuDNN's layout into the bias gradient (`bias_gradient`).
    """
    return _Convolution.apply(
        x, weight, bias, stride, padding, dilation, groups, transposed, layout
    )


def _prefers(t: torch.Tensor, memory_format: torch.memory_format) -> bool:
    return t.is_contiguous(memory_format=memory_format) and not t.is_contiguous()


def cudnn_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout cuDNN convolves `x` with `weight` in: channels-last if either one is."""
    channels_last = channels_last_of(x.ndim)
    if channels_last is not None and (
        _prefers(x, channels_last) or _prefers(weight, channels_last)
    ):
        return channels_last
    return torch.contiguous_format


def prefer_channels_last(module: nn.Module) -> None:
    """Ask every convolution in `module` for channels-last activations without converting its
    weight: for FSDP, which shards only contiguous parameters, where `module.to(memory_format=
    torch.channels_last)` would otherwise tell cuDNN the layout."""
    for conv in module.modules():
        if type(conv) in (nn.Conv2d, nn.Conv3d):
            conv.preferred_memory_format = channels_last_of(conv.weight.ndim)


def _layout_for(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    preferred = getattr(conv, "preferred_memory_format", None)
    return preferred if preferred is not None else cudnn_memory_format(x, weight)


def _compiling_for_inductor() -> bool:
    """While Dynamo traces for `torch.compile`; not in eager mode or non-strict `torch.export`.

    Exported programs keep plain aten convolutions, which ONNX and the pt2e quantizer know.
    `torch.compiler.is_exporting()` cannot tell the two apart (PyTorch 2.11 reports True inside
    `torch.compile` too), so the test is for Dynamo itself.
    """
    return torch.compiler.is_dynamo_compiling()


def _exporting() -> bool:
    """While (non-strict) `torch.export` traces: exported programs keep the model's own
    convolutions."""
    return torch.compiler.is_exporting() and not _compiling_for_inductor()


_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _plain(conv: nn.Module) -> bool:
    """An `nn.ConvNd` itself (no subclass) without hooks: its call is `_conv_forward`."""
    return type(conv) in _PLAIN_CONVS and not (conv._forward_hooks or conv._forward_pre_hooks)


def _routable(conv: nn.Module) -> bool:
    """A plain `nn.ConvNd` with zero padding and a plain weight."""
    return (
        _plain(conv)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and type(conv.weight) in (nn.Parameter, torch.Tensor)
    )


def _needs_backward(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether autograd will differentiate this convolution. The route exists for the
    backward's layouts; without one Inductor's own lowering lays the convolution out."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def convolve(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`; under `torch.compile` with autograd, through `_Convolution`, the
    layout-stable route above.

    The model keeps plain `nn.ConvNd` modules (tools that match module types, such as the pt2e
    quantizers, see exactly those); only this call differs while Dynamo traces. Anything else
    (a subclass, hooks, other padding modes, a tensor-subclass weight) runs `conv(x)`.
    """
    return _convolve(conv, x, with_bias=True)


def convolve_split_bias(
    conv: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(out, bias)` with `conv(x) == out + bias` (broadcast over positions): `convolve`
    without adding the bias, for a caller that adds it together with other per-channel terms.

    `bias` is None where `out` already holds it: for a convolution without one, for any that
    `convolve` would not run as plain `nn.ConvNd` arithmetic (a subclass, hooks), and in
    programs that (non-strict) `torch.export` traces, whose biased convolutions followed by an
    add are the pattern the pt2e quantizers know (without the bias they leave such a
    convolution in float32).
    """
    if conv.bias is None or _exporting() or not _plain(conv):
        return convolve(conv, x), None
    return _convolve(conv, x, with_bias=False), conv.bias


def convolve_transposed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    memory_format: torch.memory_format,
) -> torch.Tensor:
    """`F.conv_transpose{1,2,3}d(x, weight, bias, stride, padding)` (no output padding, one
    group) in `memory_format`, for a weight computed in the graph rather than held by a module
    (whose layout the module decides: `_layout_for`); under `torch.compile` with autograd
    through the layout-stable route, like `convolve`."""
    dilation = [1] * len(stride)
    compiling = _compiling_for_inductor() and x.device.type in settings.ROUTED_DEVICES
    x, weight, bias = autocast_operands(x, weight, bias)
    if compiling and _needs_backward(x, weight):
        in_op = settings.COMPILED_BIAS_GRADIENT_IN_CONV
        out = convolution(
            x,
            weight,
            bias if in_op else None,
            list(stride),
            list(padding),
            dilation,
            1,
            True,
            memory_format,
        )
        return _add_bias(out, bias, detached=in_op)
    weight = weight.contiguous(memory_format=memory_format)
    x = pin_layout(x, memory_format) if compiling else x.contiguous(memory_format=memory_format)
    return torch.ops.aten.convolution(
        x, weight, bias, list(stride), list(padding), dilation, True, [0] * len(stride), 1
    )


def output_padding(conv: nn.Module, x: torch.Tensor) -> int:
    """How many zero output channels `convolve` appends to `conv`: up to a multiple of
    `settings.CHANNEL_MULTIPLE` for a plain 3D convolution on `settings.PADDED_DEVICES`, else
    none.

    The extra outputs come from zero weight rows and are sliced off, so nothing changes but the
    kernel cuDNN picks, a wider-tiled one for a narrow 3D head. Padding the stems' few input
    channels or 2D heads did not pay (docs/performance.md), so those stay as they are. The
    parameters keep their shapes; exported programs keep the model's own convolutions. (On a
    GPU, 3D heads and stems that `thin_conv` takes never get here.)
    """
    if (
        x.device.type not in settings.PADDED_DEVICES
        or x.ndim != 5
        or not _routable(conv)
        or conv.groups != 1
        or _exporting()
    ):
        return 0
    return -conv.out_channels % settings.CHANNEL_MULTIPLE


def _convolve(conv: nn.Module, x: torch.Tensor, *, with_bias: bool) -> torch.Tensor:
    if thin_conv.takes(conv, x) and _routable(conv) and not _exporting():
        return thin_conv.convolve(conv, x, with_bias=with_bias)
    compiling = (
        _compiling_for_inductor() and x.device.type in settings.ROUTED_DEVICES and _routable(conv)
    )
    extra = output_padding(conv, x)
    if not (compiling and _needs_backward(x, conv.weight)):
        # Compiled: Inductor lays out only 2D convolutions for cuDNN; a 3D one follows its
        # operands' layouts, and cuDNN converts input, weight and output on every call where
        # those are NCDHW (see `pin_layout`). The input is cast first, so autocast's own cast
        # (a kernel free to pick its layout again) is a no-op.
        layout = (
            _layout_for(conv, x, conv.weight)
            if compiling or extra
            else getattr(conv, "preferred_memory_format", None)
        )
        if layout is not None and x.ndim == conv.weight.ndim:
            dtype = autocast_dtype(x.device.type) if compiling else None
            x = x if dtype is None else x.to(dtype)
            x = pin_layout(x, layout) if compiling else x.contiguous(memory_format=layout)
        if extra:  # zero output channels computed and sliced off (see `output_padding`)
            weight, bias = pad_output_channels(conv.weight, conv.bias if with_bias else None, extra)
            return conv._conv_forward(x, weight, bias)[:, : conv.out_channels]
        return conv(x) if with_bias else conv._conv_forward(x, conv.weight, None)
    x, weight, bias = autocast_operands(x, conv.weight, conv.bias if with_bias else None)
    padded_weight, padded_bias = (
        pad_output_channels(weight, bias, extra) if extra else (weight, bias)
    )
    in_op = settings.COMPILED_BIAS_GRADIENT_IN_CONV
    out = convolution(
        x,
        padded_weight,
        padded_bias if in_op else None,
        list(conv.stride),
        list(conv.padding),
        list(conv.dilation),
        conv.groups,
        False,
        _layout_for(conv, x, weight),
    )
    return _add_bias(out[:, : conv.out_channels] if extra else out, bias, detached=in_op)


def _add_bias(out: torch.Tensor, bias: torch.Tensor | None, *, detached: bool) -> torch.Tensor:
    """`out` plus `bias` per channel. `detached` where `_Convolution`'s backward gives the bias
    gradient (`settings.COMPILED_BIAS_GRADIENT_IN_CONV`, see `convolution`); otherwise autograd
    sums it here, in a reduction Inductor fuses with others."""
    if bias is None:
        return out
    return out + (bias.detach() if detached else bias).view(-1, *[1] * (out.ndim - 2))
