"""The thin 3D convolution kernels (`diffunet.accel.thin_conv`): they compute `F.conv3d` and its
gradients, under Triton's CPU interpreter here (float32 and float16: the interpreter's bfloat16
`tl.dot` is wrong) and in bfloat16 on the GPU when present; `convolve` calls them only for the
convolutions they serve, and only when switched on."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from diffunet.accel import thin_conv
from diffunet.accel.conv import convolve
from diffunet.model.layers.ops import conv_nd

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CPU-only torch)")


@pytest.fixture
def enabled(monkeypatch):
    """Kernels on (whatever `DIFFUNET_THIN_CONV` says), and CPU tensors taken as if Triton
    interpreted them."""
    monkeypatch.setattr(thin_conv, "_ENABLED", True)
    monkeypatch.setattr(thin_conv, "_interpreting", lambda: True)


def test_on_by_default_and_never_for_cpu_tensors_without_the_interpreter():
    conv, x = conv_nd(3, 2, 16, 3, padding=1), torch.randn(1, 2, 4, 4, 4)
    if os.environ.get("DIFFUNET_THIN_CONV") != "0":
        assert thin_conv._ENABLED
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not thin_conv.takes(conv, x)


@pytest.mark.parametrize(
    ("cin", "cout", "channels_last"), [(2, 16, True), (16, 1, True), (3, 5, False)]
)
def test_ops_compute_with_aten_where_the_kernels_cannot_run(cin, cout, channels_last, monkeypatch):
    """On a GPU without bf16 tensor cores the same ops run ATen: the same numbers (against
    float64 `F.conv3d`) and the layouts their fake versions promise."""
    monkeypatch.setattr(thin_conv, "_runs_kernels", lambda device: False)
    torch.manual_seed(0)
    x = torch.randn(2, cin, 3, 4, 5)
    w, b, g = torch.randn(cout, cin, 3, 3, 3), torch.randn(cout), torch.randn(2, cout, 3, 4, 5)
    if channels_last:
        x, w, g = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, w, g))
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    want = torch.nn.functional.conv3d(x64, w64, b64, padding=1)
    wants = torch.autograd.grad(want, [x64, w64, b64], g.double())
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    got = thin_conv.thin_conv3d(*args)
    gots = torch.autograd.grad(got, args, g)
    for a, e in zip([got, *gots], [want, *wants], strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-4)
    torch.library.opcheck(thin_conv.thin_conv3d, (x, w, b))
    torch.library.opcheck(thin_conv.thin_conv3d_backward, (g, x, w, True, True))


@needs_triton
def test_which_convolutions_the_kernels_take(enabled):
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
    thin_conv.set_thin_conv_enabled(False)  # the fixture restores the setting
    assert not thin_conv.takes(conv_nd(3, 2, 16, 3, padding=1), x2)


@pytest.mark.parametrize(
    ("setting", "wanted"),
    [
        ("auto", {(64, 1): True, (54, 2): True, (53, 2): False, (16, 1): False, (64, 3): False}),
        ("always", {(64, 1): True, (16, 1): True, (8, 5): True}),
        ("never", {(64, 1): False, (128, 1): False}),
    ],
)
def test_which_heads_forward_by_tap_products(setting, wanted, monkeypatch):
    monkeypatch.setattr(thin_conv, "TAP_PRODUCT_FORWARD", setting)
    calls = []

    def tap_products(x, weight, bias):
        calls.append(tuple(weight.shape[:2]))
        return torch.nn.functional.conv3d(x, weight, bias, padding=1)

    monkeypatch.setattr(thin_conv, "_tap_product_forward", tap_products)
    for (cin, cout), want in wanted.items():
        x, weight = torch.randn(1, cin, 2, 3, 2), torch.randn(cout, cin, 3, 3, 3)
        calls.clear()
        y = thin_conv._thin_output(x, weight, None)
        assert calls == ([(cout, cin)] if want else []), (setting, cin, cout)
        torch.testing.assert_close(y, torch.nn.functional.conv3d(x, weight, padding=1))


@pytest.mark.parametrize(
    ("value", "setting"),
    [(None, "auto"), ("auto", "auto"), ("1", "always"), ("Always", "always"), ("0", "never")],
)
def test_tap_product_setting_from_the_environment(value, setting, monkeypatch):
    name = "DIFFUNET_TAP_PRODUCT_FORWARD"
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    assert thin_conv._tap_product_setting(name) == setting


def test_a_bad_tap_product_setting_warns_and_keeps_auto(monkeypatch):
    monkeypatch.setenv("DIFFUNET_TAP_PRODUCT_FORWARD", "yes")
    with pytest.warns(UserWarning, match="'yes' is not one of auto, always, never"):
        assert thin_conv._tap_product_setting("DIFFUNET_TAP_PRODUCT_FORWARD") == "auto"


INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from diffunet import UNet
    from diffunet.benchmark import UNET_3D
    from diffunet.accel import thin_conv
    from diffunet.accel.conv import convolve
    from diffunet.model.layers.ops import conv_nd

    torch.manual_seed(0)
    thin_conv.TAP_PRODUCT_FORWARD = "always"  # every head's forward by the kernels, not ATen
    worst = {}
    cases = [((2, 16), (2, 3, 5, 4), True, True), ((16, 1), (1, 4, 3, 5), True, True),
             ((3, 5), (2, 3, 3, 3), False, False), ((8, 33), (1, 2, 3, 2), True, True),
             ((1, 16), (1, 3, 4, 3), False, True), ((12, 3), (1, 3, 2, 4), False, True),
             ((2, 16), (2, 1, 1, 1), True, True), ((16, 2), (2, 1, 3, 1), True, False)]
    for dtype in (torch.float32, torch.float16):
        for (cin, cout), spatial, channels_last, bias in cases:
            x = torch.randn(spatial[0], cin, *spatial[1:])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            w, b = torch.randn(cout, cin, 3, 3, 3), torch.randn(cout) if bias else None
            g = torch.randn(spatial[0], cout, *spatial[1:]).to(dtype)
            # the float64 reference sees the same rounded numbers
            x, w, b = (None if t is None else t.to(dtype).float() for t in (x, w, b))
            x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
            b64 = None if b is None else b.double().requires_grad_()
            want = F.conv3d(x64, w64, b64, padding=1)
            inputs = [x64, w64] + ([b64] if bias else [])
            wants = torch.autograd.grad(want, inputs, g.double())
            args = [t.to(dtype).requires_grad_() for t in (x, w)]
            args.append(None if b is None else b.to(dtype).requires_grad_())
            got = thin_conv.thin_conv3d(*args)
            assert got.dtype == dtype and got.shape == want.shape
            # a one-channel input is channels-last too, and so is the wide output
            channels_last_out = channels_last or cin == 1
            assert got.is_contiguous(memory_format=torch.channels_last_3d) == channels_last_out
            gots = torch.autograd.grad(got, [a for a in args if a is not None], g.to(dtype))
            for name, a, e in zip(("out", "x", "weight", "bias"), [got, *gots], [want, *wants]):
                error = ((a.double() - e).abs().max() / e.abs().max()).item()
                worst[dtype, name] = max(worst.get((dtype, name), 0.0), error)
    print(worst)
    assert all(v < (1e-6 if dtype == torch.float32 else 3e-3) for (dtype, _), v in worst.items())

    # inputs that are views with strides of their own: a channel slice, a transposed volume
    for x in (torch.randn(2, 3, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)[:, :2],
              torch.randn(2, 2, 5, 4, 3).transpose(2, 4)):
        w, b = torch.randn(16, 2, 3, 3, 3), torch.randn(16)
        want = F.conv3d(x.double(), w.double(), b.double(), padding=1)
        got = thin_conv.thin_conv3d(x, w, b).double()
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6

    # a head's forward in groups of samples whose tap products fit the budget: here one each
    thin_conv.TAP_PRODUCTS_BYTES = 1
    x, w, b = torch.randn(3, 12, 2, 3, 4), torch.randn(2, 12, 3, 3, 3), torch.randn(2)
    want = F.conv3d(x.double(), w.double(), b.double(), padding=1)
    got = thin_conv.thin_conv3d(x, w, b).double()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6
    thin_conv.TAP_PRODUCTS_BYTES = 64 << 20

    # schema, fake kernels (strides included) and autograd registration, as PyTorch checks ops
    for cin, cout, channels_last in ((2, 16, True), (16, 1, True), (3, 5, False)):
        x = torch.randn(2, cin, 3, 4, 3, requires_grad=True)
        w = torch.randn(cout, cin, 3, 3, 3, requires_grad=True)
        g = torch.randn(2, cout, 3, 4, 3)
        if channels_last:
            x, w, g = (t.detach().contiguous(memory_format=torch.channels_last_3d)
                       for t in (x, w, g))
        torch.library.opcheck(thin_conv.thin_conv3d, (x, w, torch.randn(cout)))
        torch.library.opcheck(thin_conv.thin_conv3d_backward,  # no double backward
                              (g, x.detach(), w.detach(), True, True))

    thin_conv.set_thin_conv_enabled(True)
    routed = []
    def backend(gm, inputs):
        routed.extend(str(n.target) for n in gm.graph.nodes)
        return gm
    conv = conv_nd(3, 2, 16, 3, padding=1)
    x = torch.randn(1, 2, 4, 5, 3).contiguous(memory_format=torch.channels_last_3d)
    torch.compile(lambda x: convolve(conv, x), backend=backend)(x)
    assert "diffunet.thin_conv3d.default" in routed, routed
    compiled = torch.compile(lambda x: convolve(conv, x), backend="aot_eager")
    torch.testing.assert_close(compiled(x), conv(x), rtol=1e-5, atol=1e-5)

    # Inductor checks the strides of what the ops return against their fake versions;
    # channels-last weights (as the model keeps them on a GPU) are the case to get right.
    for conv in (conv_nd(3, 2, 16, 3, padding=1), conv_nd(3, 16, 1, 3, padding=1)):
        conv = conv.to(memory_format=torch.channels_last_3d)
        x = torch.randn(2, conv.in_channels, 4, 3, 5).contiguous(
            memory_format=torch.channels_last_3d).requires_grad_()
        grads = []
        for step in (torch.compile(lambda x: convolve(conv, x)), conv):
            step(x).square().sum().backward()
            grads.append([t.grad.clone() for t in (x, conv.weight, conv.bias)])
            x.grad = None
            conv.zero_grad()
        for got, want in zip(*grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    model = UNet(UNET_3D.replace(model_channels=16, channel_mult=(1, 2), norm_groups=8,
                                 num_head_channels=8, attention_resolutions=()))
    x = torch.randn(2, 1, 4, 6, 4)
    cond, t = torch.randn_like(x), torch.tensor([3, 7])
    results = []
    for on in (True, False):
        thin_conv.set_thin_conv_enabled(on)
        out = model(x, t, cond=cond)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (out, grads), (want, wants) = results
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    print("ok")
""")


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below checks the real kernels")
def test_kernels_compute_conv3d_and_its_gradients_under_the_interpreter():
    """Forward and the three gradients against float64 `F.conv3d`, channels-last and
    contiguous, odd sizes, with and without bias; compiled graphs call the op; a 3D U-Net with
    the kernels computes what it does without them."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETER_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
def test_bf16_kernels_match_cudnn_on_the_gpu(channels, spatial, tap_products, monkeypatch):
    monkeypatch.setattr(thin_conv, "_ENABLED", True)
    monkeypatch.setattr(thin_conv, "TAP_PRODUCT_FORWARD", tap_products)
    torch.manual_seed(0)
    conv = conv_nd(3, *channels, 3, padding=1).cuda().to(memory_format=torch.channels_last_3d)
    x = torch.randn(spatial[0], channels[0], *spatial[1:], device="cuda")
    x = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    assert thin_conv.takes(conv, x)
    grad = torch.randn(spatial[0], channels[1], *spatial[1:], device="cuda")
    results = []
    for on in (True, False):
        thin_conv.set_thin_conv_enabled(on)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = thin_conv.convolve(conv, x, with_bias=True) if on else conv(x)
        grads = torch.autograd.grad(out, [x, *conv.parameters()], grad.to(out.dtype))
        results.append([out.float(), *(g.float() for g in grads)])
    thin_conv.set_thin_conv_enabled(False)
    for got, want in zip(*results, strict=True):
        assert got.shape == want.shape
        assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
