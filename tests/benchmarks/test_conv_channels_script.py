"""`benchmarks/conv_channels.py`: zero-padded stem and head convolutions compute exactly what
the plain ones do, and the script times both on the CPU end to end."""

import json

import pytest
import torch

from diffunet.model.layers.ops import conv_nd


@pytest.mark.parametrize(
    ("dims", "channels"), [(2, (3, 16)), (3, (2, 16)), (3, (16, 1)), (2, (16, 3)), (2, (8, 16))]
)
def test_padded_convolution_equals_the_plain_one_with_all_gradients(
    dims, channels, benchmark_script
):
    script = benchmark_script("conv_channels")
    torch.manual_seed(0)
    conv = conv_nd(dims, *channels, 3, padding=1).double()
    x = torch.randn(2, channels[0], *[6] * dims, dtype=torch.double, requires_grad=True)
    plain, padded = conv(x), script.padded_convolution(conv, x)
    assert padded.shape == plain.shape
    torch.testing.assert_close(padded, plain)
    grad = torch.randn_like(plain)
    inputs = [x, *conv.parameters()]
    for got, want in zip(
        torch.autograd.grad(padded, inputs, grad),
        torch.autograd.grad(plain, inputs, grad),
        strict=True,
    ):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


def test_the_script_times_every_stem_and_head_both_ways(tmp_path, benchmark_script):
    out = tmp_path / "conv.json"
    script = benchmark_script("conv_channels")
    assert script.main(["--quick", "--device", "cpu", "--iters", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    cases = ("3d", "ldm", "ddpm-cifar10")
    assert [(r["case"], r["conv"], r["variant"]) for r in rows] == [
        (case, conv, variant)
        for case in cases
        for conv in ("stem", "head")
        for variant in ("as is", "padded to 8")
    ]  # thin_conv's variants need a GPU
    from harness.models import build_case

    for row in rows:
        config = build_case(row["case"], quick=True).config
        if row["conv"] == "stem":  # image, or image + condition, into the first level's width
            assert row["in_channels"] == config.in_channels + config.cond_channels
            assert row["out_channels"] == config.model_channels
        else:
            assert row["out_channels"] == config.out_channels
        spec = build_case(row["case"], quick=True)
        assert row["shape"] == [spec.batch, row["in_channels"], *spec.size]
        assert row["max_relative_difference"] < 1e-5
