"""`diffunet info` and `diffunet check` from the command line, and `diffunet sample` refusing
a checkpoint that loads badly (changed weights, a bad run.json, NaN weights or samples) or that
needs text embeddings."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffunet import cli
from diffunet.cli import main
from diffunet.cli.app import COMMANDS


def test_info_prints_counted_parameters_flops_and_levels(capsys):
    assert main(["info", "ddpm-cifar10"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 35,746,307" in out
    assert "FLOPs per forward (batch 1, size (32, 32)): " in out
    assert "16×16       256       2  full" in out


def test_info_reads_a_config_file(tmp_path, capsys):
    from diffunet import preset

    preset("emdiffuse").to_json(tmp_path / "config.json")
    assert main(["info", str(tmp_path), "--no-flops"]) == 0
    assert "parameters: 15,677,345" in capsys.readouterr().out


def test_check_runs_every_preset(capsys):
    assert main(["check", "ldm", "efficient-unet"]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") == 4  # ldm in 2D, efficient-unet in 1D, 2D and 3D


def test_unknown_preset_is_one_line_and_non_zero(capsys):
    # In-process: test_cli_train.py runs the console entry point itself in a subprocess.
    assert main(["info", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "unknown preset 'nope'" in err
    assert "Traceback" not in err


def test_info_without_a_name_lists_every_preset_and_its_source(capsys):
    from diffunet import list_presets, preset_info

    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    for line, name in zip(lines, list_presets()):
        assert line.endswith(preset_info(name).source)


# ------------------------------------------------------------------ checkpoints that load badly
@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny 8×8 checkpoint folder (no run.json: the diffusion defaults apply)."""
    from diffunet import UNet, UNetConfig
    from diffunet.model.checkpoint import save_pretrained

    config = UNetConfig(
        in_channels=1,
        out_channels=1,
        image_size=8,
        model_channels=8,
        norm_groups=4,
        channel_mult=(1,),
    )
    return save_pretrained(UNet(config), tmp_path / "ckpt")


def sample(capsys, checkpoint, out, *extra: str) -> tuple[int, str]:
    """`diffunet sample` of 2 samples in 1 step, in-process; (exit code, stderr)."""
    argv = ["sample", "--from", str(checkpoint), "--num", "2", "--steps", "1", "--out", str(out)]
    code = main([*argv, *extra])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_sample_refuses_changed_weights_unless_no_verify(tiny_checkpoint, tmp_path, capsys):
    weights = tiny_checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4] ^= 0x01  # the lowest bit of the file's last float: the weights, still finite
    weights.write_bytes(bytes(data))
    out = tmp_path / "x.npy"
    code, err = sample(capsys, tiny_checkpoint, out)
    assert_one_line_error(code, err, "model.safetensors fails its SHA-256 check", "--no-verify")
    assert not out.exists()
    assert sample(capsys, tiny_checkpoint, out, "--no-verify")[0] == 0
    assert np.load(out).shape == (2, 1, 8, 8)


def test_sample_refuses_bad_run_json_nan_weights_and_nan_samples(
    tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "x.npy"
    (tiny_checkpoint / "run.json").write_text('[{"diffusion": {}}]')
    code, err = sample(capsys, tiny_checkpoint, out)
    assert_one_line_error(code, err, "run.json must hold a JSON object", "got a list")
    (tiny_checkpoint / "run.json").write_text('{"diffusion": "cosine"}')
    assert_one_line_error(*sample(capsys, tiny_checkpoint, out), "run.json: 'diffusion' must")
    (tiny_checkpoint / "run.json").unlink()

    from diffunet.diffusion import Diffusion

    # Finite weights whose samples come out NaN: an error, and nothing written.
    monkeypatch.setattr(
        Diffusion, "sample", lambda self, model, shape, **kw: torch.full(shape, torch.nan)
    )
    code, err = sample(capsys, tiny_checkpoint, out)
    assert_one_line_error(code, err, "produced NaN or inf in 2 of the 2 samples")
    assert not out.exists()

    from diffunet.model import load_pretrained

    model = load_pretrained(tiny_checkpoint)
    with torch.no_grad():
        model.out[2].bias[0] = torch.inf
        model.time_embed.linear_1.weight[0, 0] = torch.nan
    model.save_pretrained(tiny_checkpoint)
    code, err = sample(capsys, tiny_checkpoint, out)
    tensors = len(model.state_dict())
    assert_one_line_error(
        code, err, f"(2 of {tensors} tensors, e.g. time_embed.linear_1.weight)", "diverged run"
    )


def test_sample_refuses_text_conditioned_models_in_one_line(tmp_path, capsys):
    from diffunet import UNet
    from diffunet.model.checkpoint import save_pretrained
    from diffunet.model.introspect import small_config

    config = small_config("sd15")
    save_pretrained(UNet(config), tmp_path / "sd-like")
    code, err = sample(capsys, tmp_path / "sd-like", tmp_path / "x.npy")
    context = f"context_dim={config.context_dim}"
    assert_one_line_error(code, err, context, "no text encoder", "docs/interop.md")
    assert not (tmp_path / "x.npy").exists()


def test_version_answers_without_importing_torch():
    code = "import sys; from diffunet.cli import main; main(['--version']); print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    from diffunet import __version__

    assert out == ["diffunet", __version__, "False"]


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys; from diffunet.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[-1] == "False"
    # argparse lists each command four spaces in, its wrapped help further in
    listed = {line.split()[0] for line in lines if line[:4] == "    " and line[4:5].strip()}
    assert listed == set(COMMANDS)
    commands = Path(cli.__file__).parent
    modules = {p.stem for p in commands.glob("*.py")} - {"__init__", "app"}
    assert modules == set(COMMANDS)  # a command module nobody lists would never run


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU defines the inline norm operators")
def test_a_command_on_the_cpu_does_not_import_the_compiler():
    """Inductor and Dynamo take seconds to import; a CPU command that compiles nothing (here a
    rejected option, after the accelerator's import) leaves them out."""
    code = (
        "import sys; import diffunet.accel; from diffunet.cli import main\n"
        "try:\n    main(['train', '--steps', '-3'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch._inductor', 'torch._dynamo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
