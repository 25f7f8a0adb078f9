"""`benchmarks/norm_kernels.py`: the norm calls of a model, the per-step totals, and a sweep
run end to end under Triton's CPU interpreter (in tests/accel/test_interpreter.py's child)."""

import dataclasses
import json
import math

import pytest
from torch import nn

from diffunet.accel import settings
from diffunet.model.layers.resblock import ResBlock


@pytest.mark.parametrize("case", ["3d", "ldm"])
def test_every_group_norm_is_one_call_and_additive_blocks_add(case, benchmark_script):
    calls = benchmark_script("norm_kernels").norm_calls(case, quick=True)
    from harness.models import build_case, build_ours

    model = build_ours(build_case(case, quick=True).config, "meta")
    assert sum(calls.values()) == sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    additive = sum(
        isinstance(m, ResBlock) and m.emb_proj is not None and not m.use_scale_shift_norm
        for m in model.modules()
    )
    assert sum(n for (_, _, _, add, _), n in calls.items() if add) == additive > 0


def test_totals_weight_each_call_by_its_count(benchmark_script):
    script = benchmark_script("norm_kernels")
    plan = settings.LaunchPlan()
    small = dataclasses.asdict(plan.small)  # what the plan ships for the row's 2^20 elements
    assert plan.large_from > 4 * 64 * 16**3 and small["num_warps"] != 8
    rows = [
        {
            "shape": [4, 64, 16, 16, 16],
            "count": 3,
            "film": False,
            "add": True,
            "act": True,
            "bytes": {"forward": 3_000_000, "backward": 5_000_000, "stats": 1_000_000},
            "configs": [
                {**small, "forward_ms": 0.002, "backward_ms": 0.004, "stats_ms": 0.0005},
                {
                    **small,
                    "num_warps": 8,
                    "forward_ms": 0.001,
                    "backward_ms": 0.004,
                    "stats_ms": 0.0008,
                },
            ],
        }
    ]
    total = script.summarize(rows, copy_gbps=2000.0)
    assert total["shipped_ms"] == pytest.approx(3 * 0.006)
    assert total["best_ms"] == pytest.approx(3 * 0.005)
    # per forward (inference): the shipped 0.002 ms, the best forward of any configuration 0.001
    assert total["shipped_forward_ms"] == pytest.approx(3 * 0.002)
    assert total["best_forward_ms"] == pytest.approx(3 * 0.001)
    assert total["copy_ms"] == pytest.approx(3 * 8_000_000 / 2000e9 * 1e3)
    assert rows[0]["best"]["num_warps"] == 8
    assert rows[0]["best_forward_gbps"] == pytest.approx(3_000_000 / 0.001 / 1e6)
    # the statistics pass alone: its own best configuration, not the forward's
    assert total["shipped_stats_ms"] == pytest.approx(3 * 0.0005)
    assert total["best_stats_ms"] == pytest.approx(3 * 0.0005)
    assert rows[0]["best_stats"]["num_warps"] == 4
    assert rows[0]["best_stats_gbps"] == pytest.approx(1_000_000 / 0.0005 / 1e6)
    line = script.format_rows(rows).splitlines()[2]
    assert line.endswith(f"; {tuple(small.values())}: 2000") and "        2000  " in line


# Collected only by tests/accel/test_interpreter.py's child pytest (TRITON_INTERPRET=1), which
# runs every `interpreted_*` function: the sweep shares that process's torch and Triton import.
def interpreted_a_sweep_runs_under_the_interpreter(tmp_path, benchmark_script):
    out = tmp_path / "norm.json"
    code = benchmark_script("norm_kernels").main(
        [
            "--quick",
            "--cases",
            "ddpm-cifar10",
            "--iters",
            "1",
            # One call, in large tiles: the interpreter's time goes with the programs run.
            "--min-elements",
            "20000",
            "--tiles",
            "32768",
            "--programs",
            "4",
            "--warps",
            "4",
            "--stages",
            "2",
            "--one-pass",
            "0,1048576",
            "--reduction-warps",
            "0",
            "--no-reference",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())["cases"]["ddpm-cifar10"]
    rows = result["rows"]
    assert rows and all(math.prod(r["shape"]) >= 20000 for r in rows)
    for row in rows:
        # every quick call's programs fit 2^20 elements: that configuration runs in one kernel,
        # so its statistics pass is not a kernel of its own and is not timed
        assert [(c["one_pass_elements"], "stats_ms" in c) for c in row["configs"]] == [
            (0, True),
            (1048576, False),
        ]
    assert result["total"]["best_forward_ms"] <= result["total"]["best_ms"]
