#!/usr/bin/env python3
"""Bandwidth of the fused GroupNorm kernels at the shapes a model normalizes, and a sweep of
their launch configuration (`diffunet.accel.settings.NORM_LAUNCH`).

    python benchmarks/norm_kernels.py --cases 3d,ldm --tiles 2048,4096,8192 \\
        --programs 2,4,8 --warps 4,8 --out $OUT/norm_kernels.json

One forward pass of each case's model at its benchmark size, on the meta device, lists the
calls of `group_norm_act` (shape, groups, FiLM, added embedding, SiLU) and how often each
occurs. Every distinct call that the fused kernels would take in a training step is timed in
bf16 and channels-last (as CUDA-graph replays, so the kernels' time and not the host's launch
overhead; `--no-graphs` for the latter), forward alone, forward + backward and the forward's
statistics pass alone, under each launch configuration: milliseconds, and GB/s over the bytes
the kernels must move (forward: x read twice, y written once; backward: x and the output
gradient read twice, the input gradient written once; statistics: x read once). The summary
weights each call by its count: the norm kernels' time in one training step, with the shipped
launch plan and with the best per call, next to what a plain copy of the same bytes would take
at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

try:
    import diffunet  # noqa: F401  (installed, or run from a checkout:)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffunet.accel import norm as fused
from diffunet.accel import settings, triton_runtime
from diffunet.model.introspect import example_inputs
from harness.layers import count_list, int_list, kernel_time_ms, write_json_result
from harness.models import build_case, build_ours

#: (shape, groups, film, add, act) of one `group_norm_act` call.
Call = tuple[tuple[int, ...], int, bool, bool, bool]


def norm_calls(case: str, quick: bool = False) -> Counter[Call]:
    """How often one forward pass of `case`'s model calls `group_norm_act`, per signature."""
    spec = build_case(case, quick)
    model = build_ours(spec.config, "meta")
    x, kwargs = example_inputs(spec.config, spec.batch, spec.size, device="meta")
    calls: Counter[Call] = Counter()
    original = fused.functional.group_norm_act  # what `norm_act` calls

    def record(x, num_groups, weight, bias, eps, scale=None, shift=None, act=True, add=None):
        calls[(tuple(x.shape), num_groups, scale is not None, add is not None, act)] += 1
        return fused.group_norm_act_reference(
            x, num_groups, weight, bias, eps, scale, shift, act, add
        )

    fused.functional.group_norm_act = record
    try:
        # No kernels on the meta device: a decoder block's entry then concatenates `(h, skip)`
        # and normalizes that (the call its fused pair makes) through `group_norm_act` too.
        with torch.no_grad(), settings.override(FUSED_NORM=False):
            model(x, **kwargs)
    finally:
        fused.functional.group_norm_act = original
    return calls


def _timer(
    device: torch.device, iters: int, graphs: bool = True
) -> Callable[[Callable[[], object]], float]:
    """`kernel_time_ms` with the device, iterations and timing method fixed."""
    return lambda fn: kernel_time_ms(fn, iters, device, graphs)


def call_inputs(call: Call, device: torch.device, dtype: torch.dtype) -> tuple[list, dict]:
    """Random inputs for one call, laid out as in a channels-last bf16 training step."""
    shape, groups, film, add, act = call
    b, c = shape[:2]
    x = torch.randn(shape, device=device, dtype=dtype)
    if x.ndim in (4, 5):
        x = x.contiguous(
            memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        )
    tensors = [
        x.requires_grad_(),
        torch.randn(c, device=device).requires_grad_(),
        torch.randn(c, device=device).requires_grad_(),
    ]
    kwargs: dict = {"act": act}
    if film:
        projection = torch.randn(b, 2 * c, device=device, dtype=dtype).requires_grad_()
        kwargs["scale"], kwargs["shift"] = projection.chunk(2, dim=1)
    if add:
        kwargs["add"] = torch.randn(b, c, device=device).requires_grad_()
    return [tensors[0], groups, tensors[1], tensors[2], 1e-5], kwargs


