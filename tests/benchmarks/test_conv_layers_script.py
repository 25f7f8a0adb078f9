"""`benchmarks/conv_layers.py`: records every convolution of both models of a case and times
each direction on the CPU."""

import json

import pytest
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
    for which in ("ours", "ref"):
        model = build_model(which, case, "cpu")
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        ups = sum(type(m).__name__.endswith(("Upsample", "Upsample2D")) for m in model.modules())
        mine = [r for r in rows if r["model"] == which]
        assert sum(r["count"] for r in mine) == len(convs) > 0  # each runs once per forward
        transposed = sum(r["count"] for r in mine if r["transposed"])
        folded = which == "ours" and "cpu" in settings.FOLDED_DEVICES
        assert transposed == (ups if folded else 0) and ups > 0
        # only the stem convolves the model's input, which needs no gradient
        assert sum(r["count"] for r in mine if not r["input_grad"]) == 1
        for r in mine:
            names = {"forward", "weight grad"} | ({"input grad"} if r["input_grad"] else set())
            assert set(r["directions"]) == names
            assert all(d["ms"] > 0 and d["tflops"] > 0 for d in r["directions"].values())
        total = data["totals"][f"ddpm-cifar10 / {which}"]
        assert total["train_ms"] == pytest.approx(sum(script.step_ms(r, "train") for r in mine))
        assert 0 < total["infer_ms"] < total["train_ms"]
