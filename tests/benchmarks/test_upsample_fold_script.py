"""`benchmarks/upsample_fold.py`: finds every upsampling of each case's model and times it both
ways on the CPU end to end, the two ways agreeing."""

import json

import pytest
import torch

from diffunet import UNet
from diffunet.benchmark import build_case
from diffunet.model.layers import resample
from diffunet.model.layers.resample import Upsample


def test_every_upsampling_is_timed_both_ways(tmp_path, benchmark_script):
    out = tmp_path / "fold.json"
    devices = resample.FOLDED_DEVICES
    assert (
        benchmark_script("upsample_fold").main(
            ["--quick", "--device", "cpu", "--iters", "1", "--out", str(out)]
        )
        == 0
    )
    assert devices == resample.FOLDED_DEVICES
    data = json.loads(out.read_text())
    for case in ("3d", "ldm", "ddpm-cifar10"):
        rows = [r for r in data["rows"] if r["case"] == case]
        upsamplings = sum(
            isinstance(m, Upsample) for m in UNet(build_case(case, quick=True).config).modules()
        )
        for variant in ("nearest + conv", "folded", "phase convs"):
            of_variant = [r for r in rows if r["variant"] == variant]
            assert sum(r["count"] for r in of_variant) == upsamplings > 0
            total = data["totals"][f"{case} / {variant}"]
            assert total["train_ms"] == sum(r["count"] * r["train_ms"] for r in of_variant)
        counted = data["forward_flops_per_sample"][case]
        assert 0 < counted["folded"] < counted["nearest + conv"]
        for row in rows:
            assert row["forward_ms"] > 0 and row["train_ms"] > 0
            assert row["max_relative_difference"] < 1e-5


def test_whole_model_steps_are_timed_both_ways(tmp_path, benchmark_script):
    out = tmp_path / "steps.json"
    assert (
        benchmark_script("upsample_fold").main(
            [
                "--quick",
                "--device",
                "cpu",
                "--cases",
                "ldm",
                "--model-rounds",
                "2",
                "--no-layers",
                "--model-size",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["rows"] == []
    steps = data["model_steps"]["ldm"]
    assert set(steps) == {"nearest + conv", "folded"}
    assert all(0 < t["min_ms"] <= t["median_ms"] for t in steps.values())


@pytest.mark.parametrize(
    ("dims", "factors"), [(1, (2,)), (2, (2, 2)), (3, (2, 2, 2)), (3, (1, 2, 2)), (2, (2, 1))]
)
def test_phase_convolutions_compute_nearest_then_conv(dims, factors, benchmark_script):
    torch.manual_seed(0)
    up = Upsample(dims, 5, factors, "nearest_conv").double()
    x = torch.randn(2, 5, *[3 + i for i in range(dims)], dtype=torch.float64)
    with resample.folding_on("none"):
        expected = up(x)
    got = benchmark_script("upsample_fold").phase_convolutions(up, x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
