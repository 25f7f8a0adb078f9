"""`benchmarks/memory_history.py`: replaying allocator traces and naming the blocks at the peak.

The recording itself needs a GPU; its analysis is plain Python and is checked here on traces
written by hand, in the format of `torch.cuda.memory._snapshot()["device_traces"]`.
"""

import os

import pytest
import torch

MiB = 2**20


def alloc(addr, mib, frames=()):
    return {"action": "alloc", "addr": addr, "size": mib * MiB, "frames": list(frames)}


def free(addr, mib, action="free_requested"):
    return {"action": action, "addr": addr, "size": mib * MiB, "frames": []}


def test_the_peak_and_the_blocks_alive_at_it(benchmark_script):
    replay = benchmark_script("memory_history").replay
    trace = [
        alloc(1, 100),
        alloc(2, 50),
        free(1, 100),
        free(1, 100, "free_completed"),
        alloc(3, 120),
        alloc(4, 10),
        free(4, 10),
        alloc(5, 5),
        free(2, 50),
        free(3, 120),
        free(99, 700),
    ]  # a block from before the recording: not counted
    peak, index, live = replay(trace)
    assert peak == 180 * MiB and index == 5  # blocks 2, 3 and 4: 50 + 120 + 10
    assert sorted(live) == [2, 3, 4]
    assert replay([free(7, 1)]) == (0, -1, {})


def test_blocks_are_grouped_by_the_line_that_allocated_them(tmp_path, benchmark_script):
    script = benchmark_script("memory_history")
    inductor = tmp_path / "torchinductor_root" / "ab" / "cabc.py"
    inductor.parent.mkdir(parents=True)
    inductor.write_text(
        "def call(args):\n"
        "    buf7 = empty_strided_cuda((4, 64), (64, 1), torch.float32)\n"
        "    # Topologically Sorted Source Nodes: [group_norm]\n"
    )
    torch_internal = os.path.join(os.sep, "site-packages", "torch", "x.py")
    cpp = [
        {"filename": "??", "line": 0, "name": "torch::unwind::unwind()"},
        {"filename": "/pytorch/c10/cuda/CUDACachingAllocator.cpp", "line": 9, "name": "malloc"},
    ]
    at_buf7 = [
        *cpp,
        {"filename": torch_internal, "line": 3, "name": "inner"},
        {"filename": str(inductor), "line": 2, "name": "call"},
    ]
    elsewhere = [{"filename": str(tmp_path / "model.py"), "line": 1, "name": "forward"}]
    (tmp_path / "model.py").write_text("h = conv(x)\n")
    blocks = {1: alloc(1, 8, at_buf7), 2: alloc(2, 8, at_buf7), 3: alloc(3, 20, elsewhere)}
    groups = script.group(blocks, top=5)
    assert [(g["mib"], g["count"]) for g in groups] == [(20, 1), (16, 2)]
    assert groups[0]["where"] == ["model.py:1 forward | h = conv(x)"]
    (where,) = groups[1]["where"]  # C++ frames and torch's own Python frame are skipped
    assert where.startswith(
        "cabc.py:2 call | buf7 = empty_strided_cuda((4, 64), (64, 1), torch.float32)"
    )
    assert where.endswith("# Topologically Sorted Source Nodes: [group_norm]")
    assert len(script.group(blocks, top=1)) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("kind", ["train", "infer"])
def test_without_a_gpu_it_says_so(kind, benchmark_script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_script("memory_history").main(["--case", "3d", "--kind", kind])
    assert exit_info.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--models", "ours,theirs"], "ours and/or ref"), (["--kind", "fwd"], "invalid choice")],
)
def test_unknown_models_and_kinds_are_refused(argv, message, benchmark_script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_script("memory_history").main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
