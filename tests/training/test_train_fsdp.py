"""Sharded training (`--parallel fsdp`): 2 gloo processes match one, and resume exactly."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffunet import UNet
from diffunet.cli import main
from diffunet.training.run_log import last_logged_step
from diffunet.training.state import load_training_state

MODEL = [
    "model_channels=16",
    "norm_groups=8",
    "channel_mult=[1,2]",
    "attention_resolutions=[2]",
    "num_res_blocks=1",
]
COMMON = [
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
    "--device",
    "cpu",
    *MODEL,
]


def _torchrun(run: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
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
            str(run),
            "--parallel",
            "fsdp",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _finish(process: subprocess.Popen) -> tuple[str, str]:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out, err


# One sharded run serves every test below: it is compared with one process, is the
# uninterrupted reference of the kill-and-resume test, and is the run resumed in one process.
# Gradient checkpointing is on: its checkpointed blocks are the FSDP units.
STEPS = 8
ARGS = [
    "--steps",
    str(STEPS),
    "--checkpoint-every",
    "4",
    "--log-every",
    "1",
    "--seed",
    "5",
    *COMMON,
    "use_checkpoint=true",
    "--sample-every",
    "6",
]


def _weights(state: dict, part: str) -> dict[str, torch.Tensor]:
    return state["model"] if part == "model" else state["ema"]["weights"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, str, str]:
    """The folder holding a one-process run ("single") and a 2-process sharded run ("fsdp")
    of `ARGS`, and the sharded run's stdout and stderr."""
    folder = tmp_path_factory.mktemp("fsdp")
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(folder / "single"), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    out, err = _finish(_torchrun(folder / "fsdp", *ARGS))
    return folder, out, err


def test_two_sharded_processes_match_one_and_write_a_plain_checkpoint(runs):
    folder, out, err = runs
    single = load_training_state(folder / "single" / "train_state.pt")
    sharded = load_training_state(folder / "fsdp" / "train_state.pt")
    assert "2× cpu, sharded (FSDP: " in err
    held = int(err.split("sharded (FSDP: ")[1].split(" parameters")[0].replace(",", ""))
    total = sum(v.numel() for v in single["model"].values())
    assert total / 2 <= held < total / 2 + 1000  # half of every tensor, rounded up per tensor
    assert out.count(f"trained {STEPS} steps") == 1
    assert (folder / "fsdp" / "samples" / "step_0000006.png").is_file()  # a grid mid-run
    assert "use_checkpoint: true" in (folder / "fsdp" / "config.yaml").read_text()

    assert sharded["parallel"] == "fsdp" and sharded["step"] == STEPS
    assert int(sharded["ema"]["n_averaged"]) == STEPS
    for part in ("model", "ema"):
        a, b = _weights(single, part), _weights(sharded, part)
        assert a.keys() == b.keys()
        assert all(a[k].shape == b[k].shape for k in a)  # whole tensors, not shards
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        scale = max(a[k].abs().max().item() for k in a)
        # identical up to floating-point reduction order (reduce-scatter vs one batch mean)
        assert worst <= 1e-4 * scale, f"{part}: max difference {worst} (weights up to {scale})"
    # the optimizer state is whole too, keyed by parameter name
    moments = sharded["optimizer"]["state"]["time_embed.linear_1.weight"]["exp_avg"]
    assert moments.shape == single["model"]["time_embed.linear_1.weight"].shape

    checkpoint = UNet.from_pretrained(folder / "fsdp" / "checkpoint")
    for key, value in checkpoint.state_dict().items():
        torch.testing.assert_close(value, sharded["ema"]["weights"][key], rtol=0, atol=0)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc): torchrun starts its workers in new sessions, so
    killing its process group would leave them running."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _sigkill_tree(process: subprocess.Popen) -> None:
    for pid in [process.pid, *_descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)
    process.communicate()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers in /proc")
