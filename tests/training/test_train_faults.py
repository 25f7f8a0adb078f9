"""Faults a long run must survive: divergence, a second process, signals, a full disk, stale
temporary files, a damaged config.yaml."""

import contextlib
import errno
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from diffunet.cli import main
from diffunet.errors import StorageError
from diffunet.model.checkpoint import atomic_write_bytes
from diffunet.training.distributed import DistInfo
from diffunet.training.divergence import NonFiniteWatch, nonfinite_tensors
from diffunet.training.interrupts import StopSignals
from diffunet.training.run_lock import RunLock
from diffunet.training.state import load_training_state

TINY = [
    "--image-size",
    "8",
    "--batch-size",
    "16",
    "--threads",
    "1",
    "--precision",
    "fp32",
    "--sample-steps",
    "2",
    "--sample-every",
    "0",
    "--no-eval",
    "--seed",
    "5",
    "model_channels=16",
    "norm_groups=8",
    "channel_mult=[1,2]",
    "attention_resolutions=[]",
    "num_res_blocks=1",
]


def train(capsys, *argv: str) -> tuple[int, str]:
    """`diffunet train ...` in-process: (exit code, stderr)."""
    code = main(["train", *[str(a) for a in argv], *TINY])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def assert_finite_state(run: Path) -> int:
    state = load_training_state(run / "train_state.pt")
    assert nonfinite_tensors({k: state[k] for k in ("model", "ema", "optimizer")}) == []
    return int(state["step"])


def test_divergence_between_log_steps_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    diverge = ["--lr", "10", "--grad-clip", "0", "--warmup", "0"]
    code, err = train(
        capsys,
        "--out",
        run,
        "--steps",
        "12",
        "--checkpoint-every",
        "3",
        "--log-every",
        "10",
        *diverge,
    )
    line = one_line(err)
    assert code == 1 and "NaN/inf at step" in line and "--resume" in line, line
    bad_step = int(line.split("NaN/inf at step ")[1].split(";")[0])
    saved = assert_finite_state(run)  # nothing non-finite reached the disk
    assert saved % 3 == 0 and saved < bad_step <= 12
    assert f"nothing after step {saved} was saved" in line

    # A second process on the same folder is refused, naming the holder.
    with RunLock(run):
        code, err = train(capsys, "--out", run, "--resume")
    assert code == 1 and f"PID {os.getpid()}" in one_line(err)

    # The last good state resumes (the stale temporary file of a killed write goes away) and
    # replays the same steps exactly: the same divergence at the same step, still nothing on disk.
    stale = run / ".train_state.pt.abc123.tmp"
    stale.write_bytes(b"partial")
    code, err = train(capsys, "--out", run, "--resume", "--steps", "12", *diverge)
    assert code == 1 and f"from step {saved} " in err and "removed 1 temporary file" in err
    assert one_line(err) == line and not stale.exists()
    assert assert_finite_state(run) == saved


def test_a_damaged_config_yaml_is_named_and_a_missing_one_is_restored(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(capsys, "--out", run, "--steps", "2")[0] == 0  # batch size 16
    text = (run / "config.yaml").read_text()
    config = yaml.safe_load(text)
    del config["train"]["batch_size"]  # as a truncation in the middle of the train section does
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    code, err = main(["train", "--out", str(run), "--resume", "--steps", "3"]), capsys.readouterr()
    line = one_line(err.err)
    assert code == 1 and "does not match the run's config saved in train_state.pt" in line
    assert "train.batch_size 64 there, 16 saved" in line

    (run / "config.yaml").unlink()
    code = main(["train", "--out", str(run), "--resume", "--steps", "3"])
    err = capsys.readouterr().err
    assert code == 0 and "resuming with the config saved in train_state.pt" in err
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"] == 16


def test_the_watch_names_the_first_non_finite_step_even_past_its_window():
    one, nan, inf = torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))
    watch = NonFiniteWatch(torch.device("cpu"), window=4)
    assert watch.first_bad_step() is None  # nothing observed yet
    for step in (1, 2, 3):
        watch.observe(step, one, one)
    assert watch.first_bad_step() is None
    watch.observe(4, one, None)
    watch.observe(5, one, inf)  # a finite loss with an infinite gradient norm
    watch.observe(6, nan, None)
    assert watch.first_bad_step() == 5
    unchecked = NonFiniteWatch(torch.device("cpu"), window=2)
    for step, loss in ((1, nan), (2, one), (3, one)):  # step 3 overflows the window: checks
        unchecked.observe(step, loss, None)
    assert unchecked.first_bad_step() == 1


