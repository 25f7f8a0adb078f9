"""The folded nearest-upsample convolution (`diffunet.accel.upsample.folded_upsample_weight`): one
transposed convolution of the input computes nearest upsampling followed by a 3×3 convolution,
values and gradients, eager and compiled, in every dimensionality, in `Upsample` and in an up
`ResBlock`; it runs only on `settings.FOLDED_DEVICES`, and exported programs keep the upsampling."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffunet import UNet, UNetConfig
from diffunet.accel import accelerate, settings
from diffunet.accel.blocks import AcceleratedResBlock as ResBlock
from diffunet.accel.blocks import AcceleratedUpsample as Upsample
from diffunet.accel.conv import prefer_channels_last
from diffunet.accel.upsample import folded_upsample_weight, folds
from test_conv import traced_nodes

CASES = [(1, (2,)), (2, (2, 2)), (3, (2, 2, 2)), (3, (1, 2, 2)), (2, (2, 1))]


@pytest.fixture(autouse=True)
def folded_on_the_cpu(monkeypatch):
    """Folding on the CPU and the GPU whatever the environment says (each test may change it),
    the convolutions' layout-stable route taken on the CPU too."""
    monkeypatch.setattr(settings, "FOLDED_DEVICES", frozenset({"cuda", "cpu"}))
    monkeypatch.setattr(settings, "ROUTED_DEVICES", frozenset({"cuda", "cpu"}))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class ConvolutionCalls(TorchDispatchMode):
    """Records whether each `aten.convolution` it sees is transposed, and every op's name."""

    def __init__(self) -> None:
        super().__init__()
        self.transposed: list[bool] = []
        self.inputs: list[torch.Tensor] = []
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.__name__)
        if func is torch.ops.aten.convolution.default:
            self.transposed.append(args[6])
            self.inputs.append(args[0])
        return func(*args, **(kwargs or {}))


def upsample_folds(up: Upsample, x: torch.Tensor) -> bool:
    """Whether `up(x)` runs the folded transposed convolution."""
    return up.mode == "nearest_conv" and folds(up.conv, x, up.factors)


def _upsample(dims: int, factors: tuple[int, ...], channels: int = 5) -> Upsample:
    torch.manual_seed(0)
    return Upsample(dims, channels, factors, "nearest_conv").double()


def _values_and_gradients(module, x: torch.Tensor, grad: torch.Tensor | None = None):
    out = module(x)
    grad = torch.cos(out.detach()) if grad is None else grad
    return out, torch.autograd.grad(out, [x, *module.parameters()], grad), grad


