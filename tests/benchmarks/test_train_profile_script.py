"""`benchmarks/train_profile.py`: a profiled window of a real `diffunet train` run (CPU here)."""

import json

import numpy as np
import pytest


def test_profiles_the_steps_asked_for_and_writes_json(tmp_path, benchmark_script, capsys):
    script = benchmark_script("train_profile")
    data = tmp_path / "data.npy"
    np.save(data, np.random.default_rng(0).random((16, 3, 16, 16), dtype=np.float32))
    code = script.main(
        [
            "--tag",
            "tiny",
            "--first",
            "2",
            "--last",
            "4",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--",
            "train",
            "--data",
            str(data),
            "--preset",
            "ddpm-cifar10",
            "--image-size",
            "16",
            "--batch-size",
            "4",
            "--steps",
            "5",
            "--precision",
            "fp32",
            "--device",
            "cpu",
            "--checkpoint-every",
            "0",
            "--sample-every",
            "0",
            "--log-every",
            "5",
            "--threads",
            "1",
            "--sampler",
            "euler",
            "--sample-steps",
            "1",
            "--no-eval",
            "--out",
            str(tmp_path / "run"),
            "model_channels=16",
            "norm_groups=8",
            "channel_mult=[1,2]",
            "attention_resolutions=[]",
            "num_res_blocks=1",
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "train-profile-tiny-rank0.json").read_text())
    assert result["steps"] == 2 and result["rank"] == 0
    from harness.profiling import KERNEL_CLASSES

    assert set(result["classes"]) == set(KERNEL_CLASSES)
    assert result["classes"]["convolution"] > 0  # a training step convolves
    assert result["gpu_ms_per_step"] == pytest.approx(sum(result["classes"].values()))
    ops = [row["op"] for row in result["host_self_ms_per_step"]]
    assert any("convolution" in op for op in ops)
    assert "[tiny rank 0]" in capsys.readouterr().out
    from diffunet.training.run_log import RunLog

    assert RunLog.tick.__name__ == "tick"  # the hook is gone after the run


def test_bad_windows_and_a_missing_command_are_refused(benchmark_script):
    script = benchmark_script("train_profile")
    with pytest.raises(SystemExit):
        script.main(["--first", "5", "--last", "5", "--", "train"])
    with pytest.raises(SystemExit):
        script.main(["--first", "1", "--last", "3"])
