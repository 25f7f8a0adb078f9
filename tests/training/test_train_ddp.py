"""Data-parallel training: 2 gloo processes under torchrun match one process."""

import subprocess
import sys

import torch

from diffunet.cli import main
from diffunet.training.state import load_training_state

ARGS = [
    "--steps",
    "12",
    "--checkpoint-every",
    "0",
    "--sample-every",
    "0",
    "--image-size",
    "8",
    "--batch-size",
    "16",
    "--threads",
    "1",
    "--precision",
    "fp32",
    "--sample-steps",
    "3",
    "--no-eval",
    "--log-every",
    "4",
    "--device",
    "cpu",
    "model_channels=16",
    "norm_groups=8",
    "channel_mult=[1,2]",
    "attention_resolutions=[2]",
    "num_res_blocks=1",
]


def test_two_gloo_processes_match_one(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(tmp_path / "single"), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "diffunet",
            "train",
            "--out",
            str(tmp_path / "ddp"),
            *ARGS,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2× cpu" in result.stderr  # the banner: both processes trained
    assert result.stdout.count("trained 12 steps") == 1  # rank 0 alone reports

    single = load_training_state(tmp_path / "single" / "train_state.pt")
    ddp = load_training_state(tmp_path / "ddp" / "train_state.pt")
    assert ddp["step"] == single["step"] == 12
    for part in ("model", "ema"):
        a = single[part] if part == "model" else single[part]["weights"]
        b = ddp[part] if part == "model" else ddp[part]["weights"]
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        scale = max(a[k].abs().max().item() for k in a)
        # identical up to floating-point reduction order (gradient all-reduce vs one batch mean)
        assert worst <= 1e-4 * scale, f"{part}: max difference {worst} (weights up to {scale})"