@pytest.mark.parametrize(("dims", "factors"), CASES)
def test_folded_equals_nearest_then_conv(dims, factors):
    up = _upsample(dims, factors)
    x = torch.randn(2, 5, *[3 + i for i in range(dims)], dtype=torch.float64, requires_grad=True)
    with ConvolutionCalls() as calls:
        assert upsample_folds(up, x)
        folded, folded_grads, grad = _values_and_gradients(up, x)
    assert calls.transposed == [True]  # one transposed convolution, no upsampled tensor
    assert not any("interpolate" in op or "upsample" in op for op in calls.ops)
    settings.set_folded_upsample_devices("none")  # the fixture restores the setting
    assert not upsample_folds(up, x)
    plain, plain_grads, _ = _values_and_gradients(up, x, grad)
    assert folded.shape == plain.shape == (2, 5, *[(3 + i) * f for i, f in enumerate(factors)])
    for got, want in zip([folded, *folded_grads], [plain, *plain_grads], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_folded_kernel_of_one_axis():
    """Tap by tap along one doubled axis: (w2, w1+w2, w0+w1, w0), in/out swapped."""
    weight = torch.randn(4, 3, 3)
    folded = folded_upsample_weight(weight, (2,))
    w0, w1, w2 = weight.unbind(2)
    assert folded.shape == (3, 4, 4)
    for tap, want in enumerate([w2, w1 + w2, w0 + w1, w0]):
        assert torch.equal(folded[:, :, tap], want.T)
    assert torch.equal(folded_upsample_weight(weight, (1,)), weight.flip(2).transpose(0, 1))


@pytest.mark.parametrize(("dims", "factors"), [(2, (2, 2)), (3, (1, 2, 2))])
@pytest.mark.parametrize("grad", [True, False])
def test_compiled_equals_eager_through_the_layout_stable_route(dims, factors, grad):
    up = _upsample(dims, factors).float()
    x = torch.randn(2, 5, *[4] * dims, requires_grad=True)
    ops: list[set[str]] = []

    def backend(gm, inputs):
        ops.append({str(n.target) for n in traced_nodes(gm) if n.op == "call_function"})
        return gm

    with torch.set_grad_enabled(grad):
        torch.compile(up, backend=backend)(x)
    # routed: the layout-stable `autograd.Function`; without a backward Inductor convolves itself
    assert ("autograd_function_apply" in ops[0]) == grad
    compiled = torch.compile(up)
    if not grad:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), up(x), rtol=1e-5, atol=1e-5)
        return
    got, got_grads, g = _values_and_gradients(compiled, x)
    want, want_grads, _ = _values_and_gradients(up, x, g)
    for a, b in zip([got, *got_grads], [want, *want_grads], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class BackwardCalls(TorchDispatchMode):
    """Records each `aten.convolution_backward` call's (transposed, output_mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, list[bool]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.calls.append((args[7], list(args[10])))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("dims", "factors"), [(1, (2,)), (2, (2, 2)), (3, (1, 2, 2))])
@pytest.mark.parametrize("by_phases", [False, True])
def test_the_weight_gradient_by_phases_equals_atens(dims, factors, by_phases, monkeypatch):
    """`settings.FOLDED_WEIGHT_GRADIENT_BY_PHASES`: the routed folded convolution's weight
    gradient as one stride-1 weight gradient per output phase (2 per doubled axis), the
    input gradient still ATen's transposed one; values and gradients as in eager mode."""
    monkeypatch.setattr(settings, "FOLDED_WEIGHT_GRADIENT_BY_PHASES", by_phases)
    up = _upsample(dims, factors)
    x = torch.randn(2, 5, *[5 + i for i in range(dims)], dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(up, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    grad = torch.cos(out.detach())
    with BackwardCalls() as recorder:
        got_grads = torch.autograd.grad(out, [x, *up.parameters()], grad)
    want, want_grads, _ = _values_and_gradients(up, x, grad)
    for a, b in zip([out, *got_grads], [want, *want_grads], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    phases = 2 ** factors.count(2)
    expected = (
        [(True, [True, False, False])] + [(False, [False, True, False])] * phases
        if by_phases
        else [(True, [True, True, False])]
    )
    assert recorder.calls == expected


@pytest.mark.parametrize(("dims", "factors"), [(2, (2, 2)), (3, (1, 2, 2))])
def test_one_dynamic_trace_trains_every_size_through_the_layout_stable_route(dims, factors):
    """`compile(dynamic=True)` (what "compile once for many sizes" asks): the routed transposed
    convolution's shapes stay symbolic through AOTAutograd, so odd and even sizes share one
    trace."""
    from torch._dynamo.testing import CompileCounterWithBackend

    up = _upsample(dims, factors)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(up, backend=counter, dynamic=True, fullgraph=True)
    for size in (6, 9, 7):  # sizes unequal to the batch and channels, which Dynamo would tie
        x = torch.randn(
            2, 5, *[size + i for i in range(dims)], dtype=torch.float64, requires_grad=True
        )
        got, got_grads, grad = _values_and_gradients(compiled, x)
        want, want_grads, _ = _values_and_gradients(up, x, grad)
        for a, b in zip([got, *got_grads], [want, *want_grads], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert counter.frame_count == 1
    assert any(
        str(n.target) == "autograd_function_apply"
        for graph in counter.graphs
        for n in traced_nodes(graph)
    )


@pytest.mark.parametrize(
    ("dims", "layout"), [(2, torch.channels_last), (3, torch.channels_last_3d)]
)
@pytest.mark.parametrize("asked_by", ["weight", "preference"])
def test_a_convolution_in_channels_last_stays_there_folded(dims, layout, asked_by):
    """A channels-last weight (`model.to(memory_format=...)`), or under FSDP, where the weights
    stay contiguous, the convolution's own request (`prefer_channels_last`), makes the plain
    convolution run channels-last whatever the input's layout (eager GroupNorm hands back
    NCHW); the folded one, whose computed weight is contiguous, runs channels-last too."""
    up = _upsample(dims, (2,) * dims).float()
    x = torch.randn(2, 5, *[4] * dims)
    want = up(x)
    if asked_by == "weight":
        up.to(memory_format=layout)
    else:
        prefer_channels_last(up)
    with ConvolutionCalls() as calls:
        got = up(x)
    assert calls.transposed == [True]
    assert calls.inputs[0].is_contiguous(memory_format=layout)
    assert not calls.inputs[0].is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_exported_programs_keep_the_upsampling_and_the_convolution():
    up = _upsample(2, (2, 2)).float()
    program = torch.export.export(up, (torch.randn(1, 5, 4, 4),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("transpose" in t for t in targets), targets
    assert any("conv2d" in t for t in targets), targets


def test_only_nearest_conv_on_folded_devices():
    x = torch.randn(1, 4, 3, 3)
    assert upsample_folds(_upsample(2, (2, 2), 4), x)
    assert not upsample_folds(Upsample(2, 4, (2, 2), "transposed"), x)
    assert not upsample_folds(Upsample(2, 4, (2, 2), "nearest"), x)
    hooked = _upsample(2, (2, 2), 4)
    hooked.conv.register_forward_hook(lambda *args: None)
    assert not upsample_folds(hooked, x)  # a hook must see its call
    with pytest.raises(KeyError), settings.folding_on("none"):
        assert not upsample_folds(_upsample(2, (2, 2), 4), x)
        raise KeyError  # the setting comes back however the block ends
    assert upsample_folds(_upsample(2, (2, 2), 4), x)
    settings.set_folded_upsample_devices("cuda")
    assert {"cuda"} == settings.FOLDED_DEVICES
    assert not upsample_folds(_upsample(2, (2, 2), 4), x)
    settings.set_folded_upsample_devices(["cpu", "cuda"])
    assert {"cpu", "cuda"} == settings.FOLDED_DEVICES


def test_device_lists_are_checked():
    assert settings.parse_devices("cpu, cuda") == {"cpu", "cuda"}
    assert settings.parse_devices("none") == settings.parse_devices("") == frozenset()
    with pytest.raises(ValueError, match=r"DIFFUNET_FOLDED_UPSAMPLE='1'.*'cpu,cuda'"):
        settings.parse_devices("1")


@pytest.mark.parametrize("embedding", ["none", "additive", "scale-shift"])
@pytest.mark.parametrize(("dims", "factors"), [(2, (2, 2)), (3, (1, 2, 2))])
def test_an_up_resblock_folds_its_first_convolution(dims, factors, embedding):
    """guided-diffusion's `resblock_updown`: the block upsamples `h` right before its first
    convolution (8 → 12 channels here, so the skip is a 1×1 convolution of the upsampled x)."""
    torch.manual_seed(0)
    block = ResBlock(
        dims,
        8,
        12,
        None if embedding == "none" else 16,
        resample="up",
        factors=factors,
        use_scale_shift_norm=embedding == "scale-shift",
        norm_groups=4,
        zero_init=False,
    ).double()
    x = torch.randn(2, 8, *[3] * dims, dtype=torch.float64, requires_grad=True)
    emb = None if embedding == "none" else torch.randn(2, 16, dtype=torch.float64)
    inputs = [x, *block.parameters()]
    with ConvolutionCalls() as calls:
        folded = block(x, emb)
    assert calls.transposed.count(True) == 1
    grad = torch.cos(folded.detach())
    folded_grads = torch.autograd.grad(folded, inputs, grad)
    with settings.folding_on("none"):
        plain = block(x, emb)
    plain_grads = torch.autograd.grad(plain, inputs, grad)
    assert folded.shape == plain.shape == (2, 12, *[3 * f for f in factors])
    for got, want in zip([folded, *folded_grads], [plain, *plain_grads], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("dims", "resblock_updown"), [(2, False), (3, False), (2, True)])
def test_a_unet_computes_the_same_with_folded_upsampling(dims, resblock_updown):
    config = UNetConfig(
        dims=dims,
        in_channels=2,
        out_channels=2,
        model_channels=8,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        norm_groups=4,
        zero_init=False,
        resblock_updown=resblock_updown,
    )
    torch.manual_seed(0)
    model = accelerate(UNet(config).double())
    x = torch.randn(2, 2, *[8] * dims, dtype=torch.float64)
    t = torch.tensor([3, 700])
    with ConvolutionCalls() as calls:
        folded = model(x, t)
    assert calls.transposed.count(True) == 2  # one per upsampling
    folded_grads = torch.autograd.grad(folded.square().sum(), list(model.parameters()))
    settings.set_folded_upsample_devices([])
    plain = model(x, t)
    plain_grads = torch.autograd.grad(plain.square().sum(), list(model.parameters()))
    torch.testing.assert_close(folded, plain, rtol=1e-10, atol=1e-10)
    for got, want in zip(folded_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def _on_the_gpu(dims, factors, channels, size):
    """A CUDA `Upsample` and an input for it that needs a gradient, both channels-last."""
    layout = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    torch.manual_seed(0)
    up = Upsample(dims, channels, factors, "nearest_conv").cuda().to(memory_format=layout)
    x = torch.randn(2, channels, *[size] * dims, device="cuda").contiguous(memory_format=layout)
    return up, x.requires_grad_(), layout


def _bf16_values_and_gradients(run, up, x, grad=None):
    """`run(x)` under bf16 autocast, and the gradients of x and `up`'s parameters for the
    output gradient `grad` (random where None), all as float32, with `grad`."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = run(x)
    grad = torch.randn_like(out) if grad is None else grad
    grads = torch.autograd.grad(out, [x, *up.parameters()], grad)
    return [out.float(), *(g.float() for g in grads)], grad


def _assert_within_bf16_rounding(got, want):
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() <= 0.02 * b.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("dims", "factors", "channels", "size"),
    [(3, (2, 2, 2), 128, 16), (3, (1, 2, 2), 64, 8), (2, (2, 2), 256, 32)],
)
def test_bf16_folded_matches_nearest_then_conv_on_the_gpu(dims, factors, channels, size):
    up, x, layout = _on_the_gpu(dims, factors, channels, size)
    settings.set_folded_upsample_devices(["cuda"])
    folded, grad = _bf16_values_and_gradients(up, up, x)
    settings.set_folded_upsample_devices([])
    plain, _ = _bf16_values_and_gradients(up, up, x, grad)
    assert folded[0].is_contiguous(memory_format=layout)
    _assert_within_bf16_rounding(folded, plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_compiled_weight_gradient_by_phases_matches_atens_on_the_gpu(monkeypatch):
    """Inductor's graph of the routed folded convolution, bf16 channels-last on CUDA, with the
    weight gradient by phases and by ATen: values and gradients within bf16's rounding."""
    up, x, _ = _on_the_gpu(3, (2, 2, 2), 128, 16)
    results, grad = [], None
    for by_phases in (True, False):
        monkeypatch.setattr(settings, "FOLDED_WEIGHT_GRADIENT_BY_PHASES", by_phases)
        torch._dynamo.reset()
        values, grad = _bf16_values_and_gradients(torch.compile(up, fullgraph=True), up, x, grad)
        results.append(values)
    _assert_within_bf16_rounding(*results)


@pytest.mark.parametrize(("dims", "products"), [(1, (2, 3)), (2, (4, 9)), (3, (8, 27))])
def test_folding_counts_fewer_products_on_meta_tensors_too(dims, products):
    """FLOPs as `torch.utils.flop_counter` counts them (shapes only, on the meta device):
    2ᵈ products per output instead of 3ᵈ."""
    from torch.utils.flop_counter import FlopCounterMode

    up = Upsample(dims, 16, (2,) * dims, "nearest_conv").to("meta")
    x = torch.empty(2, 16, *[6] * dims, device="meta")
    flops = []
    for devices in ("meta", "none"):
        settings.set_folded_upsample_devices(devices)
        with FlopCounterMode(display=False) as counter:
            assert up(x).shape == (2, 16, *[12] * dims)
        flops.append(counter.get_total_flops())
    assert flops[0] * products[1] == flops[1] * products[0]