def time_call(
    call: Call, time_ms: Callable, device: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """Forward and backward milliseconds of one call with the current switches."""
    args, kwargs = call_inputs(call, device, dtype)
    grad = torch.randn_like(args[0])

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            fused.group_norm_act(*args, **kwargs)

    inputs = [
        t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.requires_grad
    ]

    def forward_backward() -> None:  # autocast as in the model: the reference's norm in fp32
        with torch.autocast(device.type, dtype=dtype):
            y = fused.group_norm_act(*args, **kwargs)
        torch.autograd.grad(y, inputs, grad.to(y.dtype))  # no accumulation into .grad

    forward_ms = time_ms(forward)
    timing = {"forward_ms": forward_ms, "backward_ms": time_ms(forward_backward) - forward_ms}
    x3 = args[0].flatten(2)
    if fused.fused_available(args[0]) and fused.launch.one_pass_shape(x3, args[1]) is None:
        timing["stats_ms"] = time_ms(statistics_pass(args[0], args[1], kwargs.get("add")))
    return timing


def statistics_pass(
    x: torch.Tensor, num_groups: int, add: torch.Tensor | None
) -> Callable[[], object]:
    """The forward's statistics pass alone (`_stats_kernel`, then `_stats_combine_kernel`),
    as the fused forward launches it for `x` under the current launch configuration."""
    x3 = x.detach().flatten(2)
    add = fused.per_channel_operand(None if add is None else add.detach(), x)
    launch = fused.launch.launch_shape(x3)
    return lambda: fused.launchers.group_stats(x3, add, num_groups, 1e-5, launch)


def moved_bytes(call: Call, dtype: torch.dtype) -> dict[str, int]:
    """The activation bytes the fused kernels read and write, forward and backward, and those
    the forward's statistics pass reads."""
    size = math.prod(call[0]) * torch.empty(0, dtype=dtype).element_size()
    return {"forward": 3 * size, "backward": 5 * size, "stats": size}


def copy_bandwidth(device: torch.device, time_ms: Callable, nbytes: int) -> float:
    """GB/s of `dst.copy_(src)` (read + write) for `nbytes` bytes."""
    src = torch.empty(nbytes // 2, device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_ms(lambda: dst.copy_(src)) / 1e6


def sweep(
    calls: Counter[Call],
    configs: list[settings.LaunchConfig],
    device: torch.device,
    dtype: torch.dtype,
    time_ms: Callable,
    deadline: float,
    reference: bool,
) -> list[dict]:
    """Time every call under every launch configuration (and the eager reference)."""
    rows = []
    for call, count in sorted(calls.items(), key=lambda item: -math.prod(item[0][0])):
        row = {
            "shape": list(call[0]),
            "groups": call[1],
            "film": call[2],
            "add": call[3],
            "act": call[4],
            "count": count,
            "bytes": moved_bytes(call, dtype),
            "configs": [],
        }
        for config in configs:
            if time.monotonic() > deadline:
                row["incomplete"] = True
                break
            with settings.override(NORM_LAUNCH=config):
                timing = time_call(call, time_ms, device, dtype)
            row["configs"].append({**asdict(config), **timing})
        if reference and time.monotonic() < deadline:
            with settings.override(FUSED_NORM=False):
                row["reference"] = time_call(call, time_ms, device, dtype)
        rows.append(row)
    return rows


def _step_ms(timing: dict) -> float:
    return timing["forward_ms"] + timing["backward_ms"]


def _forward_ms(timing: dict) -> float:
    return timing["forward_ms"]


def _timing_of(row: dict, config: dict) -> dict | None:
    """The timing of `row` under the launch configuration `config` (None if not measured)."""
    return next((c for c in row["configs"] if all(c[k] == v for k, v in config.items())), None)


def _shipped(row: dict) -> dict:
    """The configuration the shipped `LaunchPlan` picks for this row's call."""
    return asdict(settings.LaunchPlan().for_elements(math.prod(row["shape"])))


def summarize(rows: list[dict], copy_gbps: float) -> dict:
    """Per-step milliseconds (each call times its count): the shipped launch plan (where the
    sweep included its configuration), the best configuration per call, and a copy of the same
    bytes at `copy_gbps`; the same for the forward alone (an inference step's norm time); of
    the forward's statistics pass alone (where it is a separate kernel), the shipped plan's
    and the best per call. Marks each row's best configuration, and the best for the
    statistics."""
    total = {
        "shipped_ms": 0.0,
        "best_ms": 0.0,
        "copy_ms": 0.0,
        "shipped_forward_ms": 0.0,
        "best_forward_ms": 0.0,
        "shipped_stats_ms": 0.0,
        "best_stats_ms": 0.0,
    }
    for row in rows:
        if not row["configs"]:
            continue
        mine = _timing_of(row, _shipped(row))
        best = min(row["configs"], key=_step_ms)
        row["best"] = {k: best[k] for k in asdict(settings.LaunchConfig())}
        for direction in ("forward", "backward"):
            row[f"best_{direction}_gbps"] = row["bytes"][direction] / best[f"{direction}_ms"] / 1e6
        if mine is not None:
            total["shipped_ms"] += row["count"] * _step_ms(mine)
            total["shipped_forward_ms"] += row["count"] * _forward_ms(mine)
        total["best_ms"] += row["count"] * _step_ms(best)
        total["best_forward_ms"] += row["count"] * min(map(_forward_ms, row["configs"]))
        total["copy_ms"] += (
            row["count"] * (row["bytes"]["forward"] + row["bytes"]["backward"]) / copy_gbps / 1e6
        )
        timed = [c for c in row["configs"] if "stats_ms" in c]
        if timed:
            stats = min(timed, key=lambda c: c["stats_ms"])
            row["best_stats"] = {k: stats[k] for k in asdict(settings.LaunchConfig())}
            row["best_stats_gbps"] = row["bytes"]["stats"] / stats["stats_ms"] / 1e6
            total["best_stats_ms"] += row["count"] * stats["stats_ms"]
            if mine is not None and "stats_ms" in mine:
                total["shipped_stats_ms"] += row["count"] * mine["stats_ms"]
    return total


def _config_text(config: dict) -> str:
    return ", ".join(str(config[k]) for k in asdict(settings.LaunchConfig()))


def format_rows(rows: list[dict]) -> str:
    """One line per call: the shipped plan's and the best configuration's times and bandwidth,
    and the statistics pass's bandwidth under the shipped plan and under its best one."""
    head = (
        f"{'shape':<24}{'flags':<14}{'n':>3}{'ref ms':>14}{'fwd ms':>9}{'bwd ms':>9}"
        f"{'fwd GB/s':>10}{'bwd GB/s':>10}{'stats GB/s':>12}"
        f"  best (tile, programs/SM, warps, stages, one-pass): fwd/bwd ms, GB/s; "
        f"stats best: GB/s"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        flags = (
            "+".join(
                f
                for f, on in (("film", row["film"]), ("add", row["add"]), ("silu", row["act"]))
                if on
            )
            or "plain"
        )
        mine = _timing_of(row, _shipped(row))
        ref = row.get("reference")
        cells = f"{ref['forward_ms']:>7.3f}/{ref['backward_ms']:<6.3f}" if ref else f"{'-':>14}"
        cells += (
            ""
            if mine is None
            else (
                f"{mine['forward_ms']:>9.3f}{mine['backward_ms']:>9.3f}"
                f"{row['bytes']['forward'] / mine['forward_ms'] / 1e6:>10.0f}"
                f"{row['bytes']['backward'] / mine['backward_ms'] / 1e6:>10.0f}"
                + (
                    f"{row['bytes']['stats'] / mine['stats_ms'] / 1e6:>12.0f}"
                    if "stats_ms" in mine
                    else f"{'-':>12}"
                )
            )
        )
        best = _timing_of(row, row["best"]) if "best" in row else None
        tail = (
            ""
            if best is None
            else (
                f"  ({_config_text(best)}): "
                f"{best['forward_ms']:.3f}/{best['backward_ms']:.3f}, "
                f"{row['best_forward_gbps']:.0f}/{row['best_backward_gbps']:.0f}"
            )
        )
        if "best_stats" in row:
            stats = row["best_stats"]
            tail += f"; ({_config_text(stats)}): {row['best_stats_gbps']:.0f}"
        lines.append(
            f"{'x'.join(map(str, row['shape'])):<24}{flags:<14}{row['count']:>3}{cells}{tail}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; prints a table per case and writes JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--cases", default="3d,ldm", help="benchmark cases, comma-separated")
    plan = settings.LaunchPlan()
    parser.add_argument(
        "--tiles",
        type=int_list,
        default=sorted({plan.large.tile_elements, plan.small.tile_elements}),
        help="tile_elements values",
    )
    parser.add_argument(
        "--programs",
        type=int_list,
        default=sorted({plan.large.programs_per_sm, plan.small.programs_per_sm}),
        help="programs_per_sm values",
    )
    parser.add_argument(
        "--warps",
        type=int_list,
        default=sorted({plan.large.num_warps, plan.small.num_warps}),
        help="num_warps values",
    )
    parser.add_argument(
        "--stages",
        type=int_list,
        default=sorted({plan.large.loop_stages, plan.small.loop_stages}),
        help="loop_stages values (software-pipelining depth of the kernels' loops; 1: none)",
    )
    parser.add_argument(
        "--one-pass",
        type=count_list,
        default=sorted({plan.large.one_pass_elements, plan.small.one_pass_elements}),
        help="one_pass_elements values (the largest program of a call run in "
        "one kernel each way; 0: none)",
    )
    parser.add_argument(
        "--reduction-warps",
        type=count_list,
        default=sorted({plan.large.reduction_warps, plan.small.reduction_warps}),
        help="reduction_warps values (warps of the backward-reduce kernel; 0: as --warps)",
    )
    parser.add_argument(
        "--min-elements",
        type=int,
        default=settings.CUDA_GRAPHS_MIN_ELEMENTS,
        help="time only calls of at least this many elements (the size from "
        "which compiled CUDA-graph steps call the kernels)",
    )
    parser.add_argument("--iters", type=int, default=20, help="timed calls per measurement")
    parser.add_argument(
        "--no-graphs",
        dest="graphs",
        action="store_false",
        help="time calls launched from Python instead of CUDA-graph replays "
        "(host overhead included)",
    )
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the eager reference (F.group_norm and friends)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=540,
        help="seconds after which the remaining configurations are skipped",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the tiny benchmark cases (a smoke test, e.g. under Triton's CPU interpreter)",
    )
    parser.add_argument("--out", help="JSON path (default: $OUT/norm_kernels.json when OUT is set)")
    args = parser.parse_args(argv)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if triton_runtime.triton is None or not (torch.cuda.is_available() or interpreting):
        parser.error("the fused kernels need Triton and a CUDA device (or TRITON_INTERPRET=1)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    deadline = time.monotonic() + args.deadline
    configs = [
        settings.LaunchConfig(*values)
        for values in itertools.product(
            args.tiles, args.programs, args.warps, args.stages, args.one_pass, args.reduction_warps
        )
    ]
    settings.set_fused_enabled(True, min_elements=0)
    time_ms = _timer(device, args.iters, args.graphs)
    copy_gbps = copy_bandwidth(device, time_ms, 1 << (20 if args.quick else 30))
    data: dict = {
        "meta": {
            "device": torch.cuda.get_device_name()
            if device.type == "cuda"
            else "cpu (Triton interpreter)",
            "torch": torch.__version__,
            "argv": sys.argv[1:] if argv is None else argv,
            "copy_gbps": copy_gbps,
            "cuda_graphs": args.graphs and device.type == "cuda",
        },
        "cases": {},
    }
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    for case in args.cases.split(","):
        calls = Counter(
            {
                call: n
                for call, n in norm_calls(case, args.quick).items()
                if math.prod(call[0]) >= args.min_elements
            }
        )
        rows = sweep(calls, configs, device, dtype, time_ms, deadline, args.reference)
        total = summarize(rows, copy_gbps)
        data["cases"][case] = {"rows": rows, "total": total}
        print(
            f"\n{case}: norm kernels per training step {total['shipped_ms']:.2f} ms with the "
            f"shipped launch plan, {total['best_ms']:.2f} ms with the best per call, "
            f"{total['copy_ms']:.2f} ms to copy the same bytes; per forward "
            f"{total['shipped_forward_ms']:.2f} ms shipped, {total['best_forward_ms']:.2f} ms "
            f"with the best per call; the forward's statistics pass "
            f"{total['shipped_stats_ms']:.2f} ms shipped, {total['best_stats_ms']:.2f} ms "
            f"with the best per call"
        )
        print(format_rows(rows), flush=True)
    write_json_result(data, args.out, "norm_kernels.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
