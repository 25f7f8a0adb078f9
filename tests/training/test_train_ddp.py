"""Data-parallel training: 2 gloo processes under torchrun match one process, with DDP's hooks
and with the gradients all-reduced after the backward; on a GPU, a 1-process NCCL group's
replayed steps match a plain process's."""

import subprocess
import sys

import pytest
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


def torchrun(processes: int, out, *args: str) -> subprocess.CompletedProcess:
    """`diffunet train --out OUT ARGS` under torchrun with `processes` processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={processes}", "-m", "diffunet", "train", "--out", str(out)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def single_cpu_run(tmp_path_factory):
    """The run folder of ARGS trained in one process (shared by the data-parallel runs)."""
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(out), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("grad_sync", ["ddp", "after-backward"])
def test_two_gloo_processes_match_one(tmp_path, grad_sync, single_cpu_run):
    result = torchrun(2, tmp_path / "ddp", *ARGS, "--grad-sync", grad_sync)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2× cpu" in result.stderr  # the banner: both processes trained
    after = "gradients all-reduced after the backward"
    assert (after in result.stderr) == (grad_sync == "after-backward")
    assert result.stdout.count("trained 12 steps") == 1  # rank 0 alone reports

    assert load_training_state(tmp_path / "ddp" / "train_state.pt")["step"] == 12
    assert_same_training_state(single_cpu_run, tmp_path / "ddp")


def assert_same_training_state(a_dir, b_dir) -> None:
    """The two runs' weights and EMA agree up to floating-point reduction order."""
    a, b = (load_training_state(d / "train_state.pt") for d in (a_dir, b_dir))
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        x = a[part] if part == "model" else a[part]["weights"]
        y = b[part] if part == "model" else b[part]["weights"]
        assert x.keys() == y.keys()
        worst = max((x[k] - y[k]).abs().max().item() for k in x)
        scale = max(x[k].abs().max().item() for k in x)
        # identical up to floating-point reduction order (gradient all-reduce vs one batch mean)
        assert worst <= 1e-4 * scale, f"{part}: max difference {worst} (weights up to {scale})"


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_a_one_process_nccl_group_replays_the_steps_of_a_plain_run(tmp_path, compiled):
    """torchrun with one process joins an NCCL group and takes the data-parallel path: its
    replayed steps (CUDA graphs, gradients all-reduced after the backward over a world of one)
    train as the same run without torchrun."""
    gpu = [a for a in ARGS if a not in ("--device", "cpu")] + ["--device", "cuda"]
    gpu += ["--compile"] if compiled else []
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(tmp_path / "single"), *gpu]) == 0
    finally:
        torch.set_num_threads(threads)
    result = torchrun(1, tmp_path / "group", *gpu)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1× cuda, gradients all-reduced after the backward" in result.stderr
    assert ("CUDA graphs" in result.stderr) != compiled
    assert ("reduce-overhead" in result.stderr) == compiled
    assert_same_training_state(tmp_path / "single", tmp_path / "group")
