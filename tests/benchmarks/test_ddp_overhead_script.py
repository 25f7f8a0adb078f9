"""`benchmarks/ddp_overhead.py` on the CPU: two gloo processes under torchrun, every variant."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ddp_overhead.py"


def test_every_variant_trains_and_only_the_communicating_ones_stay_in_sync(tmp_path):
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
    assert all(r["ms"] > 0 and r["algbw_gb_s"] > 0 for r in result["all_reduce"])
    variants = {r["variant"]: r for r in result["variants"]}
    assert list(variants) == [
        "alone",
        "ddp",
        "ddp no_sync",
        "ddp 5 MB buckets",
        "ddp 100 MB buckets",
        "ddp static_graph",
    ]  # bf16 hook: NCCL only
    assert all(len(r["ms_per_step"]) == 2 and min(r["ms_per_step"]) > 0 for r in variants.values())
    # Each process trains on its own data: without communication the replicas drift apart.
    in_sync = {name: r["replicas_in_sync"] for name, r in variants.items()}
    assert in_sync == {
        "alone": False,
        "ddp": True,
        "ddp no_sync": False,
        "ddp 5 MB buckets": True,
        "ddp 100 MB buckets": True,
        "ddp static_graph": True,
    }
    assert "| ddp no_sync |" in done.stdout


def test_it_asks_for_torchrun(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--case", "tiny"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "run it under torchrun" in done.stderr


@pytest.mark.parametrize("variant", ["ddp fp8", "alone,nothing"])
def test_unknown_variants_are_named(variant):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--variants", variant],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "unknown variant(s)" in done.stderr
