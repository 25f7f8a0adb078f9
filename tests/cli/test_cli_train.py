"""`diffunet train` / `sample` end to end on a tiny model, and every hostile input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffunet.cli import main
from diffunet.training.state import load_training_state

TINY_MODEL = [
    "model_channels=16",
    "norm_groups=8",
    "channel_mult=[1,2]",
    "attention_resolutions=[]",
    "num_res_blocks=1",
]
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
    "4",
    "--no-eval",
    "--log-every",
    "5",
    *TINY_MODEL,
]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `diffunet ...` in-process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run: 12 steps on the digits at 8×8, checkpoints every 6 steps, one grid mid-way."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    threads = torch.get_num_threads()
    try:
        code = main(
            [
                "train",
                "--steps",
                "12",
                "--checkpoint-every",
                "6",
                "--sample-every",
                "6",
                "--out",
                str(out),
                *TINY,
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


def test_train_writes_a_complete_run(trained_run):
    for name in (
        "config.yaml",
        "train_state.pt",
        "log.csv",
        "checkpoint/config.json",
        "checkpoint/model.safetensors",
        "checkpoint/run.json",
        "samples/step_0000006.png",
        "samples/final.png",
    ):
        assert (trained_run / name).is_file(), name
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["model"]["model_channels"] == 16 and config["model"]["num_classes"] == 10
    assert config["train"]["steps"] == 12 and config["data"]["image_size"] == 8
    state = load_training_state(trained_run / "train_state.pt")  # weights_only=True inside
    assert state["step"] == 12
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["ema"]["weights"])
    rows = (trained_run / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and rows[-1].startswith("12,")
    meta = json.loads((trained_run / "checkpoint" / "run.json").read_text())
    assert meta["step"] == 12 and meta["diffusion"]["schedule"] == "cosine"


def test_sample_npy_and_png(trained_run, tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "sample",
        "--from",
        trained_run,
        "--num",
        "12",
        "--steps",
        "3",
        "--out",
        tmp_path / "s.npy",
    )
    assert code == 0, err
    array = np.load(tmp_path / "s.npy")
    assert array.shape == (12, 1, 8, 8) and array.dtype == np.float32
    assert array.min() >= 0.0 and array.max() <= 1.0
    code, _, err = run_cli(
        capsys,
        "sample",
        "--from",
        trained_run / "checkpoint",
        "--num",
        "20",
        "--steps",
        "3",
        "--sampler",
        "euler",
        "--guidance",
        "2",
        "--out",
        tmp_path / "grid.png",
    )
    assert code == 0, err
    image = Image.open(tmp_path / "grid.png")
    # 10 columns (one per class) × 2 rows of 8×8 digits shown at 4× with 2-pixel padding
    assert image.size == (10 * (32 + 2) + 2, 2 * (32 + 2) + 2) and image.mode == "L"
    code, _, _ = run_cli(
        capsys,
        "sample",
        "--from",
        trained_run,
        "--num",
        "4",
        "--steps",
        "2",
        "--label",
        "3",
        "--sampler",
        "heun",
        "--seed",
        "1",
        "--out",
        tmp_path / "3.npy",
    )
    assert code == 0 and np.load(tmp_path / "3.npy").shape == (4, 1, 8, 8)


def test_sample_is_reproducible(trained_run, tmp_path, capsys):
    for name in ("a", "b"):
        assert (
            run_cli(
                capsys,
                "sample",
                "--from",
                trained_run,
                "--num",
                "3",
                "--steps",
                "3",
                "--seed",
                "7",
                "--out",
                tmp_path / f"{name}.npy",
            )[0]
            == 0
        )
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("train: {steps: 3\n  batch_size: [\n")
    return path


def _corrupt_image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "ok.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


HOSTILE_TRAIN = {
    "missing data folder": (lambda p: ["--data", p / "nowhere"], ["nowhere", "neither"]),
    "empty data folder": (lambda p: (p / "empty").mkdir() or ["--data", p / "empty"], ["empty"]),
    "corrupt image": (lambda p: ["--data", _corrupt_image_folder(p)], ["corrupt.png"]),
    "malformed yaml": (lambda p: ["--config", _bad_yaml(p)], ["bad.yaml", "not valid YAML"]),
    "missing yaml": (lambda p: ["--config", p / "none.yaml"], ["does not exist"]),
    "unknown preset": (lambda p: ["--preset", "no-such-net"], ["unknown preset", "no-such-net"]),
    "negative steps": (lambda p: ["--steps", "-3"], ["--steps", "-3"]),
    "zero batch": (lambda p: ["--batch-size", "0"], ["--batch-size", "0"]),
    "huge batch": (lambda p: ["--batch-size", "5000"], ["5000", "1797"]),
    "bad lr": (lambda p: ["--lr", "-1"], ["--lr"]),
    "unknown model field": (lambda p: ["widthh=3"], ["widthh"]),
    "bad override syntax": (lambda p: ["model_channels"], ["KEY=VALUE"]),
    "invalid model config": (lambda p: ["model_channels=0"], ["model_channels"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TRAIN))
def test_hostile_train_input(case, tmp_path, capsys):
    make_args, fragments = HOSTILE_TRAIN[case]
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--out", out, "--steps", "2", *make_args(tmp_path))
    assert_one_line_error(code, err, *fragments)
    assert not out.exists(), "a failed start must not leave a run folder"


def test_existing_run_needs_resume_and_resume_needs_a_run(trained_run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--out", trained_run, "--steps", "2", *TINY)
    assert_one_line_error(code, err, "--resume")
    code, _, err = run_cli(capsys, "train", "--resume", "--out", tmp_path / "none")
    assert_one_line_error(code, err, "nothing to resume")
    code, _, err = run_cli(capsys, "train", "--resume", "--out", trained_run, "--seed", "5")
    assert_one_line_error(code, err, "seed")


def test_corrupt_training_state_is_reported(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    (run / "train_state.pt").write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run_cli(capsys, "train", "--resume", "--out", run, "--steps", "14")
    assert_one_line_error(code, err, "train_state.pt", "corrupt")


def test_hostile_sample_input(trained_run, tmp_path, capsys):
    import shutil

    code, _, err = run_cli(
        capsys, "sample", "--from", tmp_path / "missing", "--out", tmp_path / "x.png"
    )
    assert_one_line_error(code, err, "does not exist")
    broken = tmp_path / "broken"
    shutil.copytree(trained_run / "checkpoint", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "sample", "--from", broken, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "model.safetensors")
    (broken / "config.json").write_text("{ not json")
    code, _, err = run_cli(capsys, "sample", "--from", broken, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "sample", "--from", empty, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "neither a run folder")
    code, _, err = run_cli(capsys, "sample", "--from", trained_run, "--out", tmp_path / "x.jpg")
    assert_one_line_error(code, err, ".png", ".npy")
    code, _, err = run_cli(
        capsys, "sample", "--from", trained_run, "--num", "0", "--out", tmp_path / "x.png"
    )
    assert_one_line_error(code, err, "--num")
    code, _, err = run_cli(
        capsys, "sample", "--from", trained_run, "--label", "12", "--out", tmp_path / "x.png"
    )
    assert_one_line_error(code, err, "--label")
    assert not (tmp_path / "x.png").exists()


def test_console_script_exit_code_and_one_line(tmp_path):
    """The installed entry point, as a user runs it: exit 1, one line, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "diffunet", "train", "--steps", "-3", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result.returncode, result.stderr, "--steps")
    assert not (tmp_path / "r").exists()


