"""`benchmarks/ddp_scaling.py` end to end on the CPU: torchrun, 1 and 2 gloo processes, a table."""

import json

import pytest


def test_scaling_script_measures_one_and_two_processes(tmp_path, capsys, benchmark_script):
    script = benchmark_script("ddp_scaling")
    code = script.main(
        [
            "--device",
            "cpu",
            "--cases",
            "tiny",
            "--gpus",
            "1,2",
            "--modes",
            "eager",
            "--parallel",
            "ddp,fsdp",
            "--steps",
            "12",
            "--log-every",
            "3",
            "--skip-rows",
            "1",
            "--count",
            "32",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0, capsys.readouterr().out
    records = json.loads((tmp_path / "scaling.json").read_text())
    assert [(r["gpus"], r["parallel"], r["global_batch"]) for r in records] == [
        (1, "single", 8),
        (2, "ddp", 16),
        (2, "fsdp", 16),
    ]
    assert all(r["img_per_s"] > 0 and r["timed_steps"] == 6 for r in records)  # steps 6 → 12
    assert records[0]["efficiency"] == 1.0 and all(r["efficiency"] > 0 for r in records)
    assert "sharded (FSDP: " in (tmp_path / "tiny-eager-2gpu-fsdp.log").read_text()
    table = capsys.readouterr().out
    assert (
        "| tiny | eager | ddp | 2 | 16 |" in table and "| tiny | eager | fsdp | 2 | 16 |" in table
    )


def test_throughput_reads_the_log_after_the_warm_up(tmp_path, benchmark_script):
    log = tmp_path / "log.csv"
    log.write_text(
        "step,loss,lr,grad_norm,it_per_s,elapsed_s\n10,1,1,1,1,30.0\n20,1,1,1,1,31.0\n"
        "30,1,1,1,1,32.0\n40,1,1,1,1,34.0\n"
    )
    result = benchmark_script("ddp_scaling").throughput(log, global_batch=16, skip_rows=1)
    assert result["img_per_s"] == 20 * 16 / 3.0 and result["warmup_seconds"] == 31.0


def test_compiled_runs_compile_alike_on_one_and_on_several_gpus(tmp_path, benchmark_script):
    """Plain `--compile` would add CUDA graphs to the one-process baseline only."""
    script = benchmark_script("ddp_scaling")
    for gpus in (1, 2):
        cmd = script.command(
            "ldm", gpus, "compile", 10, 5, tmp_path / "d.npy", tmp_path / "c.yaml", tmp_path / "out"
        )
        assert cmd[cmd.index("--compile-mode") + 1] == "default" and "--compile" not in cmd


def test_a_dynamo_strategy_runs_the_trainer_through_its_launcher(tmp_path, benchmark_script):
    """`--dynamo-ddp`: torchrun starts `dynamo_ddp_train.py STRATEGY train ...`, which trains."""
    import subprocess

    script = benchmark_script("ddp_scaling")
    data = script.write_data(tmp_path, 16, 32)
    cmd = script.command(
        "tiny",
        2,
        "eager",
        4,
        2,
        data,
        script.run_config(tmp_path),
        tmp_path / "run",
        device="cpu",
        dynamo_ddp="no_optimization",
    )
    launcher = cmd.index(str(script.DYNAMO_DDP_TRAIN))
    assert cmd[launcher + 1 : launcher + 3] == ["no_optimization", "train"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 3  # header, 2 rows


def test_the_launcher_sets_dynamos_ddp_strategy(benchmark_script):
    import torch._dynamo

    launcher = benchmark_script("dynamo_ddp_train")
    saved = torch._dynamo.config.optimize_ddp
    try:
        launcher.configure("no_optimization")
        assert torch._dynamo.config.optimize_ddp == "no_optimization"
        launcher.configure("ddp_optimizer")
        assert torch._dynamo.config.optimize_ddp == "ddp_optimizer"
    finally:
        torch._dynamo.config.optimize_ddp = saved
    with pytest.raises(SystemExit, match="unknown strategy 'fast'"):
        launcher.configure("fast")


def test_unknown_dynamo_strategies_are_refused(tmp_path, benchmark_script, capsys):
    with pytest.raises(SystemExit):
        benchmark_script("ddp_scaling").main(
            ["--dynamo-ddp", "ddp_optimizer,fast", "--out", str(tmp_path)]
        )
    assert "--dynamo-ddp: unknown fast" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.npy"))  # refused before any data is written
