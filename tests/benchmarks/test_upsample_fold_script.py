"""`benchmarks/upsample_fold.py`: finds every upsampling of a case's model, times it each way
and the whole model both ways on the CPU, the ways agreeing; and its phase convolutions
compute nearest upsampling then the convolution."""

import json

import pytest
import torch

from diffunet.accel import settings
from diffunet.model.layers.resample import Upsample


def test_every_upsampling_and_the_whole_model_are_timed_each_way(tmp_path, benchmark_script):
    out = tmp_path / "fold.json"
    script = benchmark_script("upsample_fold")
    devices = settings.FOLDED_DEVICES
    argv = ["--quick", "--device", "cpu", "--cases", "ddpm-cifar10", "--iters", "1"]
    argv += ["--model-rounds", "1", "--model-size", "8", "--out", str(out)]
    assert script.main(argv) == 0
    assert devices == settings.FOLDED_DEVICES  # folding is switched back as it was
    data = json.loads(out.read_text())
    from harness.models import build_case, build_ours

    model = build_ours(build_case("ddpm-cifar10", quick=True).config, "meta")
    upsamplings = sum(isinstance(m, Upsample) for m in model.modules())
    rows = data["rows"]
    for variant in ("nearest + conv", "folded", "phase convs"):
        of_variant = [r for r in rows if r["variant"] == variant]
        assert sum(r["count"] for r in of_variant) == upsamplings > 0
        total = data["totals"][f"ddpm-cifar10 / {variant}"]
        assert total["train_ms"] == pytest.approx(
            sum(r["count"] * r["train_ms"] for r in of_variant)
        )
    assert all(row["max_relative_difference"] < 1e-5 for row in rows)
    gradients = data["weight_gradients"]
    assert sum(r["count"] for r in gradients) == upsamplings
    assert all(r["aten_ms"] > 0 and r["phases_ms"] > 0 for r in gradients)
    assert all(r["max_relative_difference"] < 1e-5 for r in gradients)
    counted = data["forward_flops_per_sample"]["ddpm-cifar10"]
    assert 0 < counted["folded"] < counted["nearest + conv"]
    steps = data["model_steps"]["ddpm-cifar10"]
    assert set(steps) == {"nearest + conv", "folded"}
    assert all(t["min_ms"] <= t["median_ms"] for t in steps.values())


@pytest.mark.parametrize(
    ("dims", "factors"), [(1, (2,)), (2, (2, 2)), (3, (2, 2, 2)), (3, (1, 2, 2)), (2, (2, 1))]
)
def test_phase_convolutions_compute_nearest_then_conv(dims, factors, benchmark_script):
    torch.manual_seed(0)
    up = Upsample(dims, 5, factors, "nearest_conv").double()  # the plain module
    x = torch.randn(2, 5, *[3 + i for i in range(dims)], dtype=torch.float64)
    expected = up(x)
    got = benchmark_script("upsample_fold").phase_convolutions(up, x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
