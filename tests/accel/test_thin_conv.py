"""The thin 3D convolution kernels (`diffunet.accel.thin_conv`): they compute `F.conv3d` and its
gradients, through Triton's CPU interpreter here (the `interpreted_*` functions; float32 and
float16, since the interpreter's bfloat16 `tl.dot` is wrong) and in bfloat16 on a GPU under
`-m gpu`; `convolve` calls them only for the convolutions they serve, and only when on."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from diffunet import UNet, UNetConfig
from diffunet.accel import accelerate, settings, thin_conv, triton_runtime
from diffunet.accel.conv import convolve
from diffunet.model.layers.ops import conv_nd

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture
def enabled(monkeypatch):
    """Kernels on (whatever `DIFFUNET_THIN_CONV` says), and CPU tensors taken as if Triton
    interpreted them."""
    settings.THIN_CONV = True  # the autouse fixture restores the settings
    monkeypatch.setattr(thin_conv.functional, "interpreting", lambda: True)


def test_never_for_cpu_tensors_without_the_interpreter():
    conv, x = conv_nd(3, 2, 16, 3, padding=1), torch.randn(1, 2, 4, 4, 4)
    assert thin_conv.takes(conv, x) == (settings.THIN_CONV and triton_runtime.interpreting())


@pytest.mark.parametrize(
    ("cin", "cout", "channels_last"), [(2, 16, True), (16, 1, True), (3, 5, False)]
)
def test_ops_compute_with_aten_where_the_kernels_cannot_run(cin, cout, channels_last, monkeypatch):
    """On a GPU without bf16 tensor cores the same ops run ATen: the same numbers (against
    float64 `F.conv3d`) and the layouts their fake versions promise."""
    monkeypatch.setattr(thin_conv.launchers, "runs_kernels", lambda device: False)
    x = torch.randn(2, cin, 3, 4, 5)
    w, b, g = torch.randn(cout, cin, 3, 3, 3), torch.randn(cout), torch.randn(2, cout, 3, 4, 5)
    if channels_last:
        x, w, g = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, w, g))
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    want = F.conv3d(x64, w64, b64, padding=1)
    wants = torch.autograd.grad(want, [x64, w64, b64], g.double())
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    got = thin_conv.thin_conv3d(*args)
    gots = torch.autograd.grad(got, args, g)
    for a, e in zip([got, *gots], [want, *wants], strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-4)
    torch.library.opcheck(thin_conv.thin_conv3d_op, (x, w, b))
    torch.library.opcheck(thin_conv.thin_conv3d_backward_op, (g, x, w, True, True))


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.usefixtures("enabled")
def test_which_convolutions_the_kernels_take():
    x2, x16 = torch.randn(1, 2, 4, 4, 4), torch.randn(1, 16, 4, 4, 4)
    assert thin_conv.takes(conv_nd(3, 2, 16, 3, padding=1), x2)  # a stem
    assert thin_conv.takes(conv_nd(3, 16, 1, 3, padding=1), x16)  # a head
    assert not thin_conv.takes(conv_nd(3, 16, 16, 3, padding=1), x16)  # not thin
    assert not thin_conv.takes(conv_nd(3, 2, 256, 3, padding=1), x2)  # too wide
    assert not thin_conv.takes(conv_nd(3, 2, 16, 1), x2)  # not 3×3×3
    assert not thin_conv.takes(conv_nd(3, 2, 16, 3, padding=1, stride=2), x2)
    assert not thin_conv.takes(conv_nd(3, 2, 16, 3, padding=1, padding_mode="circular"), x2)
    assert not thin_conv.takes(conv_nd(2, 2, 16, 3, padding=1), torch.randn(1, 2, 4, 4))
    assert not thin_conv.takes(conv_nd(3, 2, 16, 3, padding=1).double(), x2)  # dtype mismatch
    assert not thin_conv.takes(conv_nd(3, 3, 16, 3, padding=1), x2)  # F.conv3d's error instead
    meta = conv_nd(3, 2, 16, 3, padding=1).to("meta")  # shapes only, as a benchmark lists calls
    assert not thin_conv.takes(meta, x2.to("meta"))
    assert convolve(meta, x2.to("meta")).shape == (1, 16, 4, 4, 4)
    huge = torch.zeros(1, 2, 1, 1, 1).expand(1, 2, 512, 512, 512)  # 2³³ outputs per sample
    assert not thin_conv.takes(conv_nd(3, 2, 64, 3, padding=1), huge)
    assert thin_conv.takes(conv_nd(3, 2, 64, 3, padding=1), huge[:, :, :64])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts both
        assert thin_conv.takes(conv_nd(3, 2, 16, 3, padding=1).double(), x2)
    settings.THIN_CHANNELS = 1
    assert not thin_conv.takes(conv_nd(3, 2, 16, 3, padding=1), x2)
    settings.set_thin_conv_enabled(False)
    assert not thin_conv.takes(conv_nd(3, 16, 1, 3, padding=1), x16)


def _compiled_convolve_matches_eager() -> None:
    """A stem's `convolve` compiled: the operators in the forward and backward graphs, and the
    values and gradients of `conv(x)`."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    conv = conv_nd(3, 2, 16, 3, padding=1).to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 2, 4, 5, 3).contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    backend = AotEagerAndRecordGraphs()
    out = torch.compile(lambda x: convolve(conv, x), backend=backend)(x)
    grads = torch.autograd.grad(out.square().sum(), [x, conv.weight, conv.bias])
    forward, backward = (
        {str(n.target) for n in graphs[0].graph.nodes}
        for graphs in (backend.fw_graphs, backend.bw_graphs)
    )
    assert "diffunet.thin_conv3d.default" in forward
    assert "diffunet.thin_conv3d_backward.default" in backward
    want = conv(x)
    wants = torch.autograd.grad(want.square().sum(), [x, conv.weight, conv.bias])
    for got, expected in zip([out, *grads], [want, *wants], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.usefixtures("enabled")
def test_compiled_convolve_calls_the_ops(monkeypatch):
    """Computing with ATen inside the operators here; the kernels' own numbers under the
    interpreter (`interpreted_compiled_convolve_runs_the_kernels`)."""
    monkeypatch.setattr(thin_conv.launchers, "runs_kernels", lambda device: False)
    _compiled_convolve_matches_eager()


@pytest.mark.parametrize(
    ("setting", "wanted"),
    [
        ("auto", {(64, 1): True, (54, 2): True, (53, 2): False, (16, 1): False, (64, 3): False}),
        ("always", {(64, 1): True, (16, 1): True, (8, 5): True}),
        ("never", {(64, 1): False, (128, 1): False}),
    ],
)
def test_which_heads_forward_by_tap_products(setting, wanted, monkeypatch):
    settings.TAP_PRODUCT_FORWARD = setting
    calls = []

    def tap_products(x, weight, bias):
        calls.append(tuple(weight.shape[:2]))
        return F.conv3d(x, weight, bias, padding=1)

    monkeypatch.setattr(thin_conv.launchers, "tap_product_forward", tap_products)
    for (cin, cout), want in wanted.items():
        x, weight = torch.randn(1, cin, 2, 3, 2), torch.randn(cout, cin, 3, 3, 3)
        calls.clear()
        y = thin_conv.launchers.thin_output(x, weight, None)
        assert calls == ([(cout, cin)] if want else []), (setting, cin, cout)
        torch.testing.assert_close(y, F.conv3d(x, weight, padding=1))


@pytest.mark.parametrize(
    ("value", "setting"),
    [(None, "auto"), ("auto", "auto"), ("1", "always"), ("Always", "always"), ("0", "never")],
)
def test_tap_product_setting_from_the_environment(value, setting, monkeypatch):
    name = settings.TAP_PRODUCT_FORWARD_ENV
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    assert settings.tap_product_setting(name) == setting


def test_a_bad_tap_product_setting_warns_and_keeps_auto(monkeypatch):
    monkeypatch.setenv(settings.TAP_PRODUCT_FORWARD_ENV, "yes")
    with pytest.warns(UserWarning, match="'yes' is not one of auto, always, never"):
        assert settings.tap_product_setting() == "auto"


# --- the kernels under Triton's interpreter (run by `test_kernels_under_the_interpreter`) -------

#: ((in, out) channels, (batch, *spatial), channels-last, bias): stems and heads, odd sizes,
#: one-position volumes, a wide side above 32 channels.
CASES = [
    ((2, 16), (2, 3, 5, 4), True, True),
    ((16, 1), (1, 4, 3, 5), True, True),
    ((3, 5), (2, 3, 3, 3), False, False),
    ((8, 33), (1, 2, 3, 2), True, True),
    ((1, 16), (1, 3, 4, 3), False, True),
    ((12, 3), (1, 3, 2, 4), False, True),
    ((2, 16), (2, 1, 1, 1), True, True),
    ((16, 2), (2, 1, 3, 1), True, False),
]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("channels", "spatial", "channels_last", "bias"), CASES)
def interpreted_kernels_compute_conv3d_and_its_gradients(
    channels, spatial, channels_last, bias, dtype
):
    """Forward (every head's by tap products), input, weight and bias gradients against
    float64 `F.conv3d` of the same rounded numbers; outputs in the layouts promised."""
    settings.TAP_PRODUCT_FORWARD = "always"
    cin, cout = channels
    x = torch.randn(spatial[0], cin, *spatial[1:])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(cout, cin, 3, 3, 3), torch.randn(cout) if bias else None
    g = torch.randn(spatial[0], cout, *spatial[1:]).to(dtype)
    x, w, b = (None if t is None else t.to(dtype).float() for t in (x, w, b))
    reference = [t.double().requires_grad_() for t in (x, w, b) if t is not None]
    want = F.conv3d(*reference[:2], reference[2] if bias else None, padding=1)
    wants = torch.autograd.grad(want, reference, g.double())
    args = [None if t is None else t.to(dtype).requires_grad_() for t in (x, w, b)]
    got = thin_conv.thin_conv3d(*args)
    assert got.dtype == dtype and got.shape == want.shape
    # a one-channel input is channels-last too, and so is a stem's wide output
    assert got.is_contiguous(memory_format=torch.channels_last_3d) == (channels_last or cin == 1)
    gots = torch.autograd.grad(got, [a for a in args if a is not None], g)
    tolerance = 1e-6 if dtype == torch.float32 else 3e-3
    for name, a, e in zip(("out", "x", "weight", "bias"), [got, *gots], [want, *wants]):
        assert _relative_error(a, e) < tolerance, name


