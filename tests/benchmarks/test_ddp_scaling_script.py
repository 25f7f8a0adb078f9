"""`benchmarks/ddp_scaling.py` end to end on the CPU (torchrun, 1 and 2 gloo processes, a
table), the command lines it builds, and its launcher `benchmarks/dynamo_ddp_train.py`."""

import json

import pytest


def test_scaling_script_trains_under_torchrun(tmp_path, capsys, benchmark_script):
    """The smoke test: one torchrun run of the tiny case (one gloo process: `ddp_overhead.py`'s
    test runs DDP over two), read back from its log."""
    script = benchmark_script("ddp_scaling")
    argv = ["--device", "cpu", "--cases", "tiny", "--gpus", "1", "--modes", "eager"]
    argv += ["--steps", "6", "--log-every", "3", "--skip-rows", "0", "--count", "16"]
    code = script.main([*argv, "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().out
    (record,) = json.loads((tmp_path / "scaling.json").read_text())
    assert (record["gpus"], record["parallel"], record["global_batch"]) == (1, "single", 8)
    assert record["timed_steps"] == 3  # logged steps 3 → 6
    assert record["img_per_s"] == pytest.approx(3 * 8 / record["timed_seconds"])
    assert record["efficiency"] == 1.0  # its own baseline
    assert "| tiny | eager | single | 1 | 8 |" in capsys.readouterr().out
    assert "--threads 1" in " ".join(
        script.command("tiny", 2, "eager", 6, 3, *[tmp_path] * 3, "cpu")
    )


def test_efficiency_is_against_the_one_process_run_of_the_same_case_and_mode(benchmark_script):
    script = benchmark_script("ddp_scaling")
    records = [
        {"case": "ldm", "mode": "eager", "gpus": 1, "img_per_s": 10.0},
        {"case": "ldm", "mode": "eager", "gpus": 2, "img_per_s": 18.0},
        {"case": "ldm", "mode": "compile", "gpus": 2, "img_per_s": 30.0},
        {"case": "ldm", "mode": "eager", "gpus": 4, "error": "exit 1"},
    ]
    script.add_efficiency(records)
    assert [r.get("efficiency") for r in records] == [1.0, 0.9, None, None]


def test_throughput_reads_the_log_after_the_warm_up(tmp_path, benchmark_script):
    log = tmp_path / "log.csv"
    log.write_text(
        "step,loss,lr,grad_norm,it_per_s,elapsed_s\n10,1,1,1,1,30.0\n20,1,1,1,1,31.0\n"
        "30,1,1,1,1,32.0\n40,1,1,1,1,34.0\n"
    )
    result = benchmark_script("ddp_scaling").throughput(log, global_batch=16, skip_rows=1)
    assert result["img_per_s"] == 20 * 16 / 3.0 and result["warmup_seconds"] == 31.0


def test_command_lines_of_the_modes(tmp_path, benchmark_script):
    """Compiled runs compile alike on one and on several GPUs (plain `--compile` would add
    CUDA graphs to the one-process baseline only); FSDP and a Dynamo strategy reach the
    trainer, the latter through its launcher."""
    script = benchmark_script("ddp_scaling")
    paths = tmp_path / "d.npy", tmp_path / "c.yaml", tmp_path / "out"
    for gpus in (1, 2):
        cmd = script.command("ldm", gpus, "compile", 10, 5, *paths)
        assert cmd[cmd.index("--compile-mode") + 1] == "default" and "--compile" not in cmd
        assert cmd[cmd.index("--batch-size") + 1] == str(16 * gpus)
    cmd = script.command("ldm", 2, "eager", 10, 5, *paths, parallel="fsdp")
    assert cmd[cmd.index("--parallel") + 1] == "fsdp"
    cmd = script.command(
        "tiny", 2, "compile", 4, 2, *paths, device="cpu", dynamo_ddp="no_optimization"
    )
    launcher = cmd.index(str(script.DYNAMO_DDP_TRAIN))
    assert cmd[launcher + 1 : launcher + 3] == ["no_optimization", "train"]
    assert "-m" not in cmd[launcher - 1 : launcher + 1]


def test_unknown_dynamo_strategies_are_refused(tmp_path, benchmark_script, capsys):
    with pytest.raises(SystemExit):
        benchmark_script("ddp_scaling").main(
            ["--dynamo-ddp", "ddp_optimizer,fast", "--out", str(tmp_path)]
        )
    assert "--dynamo-ddp: unknown fast" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.npy"))  # refused before any data is written


def test_the_launcher_sets_the_strategy_and_trains(tmp_path, benchmark_script):
    """`dynamo_ddp_train.py STRATEGY train ...`: Dynamo's compiled-DDP strategy, then the run."""
    import torch._dynamo

    scaling = benchmark_script("ddp_scaling")
    launcher = benchmark_script("dynamo_ddp_train")
    data = scaling.write_data(tmp_path, 16, 8)
    cmd = scaling.command(
        "tiny", 1, "eager", 2, 1, data, scaling.run_config(tmp_path), tmp_path / "run", "cpu"
    )
    saved = torch._dynamo.config.optimize_ddp
    try:
        assert launcher.main(["no_optimization", *cmd[cmd.index("train") :]]) == 0
        assert torch._dynamo.config.optimize_ddp == "no_optimization"
        launcher.configure("ddp_optimizer")
        assert torch._dynamo.config.optimize_ddp == "ddp_optimizer"
    finally:
        torch._dynamo.config.optimize_ddp = saved
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 3  # header, 2 rows
    with pytest.raises(SystemExit, match="unknown strategy 'fast'"):
        launcher.configure("fast")
