"""`benchmarks/ddp_scaling.py` end to end on the CPU: torchrun, 1 and 2 gloo processes, a table."""

import json


def test_scaling_script_measures_one_and_two_processes(tmp_path, capsys, benchmark_script):
    script = benchmark_script("ddp_scaling")
    code = script.main(["--device", "cpu", "--cases", "tiny", "--gpus", "1,2", "--modes", "eager",
                        "--parallel", "ddp,fsdp", "--steps", "12", "--log-every", "3",
                        "--skip-rows", "1", "--count", "32", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().out
    records = json.loads((tmp_path / "scaling.json").read_text())
    assert [(r["gpus"], r["parallel"], r["global_batch"]) for r in records] == [
        (1, "single", 8), (2, "ddp", 16), (2, "fsdp", 16)]
    assert all(r["img_per_s"] > 0 and r["timed_steps"] == 6 for r in records)  # steps 6 → 12
    assert records[0]["efficiency"] == 1.0 and all(r["efficiency"] > 0 for r in records)
    assert "sharded (FSDP: " in (tmp_path / "tiny-eager-2gpu-fsdp.log").read_text()
    table = capsys.readouterr().out
    assert "| tiny | eager | ddp | 2 | 16 |" in table and "| tiny | eager | fsdp | 2 | 16 |" in table


def test_throughput_reads_the_log_after_the_warm_up(tmp_path, benchmark_script):
    log = tmp_path / "log.csv"
    log.write_text("step,loss,lr,grad_norm,it_per_s,elapsed_s\n10,1,1,1,1,30.0\n20,1,1,1,1,31.0\n"
                   "30,1,1,1,1,32.0\n40,1,1,1,1,34.0\n")
    result = benchmark_script("ddp_scaling").throughput(log, global_batch=16, skip_rows=1)
    assert result["img_per_s"] == 20 * 16 / 3.0 and result["warmup_seconds"] == 31.0


def test_compiled_runs_compile_alike_on_one_and_on_several_gpus(tmp_path, benchmark_script):
    """Plain `--compile` would add CUDA graphs to the one-process baseline only."""
    script = benchmark_script("ddp_scaling")
    for gpus in (1, 2):
        cmd = script.command("ldm", gpus, "compile", 10, 5, tmp_path / "d.npy",
                             tmp_path / "c.yaml", tmp_path / "out")
        assert cmd[cmd.index("--compile-mode") + 1] == "default" and "--compile" not in cmd