CONTIGUOUS, CHANNELS_LAST = torch.contiguous_format, torch.channels_last_3d


@pytest.mark.parametrize(
    ("cin", "cout", "input_layout", "weight_layout"),
    [
        (2, 16, CONTIGUOUS, CONTIGUOUS),
        (2, 16, CHANNELS_LAST, CONTIGUOUS),
        (2, 16, CONTIGUOUS, CHANNELS_LAST),
        (16, 1, CHANNELS_LAST, CHANNELS_LAST),
        (16, 1, CONTIGUOUS, CHANNELS_LAST),
    ],
)
def interpreted_the_ops_return_what_their_fake_versions_promise(
    cin, cout, input_layout, weight_layout
):
    """Shapes, strides and dtypes, which compiled graphs plan their buffers by (channels-last
    weights, as the model keeps them on a GPU, decide a stem's output layout)."""
    settings.TAP_PRODUCT_FORWARD = "always"
    x = torch.randn(2, cin, 3, 4, 3).contiguous(memory_format=input_layout)
    w = torch.randn(cout, cin, 3, 3, 3).contiguous(memory_format=weight_layout)
    b = torch.randn(cout)
    out = thin_conv.thin_conv3d(x, w, b)
    promised = thin_conv.ops.thin_conv3d_fake(x, w, b)
    assert (out.shape, out.stride()) == (promised.shape, promised.stride())
    args = (torch.randn_like(out), x, w, True, True)
    for got, fake in zip(
        thin_conv.thin_conv3d_backward_op(*args),
        thin_conv.ops.thin_conv3d_backward_fake(*args),
        strict=True,
    ):
        assert (got.shape, got.stride(), got.dtype) == (fake.shape, fake.stride(), fake.dtype)


