"""Timing one layer or one call, for the per-layer scripts (`conv_channels.py`,
`upsample_fold.py`, `norm_kernels.py`): CUDA-graph replays of a call, variants of one
computation timed and checked against each other, their shared options and JSON output."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn


def kernel_time_ms(
    fn: Callable[[], Any], iters: int, device: torch.device, graphs: bool = True
) -> float:
    """Milliseconds per call of `fn()`, after two warm-up calls.

    On CUDA with `graphs`, `iters` calls are captured in one CUDA graph and its replay is timed:
    the kernels' own time, as in a CUDA-graph step, without the host's launch and autograd
    overhead (which can hide small kernels entirely). Without, `iters` calls from Python
    between CUDA events; on the CPU, `perf_counter`.
    """
    if device.type != "cuda":
        for _ in range(2):
            fn()
        begin = time.perf_counter()
        for _ in range(iters):
            fn()
        return 1000 * (time.perf_counter() - begin) / iters
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as graph capture needs
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    replay, replays = fn, iters
    if graphs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        replay, replays = graph.replay, 1
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def layer_benchmark_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The options the per-layer timing scripts share (`benchmarks/conv_channels.py`,
    `benchmarks/upsample_fold.py`): --cases, --iters, --device, --quick and --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--cases",
        default="3d,ldm,ddpm-cifar10",
        help="benchmark cases, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--iters", type=int, default=20, help="timed calls per measurement (default: %(default)s)"
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--quick", action="store_true", help="the tiny benchmark cases, float32 (a CPU smoke test)"
    )
    parser.add_argument("--out", help=f"JSON path (default: $OUT/{default_out} when OUT is set)")
    return parser


def layer_benchmark_setup(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[torch.device, torch.dtype, dict[str, Any]]:
    """The device and dtype `layer_benchmark_parser`'s options ask for (bf16 on a GPU unless
    --quick, else float32), with cuDNN's autotuning on, and the result's "meta" entry."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    dtype = torch.bfloat16 if device.type == "cuda" and not args.quick else torch.float32
    torch.backends.cudnn.benchmark = True
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "cudnn": torch.backends.cudnn.version(),
    }
    return device, dtype, meta


def _compare_variant(
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    inputs: list[torch.Tensor],
    expected: tuple | None,
) -> tuple[torch.Tensor, float, tuple]:
    """For one variant `run` of a computation: the output gradient to time it with, how far
    (relative to the largest magnitude) its output and its gradients with respect to `inputs`
    are from `expected` (the first variant's; None for the first), and `expected`.

    Nothing of the autograd graph outlives the call: a parameter's gradient accumulator kept
    from this default-stream call would belong to another stream than the timed calls and
    break their CUDA-graph capture."""
    out = run(x)
    grad = torch.randn_like(out) if expected is None else expected[1]
    grads = torch.autograd.grad(out, inputs, grad)
    if expected is None:
        expected = out.detach(), grad, [g.detach() for g in grads]
    difference = max(
        ((got - want).abs().max() / want.abs().max()).item()
        for got, want in zip([out, *grads], [expected[0], *expected[2]])
    )
    return grad, difference, expected


def time_variants(
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    inputs: list[torch.Tensor],
    iters: int,
) -> list[dict[str, Any]]:
    """Per variant of one computation of `x`: milliseconds of the forward alone and with the
    gradients with respect to `inputs` (`kernel_time_ms`: CUDA-graph replays on a GPU), and
    how far its output and gradients are from the first variant's."""
    rows, expected = [], None
    for variant, run in variants.items():
        grad, difference, expected = _compare_variant(run, x, inputs, expected)

        def forward(run=run) -> None:
            with torch.no_grad():
                run(x)

        def train(run=run, grad=grad) -> None:
            torch.autograd.grad(run(x), inputs, grad)

        rows.append(
            {
                "variant": variant,
                "forward_ms": kernel_time_ms(forward, iters, x.device),
                "train_ms": kernel_time_ms(train, iters, x.device),
                "max_relative_difference": difference,
            }
        )
    return rows


def materialize(
    module: nn.Module, device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format
) -> nn.Module:
    """A copy of `module` (e.g. from a model on the meta device) on `device` in `dtype` and
    `memory_format`, with N(0, 0.05) random parameters."""
    copy = deepcopy(module).to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in copy.parameters():
            p.normal_(0, 0.05)
    return copy.to(memory_format=memory_format)


def write_json_result(data: Any, out: str | None, default_name: str) -> str | None:
    """Write `data` as JSON to `out`, or to `$OUT/default_name` when OUT is set (the device
    machine's folder that comes back); print and return the path (None: nothing written)."""
    if not out and os.environ.get("OUT"):
        out = str(Path(os.environ["OUT"]) / default_name)
    if not out:
        return None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")
    return out


def int_list(text: str, minimum: int = 1) -> list[int]:
    """An argparse type: comma-separated integers, each at least `minimum` ("4,8" → [4, 8])."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers of at least {minimum}, got {text!r}"
        )
    return values


def count_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers, each at least 0."""
    return int_list(text, minimum=0)
