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
    assert (
        benchmark_script("conv_channels").main(
            ["--quick", "--device", "cpu", "--iters", "1", "--out", str(out)]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert {(r["case"], r["conv"]) for r in rows} == {
        (case, conv) for case in ("3d", "ldm", "ddpm-cifar10") for conv in ("stem", "head")
    }
    assert len(rows) == 12
    stems = [r for r in rows if r["conv"] == "stem"]
    assert all(r["in_channels"] in (2, 3) for r in stems)  # image, or image + condition
    for row in rows:
        assert row["forward_ms"] > 0 and row["train_ms"] > 0
        assert row["max_relative_difference"] < 1e-5