def interpreted_views_with_strides_of_their_own():
    """Inputs that are a channel slice and a transposed volume."""
    for x in (
        torch.randn(2, 3, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)[:, :2],
        torch.randn(2, 2, 5, 4, 3).transpose(2, 4),
    ):
        w, b = torch.randn(16, 2, 3, 3, 3), torch.randn(16)
        want = F.conv3d(x.double(), w.double(), b.double(), padding=1)
        assert _relative_error(thin_conv.thin_conv3d(x, w, b), want) < 1e-6


def interpreted_a_head_forward_in_groups_of_samples():
    """Tap products held for one sample at a time, as a small `TAP_PRODUCTS_BYTES` asks."""
    settings.TAP_PRODUCT_FORWARD, settings.TAP_PRODUCTS_BYTES = "always", 1
    x, w, b = torch.randn(3, 12, 2, 3, 4), torch.randn(2, 12, 3, 3, 3), torch.randn(2)
    want = F.conv3d(x.double(), w.double(), b.double(), padding=1)
    assert _relative_error(thin_conv.thin_conv3d(x, w, b), want) < 1e-6


def interpreted_compiled_convolve_runs_the_kernels():
    """The kernels themselves through the operators in a compiled graph."""
    settings.set_thin_conv_enabled(True)
    _compiled_convolve_matches_eager()


