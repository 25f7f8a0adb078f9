"""Exact resume: SIGKILL a training subprocess mid-run, then SIGTERM and SIGINT the resumed\nruns, `--resume` each time, and get the weights of an uninterrupted run."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffunet.cli import main
from diffunet.training.run_log import RunLog, last_logged_step
from diffunet.training.state import load_training_state

STEPS = 40
ARGS = [
    "--steps",
    str(STEPS),
    "--checkpoint-every",
    "10",
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
    "5",
    "--seed",
    "3",
    "model_channels=16",
    "norm_groups=8",
    "channel_mult=[1,2]",
    "attention_resolutions=[2]",
    "num_res_blocks=1",
    "dropout=0.1",
]


def _kill_when(run: Path, process: subprocess.Popen, step: int, timeout: float = 240) -> None:
    """SIGKILL `process` once its log shows `step` (between two checkpoints)."""
    deadline = time.monotonic() + timeout
    while last_logged_step(run) < step:
        if process.poll() is not None:
            pytest.fail(
                f"training ended (rc {process.returncode}) before step {step}: "
                f"{process.stderr.read()}"
            )
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("training did not progress")
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def _train_subprocess(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "diffunet", "train", "--out", str(run), *ARGS, *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def _signal_at(step: int, signum: int) -> Iterator[None]:
    """Send this process `signum` when the trainer finishes `step` (in-process runs)."""
    tick = RunLog.tick

    def tick_and_signal(self: RunLog, done: int) -> None:
        tick(self, done)
        if done == step:
            signal.raise_signal(signum)

    RunLog.tick = tick_and_signal  # type: ignore[method-assign]
    try:
        yield
    finally:
        RunLog.tick = tick  # type: ignore[method-assign]


def test_sigkill_and_resume_match_an_uninterrupted_run(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(tmp_path / "straight"), *ARGS]) == 0

        run = tmp_path / "killed"
        _kill_when(run, _train_subprocess(run), step=15)  # after the step-10 checkpoint
        assert load_training_state(run / "train_state.pt")["step"] == 10
        _kill_when(run, _train_subprocess(run, "--resume"), step=25)  # a second kill, later
        last = load_training_state(run / "train_state.pt")["step"]
        assert last in (20, 30)
        capsys.readouterr()
        # SIGTERM, then Ctrl-C: each saves the step it arrived in and exits 143 / 130.
        for signum, step, code in ((signal.SIGTERM, 33, 143), (signal.SIGINT, 36, 130)):
            with _signal_at(step, signum):
                assert main(["train", "--out", str(run), "--resume", *ARGS]) == code
            err = capsys.readouterr().err
            assert f"from step {last} " in err  # it did not start over
            assert (
                f"interrupted at step {step}; resume with: diffunet train --resume --out {run}"
                in err
            )
            assert load_training_state(run / "train_state.pt")["step"] == step
            last = step
        assert main(["train", "--out", str(run), "--resume", *ARGS]) == 0
        assert f"from step {last} " in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)

    straight = load_training_state(tmp_path / "straight" / "train_state.pt")
    resumed = load_training_state(run / "train_state.pt")
    assert resumed["step"] == straight["step"] == STEPS
    for part in ("model", "ema"):
        a = straight[part] if part == "model" else straight[part]["weights"]
        b = resumed[part] if part == "model" else resumed[part]["weights"]
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-6, f"{part} differs by {worst}"
    ema_a = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    ema_b = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) <= 1e-6
    steps = [int(r.split(",")[0]) for r in (run / "log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # the log reads as one run
