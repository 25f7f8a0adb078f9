"""`benchmarks/kernel_registers.py`: the norm kernels compiled for an H100 on the CPU, their
registers read back from the binary."""

import json
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
pytestmark = pytest.mark.skipif(not CUOBJDUMP.exists(), reason="Triton ships no cuobjdump here")


def test_more_warps_take_fewer_registers_per_thread(benchmark_script, tmp_path, capsys):
    script = benchmark_script("kernel_registers")
    out = tmp_path / "regs.json"
    argv = ["--kernels", "backward_reduce", "--channels", "128", "--warps", "4,8"]
    assert script.main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["warps"]) for r in rows] == [
        ("backward_reduce", 4),
        ("backward_reduce", 8),
    ]
    four, eight = rows
    # A tile of 4096 elements over twice the threads: each thread holds half the accumulators.
    assert 0 < eight["registers"] < four["registers"] <= 255
    for row in rows:
        by_registers = script.REGISTERS_PER_SM // (row["registers"] * 32 * row["warps"])
        assert row["programs_per_sm_by_registers"] == min(by_registers, 64 // row["warps"]) >= 1
    assert "backward_reduce" in capsys.readouterr().out


def test_an_unknown_kernel_is_refused_in_one_line(benchmark_script, capsys):
    with pytest.raises(SystemExit):
        benchmark_script("kernel_registers").main(["--kernels", "stats"])
    assert "unknown kernels ['stats']; choose from statistics" in capsys.readouterr().err