def test_sigkill_and_resume_of_a_sharded_run_match_an_uninterrupted_one(runs, tmp_path, capsys):
    """A sharded run killed mid-run resumes to the uninterrupted run's weights, and resuming it
    in one process is refused in one line (checked here rather than in a test of its own: each
    xdist worker that runs a test of `runs` trains both runs again)."""
    run = tmp_path / "killed"
    process = _torchrun(run, *ARGS)
    deadline = time.monotonic() + 240
    while last_logged_step(run) < 5:  # after the step-4 checkpoint, before the step-8 one
        if process.poll() is not None:
            pytest.fail(
                f"training ended (rc {process.returncode}) before step 5: "
                f"{process.stderr.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            _sigkill_tree(process)
            pytest.fail("training did not progress")
        time.sleep(0.01)
    _sigkill_tree(process)  # torchrun and both of its processes, mid-run
    killed_at = load_training_state(run / "train_state.pt")["step"]
    assert killed_at in (4, 8) and last_logged_step(run) <= STEPS

    _finish(_torchrun(run, *ARGS, "--resume"))
    straight = load_training_state(runs[0] / "fsdp" / "train_state.pt")
    resumed = load_training_state(run / "train_state.pt")
    assert resumed["step"] == straight["step"] == STEPS
    for part in ("model", "ema"):
        a, b = _weights(straight, part), _weights(resumed, part)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-6, f"{part}: resumed run differs by {worst}"

    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", str(STEPS + 2), *COMMON]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--parallel fsdp" in err[0] and "resume it the same way" in err[0]


def test_fp16_with_fsdp_is_a_config_error(tmp_path, capsys):
    code = main(
        [
            "train",
            "--out",
            str(tmp_path / "r"),
            "--parallel",
            "fsdp",
            "--precision",
            "fp16",
            "--steps",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert code != 0
    err = capsys.readouterr().err
    assert "--parallel fsdp" in err and "bf16" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DIFFUNET_SLOW_TESTS"),
    reason="Inductor compiles C++ for about a minute; set DIFFUNET_SLOW_TESTS=1",
)
def test_compiled_sharded_training_matches_eager_without_hitting_the_recompile_limit(tmp_path):
    args = ["--steps", "6", "--checkpoint-every", "0", "--log-every", "2", *COMMON]
    _finish(_torchrun(tmp_path / "eager", *args))
    _, err = _finish(_torchrun(tmp_path / "compiled", *args, "--compile"))
    assert "recompile_limit" not in err  # every sharded block stays compiled
    eager = load_training_state(tmp_path / "eager" / "train_state.pt")["model"]
    compiled = load_training_state(tmp_path / "compiled" / "train_state.pt")["model"]
    worst = max((eager[k] - compiled[k]).abs().max().item() for k in eager)
    assert worst <= 1e-4, worst


def _one_process_group(tmp_path: Path, backend: str) -> None:
    torch.distributed.init_process_group(
        backend, store=torch.distributed.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )


def test_fsdp_shards_only_contiguous_weights_so_placement_asks_for_the_layout(tmp_path):
    """`place_model(..., sharded=True)` must not convert weights to channels-last: FSDP2
    refuses such parameters (this is what a GPU run would hit)."""
    from torch.distributed.fsdp import fully_shard

    from diffunet import UNetConfig
    from diffunet.accel.conv import prefer_channels_last
    from diffunet.training.sharding import shard_unet

    config = UNetConfig(
        dims=2,
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        norm_groups=4,
    )
    _one_process_group(tmp_path, "gloo")
    try:
        converted = torch.nn.Conv2d(4, 4, 3).to(memory_format=torch.channels_last)
        with pytest.raises(NotImplementedError, match="non-contiguous"):
            fully_shard(torch.nn.Sequential(converted))
        model = UNet(config)
        prefer_channels_last(model)
        shard_unet(model)
        x = torch.randn(2, 3, 8, 8)
        model(x, torch.tensor([1, 2])).square().mean().backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.gpu
def test_sharded_model_on_a_gpu_trains_with_channels_last_activations(tmp_path):
    from diffunet import UNetConfig
    from diffunet.training.parallel import place_model
    from diffunet.training.sharding import shard_unet

    config = UNetConfig(
        dims=2,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        norm_groups=8,
    )
    _one_process_group(tmp_path, "nccl")
    try:
        device = torch.device("cuda")
        model = UNet(config).to(device)
        place_model(model, device, sharded=True)
        shard_unet(model)
        seen = []
        stem = model.input_blocks[0][0]
        stem.register_forward_hook(lambda module, args, out: seen.append(out))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(torch.randn(4, 3, 32, 32, device=device), torch.tensor([1, 2, 3, 4]))
        out.float().square().mean().backward()
        assert seen[0].is_contiguous(memory_format=torch.channels_last)
    finally:
        torch.distributed.destroy_process_group()
