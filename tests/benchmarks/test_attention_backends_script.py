"""`benchmarks/attention_backends.py`: finds every attention call of a case's model, times each
shape under the default choice and each backend asked for on the CPU, the backends agreeing,
and reports a backend that cannot run a shape instead of failing."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend

from diffunet.model.layers.transformer import TransformerBlock


def test_every_attention_call_is_timed_under_each_backend(tmp_path, benchmark_script):
    out = tmp_path / "attention.json"
    script = benchmark_script("attention_backends")
    argv = ["--quick", "--device", "cpu", "--cases", "sd15", "--iters", "1"]
    argv += ["--backends", "math", "--out", str(out)]
    assert script.main(argv) == 0
    data = json.loads(out.read_text())
    from harness.models import build_case, build_ours

    model = build_ours(build_case("sd15", quick=True).config, "meta")
    blocks = sum(isinstance(m, TransformerBlock) for m in model.modules())
    rows = data["rows"]
    for backend in ("default", "math"):
        of_backend = [r for r in rows if r["backend"] == backend]
        # Each transformer block attends twice: to its own tokens and to the 8 context tokens.
        assert sum(r["count"] for r in of_backend) == 2 * blocks > 0
        assert {r["shape"][3] for r in of_backend} > {8}
        total = data["totals"]["sd15"][backend]
        assert total["train_ms"] == pytest.approx(
            sum(r["count"] * r["train_ms"] for r in of_backend)
        )
    assert all(r["max_relative_difference"] < 1e-5 for r in rows)


def test_a_backend_that_cannot_run_a_shape_is_reported(benchmark_script):
    script = benchmark_script("attention_backends")
    # No CUDA here: the cuDNN backend has no kernel for CPU tensors.
    rows = script.measure((1, 2, 8, 8, 16), ["cudnn"], torch.device("cpu"), torch.float32, 1)
    assert [r["backend"] for r in rows] == ["default", "cudnn"]
    assert "error" in rows[1] and "forward_ms" in rows[0]
    rows = [{"case": "c", "count": 3, **row} for row in rows]
    assert set(script.totals(rows)["c"]) == {"default"}
    assert script.BACKENDS["cudnn"] is SDPBackend.CUDNN_ATTENTION


def test_the_accelerators_explicit_attention_is_timed_beside_the_backends(benchmark_script):
    script = benchmark_script("attention_backends")
    # One 64-channel head, as `ldm`'s single head at its attention level (512 there).
    rows = script.measure((2, 1, 16, 16, 64), ["explicit"], torch.device("cpu"), torch.float32, 1)
    assert [r["backend"] for r in rows] == ["default", "explicit"]
    assert rows[1]["max_relative_difference"] < 1e-5 and rows[1]["train_ms"] > 0
    with pytest.raises(SystemExit):
        script.main(["--quick", "--device", "cpu", "--backends", "explicit,fused"])
