"""`benchmarks/conv_layers.py`: records every convolution of both models of a case, times each
direction on the CPU, and computes each direction of a transposed convolution through the
ordinary convolution it transposes as well."""

import json

import pytest
import torch
from torch import nn

from diffunet.accel import settings


def test_every_convolution_of_both_models_is_recorded_and_timed(tmp_path, benchmark_script):
    pytest.importorskip("diffusers")
    out = tmp_path / "conv.json"
    script = benchmark_script("conv_layers")
    argv = ["--quick", "--device", "cpu", "--cases", "ddpm-cifar10", "--iters", "1"]
    assert script.main([*argv, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    from harness.models import build_case, build_model

    case = build_case("ddpm-cifar10", quick=True)
    rows = data["rows"]
    transposed_calls = 0
    for which in ("ours", "ref"):
        model = build_model(which, case, "cpu")
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        ups = sum(type(m).__name__.endswith(("Upsample", "Upsample2D")) for m in model.modules())
        mine = [r for r in rows if r["model"] == which]
        assert sum(r["count"] for r in mine) == len(convs) > 0  # each runs once per forward
        transposed = sum(r["count"] for r in mine if r["transposed"])
        transposed_calls = transposed_calls + transposed
        folded = which == "ours" and "cpu" in settings.FOLDED_DEVICES
        assert transposed == (ups if folded else 0) and ups > 0
        # only the stem convolves the model's input, which needs no gradient
        assert sum(r["count"] for r in mine if not r["input_grad"]) == 1
        for r in mine:
            names = {"forward", "weight grad"} | ({"input grad"} if r["input_grad"] else set())
            names |= set(script.SWAPPED) if r["transposed"] else set()
            assert set(r["directions"]) == names
            assert all(d["ms"] > 0 and d["tflops"] > 0 for d in r["directions"].values())
        total = data["totals"][f"ddpm-cifar10 / {which}"]
        assert total["train_ms"] == pytest.approx(sum(script.step_ms(r, "train") for r in mine))
        assert 0 < total["infer_ms"] < total["train_ms"]
    differences = [d for r in rows if r["transposed"] for d in r["swapped_differences"].values()]
    assert len(differences) == 3 * transposed_calls > 0 and max(differences) < 1e-5


def test_swapped_directions_are_the_transposed_convolutions_own(benchmark_script):
    """Against autograd of `F.conv_transpose3d` itself, float64, stride 2 and padding 1 as a
    folded upsampling runs it."""
    script = benchmark_script("conv_layers")
    x = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv_transpose3d(x, w, stride=2, padding=1)
    go = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), go)
    call = script.ConvCall(
        tuple(x.shape), tuple(w.shape), False, (2,) * 3, (1,) * 3, (1,) * 3, True, (0,) * 3, 1, True
    )
    got = {name: run() for name, run in script.swapped(call, x.detach(), w.detach(), go).items()}
    torch.testing.assert_close(got["forward"], y.detach())
    torch.testing.assert_close(got["input grad"], dx)
    torch.testing.assert_close(got["weight grad"], dw)