def test_train_and_sample_signals_volumes_and_pairs(tmp_path, capsys):
    """1D signals and 3D volumes from .npy, 2D pairs from input/ → target/ folders."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "signals.npy", rng.normal(size=(16, 1, 16)).astype(np.float32))
    np.save(tmp_path / "volumes.npy", rng.integers(0, 256, (16, 1, 8, 8, 8), dtype=np.uint8))
    for i in range(16):
        image = rng.integers(0, 256, (12, 12), dtype=np.uint8)
        for side, array in (("target", image), ("input", image // 2)):
            (tmp_path / "pairs" / side).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(tmp_path / "pairs" / side / f"{i}.png")
    tiny = [
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--precision",
        "fp32",
        "--sample-steps",
        "2",
        *TINY_MODEL,
    ]
    for name, data, extra in (
        ("1d", "signals.npy", []),
        ("3d", "volumes.npy", []),
        ("pairs", "pairs", ["--image-size", "8"]),
    ):
        run = tmp_path / f"run_{name}"
        code, _, err = run_cli(
            capsys, "train", "--data", tmp_path / data, "--out", run, *tiny, *extra
        )
        assert code == 0, err
        assert (run / "samples" / "final.png").is_file()
    assert yaml.safe_load((tmp_path / "run_1d" / "config.yaml").read_text())["model"]["dims"] == 1
    code, _, err = run_cli(
        capsys,
        "sample",
        "--from",
        tmp_path / "run_3d",
        "--num",
        "2",
        "--steps",
        "2",
        "--out",
        tmp_path / "v.npy",
    )
    assert code == 0, err
    assert np.load(tmp_path / "v.npy").shape == (2, 1, 8, 8, 8)
    code, _, err = run_cli(
        capsys,
        "sample",
        "--from",
        tmp_path / "run_pairs",
        "--num",
        "3",
        "--steps",
        "2",
        "--out",
        tmp_path / "p.npy",
    )
    assert_one_line_error(code, err, "--cond")
    code, _, err = run_cli(
        capsys,
        "sample",
        "--from",
        tmp_path / "run_pairs",
        "--num",
        "3",
        "--steps",
        "2",
        "--cond",
        tmp_path / "pairs" / "input" / "0.png",
        "--out",
        tmp_path / "p.npy",
    )
    assert code == 0, err
    assert np.load(tmp_path / "p.npy").shape == (3, 1, 8, 8)


def test_resume_of_a_run_without_checkpoint_starts_over(tmp_path, capsys):
    """A run killed before its first checkpoint has only config.yaml; --resume starts at 0."""
    run = tmp_path / "early"
    assert run_cli(capsys, "train", "--out", run, "--steps", "2", *TINY)[0] == 0
    (run / "train_state.pt").unlink()
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--steps", "3")
    assert code == 0, err
    assert "starting from step 0" in err


def test_cudnn_autotuning_is_switched_on_for_3d_models_on_gpus_only(monkeypatch):
    """On an H200 it doubles eager 3D training and slows 2D models (docs/performance.md)."""
    from diffunet.accel.layout import enable_cudnn_autotuning

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    enable_cudnn_autotuning(torch.device("cpu"), 3)
    for dims in (1, 2):
        enable_cudnn_autotuning(torch.device("cuda", 0), dims)
    assert torch.backends.cudnn.benchmark is False
    enable_cudnn_autotuning(torch.device("cuda", 0), 3)
    assert torch.backends.cudnn.benchmark is True


@pytest.mark.parametrize("command", ["train", "sample"])
def test_commands_that_repeat_shapes_autotune_cudnn_on_their_device(
    command, trained_run, tmp_path, capsys, monkeypatch
):
    import diffunet.cli.sample as sample_command
    import diffunet.cli.train as train_command

    seen = []
    module = train_command if command == "train" else sample_command
    monkeypatch.setattr(
        module, "enable_cudnn_autotuning", lambda device, dims: seen.append((device, dims))
    )
    args = (
        ["train", "--steps", "1", "--out", tmp_path / "run", *TINY]
        if command == "train"
        else [
            "sample",
            "--from",
            trained_run,
            "--num",
            "2",
            "--steps",
            "1",
            "--out",
            tmp_path / "s.npy",
        ]
    )
    threads = torch.get_num_threads()
    try:
        code, _, err = run_cli(capsys, *args)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert seen == [(torch.device("cpu"), 2)]


@pytest.mark.parametrize(
    "error, one_line",
    [
        (__import__("diffunet").errors.InvalidValueError("--foo must be 3, got 4"), True),
        (FileNotFoundError(2, "No such file or directory", "/nowhere/x.png"), True),
        (ZeroDivisionError("division by zero"), False),
        (ValueError("a torch shape error deep inside"), False),
    ],
)
def test_user_errors_are_one_line_and_bugs_show_their_traceback(
    error, one_line, monkeypatch, capsys
):
    def fail(args):
        raise error

    monkeypatch.setattr("diffunet.cli.info.run", fail)
    code, _, err = run_cli(capsys, "info")
    assert code == 1
    if one_line:
        assert_one_line_error(code, err, "diffunet info: error:")
        assert str(getattr(error, "filename", None) or error) in err
    else:
        assert "Traceback" in err and "this is a bug in diffunet" in err.strip().splitlines()[-1]


def test_eval_from_a_run_reproduces_the_numbers_training_wrote(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("diffunet.apps.evaluation.EVAL_SAMPLES", 24)
    run = tmp_path / "run"
    tiny = [a for a in TINY if a != "--no-eval"]
    assert main(["train", "--out", str(run), "--steps", "4", "--sample-every", "0", *tiny]) == 0
    at_training = json.loads((run / "eval.json").read_text())
    (run / "eval.json").unlink()
    code, out, _ = run_cli(capsys, "eval", "--from", run, "--num", "24")
    assert code == 0 and "24 samples (seed 0, heun 4 steps)" in out
    again = json.loads((run / "eval.json").read_text())  # written where training writes it
    for key in ("frechet_distance", "accuracy", "samples", "seed", "sampler", "guidance"):
        assert again[key] == at_training[key], key


def test_other_libraries_warnings_show_only_with_verbose(monkeypatch, capsys):
    import logging
    import warnings

    def noisy(args):
        warnings.warn("torchvision is not installed", UserWarning, stacklevel=1)  # a dependency
        logging.getLogger("torchao").warning("Failed to load the .so")
        warnings.warn_explicit("diffunet's own", UserWarning, "x.py", 1, module="diffunet.cli")
        return 0

    monkeypatch.setattr("diffunet.cli.info.run", noisy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["info"]) == 0
        quiet = [str(w.message) for w in caught]
        caught.clear()
        assert main(["info", "-v"]) == 0
        loud = [str(w.message) for w in caught]
    assert quiet == ["diffunet's own"]
    assert loud == ["torchvision is not installed", "diffunet's own"]
    assert "Failed to load" not in capsys.readouterr().err  # logging: hidden without -v


@pytest.mark.parametrize(
    "process, sampler, foreign",
    [("ddpm", "dpm++", "heun"), ("flow", "heun", "ddim"), ("edm", "heun", "ddim")],
)
def test_each_process_resumes_exactly_and_samples(process, sampler, foreign, tmp_path, capsys):
    common = ["--process", process, "--sample-every", "0", "--checkpoint-every", "0", *TINY]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", "--out", str(straight), "--steps", "4", *common]) == 0
    assert main(["train", "--out", str(resumed), "--steps", "2", *common]) == 0
    assert main(["train", "--out", str(resumed), "--resume", "--steps", "4"]) == 0
    a = load_training_state(straight / "train_state.pt")["model"]
    b = load_training_state(resumed / "train_state.pt")["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    meta = json.loads((resumed / "checkpoint" / "run.json").read_text())
    assert meta["diffusion"]["process"] == process and meta["sample"]["sampler"] == sampler
    capsys.readouterr()
    code, _, _ = run_cli(
        capsys, "sample", "--from", resumed, "--num", "2", "--out", tmp_path / "s.npy"
    )
    samples = np.load(tmp_path / "s.npy")
    assert code == 0 and samples.shape == (2, 1, 8, 8) and np.isfinite(samples).all()
    code, _, err = run_cli(
        capsys, "sample", "--from", resumed, "--sampler", foreign, "--out", tmp_path / "x.npy"
    )
    assert_one_line_error(code, err, foreign, sampler)
