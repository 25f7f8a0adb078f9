"""Layout-stable convolutions (`diffunet.accel.conv`): exact against `nn.ConvNd`, plain in exports."""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch import nn
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import min_cut_rematerialization_partition

import diffunet.accel.conv as conv_module
from diffunet import UNet, UNetConfig
from diffunet.accel import accelerate, settings
from diffunet.accel.conv import convolve, convolve_split_bias, cudnn_memory_format
from diffunet.accel.layout import dense_strides, memory_format_for, pin_layout
from diffunet.accel.upsample import upsample_nearest
from diffunet.model.layers.ops import conv_nd


class Convolve(nn.Module):
    """`convolve(conv, x)` as a module, the way the model's blocks call their convolutions."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return convolve(self.conv, x)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles `nn.Conv*.forward` anew (Dynamo stops recompiling after 8 variants)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


#: The 3D benchmark model's options at a small size: one input and one condition channel, one
#: output channel (a head that pads), eps 1e-6, no zero init.
UNET_3D = UNetConfig(
    dims=3,
    in_channels=1,
    cond_channels=1,
    out_channels=1,
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=2,
    attention_resolutions=(),
    num_head_channels=8,
    norm_groups=8,
    norm_eps=1e-6,
    zero_init=False,
)


@pytest.fixture(autouse=True)
def routed_on_the_cpu():
    """The route serves CUDA runs; these tests check its arithmetic on the CPU too (the
    autouse `accel_settings` fixture restores the setting)."""
    settings.ROUTED_DEVICES = frozenset({"cuda", "cpu"})


def traced_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The nodes of `gm` and of the subgraphs it calls: Dynamo keeps an `autograd.Function`'s
    forward and backward (which call the operators) as graphs of their own."""
    graphs = [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    return [n for g in graphs for n in g.graph.nodes]


#: How a routed convolution shows in a Dynamo graph: `aten.convolution` inside the traced
#: `autograd.Function` (a plain `nn.ConvNd` call shows as `conv2d` and friends there).
ROUTED = str(torch.ops.aten.convolution.default)


def _call_targets(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in traced_nodes(gm) if n.op == "call_function"}


def _recording_backward(calls: list[torch.fx.Node]):
    """An AOT backend that runs the traced graphs as they are and appends the function calls of
    each backward graph (and its subgraphs) to `calls`."""

    def backend(gm, inputs):
        def backward_compiler(bw, _):
            calls.extend(n for n in traced_nodes(bw) if n.op == "call_function")
            return make_boxed_func(bw)

        return aot_module_simplified(
            gm, inputs, fw_compiler=lambda fw, _: make_boxed_func(fw), bw_compiler=backward_compiler
        )

    return backend


def _graphs_counted(module: nn.Module, *args: torch.Tensor) -> list[dict[str, int]]:
    """Per captured graph, how often each op is called."""
    seen: list[dict[str, int]] = []

    def backend(gm, inputs):
        counts: dict[str, int] = {}
        for n in traced_nodes(gm):
            if n.op == "call_function":
                counts[str(n.target)] = counts.get(str(n.target), 0) + 1
        seen.append(counts)
        return gm

    torch.compile(module, backend=backend)(*args)
    return seen


def _traced_input_strides(conv: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """The strides of the input the compiled `convolve(conv, x)` hands `aten.convolution`."""
    strides = []

    def backend(gm, inputs):
        for node in traced_nodes(gm):
            if node.target is torch.ops.aten.convolution.default:
                strides.append(node.args[0].meta["example_value"].stride())
        return gm

    torch.compile(Convolve(conv), backend=backend)(x)
    return strides


def _graphs(module: nn.Module, *args: torch.Tensor) -> list[set[str]]:
    """The ops of every graph Dynamo captures when `module(*args)` is compiled."""
    seen: list[set[str]] = []

    def backend(gm, inputs):
        seen.append(_call_targets(gm))
        return gm

    torch.compile(module, backend=backend)(*args)
    return seen


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(
    "options",
    [dict(padding=1), dict(stride=2, padding=0, bias=False), dict(padding=2, dilation=2, groups=2)],
)
@pytest.mark.parametrize(
    ("channels_last", "bias_gradient_in_op"),
    # the operator's own bias gradient only where it differs from a sum: channels-last (GEMV)
    [(False, False), (True, False), (True, True)],
    ids=["contiguous", "channels-last", "channels-last-bias-in-op"],
)
def test_compiled_forward_and_gradients_equal_eager(
    dims, options, channels_last, bias_gradient_in_op
):
    settings.COMPILED_BIAS_GRADIENT_IN_CONV = bias_gradient_in_op  # restored by the fixture
    torch.manual_seed(0)
    conv = conv_nd(dims, 4, 6, 3, **options)
    x = torch.randn(2, 4, *[9] * dims)
    if channels_last and dims > 1:  # the operator's bias gradient is then a product with ones
        layout = memory_format_for(dims)
        conv, x = conv.to(memory_format=layout), x.contiguous(memory_format=layout)
    x.requires_grad_()
    expected = conv(x)
    expected.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in conv.parameters()]
    x.grad = None
    conv.zero_grad()

    out = torch.compile(Convolve(conv), backend="aot_eager")(x)
    out.square().sum().backward()

    # float32 tolerances: only the order of the bias-gradient reduction differs
    torch.testing.assert_close(out, expected)
    for got, want in zip([x.grad] + [p.grad for p in conv.parameters()], grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_under_autocast_matches_eager_within_bf16_rounding():
    torch.manual_seed(0)
    conv = conv_nd(2, 8, 16, 3, padding=1)
    x = torch.randn(2, 8, 12, 12)
    compiled = torch.compile(Convolve(conv), backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, out = conv(x), compiled(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    # eager adds the bias inside the convolution; the compiled path adds it after rounding
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((3, 5, 7), None),
        ((2, 5, 4, 6), None),
        ((2, 5, 4, 6), torch.channels_last),
        ((2, 5, 3, 4, 6), torch.channels_last_3d),
    ],
)
def test_bias_gradient_is_the_sum_over_all_but_the_channels(shape, layout):
    torch.manual_seed(0)
    grad = torch.randn(shape, dtype=torch.float64)
    if layout is not None:
        grad = grad.contiguous(memory_format=layout)
    expected = grad.sum([0, *range(2, grad.ndim)])
    layout = layout or torch.contiguous_format
    torch.testing.assert_close(
        conv_module.bias_gradient(grad, layout), expected, rtol=1e-12, atol=1e-12
    )


def _convolution_backwards(calls: list[torch.fx.Node]) -> list[torch.fx.Node]:
    return [n for n in calls if n.target is torch.ops.aten.convolution_backward.default]


@pytest.mark.parametrize("dims", [2, 3])
def test_the_backward_hands_cudnn_the_output_gradient_in_its_layout(dims):
    """The point of the route: the traced backward gives `aten.convolution_backward` (whose
    operands Inductor lays out as traced) a channels-last output gradient and input, even where
    the gradient arrives NCHW, as through eager CUDA GroupNorm's backward."""
    memory_format = memory_format_for(dims)
    conv = conv_nd(dims, 4, 4, 3, padding=1).to(memory_format=memory_format)
    x = torch.randn(2, 4, *[6] * dims, requires_grad=True)

    def call(x):
        # `contiguous` after the convolution: the gradient reaching it comes back NCHW
        return convolve(conv, x).contiguous().square().sum()

    backward_calls: list[torch.fx.Node] = []
    torch.compile(call, backend=_recording_backward(backward_calls))(x).backward()
    (node,) = _convolution_backwards(backward_calls)
    grad, saved_input, weight = (node.args[i].meta["val"] for i in range(3))
    for t in (grad, saved_input, weight):
        assert t.is_contiguous(memory_format=memory_format), t.stride()
    assert node.args[-1] == [True, True, False]  # the bias gradient is not cuDNN's
    conv_copy = conv_nd(dims, 4, 4, 3, padding=1)
    conv_copy.load_state_dict(conv.state_dict())
    x_copy = x.detach().clone().requires_grad_()
    conv_copy(x_copy).square().sum().backward()
    torch.testing.assert_close(x.grad, x_copy.grad)
    torch.testing.assert_close(conv.weight.grad, conv_copy.weight.grad)


def test_the_bias_gradient_is_the_product_with_ones_in_cuda_graph_modes():
    """With `COMPILED_BIAS_GRADIENT_IN_CONV` on (CUDA-graph modes), the compiled backward sums
    no gradient for the bias: the convolution's backward computes it as a matrix product."""
    settings.COMPILED_BIAS_GRADIENT_IN_CONV = True  # the autouse fixture restores it
    conv = conv_nd(2, 3, 4, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    backward_calls: list[torch.fx.Node] = []
    torch.compile(Convolve(conv), backend=_recording_backward(backward_calls))(x).sum().backward()
    backward_ops = {str(n.target) for n in backward_calls}
    assert "aten.mm.default" in backward_ops
    assert not any(op.startswith("aten.sum") for op in backward_ops), backward_ops
    torch.testing.assert_close(conv.bias.grad, torch.full((4,), 64.0))


@pytest.mark.parametrize("bias_gradient_in_op", [False, True])
def test_the_traced_backward_copies_no_incoming_gradient(bias_gradient_in_op):
    """Dynamo rewrites an `autograd.Function` whose backward asks a gradient for its strides
    to copy every incoming gradient to NCHW first (a full pass per convolution, and back to
    channels-last for cuDNN): the route's backward asks none."""
    settings.COMPILED_BIAS_GRADIENT_IN_CONV = bias_gradient_in_op  # the fixture restores it
    first, second = (
        conv_nd(2, 4, 4, 3, padding=1).to(memory_format=torch.channels_last) for _ in range(2)
    )
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    backward_calls: list[torch.fx.Node] = []
    call = torch.compile(
        lambda x: convolve(second, convolve(first, x)).square().sum(),
        backend=_recording_backward(backward_calls),
    )
    call(x).backward()
    assert len(_convolution_backwards(backward_calls)) == 2
    clones = [n for n in backward_calls if n.target is torch.ops.aten.clone.default]
    assert not clones, [n.meta.get("stack_trace", "").splitlines()[-2:] for n in clones]


@pytest.mark.parametrize("transposed", [False, True])
def test_without_the_bias_gradient_in_the_op_autograd_sums_it_once(transposed):
    """`COMPILED_BIAS_GRADIENT_IN_CONV` off (plain-compile training): the convolution's backward
    computes no bias gradient, the graph sums the output gradient instead, and the gradients
    are those of `nn.ConvNd` (not twice the bias's)."""
    settings.COMPILED_BIAS_GRADIENT_IN_CONV = False  # the autouse fixture restores it
    torch.manual_seed(0)
    if transposed:
        reference = nn.ConvTranspose2d(3, 4, 2, stride=2)
        x = torch.randn(2, 3, 4, 4, requires_grad=True)

        def call(x):
            return conv_module.convolve_transposed(
                x, reference.weight, reference.bias, [2, 2], [0, 0], torch.contiguous_format
            )
    else:
        reference = conv_nd(2, 3, 4, 3, padding=1)
        x = torch.randn(2, 3, 8, 8, requires_grad=True)

        def call(x):
            return convolve(reference, x)

    backward_calls: list[torch.fx.Node] = []
    upstream = torch.randn_like(call(x))
    torch.compile(call, backend=_recording_backward(backward_calls))(x).mul(
        upstream
    ).sum().backward()
    compiled = (x.grad.clone(), reference.weight.grad.clone(), reference.bias.grad.clone())
    backward_ops = [str(n.target) for n in backward_calls]
    (node,) = _convolution_backwards(backward_calls)
    assert node.args[-1] == [True, True, False]  # cuDNN computes no bias gradient
    assert any(op.startswith("aten.sum") for op in backward_ops), backward_ops
    assert "aten.mm.default" not in backward_ops
    x.grad = reference.weight.grad = reference.bias.grad = None
    reference(x).mul(upstream).sum().backward()
    for got, expected in zip(compiled, (x.grad, reference.weight.grad, reference.bias.grad)):
        torch.testing.assert_close(got, expected)


def test_input_without_gradient_gets_none():
    conv = conv_nd(2, 3, 4, 3, padding=1)
    x = torch.randn(1, 3, 8, 8)  # data, not a parameter: no input gradient is computed
    torch.compile(Convolve(conv), backend="aot_eager")(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_compile_routes_through_the_autograd_function_and_eager_does_not():
    conv = conv_nd(2, 3, 4, 3, padding=1)
    x = torch.randn(1, 3, 8, 8)
    (ops,) = _graphs(Convolve(conv), x)
    assert ROUTED in ops and "autograd_function_apply" in ops
    assert not any("conv2d" in op for op in ops)
    assert type(conv) is nn.Conv2d  # the model holds plain modules; only the call differs
    torch.testing.assert_close(Convolve(conv)(x), conv(x), rtol=0, atol=0)


def test_without_a_backward_inductor_convolves_itself():
    """No gradient, no layout problem: Inductor's own convolution lowering lays it out."""
    conv = conv_nd(2, 3, 4, 3, padding=1)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        (ops,) = _graphs(Convolve(conv), x)
    assert ROUTED not in ops and "autograd_function_apply" not in ops
    torch._dynamo.reset()
    conv.requires_grad_(False)
    (ops,) = _graphs(Convolve(conv), x)  # grad mode on, but nothing to differentiate
    assert ROUTED not in ops and "autograd_function_apply" not in ops
    torch._dynamo.reset()
    (ops,) = _graphs(Convolve(conv), x.requires_grad_())  # the input's gradient needs a backward
    assert ROUTED in ops


def test_hooks_subclasses_and_other_layers_are_just_called():
    conv = conv_nd(2, 3, 4, 3, padding=1)
    conv.register_forward_hook(lambda module, args, out: out * 2)

    class Scaled(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 3

    x = torch.randn(1, 3, 8, 8)
    for layer in (conv, Scaled(3, 4, 3, padding=1), nn.AvgPool2d(2), nn.Identity()):
        (ops,) = _graphs(Convolve(layer), x)
        assert ROUTED not in ops and "autograd_function_apply" not in ops, layer
        torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(Convolve(conv), backend="eager")(x), conv(x))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_split_bias_output_plus_bias_is_the_convolution(compiled, grad):
    """Eager, compiled through the route (with autograd) and compiled inference alike; the
    bias still gets its gradient once the caller adds it."""
    torch.manual_seed(0)
    conv = conv_nd(2, 4, 6, 3, padding=1)
    x = torch.randn(2, 4, 7, 7, requires_grad=grad)

    def split(x):
        out, bias = convolve_split_bias(conv, x)
        return out, out + bias.view(-1, 1, 1)

    if compiled:
        with torch.set_grad_enabled(grad):
            assert (ROUTED in set().union(*_graphs(split, x))) == grad
        torch._dynamo.reset()
        split = torch.compile(split, backend="aot_eager")
    with torch.set_grad_enabled(grad):
        out, total = split(x)
        expected = conv(x)
        torch.testing.assert_close(total, expected)
        torch.testing.assert_close(out, F.conv2d(x, conv.weight, None, padding=1))
    if grad:
        (total.square().sum() + out.sum()).backward()
        got = [x.grad, conv.weight.grad, conv.bias.grad]
        x.grad, _ = None, conv.zero_grad()
        (expected.square().sum() + (expected - conv.bias.view(-1, 1, 1)).sum()).backward()
        for g, want in zip(got, [x.grad, conv.weight.grad, conv.bias.grad], strict=True):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)


def test_split_bias_leaves_the_bias_in_where_the_convolution_is_not_plain():
    x = torch.randn(1, 3, 8, 8)
    unbiased = conv_nd(2, 3, 4, 3, padding=1, bias=False)
    hooked = conv_nd(2, 3, 4, 3, padding=1)
    hooked.register_forward_hook(lambda module, args, out: out * 2)

    class Scaled(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 3

    for conv in (unbiased, hooked, Scaled(3, 4, 3, padding=1)):
        out, bias = convolve_split_bias(conv, x)
        assert bias is None
        torch.testing.assert_close(out, conv(x), rtol=0, atol=0)


def test_split_bias_keeps_the_bias_in_exported_programs():
    """Exported graphs keep `conv2d(x, w, b)`, the pattern the pt2e quantizers annotate."""

    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv_nd(2, 3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, bias = convolve_split_bias(self.conv, x)
            return out if bias is None else out + bias.view(-1, 1, 1)

    program = torch.export.export(Split(), (torch.randn(1, 3, 8, 8),), strict=False)
    (conv,) = [n for n in program.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert len(conv.args) > 2 and conv.args[2] is not None


def test_the_unet_compiles_every_convolution_through_the_layout_stable_route():
    model = accelerate(
        UNet(
            UNetConfig(
                dims=2,
                model_channels=16,
                channel_mult=(1, 2),
                num_res_blocks=1,
                attention_resolutions=(),
                norm_groups=8,
            )
        )
    )
    convs = sum(type(m) is nn.Conv2d for m in model.modules())
    (ops,) = _graphs_counted(model, torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0]))
    assert ops[ROUTED] == convs
    assert not any("conv2d" in op for op in ops)


def _saved_for_backward(model: nn.Module, *args: torch.Tensor) -> list[torch.fx.Node]:
    """What the compiled training step of `model` saves for its backward, split as Inductor
    splits it (AOTAutograd's min-cut partitioner)."""
    saved: list[torch.fx.Node] = []

    def forward_compiler(fw, _):
        (outputs,) = fw.graph.find_nodes(op="output")[0].args
        saved.extend(n for n in outputs[1:] if isinstance(n, torch.fx.Node))
        return make_boxed_func(fw)

    def backend(gm, inputs):
        return aot_module_simplified(
            gm,
            inputs,
            fw_compiler=forward_compiler,
            bw_compiler=lambda bw, _: make_boxed_func(bw),
            partition_fn=functools.partial(
                min_cut_rematerialization_partition, compiler="inductor"
            ),
        )

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(*args).square().mean().backward()
    return saved


def _bytes(nodes: list[torch.fx.Node]) -> int:
    tensors = [n.meta.get("val") for n in nodes]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def test_the_route_saves_for_backward_no_more_than_plain_convolutions():
    """The route pins each convolution's operands for the forward only: the partitioner never
    recomputes a pin, so a saved pinned copy of a tensor saved anyway (a decoder's
    concatenation) would stay alive through the step beside it."""
    torch.manual_seed(0)
    model = accelerate(
        UNet(
            UNetConfig(
                dims=2,
                model_channels=8,
                channel_mult=(1,),
                num_res_blocks=1,
                attention_resolutions=(),
                norm_groups=4,
            )
        )
    ).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    t = torch.tensor([1.0, 2.0])
    with torch.autocast("cpu", torch.bfloat16):
        routed = _saved_for_backward(model, x, t)
        settings.ROUTED_DEVICES = frozenset({"cuda"})
        plain = _saved_for_backward(model, x, t)
    pinned = torch.ops.prims.inductor_force_stride_order.default
    assert not [n for n in routed if n.target is pinned]
    assert _bytes(routed) <= _bytes(plain)


def test_a_checkpointed_unet_trains_compiled_as_in_eager_through_the_route():
    """Gradient checkpointing recomputes the blocks in the backward: the convolutions'
    `autograd.Function` must trace inside the checkpointed regions too."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch.manual_seed(0)
    config = UNetConfig(
        dims=2,
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        norm_groups=4,
        use_checkpoint=True,
    )
    model = accelerate(UNet(config))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0])
    model(x, t).square().mean().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    backend = AotEagerAndRecordGraphs()
    torch.compile(model, backend=backend)(x, t).square().mean().backward()
    for p, g in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    assert any(ROUTED in _call_targets(g) for g in backend.graphs)


def test_export_keeps_plain_aten_convolutions():
    conv = conv_nd(2, 3, 4, 3, padding=1)
    program = torch.export.export(conv, (torch.randn(2, 3, 8, 8),), strict=False)
    ops = _call_targets(program.graph_module)
    assert "aten.conv2d.default" in ops
    assert ROUTED not in ops


def test_nchw_input_to_channels_last_weight_is_made_channels_last_in_the_graph():
    """Eager CUDA GroupNorm returns NCHW: the traced graph must ask for cuDNN's layout."""
    conv = nn.Conv2d(8, 8, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 6, 6)  # NCHW, as GroupNorm hands it over on the GPU
    strides = _traced_input_strides(conv, x)
    assert strides == [torch.empty(2, 8, 6, 6).to(memory_format=torch.channels_last).stride()]


@pytest.mark.parametrize("dims", [2, 3])
def test_compiled_inference_asks_for_cudnn_layout_too(dims):
    """Without a backward, Inductor convolves itself, but it lays out only 2D convolutions for
    cuDNN: a 3D one would get the NCDHW input the traced GroupNorm returns."""
    channels_last = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    conv = conv_nd(dims, 8, 8, 3, padding=1).to(memory_format=channels_last)
    x = torch.randn(2, 8, *[6] * dims)  # contiguous, as eager CUDA GroupNorm returns it
    strides = []

    def backend(gm, inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and f"conv{dims}d" in str(node.target):
                strides.append(node.args[0].meta["example_value"].stride())
        return gm

    with torch.no_grad():
        out = torch.compile(Convolve(conv), backend=backend)(x)
    assert strides == [x.contiguous(memory_format=channels_last).stride()]
    torch.testing.assert_close(out, conv(x))


class NormUpsampleConvs(nn.Module):
    """GroupNorm + SiLU, a convolution, nearest upsampling, a convolution: under autocast every
    convolution input is a kernel's output that Inductor is free to lay out, and every weight
    an autocast cast."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.first, self.second = (
            conv_nd(dims, 8, 8, 3, padding=1),
            conv_nd(dims, 8, 4, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = convolve(self.first, F.silu(F.group_norm(x, 4)))
        return convolve(self.second, upsample_nearest(F.silu(h), (2,) * (x.ndim - 2)))


def _cpu_convolves_bf16_in(layout: torch.memory_format, dims: int) -> bool:
    """Whether this CPU's bf16 convolution returns `layout` for operands in it: Inductor lays a
    3D convolution out as the device's own kernel would (`conv_layout`), and x86 CPUs without
    oneDNN's bf16 kernels (AVX2 ones) convolve bf16 in NCDHW whatever the operands."""
    x = torch.zeros(1, 8, *[3] * dims, dtype=torch.bfloat16).contiguous(memory_format=layout)
    weight = torch.zeros(8, 8, *[1] * dims, dtype=torch.bfloat16).contiguous(memory_format=layout)
    return getattr(F, f"conv{dims}d")(x, weight).is_contiguous(memory_format=layout)


@pytest.mark.parametrize("dims", [2, 3])
def test_inductor_convolves_compiled_inference_in_channels_last(dims, monkeypatch):
    """Inductor takes a traced `contiguous` as a hint only, and its 3D convolution lowering laid
    both operands out NCDHW (cuDNN then converted input, weight and output on every call).
    What the generated code hands each convolution, recorded while it runs, must be
    channels-last."""
    from torch._inductor.select_algorithm import extern_kernels

    layout = memory_format_for(dims)
    if dims == 3 and not _cpu_convolves_bf16_in(layout, dims):
        pytest.skip(
            "this CPU convolves bf16 in NCDHW (no oneDNN bf16 kernels), so its Inductor "
            "lays 3D convolutions out that way, unlike CUDA's: no proxy for the GPU here"
        )
    torch.manual_seed(0)
    model = NormUpsampleConvs(dims).to(memory_format=layout)
    x = torch.randn(2, 8, *[4] * dims).contiguous(memory_format=layout)
    seen = []
    convolution = extern_kernels.convolution

    def recording(inp, weight, *args, **kwargs):
        seen.append(
            (inp.is_contiguous(memory_format=layout), weight.is_contiguous(memory_format=layout))
        )
        return convolution(inp, weight, *args, **kwargs)

    compiled = torch.compile(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(x)  # compiles
        monkeypatch.setattr(extern_kernels, "convolution", recording)
        out = compiled(x)
        expected = model(x)
    assert seen == [(True, True), (True, True)]
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.03, atol=0.03)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 4, 5, 6), (1, 1, 2, 1, 3), (4, 6, 5)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, "channels_last"])
def test_dense_strides_lay_a_tensor_out_in_the_memory_format(shape, memory_format):
    if memory_format == "channels_last":
        memory_format = memory_format_for(len(shape) - 2)
    strides = dense_strides(shape, memory_format)
    laid_out = torch.empty_strided(shape, strides)
    assert laid_out.is_contiguous(memory_format=memory_format)
    assert laid_out.untyped_storage().nbytes() == laid_out.nbytes  # dense, no gaps
    if 1 not in shape:  # torch picks among equivalent strides for axes of size 1
        assert strides == list(torch.empty(shape).contiguous(memory_format=memory_format).stride())


def test_pin_layout_outside_compilation_is_contiguous():
    x = torch.randn(2, 3, 4, 5)
    pinned = pin_layout(x, torch.channels_last)
    assert pinned.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(pinned, x)


def test_cudnn_memory_format_follows_either_operand():
    cl = torch.channels_last
    w = torch.randn(4, 4, 3, 3)
    x = torch.randn(2, 4, 5, 5)
    assert cudnn_memory_format(x, w) == torch.contiguous_format
    assert cudnn_memory_format(x, w.to(memory_format=cl)) == cl
    assert cudnn_memory_format(x.to(memory_format=cl), w) == cl
    x3, w3 = torch.randn(1, 2, 3, 3, 3), torch.randn(2, 2, 3, 3, 3)
    assert (
        cudnn_memory_format(x3, w3.to(memory_format=torch.channels_last_3d))
        == torch.channels_last_3d
    )
    assert (
        cudnn_memory_format(torch.randn(2, 4, 7), torch.randn(4, 4, 3)) == torch.contiguous_format
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [2, 3])
def test_compiled_training_on_gpu_makes_no_layout_copies_in_convolution_backward(dims):
    """The point of the module: no `contiguous`/`to` copies under a convolution's backward, and
    no layout conversion inside cuDNN either way (its `nchwToNhwc` / `nhwcToNchw` kernels),
    under autocast, in 2D and in 3D (whose convolutions Inductor lays out after their operands)."""
    from torch.profiler import ProfilerActivity, profile

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.conv1 = nn.GroupNorm(8, 64), conv_nd(dims, 64, 64, 3, padding=1)
            self.norm2, self.conv2 = nn.GroupNorm(8, 64), conv_nd(dims, 64, 64, 3, padding=1)

        def forward(self, x):
            h = convolve(self.conv1, F.silu(self.norm1(x)))
            return x + convolve(self.conv2, F.silu(self.norm2(h)))

    layout = memory_format_for(dims)
    block = Block().cuda().to(memory_format=layout)
    shape = (4, 64, 32, 32) if dims == 2 else (2, 64, 16, 16, 16)
    x = torch.randn(*shape, device="cuda").to(memory_format=layout)
    compiled = torch.compile(block)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = compiled(x)
        out.float().square().mean().backward()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    copies = []
    for evt in prof.events():
        if evt.name in ("aten::copy_",) and evt.kernels:
            chain, parent = [], evt.cpu_parent
            while parent is not None:
                chain.append(parent.name)
                parent = parent.cpu_parent
            if any("convolution" in name for name in chain):
                copies.append(" > ".join(reversed(chain)))
    assert copies == []
    conversions = {
        evt.key for evt in prof.key_averages() if "nchwToNhwc" in evt.key or "nhwcToNchw" in evt.key
    }
    assert conversions == set()


def test_preferred_channels_last_without_converting_the_weight():
    """What FSDP runs get instead of channels-last weights (it shards only contiguous ones)."""
    from diffunet.accel.conv import prefer_channels_last

    block = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv1d(4, 4, 3))
    prefer_channels_last(block)
    conv = block[0]
    assert conv.weight.is_contiguous() and not hasattr(block[1], "preferred_memory_format")
    x = torch.randn(2, 4, 6, 6)
    out = convolve(conv, x)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, conv(x))

    strides = _traced_input_strides(conv, x)
    assert strides == [x.contiguous(memory_format=torch.channels_last).stride()]


