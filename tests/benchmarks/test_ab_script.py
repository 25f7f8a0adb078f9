"""`benchmarks/ab.py`: two source trees measured one after the other, and the summary."""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def _result(**rates: float) -> dict:
    """A `bench.py` result with one compiled training record per model (its peak memory a
    hundredth of its throughput)."""
    return {
        "records": [
            {
                "model": m,
                "mode": "compile",
                "kind": "train",
                "throughput": v,
                "peak_mem_gib": v / 100,
            }
            for m, v in rates.items()
        ],
        "errors": [],
    }


def test_summary_medians_gain_and_ratios_against_the_reference(benchmark_script):
    ab = benchmark_script("ab")
    runs = [
        {"tree": "base", "case": "ldm", "kind": "train", "result": _result(ours=100.0, ref=80.0)},
        {"tree": "change", "case": "ldm", "kind": "train", "result": _result(ours=120.0)},
        {"tree": "change", "case": "ldm", "kind": "train", "result": _result(ours=126.0)},
        {"tree": "base", "case": "ldm", "kind": "train", "result": _result(ours=110.0, ref=84.0)},
    ]
    (row,) = ab.summarize(runs, ["eager", "compile"])  # no eager records: no eager row
    assert (row["base"], row["change"], row["ref"]) == (
        [100.0, 110.0],
        [120.0, 126.0],
        [80.0, 84.0],
    )
    assert row["gain"] == pytest.approx(
        statistics.median([120, 126]) / statistics.median([100, 110]) - 1
    )
    assert row["change_vs_ref"] == pytest.approx(123 / 82)
    assert row["base_vs_ref"] == pytest.approx(105 / 82)
    assert row["peak_gib"] == pytest.approx({"base": 1.05, "change": 1.23, "ref": 0.82})
    table = ab.format_summary([row])
    assert "+17.1%" in table and "1.50×" in table and "1.05/1.23/0.82" in table


def test_source_trees_must_hold_the_package(tmp_path, benchmark_script):
    ab = benchmark_script("ab")
    with pytest.raises(SystemExit):
        ab.parse_args(["--base-src", str(tmp_path)])
    with pytest.raises(SystemExit):
        ab.parse_args(["--base-src", str(SRC), "--kinds", "training"])