def interpreted_a_3d_unet_computes_the_same_with_the_kernels(monkeypatch):
    """Its stem and head by the kernels (the norms by PyTorch, to isolate them)."""
    settings.FUSED_NORM = False
    config = UNetConfig(
        dims=3,
        in_channels=1,
        cond_channels=1,
        out_channels=1,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        norm_groups=8,
        attention_resolutions=(),
    )
    model = accelerate(UNet(config))
    x = torch.randn(2, 1, 4, 6, 4)
    cond, t = torch.randn_like(x), torch.tensor([3, 7])
    calls = []
    kernels = thin_conv.convolve
    monkeypatch.setattr(
        thin_conv, "convolve", lambda *args, **kwargs: calls.append(1) or kernels(*args, **kwargs)
    )
    results = []
    for on in (True, False):
        settings.set_thin_conv_enabled(on)
        calls.clear()
        out = model(x, t, cond=cond)
        out.square().mean().backward()
        assert len(calls) == (2 if on else 0)  # the stem and the head
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (out, grads), (want, wants) = results
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


# --- on a GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("tap_products", ["never", "always"])
@pytest.mark.parametrize(
    ("channels", "spatial"),
    [
        ((2, 64), (4, 64, 64, 64)),
        ((64, 1), (4, 64, 64, 64)),
        ((3, 33), (2, 7, 9, 5)),
        ((5, 2), (1, 17, 3, 4)),
    ],
)
def test_bf16_kernels_match_cudnn_on_the_gpu(channels, spatial, tap_products):
    settings.TAP_PRODUCT_FORWARD = tap_products
    conv = conv_nd(3, *channels, 3, padding=1).cuda().to(memory_format=torch.channels_last_3d)
    x = torch.randn(spatial[0], channels[0], *spatial[1:], device="cuda")
    x = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    settings.set_thin_conv_enabled(True)
    assert thin_conv.takes(conv, x)
    grad = torch.randn(spatial[0], channels[1], *spatial[1:], device="cuda")
    results = []
    for on in (True, False):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = thin_conv.convolve(conv, x, with_bias=True) if on else conv(x)
        grads = torch.autograd.grad(out, [x, *conv.parameters()], grad.to(out.dtype))
        results.append([out.float(), *(g.float() for g in grads)])
    for got, want in zip(*results, strict=True):
        assert got.shape == want.shape
        assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