def test_on_the_cpu_inductor_convolves_itself():
    settings.ROUTED_DEVICES = frozenset({"cuda"})
    conv = conv_nd(2, 3, 4, 3, padding=1)
    (ops,) = _graphs(Convolve(conv), torch.randn(1, 3, 8, 8, requires_grad=True))
    assert ROUTED not in ops and "autograd_function_apply" not in ops


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DIFFUNET_SLOW_TESTS"),
    reason="Inductor compiles C++ for about two minutes; set DIFFUNET_SLOW_TESTS=1",
)
def test_compiled_bf16_3d_unet_trains_on_the_cpu():
    """Routed on the CPU, Inductor's C++ code for this network's bias gradients declared one
    variable twice and did not compile (torch 2.13); the CPU now keeps Inductor's convolution.
    32³, not 16³: at 2³ oneDNN's bf16 conv3d weight gradient of an NCDHW input is NaN in eager."""
    settings.ROUTED_DEVICES = frozenset({"cuda"})
    # Two levels with attention at the second, one block each: every kind of block the 3D
    # preset has, in less C++ compile time than the full depth.
    model = accelerate(UNet(UNET_3D.replace(attention_resolutions=(2,), num_res_blocks=1)))
    model = model.to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 1, 32, 32, 32).to(memory_format=torch.channels_last_3d)
    cond, t = torch.randn_like(x), torch.tensor([3])
    grads = []
    for net in (torch.compile(model), model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, t, cond=cond)
        out.float().square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        model.zero_grad()
    compiled, eager = grads
    assert torch.isfinite(compiled).all() and torch.isfinite(eager).all()
    cosine = F.cosine_similarity(compiled, eager, dim=0)
    assert cosine > 0.99, cosine  # bf16 rounding differs, the gradient does not