def test_both_trees_are_measured_from_their_own_source(tmp_path, benchmark_script, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the bench.py processes: one thread each
    base = tmp_path / "base" / "src"
    shutil.copytree(
        SRC / "diffunet", base / "diffunet", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path / "ab.json"
    ab = benchmark_script("ab")
    code = ab.main(
        [
            "--base-src",
            str(base),
            "--cases",
            "ddpm-cifar10",
            "--kinds",
            "infer",
            "--modes",
            "eager",
            "--no-ref",
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    trees = data["meta"]["trees"]
    assert Path(trees["base"]["imports"]).is_relative_to(base)
    assert Path(trees["change"]["imports"]).is_relative_to(SRC)
    # the base has no harness of its own: both run this checkout's bench.py
    assert trees["base"]["bench"] == trees["change"]["bench"] == [str(ab.BENCH)]
    assert [(r["tree"], r["case"], r["kind"]) for r in data["runs"]] == [
        ("base", "ddpm-cifar10", "infer"),
        ("change", "ddpm-cifar10", "infer"),
    ]
    (row,) = data["summary"]
    measured = [
        next(r["throughput"] for r in run["result"]["records"] if r["model"] == "ours")
        for run in data["runs"]
    ]
    assert [*row["base"], *row["change"]] == measured
    assert row["gain"] == pytest.approx(measured[1] / measured[0] - 1)
    assert row["ref"] == [] and "change_vs_ref" not in row


def test_each_tree_runs_its_own_harness_where_it_has_one(tmp_path, benchmark_script):
    ab = benchmark_script("ab")
    assert ab.bench_command(SRC) == [sys.executable, str(ab.BENCH)]  # this checkout's
    bare, packaged, own = (tmp_path / name / "src" for name in ("bare", "packaged", "own"))
    (packaged / "diffunet").mkdir(parents=True)
    (packaged / "diffunet" / "benchmark.py").touch()  # before the harness left the package
    (own.parent / "benchmarks").mkdir(parents=True)
    (own.parent / "benchmarks" / "bench.py").touch()
    assert ab.bench_command(bare) == [sys.executable, str(ab.BENCH)]
    assert ab.bench_command(packaged)[:2] == [sys.executable, "-c"]
    assert "from diffunet.benchmark import main" in ab.bench_command(packaged)[2]
    assert ab.bench_command(own) == [sys.executable, str(own.parent / "benchmarks" / "bench.py")]


def test_change_env_is_parsed_and_reaches_the_change_processes_only(benchmark_script, monkeypatch):
    ab = benchmark_script("ab")
    args = ab.parse_args(
        ["--base-src", str(SRC), "--change-env", "DIFFUNET_THIN_CONV=1", "--change-env", "X=a=b"]
    )
    assert args.change_env == [("DIFFUNET_THIN_CONV", "1"), ("X", "a=b")]
    with pytest.raises(SystemExit):
        ab.parse_args(["--base-src", str(SRC), "--change-env", "DIFFUNET_THIN_CONV"])
    monkeypatch.delenv("DIFFUNET_THIN_CONV", raising=False)
    environments = []

    def run(command, env=None, **kwargs):
        environments.append(env)
        return subprocess.CompletedProcess(command, 1, "", "not measured")

    monkeypatch.setattr(ab.subprocess, "run", run)
    for env in (dict(args.change_env), {}):
        result = ab.measure(args, SRC, "3d", "train", "ours", 60, env)
        assert result["errors"][0]["error"] == "not measured"
    assert environments[0]["DIFFUNET_THIN_CONV"] == "1" and environments[0]["X"] == "a=b"
    assert "DIFFUNET_THIN_CONV" not in environments[1]
    assert all(env["PYTHONPATH"].split(os.pathsep)[0] == str(SRC) for env in environments)


def test_both_trees_time_the_same_number_of_steps(tmp_path, benchmark_script):
    """Every measurement gets `--iters` and `--repeats`; a harness that could time more steps
    of a short step is held to exactly those (`--min-repeat-s 0`), an older one has no such
    option and gets none."""
    ab = benchmark_script("ab")
    args = ab.parse_args(["--base-src", str(SRC), "--iters", "7", "--repeats", "2"])
    assert ab.timing_argv(args, SRC) == ["--iters", "7", "--repeats", "2", "--min-repeat-s", "0"]
    older = tmp_path / "older" / "src"
    (older.parent / "benchmarks").mkdir(parents=True)
    (older.parent / "benchmarks" / "bench.py").write_text("# --iters, --repeats only\n")
    assert ab.timing_argv(args, older) == ["--iters", "7", "--repeats", "2"]
    defaults = ab.parse_args(["--base-src", str(SRC)])
    assert (defaults.iters, defaults.repeats) == (30, 5)
    quick = ab.parse_args(["--base-src", str(SRC), "--quick"])
    assert (quick.iters, quick.repeats) == (2, 1)
    with pytest.raises(SystemExit):
        ab.parse_args(["--base-src", str(SRC), "--repeats", "0"])


def test_caches_fill_per_kind_and_stop_at_the_limit(benchmark_script):
    ab = benchmark_script("ab")
    args = ab.parse_args(
        ["--base-src", str(SRC), "--cases", "ddpm-cifar10", "--quick", "--limit", "0"]
    )
    trees = {"base": SRC, "change": SRC}
    begin = time.perf_counter()
    fills = ab.fill_caches(args, trees, {"base": {}, "change": {}}, time.perf_counter())
    jobs = {(f["tree"], f["model"], f["kind"]) for f in fills}
    kinds = ("train", "infer")
    assert jobs == {("base", m, k) for m in ("ours", "ref") for k in kinds} | {
        ("change", "ours", k) for k in kinds
    }
    assert all(f["error"] == "stopped at the limit" for f in fills)
    assert time.perf_counter() - begin < 60
