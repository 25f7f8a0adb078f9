"""`diffunet train --compile`: the compiled run trains the same weights, saved without prefixes.

The trainer's compiled path is tested with `torch.compile`'s `aot_eager` backend (Dynamo's
capture and AOTAutograd's forward/backward split, run eagerly): Inductor's C++ build of the
training step takes minutes on a 2-core CPU, so that variant is slow (DIFFUNET_SLOW_TESTS=1);
tests/model/test_unet.py checks Inductor's code against eager on every run.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo
import torch._functorch.config as functorch_config
from safetensors.torch import load_file

from diffunet.accel import settings
from diffunet.accel.compile_cache import ALLOW_FUNCTIONS
from diffunet.cli import main
from diffunet.training.distributed import DistInfo
from diffunet.training.run_config import RunConfigError, TrainSection
from diffunet.training.state import load_training_state
from diffunet.training.trainer import resolve_compile_mode, resolve_grad_sync

TINY = [
    "--image-size",
    "8",
    "--batch-size",
    "8",
    "--threads",
    "1",
    "--precision",
    "fp32",
    "--steps",
    "3",
    "--checkpoint-every",
    "0",
    "--sample-every",
    "0",
    "--sample-steps",
    "2",
    "--no-eval",
    "--log-every",
    "1",
    "model_channels=8",
    "norm_groups=4",
    "channel_mult=[1,2]",
    "attention_resolutions=[2]",
    "num_res_blocks=1",
]


REAL_COMPILE = torch.compile


@pytest.fixture
def compiled_modes(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """Make `torch.compile` use the `aot_eager` backend; returns the modes it was asked for."""
    modes: list[str | None] = []

    def compile_aot_eager(model, *, mode: str | None = None, **kwargs):
        modes.append(mode)
        return REAL_COMPILE(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    return modes


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(
                    not os.environ.get("DIFFUNET_SLOW_TESTS"),
                    reason="Inductor compiles C++ for minutes; set DIFFUNET_SLOW_TESTS=1",
                ),
            ],
        ),
    ],
)
def test_compiled_training_matches_eager_and_saves_clean_keys(backend, tmp_path, capsys, request):
    modes = request.getfixturevalue("compiled_modes") if backend == "aot_eager" else None
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(tmp_path / "eager"), *TINY]) == 0
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with functorch_config.patch(**{ALLOW_FUNCTIONS: False}):
            assert main(["train", "--out", str(tmp_path / "compiled"), "--compile", *TINY]) == 0
            # a resumed run loads its compiled graphs (`cache_compiled_functions`)
            assert getattr(functorch_config, ALLOW_FUNCTIONS)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # really compiled
    finally:
        torch.set_num_threads(threads)
    assert "compiled" in capsys.readouterr().out
    assert modes in (None, [None])  # aot_eager: asked for the default mode, as on every CPU

    eager = load_file(tmp_path / "eager" / "checkpoint" / "model.safetensors")
    compiled = load_file(tmp_path / "compiled" / "checkpoint" / "model.safetensors")
    assert compiled.keys() == eager.keys()
    state = load_training_state(tmp_path / "compiled" / "train_state.pt")
    assert not [
        k
        for k in (*state["model"], *state["ema"]["weights"])
        if k.startswith(("_orig_mod.", "module."))
    ]
    # Three optimizer steps from the same seed: a compiled step only reorders float math.
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-3, atol=1e-4, msg=key)
    eager_model = load_training_state(tmp_path / "eager" / "train_state.pt")["model"]
    for key, value in eager_model.items():
        torch.testing.assert_close(state["model"][key], value, rtol=1e-3, atol=1e-4, msg=key)


def test_reduce_overhead_trains_on_one_process_and_says_so(tmp_path, capsys, compiled_modes):
    """The run asks `torch.compile` for the mode, trains and reports it (on the CPU Inductor
    skips the CUDA graphs: its default build, which the slow test above covers)."""
    settings.set_compiled_min_elements(None)
    threads = torch.get_num_threads()
    try:
        torch._dynamo.reset()
        assert (
            main(
                ["train", "--out", str(tmp_path / "ro"), "--compile-mode", "reduce-overhead", *TINY]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert "compiled (reduce-overhead)" in captured.out + captured.err
    assert compiled_modes == ["reduce-overhead"]
    # graphs replayed as CUDA graphs call the fused GroupNorm kernels (on a GPU)
    assert settings.COMPILED_MIN_ELEMENTS == settings.CUDA_GRAPHS_MIN_ELEMENTS
    config = (tmp_path / "ro" / "config.yaml").read_text()
    assert "compile: true" in config and "compile_mode: reduce-overhead" in config


@pytest.mark.skipif(
    not os.environ.get("DIFFUNET_SLOW_TESTS"),
    reason="launches torchrun; the refusal itself: "
    "test_auto_compile_mode_records_cuda_graphs_where_the_communication_allows",
)
def test_reduce_overhead_under_torchrun_with_fsdp_is_refused_in_one_line(tmp_path):
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
            str(tmp_path / "r"),
            "--device",
            "cpu",
            "--compile-mode",
            "reduce-overhead",
            "--parallel",
            "fsdp",
            *TINY,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("diffunet train:")]
    assert lines and "--parallel fsdp communicates inside the backward" in lines[0]
    assert not (tmp_path / "r").exists()


def test_auto_compile_mode_records_cuda_graphs_where_the_communication_allows():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    one, torchrun = DistInfo(device=cuda), DistInfo(world_size=2, device=cuda)
    alone_in_group = DistInfo(device=cuda, grouped=True)
    auto = TrainSection(compile=True)
    assert auto.compile_mode == "auto" and auto.grad_sync == "auto"
    assert resolve_compile_mode(auto, one) == "reduce-overhead"
    assert resolve_compile_mode(auto, DistInfo(device=cpu)) == "default"
    # under torchrun the gradients are all-reduced after the replayed backward
    assert resolve_compile_mode(auto, torchrun) == "reduce-overhead"
    assert resolve_compile_mode(auto, alone_in_group) == "reduce-overhead"
    hooks = TrainSection(compile=True, grad_sync="ddp")
    sharded = TrainSection(compile=True, parallel="fsdp")
    assert resolve_compile_mode(hooks, torchrun) == resolve_compile_mode(sharded, torchrun)
    assert resolve_compile_mode(hooks, torchrun) == "default"
    assert resolve_compile_mode(hooks, one) == resolve_compile_mode(sharded, one)
    assert resolve_compile_mode(hooks, one) == "reduce-overhead"  # one process: no communication
    default = TrainSection(compile=True, compile_mode="default")
    assert resolve_compile_mode(default, one) == "default"
    graphs = TrainSection(compile=True, compile_mode="reduce-overhead")
    assert resolve_compile_mode(graphs, DistInfo(device=cpu)) == "reduce-overhead"
    assert resolve_compile_mode(graphs, torchrun) == "reduce-overhead"
    for section, option, fix in (
        (hooks, "--grad-sync ddp", "--grad-sync auto"),
        (sharded, "--parallel fsdp", "--parallel ddp"),
    ):
        section.compile_mode = "reduce-overhead"
        message = f"{option} communicates inside the backward, .*; use {fix}"
        with pytest.raises(RunConfigError, match=message):
            resolve_compile_mode(section, torchrun)


def test_grad_sync_follows_the_replayed_step_and_is_refused_with_fsdp():
    assert resolve_grad_sync(TrainSection(), graphed=True) == "after-backward"
    assert resolve_grad_sync(TrainSection(), graphed=False) == "ddp"
    for chosen in ("ddp", "after-backward"):
        for graphed in (False, True):
            assert resolve_grad_sync(TrainSection(grad_sync=chosen), graphed) == chosen
    with pytest.raises(RunConfigError, match="--grad-sync after-backward .* --parallel fsdp"):
        TrainSection(parallel="fsdp", grad_sync="after-backward").validate()
    with pytest.raises(RunConfigError, match="grad_sync"):
        TrainSection(grad_sync="hooks").validate()


@pytest.mark.gpu
def test_compile_on_a_gpu_records_cuda_graphs_and_matches_default_compile(tmp_path, capsys):
    """Plain `--compile` on one GPU is the reduce-overhead mode; CUDA graphs replay the same
    kernels, so the weights match the default-mode compiled run."""
    gpu = [arg for arg in TINY if arg != "fp32"]
    gpu[gpu.index("--precision") + 1 : gpu.index("--precision") + 1] = ["bf16"]
    for name, mode in (("default", ["--compile-mode", "default"]), ("graphs", ["--compile"])):
        torch._dynamo.reset()
        assert main(["train", "--out", str(tmp_path / name), "--device", "cuda", *mode, *gpu]) == 0
        captured = capsys.readouterr()
        banner = captured.out + captured.err
        assert ("compiled (reduce-overhead)" in banner) == (name == "graphs"), banner
    a = load_training_state(tmp_path / "default" / "train_state.pt")["model"]
    b = load_training_state(tmp_path / "graphs" / "train_state.pt")["model"]
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-2, atol=1e-3, msg=key)


def test_a_compile_mode_without_compile_in_a_config_file_is_refused(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  compile_mode: reduce-overhead\n")
    assert main(["train", "--out", str(tmp_path / "r"), "--config", str(config), *TINY]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.compile is false" in err[0] and "compile: true" in err[0]
    assert not (tmp_path / "r").exists()
