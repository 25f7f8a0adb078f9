"""Export: ONNX (dynamo exporter) runs in onnxruntime and matches PyTorch with a dynamic batch;
`torch.export` programs round-trip through save/load; AOTInductor packages load and run
(slow: set DIFFUNET_SLOW_TESTS=1). Each artifact carries its config."""

import json
import os

import numpy as np
import pytest
import torch

from diffunet import UNet, UNetConfig
from diffunet.cli import main
from diffunet.interop.export import (
    ExportError,
    export_inputs,
    export_model,
    export_program,
    load_aoti,
    load_program,
    run_onnx,
    save_program,
)
from diffunet.model.checkpoint import save_pretrained

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def randomize(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


def reference(model, inputs):
    with torch.no_grad():
        return model(inputs["x"], **{k: v for k, v in inputs.items() if k != "x"})


def max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


TINY = dict(
    in_channels=2,
    out_channels=2,
    model_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    norm_groups=4,
    attention_resolutions=(2,),
    num_heads=2,
)
# One ONNX export covers every option at once (each export takes the exporter ~20 s): every
# input kind (cond concatenated, context cross-attended, labels), 3D, linear attention in the
# levels and full attention in the middle, the aleatoric head, the noise-level embedding. The
# timestep embedding goes through ONNX in test_quantize.py's QDQ test.
EVERYTHING = UNetConfig(
    **{
        **TINY,
        "dims": 3,
        "attention_type": "linear",
        "mid_attention_type": "full",
        "aleatoric": True,
        "time_embed_type": "noise_level",
        "cond_channels": 1,
        "context_dim": 6,
        "num_classes": 3,
    }
)


def test_onnx_matches_pytorch_in_onnxruntime_with_a_dynamic_batch_size_and_tokens(tmp_path):
    import onnx

    config = EVERYTHING
    model = randomize(UNet(config))
    result = export_model(model, tmp_path / "m.onnx", "onnx", dynamic_spatial=True)
    assert result.max_relative_error <= 1e-4
    proto = onnx.load(str(result.path))
    assert [i.name for i in proto.graph.input] == [
        n for n in ("x", "t", "cond", "context", "labels") if n in export_inputs(config)
    ]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert UNetConfig.from_json(meta["diffunet_config"]) == config
    sizes = [(4, 8, 12), (8, 4, 4)]  # multiples of 2
    for seed, (batch, size) in enumerate(zip((1, 5), sizes)):
        inputs = export_inputs(config, batch=batch, size=size, seed=10 + seed)
        # the number of context tokens is dynamic too (traced with 8)
        inputs["context"] = torch.randn(batch, 3 + 10 * seed, config.context_dim)
        assert max_rel(run_onnx(result.path, inputs), reference(model, inputs)) <= 1e-4


@pytest.mark.parametrize("dims", [3])  # 2D: test_export_command
def test_torch_export_program_round_trips_through_save_and_load(tmp_path, dims):
    config = UNetConfig(**{**TINY, "dims": dims, "context_dim": 5})
    model = randomize(UNet(config))
    path = save_program(export_program(model), tmp_path / "m.pt2", config)
    program, stored = load_program(path)
    assert stored == config
    inputs = export_inputs(config, batch=3, seed=4)
    inputs["context"] = torch.randn(3, 21, 5)  # traced with 8 tokens
    got = program.module()(inputs["x"], **{k: v for k, v in inputs.items() if k != "x"})
    torch.testing.assert_close(got, reference(model, inputs), rtol=1e-5, atol=1e-6)


def test_export_refuses_unknown_formats_and_weightless_models(tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(UNet(UNetConfig(**TINY)), tmp_path / "m", "tflite")
    with torch.device("meta"):
        empty = UNet(UNetConfig(**TINY))
    with pytest.raises(ExportError, match="no weights"):
        export_model(empty, tmp_path / "m.pt2", "pt2")


def test_export_command(tmp_path, capsys):
    config = UNetConfig(**{**TINY, "num_classes": 4})
    save_pretrained(randomize(UNet(config)), tmp_path / "ckpt")
    assert (
        main(
            [
                "export",
                "--from",
                str(tmp_path / "ckpt"),
                "--format",
                "pt2",
                "--out",
                str(tmp_path / "m.pt2"),
                "--size",
                "8",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "pt2" and summary["max_relative_error"] <= 1e-4
    assert summary["bytes"] == os.path.getsize(tmp_path / "m.pt2")
    assert (
        main(
            [
                "export",
                "--from",
                str(tmp_path / "ckpt"),
                "--format",
                "onnx",
                "--out",
                str(tmp_path / "m.onnx"),
                "--size",
                "8",
                "8",
                "8",
            ]
        )
        == 1
    )
    assert "--size takes 1 or 2 values" in capsys.readouterr().err
    bad = np.zeros((2, 1, 8, 8), np.float32)
    bad[0, 0, 1, 1] = np.inf
    np.save(tmp_path / "calib.npy", bad)
    args = ["--from", str(tmp_path / "ckpt"), "--format", "onnx", "--out", str(tmp_path / "q")]
    assert main(["export", *args, "--int8", "--calibration-data", str(tmp_path / "calib.npy")]) == 1
    assert "calib.npy holds 1 non-finite value(s)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DIFFUNET_SLOW_TESTS"),
    reason="AOTInductor compiles C++ for about a minute; set DIFFUNET_SLOW_TESTS=1",
)
def test_aoti_package_loads_and_runs(tmp_path):
    config = UNetConfig(**{**TINY, "num_classes": 3, "cond_channels": 1})
    model = randomize(UNet(config))
    result = export_model(model, tmp_path / "m.aoti.pt2", "aoti")
    assert result.max_relative_error <= 1e-4
    runner = load_aoti(result.path)
    assert UNetConfig.from_json(runner.get_metadata()["diffunet_config"]) == config
    inputs = export_inputs(config, batch=5, seed=3)
    got = runner(inputs["x"], **{k: v for k, v in inputs.items() if k != "x"})
    assert max_rel(got, reference(model, inputs)) <= 1e-4
