"""`benchmarks/train_modes.py` end to end on the CPU: a real `diffunet train` run, read back."""

import json
import subprocess

import pytest

TINY = (
    "tiny:--image-size 8 --batch-size 8 --threads 1 --precision fp32 --sample-steps 1 "
    "model_channels=8 norm_groups=4 channel_mult=[1,2] attention_resolutions=[] "
    "num_res_blocks=1"
)


def test_train_modes_reads_the_last_interval_of_each_run(tmp_path, capsys, benchmark_script):
    out = tmp_path / "modes.json"
    argv = ["--modes", "eager", "--steps", "6", "--log-every", "3", "--run", TINY]
    assert benchmark_script("train_modes").main([*argv, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["steps"], data["log_every"]) == (6, 3)
    tiny = data["results"]["tiny"]["eager"]
    assert len(tiny["it_per_s_all"]) == 2 and tiny["it_per_s"] == tiny["it_per_s_all"][-1]
    assert tiny["samples_per_s"] == tiny["it_per_s"] * 8
    assert "6 steps × batch 8 on 1× cpu" in tiny["banner"]
    assert "tiny       eager" in capsys.readouterr().out


def failing_runs(script, monkeypatch, stderr: str) -> list[list[str]]:
    """Make every `diffunet train` the script starts fail with `stderr`; the commands it ran."""
    commands: list[list[str]] = []

    def run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(script.subprocess, "run", run)
    return commands


def test_a_failed_run_is_reported_with_its_last_line(
    tmp_path, capsys, benchmark_script, monkeypatch
):
    script = benchmark_script("train_modes")
    commands = failing_runs(script, monkeypatch, "Traceback\nerror: --batch-size 0\n")
    out = tmp_path / "modes.json"
    argv = ["--modes", "eager,default", "--run", "broken:--batch-size 0", "--out", str(out)]
    assert script.main(argv) == 1
    (eager, default) = commands
    assert eager[-2:] == ["--batch-size", "0"] and "--compile-mode" not in eager
    assert default[default.index("--compile-mode") + 1] == "default"
    results = json.loads(out.read_text())["results"]["broken"]
    assert results["eager"]["error"] == results["default"]["error"] == "error: --batch-size 0"
    assert "broken     eager            failed: error: --batch-size 0" in capsys.readouterr().out


def test_the_torchrun_launcher_trains_each_mode_under_torchrun_too(
    tmp_path, capsys, benchmark_script, monkeypatch
):
    script = benchmark_script("train_modes")
    commands = failing_runs(script, monkeypatch, "error: stopped here\n")
    argv = ["--modes", "auto", "--launchers", "plain,torchrun", "--nproc-per-node", "2"]
    assert script.main([*argv, "--run", "digits:", "--out", str(tmp_path / "m.json")]) == 1
    plain, launched = commands
    assert plain[1:4] == ["-m", "diffunet", "train"]
    assert launched[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in launched
    assert launched[-3:] == plain[-3:] == ["--no-eval", "--compile-mode", "auto"]
    results = json.loads((tmp_path / "m.json").read_text())
    assert set(results["results"]["digits"]) == {"auto", "auto torchrun"}
    assert results["nproc_per_node"] == 2
    with pytest.raises(SystemExit):
        script.main(["--launchers", "mpirun", "--run", "digits:"])
    assert "unknown mpirun" in capsys.readouterr().err
