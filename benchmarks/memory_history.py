"""Where a training step's peak GPU memory goes: the blocks alive at the peak, by source line.

    python benchmarks/memory_history.py --case 3d --models ours,ref
    python benchmarks/memory_history.py --case 3d --models ours --plain-convolutions
    python benchmarks/memory_history.py --case ddpm-cifar10 --models ours,ref --kind infer

For each model of the case (ours, or the reference of identical architecture, built as
`bench.py` builds them) it compiles the training step, or with `--kind infer` the forward
without gradients (unless `--eager`; a plain `torch.compile`), runs `--warmup` steps, and
records `torch.cuda.memory._record_memory_history` over one more step. Replaying the
trace gives the peak of the memory allocated during that step and the blocks alive at that
moment, grouped by the source line that allocated them; for Inductor's generated code that
line names the buffer with its shape, strides and dtype, and the comment after it the graph
nodes it serves. Prints the largest groups and writes JSON (`--out`, default
`$OUT/memory_history.json`).

`--plain-convolutions` routes no device's convolutions through diffunet's layout-stable route
(`diffunet.accel.settings.ROUTED_DEVICES`): autograd's own convolution backward, in whatever
layouts the traced graph gives it.
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffunet.accel import settings as accel_settings
from harness.models import MODEL_CASES, Case, build_case, build_model
from harness.timing import Settings, infer_fn, make_batches, make_optimizer, train_step_fn

MiB = 2**20


def replay(trace: list[dict[str, Any]]) -> tuple[int, int, dict[int, dict[str, Any]]]:
    """Replay allocator events: (peak bytes, index of the peak event, blocks live there).

    Only blocks allocated within the trace count; a block is gone once its free is requested
    (the allocator may reuse it for the same stream from then on).
    """
    live: dict[int, dict[str, Any]] = {}
    current = peak = 0
    peak_index, at_peak = -1, {}
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, peak_index, at_peak = current, index, dict(live)
        elif event["action"] == "free_requested" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    return peak, peak_index, at_peak


def _worth_naming(filename: str) -> bool:
    """A Python frame worth naming: Inductor's generated code, or anything outside torch itself.

    The allocator's traces also hold C++ frames (`??` or a `.cpp`/`.h` file) above the Python
    ones, and where they come first they would name every block `torch::unwind::unwind()`.
    """
    return filename.endswith(".py") and (
        "torchinductor" in filename or f"{os.sep}torch{os.sep}" not in filename
    )


def describe(frames: list[dict[str, Any]], depth: int = 2) -> tuple[str, ...]:
    """The innermost `depth` frames outside torch, as `file:line function | source`."""
    out = []
    for frame in frames:
        filename, line = frame["filename"], frame["line"]
        if not _worth_naming(filename):
            continue
        source = linecache.getline(filename, line).strip()
        after = linecache.getline(filename, line + 1).strip()
        if after.startswith("# Topologically Sorted Source Nodes"):
            source += "  " + after
        out.append(f"{Path(filename).name}:{line} {frame['name']} | {source}")
        if len(out) == depth:
            break
    return tuple(out)


def group(blocks: dict[int, dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """The live `blocks` grouped by allocating frames, largest total first."""
    groups: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0])
    for event in blocks.values():
        entry = groups[describe(event.get("frames", []))]
        entry[0] += event["size"]
        entry[1] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])[:top]
    return [
        {"mib": size / MiB, "count": count, "where": list(where)} for where, (size, count) in ranked
    ]


def measure(
    which: str,
    case: Case,
    settings: Settings,
    compiled: bool,
    warmup: int,
    top: int,
    kind: str = "train",
) -> dict[str, Any]:
    """One model's training step or (`kind` "infer") forward without gradients: peak, memory
    allocated before it, and the largest groups at the peak."""
    device = settings.device
    model = build_model(which, case, device)
    runner = settings.compile(model) if compiled else model
    batches = make_batches(case, case.batch, device)
    if kind == "infer":
        step = infer_fn(runner, batches, settings)
    else:
        step = train_step_fn(runner, batches, make_optimizer(model, device), settings)
    begin = time.perf_counter()
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - begin
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    try:
        step(warmup)
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][device.index or 0]
    peak, _, at_peak = replay(trace)
    return {
        "model": which,
        "kind": kind,
        "compiled": compiled,
        "warmup_s": round(warmup_s, 1),
        "allocated_before_gib": before / 2**30,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "allocated_in_step_at_peak_gib": peak / 2**30,
        "events": len(trace),
        "live_at_peak": group(at_peak, top),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure each model and print the largest groups."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="3d", choices=MODEL_CASES)
    parser.add_argument("--models", default="ours,ref", help="ours and/or ref (ours,ref)")
    parser.add_argument("--kind", default="train", choices=("train", "infer"))
    parser.add_argument("--eager", action="store_true", help="do not compile")
    parser.add_argument(
        "--plain-convolutions",
        action="store_true",
        help="convolutions not routed through diffunet's layout-stable route",
    )
    parser.add_argument("--warmup", type=int, default=3, help="steps before the recorded one")
    parser.add_argument("--top", type=int, default=30, help="groups kept per model (30)")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "memory_history.json"
    )
    args = parser.parse_args(argv)
    models = args.models.split(",")
    if not set(models) <= {"ours", "ref"}:
        parser.error(f"--models takes ours and/or ref, got {args.models!r}")
    if not torch.cuda.is_available():
        parser.error("the CUDA memory history needs a CUDA GPU; none is visible")
    if args.plain_convolutions:
        accel_settings.ROUTED_DEVICES = frozenset()
    torch.backends.cudnn.benchmark = True
    settings = Settings(device=torch.device("cuda", torch.cuda.current_device()))
    case = build_case(args.case)
    result = {
        "case": args.case,
        "description": case.description,
        "batch": case.batch,
        "plain_convolutions": args.plain_convolutions,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "runs": [],
    }
    for which in models:
        run = measure(which, case, settings, not args.eager, args.warmup, args.top, args.kind)
        result["runs"].append(run)
        print(
            f"{args.case}/{which} {args.kind}: peak {run['peak_gib']:.3f} GiB, "
            f"{run['allocated_in_step_at_peak_gib']:.3f} GiB of it allocated in the step",
            flush=True,
        )
        for g in run["live_at_peak"][:15]:
            print(f"  {g['mib']:9.1f} MiB ×{g['count']:<3d} " + " ‹ ".join(g["where"])[:220])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