def test_stop_signals_record_the_first_and_end_at_the_second():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals(DistInfo()) as stops:
        assert not stops.stop_now()
        signal.raise_signal(signal.SIGTERM)
        assert stops.stop_now() and stops.signum == signal.SIGTERM
        with pytest.raises(SystemExit) as exit_info:
            signal.raise_signal(signal.SIGTERM)
        assert exit_info.value.code == 128 + signal.SIGTERM
    with StopSignals(DistInfo()) as stops:
        signal.raise_signal(signal.SIGINT)
        assert stops.stop_now() and stops.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@contextlib.contextmanager
def full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: str):
    """A folder on a small tmpfs where the tests run as root and may mount; else one whose
    `torch.save` fails with ENOSPC after writing part of the file."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
            capture_output=True,
        ).returncode
        == 0
    )
    if not mounted:
        real_save, calls = torch.save, []

        def save(obj, f, *args, **kwargs):
            calls.append(f)
            if len(calls) == 1:
                return real_save(obj, f, *args, **kwargs)
            Path(f).write_bytes(b"\0" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 1000")

        monkeypatch.setattr(torch, "save", save)
        usage = type(shutil.disk_usage(tmp_path))
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))
    try:
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_previous_state(tmp_path, capsys, monkeypatch):
    # The second state write does not fit: the first checkpoint's (2.8 MB) plus a new
    # state's temporary copy (2.1 MB) exceed the 4 MB.
    with full_disk(tmp_path, monkeypatch, "4m") as folder:
        run = folder / "run"
        code, err = train(capsys, "--out", run, "--steps", "6", "--checkpoint-every", "3")
        line = one_line(err)
        assert code == 1 and "the disk is full" in line and "train_state.pt" in line, line
        assert assert_finite_state(run) == 3  # the previous state is intact
        leftovers = [p.name for p in run.rglob("*.tmp")]
        assert leftovers == []


def test_atomic_write_names_what_failed(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def no_space(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError, match="the disk is full: writing .*file.bin"):
        atomic_write_bytes(target, no_space)
    with pytest.raises(StorageError, match="cannot write .*inside"):
        atomic_write_bytes(target / "inside", lambda tmp: None)  # a file is no folder
    with pytest.raises(ZeroDivisionError):  # a bug in the writer stays a bug
        atomic_write_bytes(target, lambda tmp: 1 / 0)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def _stop_worker(rank: int, world: int, init_file: str, results: str) -> None:
    """A training loop without a model: rank 1 alone gets SIGTERM during step 5."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    stops, step = StopSignals(DistInfo(rank=rank, world_size=world)), 0
    while step < 20:
        step += 1
        if rank == 1 and step == 5:
            stops.received = signal.SIGTERM
        if stops.stop_now():
            break
    stops.finish()
    Path(results, f"{rank}.txt").write_text(f"{step} {stops.signum}")
    dist.destroy_process_group()


def test_ranks_agree_on_the_stop_step(tmp_path):
    torch.multiprocessing.spawn(
        _stop_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2
    )
    stopped = {(tmp_path / f"{rank}.txt").read_text() for rank in (0, 1)}
    assert stopped == {f"6 {int(signal.SIGTERM)}"}  # one step after the signal, on both ranks


@pytest.mark.gpu
def test_the_per_step_checks_do_not_wait_for_the_gpu(tmp_path):
    """The NaN watch and the torchrun stop agreement (over NCCL) add no host sync to a step."""
    import torch.distributed as dist

    device = torch.device("cuda", 0)
    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1, device_id=device
    )
    try:
        info = DistInfo(world_size=2, device=device)  # "enabled": the collective path
        watch, stops = NonFiniteWatch(device, 8, info), StopSignals(info)
        weights = torch.randn(1000, device=device, requires_grad=True)
        for step in range(1, 6):
            loss = weights.square().sum()
            loss.backward()
            sync = contextlib.nullcontext() if step == 1 else no_host_sync()  # 1: warm-up
            with sync:
                norm = torch.nn.utils.get_total_norm([weights.grad])
                watch.observe(step, loss, norm)
                assert not stops.stop_now()
            weights.grad = None
        stops.finish()
        assert watch.first_bad_step() is None
        watch.observe(6, torch.tensor(float("nan"), device=device), None)
        assert watch.first_bad_step() == 6
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