@pytest.fixture
def padded_on_the_cpu():
    """Channel padding serves cuDNN; these tests check its arithmetic on the CPU."""
    settings.PADDED_DEVICES = frozenset({"cuda", "cpu"})


class ConvolutionWeights(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the weight shape of every `aten.convolution` that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.shapes.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("dims", "channels", "padded"),
    [(3, (16, 1), (8, 16)), (3, (4, 3), (8, 4)), (3, (2, 16), (16, 2)), (2, (16, 3), (3, 16))],
)
@pytest.mark.parametrize("mode", ["eager", "compiled", "compiled inference", "split bias"])
def test_output_padding_changes_no_result_or_gradient(
    dims, channels, padded, mode, padded_on_the_cpu
):
    """3D convolutions convolve with output channels padded to 8 and sliced back: the same
    numbers, the same gradients; a 3D stem (2 inputs, 16 outputs) and 2D heads are left alone."""
    torch.manual_seed(0)
    layout = memory_format_for(dims)
    conv = conv_nd(dims, *channels, 3, padding=1).double().to(memory_format=layout)
    x = torch.randn(2, channels[0], *[5] * dims, dtype=torch.double)
    x = x.contiguous(memory_format=layout).requires_grad_(mode != "compiled inference")
    assert conv_module.output_padding(conv, x) == padded[0] - channels[1]
    run = {
        "split bias": lambda x: (lambda out, bias: out + bias.view(-1, *[1] * dims))(
            *convolve_split_bias(conv, x)
        )
    }.get(mode, Convolve(conv))
    if mode.startswith("compiled"):
        weights = []

        def backend(gm, inputs):
            weights.extend(
                tuple(n.args[1].meta["example_value"].shape)
                for n in traced_nodes(gm)
                if n.op == "call_function"
                and any(op in str(n.target) for op in ("convolution", "conv2d", "conv3d"))
                and "backward" not in str(n.target)
            )
            return gm

        with torch.set_grad_enabled(mode == "compiled"):
            torch.compile(run, backend=backend)(x)
        assert weights == [padded + (3,) * dims]
        torch._dynamo.reset()
        run = torch.compile(run, backend="aot_eager")
    else:
        with ConvolutionWeights() as recorded:
            run(x)
        assert recorded.shapes == [padded + (3,) * dims]
    with torch.set_grad_enabled(mode != "compiled inference"):
        out, expected = run(x), conv(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if mode == "compiled inference":
        return
    grad = torch.randn_like(expected)
    inputs = [x, *conv.parameters()]
    for got, want in zip(
        torch.autograd.grad(out, inputs, grad),
        torch.autograd.grad(expected, inputs, grad),
        strict=True,
    ):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_output_padding_only_for_plain_3d_convolutions_on_cuda(padded_on_the_cpu):
    x3 = torch.randn(1, 4, 6, 6, 6)
    assert conv_module.output_padding(conv_nd(3, 4, 1, 3, padding=1), x3) == 7
    assert conv_module.output_padding(conv_nd(3, 4, 16, 3, padding=1), x3) == 0
    assert conv_module.output_padding(conv_nd(2, 4, 1, 3, padding=1), torch.randn(1, 4, 6, 6)) == 0
    assert conv_module.output_padding(conv_nd(1, 4, 1, 3, padding=1), torch.randn(1, 4, 6)) == 0
    assert conv_module.output_padding(conv_nd(3, 4, 2, 3, padding=1, groups=2), x3) == 0
    circular = conv_nd(3, 4, 1, 3, padding=1, padding_mode="circular")
    assert conv_module.output_padding(circular, x3) == 0
    settings.PADDED_DEVICES = frozenset({"cuda"})  # the default; the fixture restores it
    assert conv_module.output_padding(conv_nd(3, 4, 1, 3, padding=1), x3) == 0


def test_exported_programs_keep_the_unpadded_convolution(padded_on_the_cpu):
    conv = conv_nd(3, 3, 1, 3, padding=1)
    program = torch.export.export(Convolve(conv), (torch.randn(2, 3, 4, 4, 4),), strict=False)
    (node,) = [n for n in program.graph.nodes if n.target is torch.ops.aten.conv3d.default]
    assert tuple(node.args[1].meta["val"].shape) == (1, 3, 3, 3, 3)
    assert not any(n.target is torch.ops.aten.constant_pad_nd.default for n in program.graph.nodes)


def test_a_padded_unet_computes_what_the_plain_one_does(padded_on_the_cpu):
    """The 3D benchmark's head (1 output channel) padded in the forward only: parameters and
    results are the model's own."""
    model = accelerate(UNet(UNET_3D)).double()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 8, 8, 8, dtype=torch.double)
    cond, t = torch.randn_like(x), torch.tensor([3, 7])
    results = []
    for devices in (frozenset({"cpu"}), frozenset()):
        settings.PADDED_DEVICES = devices
        with ConvolutionWeights() as recorded:
            out = model(x, t, cond=cond)
        out.square().mean().backward()
        results.append(
            (out.detach(), [p.grad.clone() for p in model.parameters()], recorded.shapes)
        )
        model.zero_grad()
    (padded, padded_grads, padded_shapes), (plain, plain_grads, plain_shapes) = results
    assert padded_shapes[0] == plain_shapes[0] == (16, 2, 3, 3, 3)  # the stem
    assert padded_shapes[-1][0] == 8 and plain_shapes[-1][0] == 1  # the head
    assert len(padded_shapes) == len(plain_shapes)
    assert padded.shape == plain.shape == x.shape
    torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-12)
    for got, want in zip(padded_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
