"""Profile steps of a real `diffunet train` run: where the GPU time and the host time go.

Wraps the CLI and hooks the run log's per-step tick: `torch.profiler` records from step FIRST
to step LAST (counted as the run counts them, so warm-up and compilation stay outside), on
every process when run under torchrun. Each process prints its wall time per step, its GPU
kernel time by class (as `bench.py --profile`) and its largest host-side ops by self CPU time,
and writes them to `$OUT/train-profile-TAG-rankR.json` (or `--out`'s folder).

    python benchmarks/train_profile.py --tag alone --first 40 --last 50 -- train --preset ldm ...
    torchrun --standalone --nproc_per_node=2 benchmarks/train_profile.py --tag ddp \\
        --first 40 --last 50 -- train --preset ldm --batch-size 32 ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffunet import cli
from diffunet.training import run_log
from harness.profiling import kernel_breakdown


def summarize(
    prof: Any, steps: int, device: torch.device, wall: float, tag: str, rank: int
) -> dict[str, Any]:
    """Per-step wall time, GPU kernel classes and the top host ops of one profiled window."""
    breakdown = kernel_breakdown(prof, steps, device)
    events = prof.key_averages()
    host = sorted(
        ((e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in events),
        key=lambda row: -row[1],
    )[:30]
    return {
        "tag": tag,
        "rank": rank,
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall,
        "gpu_ms_per_step": breakdown["ms_per_step"],
        "classes": {c: v["ms_per_step"] for c, v in breakdown["classes"].items()},
        "top_kernels": breakdown["top_kernels"][:15],
        "host_self_ms_per_step": [{"op": op, "ms": ms, "calls": calls} for op, ms, calls in host],
    }


def install(
    tag: str, first: int, last: int, out_dir: Path, device: torch.device
) -> Callable[[], None]:
    """Hook `RunLog.tick` so that steps `first`..`last` run under the profiler; returns the
    function that removes the hook."""
    rank = int(os.environ.get("RANK", 0))
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    state: dict[str, Any] = {}
    tick = run_log.RunLog.tick

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def profiled_tick(self: run_log.RunLog, step: int) -> None:
        tick(self, step)
        if step == first:
            sync()
            state["prof"] = profile(activities=activities)
            state["prof"].__enter__()
            state["begin"] = time.perf_counter()
        elif step == last and "prof" in state:
            sync()
            wall = (time.perf_counter() - state["begin"]) / (last - first)
            prof = state.pop("prof")
            prof.__exit__(None, None, None)
            result = summarize(prof, last - first, device, wall, tag, rank)
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"train-profile-{tag}-rank{rank}.json"
            path.write_text(json.dumps(result, indent=1, default=str) + "\n")
            classes = ", ".join(f"{c} {ms:.1f}" for c, ms in result["classes"].items())
            print(
                f"[{tag} rank {rank}] {result['wall_ms_per_step']:.1f} ms/step wall, GPU "
                f"kernels {result['gpu_ms_per_step']:.1f} ms ({classes})",
                flush=True,
            )
            for row in result["host_self_ms_per_step"][:12]:
                print(
                    f"[{tag} rank {rank}]   host {row['ms']:7.2f} ms  x{row['calls']:<6.0f} "
                    f"{row['op'][:90]}",
                    flush=True,
                )
            print(f"[{tag} rank {rank}] wrote {path}", flush=True)

    run_log.RunLog.tick = profiled_tick

    def remove() -> None:
        run_log.RunLog.tick = tick

    return remove


def main(argv: list[str] | None = None) -> int:
    """Parse this script's options, install the hook, run the `diffunet` command after `--`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="run", help="name of this profile in file names")
    parser.add_argument("--first", type=int, default=20, help="first profiled step (20)")
    parser.add_argument("--last", type=int, default=30, help="last profiled step (30)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", ".")),
        help="folder of the JSON files (default $OUT or .)",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        help="device whose kernels are timed (default: cuda when available)",
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="-- and the diffunet command line (e.g. -- train --preset ldm ...)",
    )
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the diffunet command after --, e.g. -- train --preset ldm")
    if not 0 < args.first < args.last:
        parser.error(f"need 0 < --first < --last, got {args.first} and {args.last}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    remove = install(args.tag, args.first, args.last, args.out, device)
    try:
        return cli.main(command)
    finally:
        remove()


if __name__ == "__main__":
    sys.exit(main())
