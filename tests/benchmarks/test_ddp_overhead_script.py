"""`benchmarks/ddp_overhead.py` on the CPU: two gloo processes under torchrun, every variant."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ddp_overhead.py"


def test_variants_train_and_only_the_communicating_ones_stay_in_sync(tmp_path):
    out = tmp_path / "overhead.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(SCRIPT),
            "--case",
            "tiny",
            "--variants",
            "alone,ddp,ddp no_sync,ddp static_graph",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--sizes-mib",
            "0.5",
            "--repeats",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["device"] == "cpu"
    assert [(r["mib"], r["dtype"]) for r in result["all_reduce"]] == [
        (0.5, "float32"),
        (0.5, "bfloat16"),
    ]
    for r in result["all_reduce"]:  # bandwidth: the bytes moved over the time taken
        assert r["algbw_gb_s"] == pytest.approx(r["mib"] * 2**20 / (r["ms"] / 1e3) / 1e9, rel=0.01)
    variants = {r["variant"]: r for r in result["variants"]}
    assert all(len(r["ms_per_step"]) == 2 for r in variants.values())  # one per process
    # Each process trains on its own data: without communication the replicas drift apart.
    in_sync = {name: r["replicas_in_sync"] for name, r in variants.items()}
    assert in_sync == {"alone": False, "ddp": True, "ddp no_sync": False, "ddp static_graph": True}
    assert "| ddp no_sync |" in done.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--case", "tiny"], "run it under torchrun"),
        (["--variants", "ddp fp8"], "unknown variant(s) ddp fp8"),
        (["--variants", "alone,nothing"], "unknown variant(s) nothing"),
    ],
)
def test_what_it_cannot_run_is_refused(benchmark_script, monkeypatch, capsys, argv, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        benchmark_script("ddp_overhead").main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
