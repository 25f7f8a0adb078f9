#!/usr/bin/env python3
"""Every cuDNN convolution of a case's model, ours and the reference's, timed by direction:
forward, input gradient and weight gradient, with the rate each reaches.

    python benchmarks/conv_layers.py --cases 3d,ldm --models ours,ref --out $OUT/conv_layers.json

Convolutions take most of a training step's GPU time on both sides (about 70 % of a 3D step),
and a profile of a compiled step names cuDNN's kernels but not the layers they serve. This
script runs one forward of each model on the device under a dispatch mode that records every
`aten.convolution` call (so what runs is what the accelerated model launches: folded
upsamplings as transposed convolutions, not our Triton thin convolutions, which are not
cuDNN's and are left out), then times each distinct call (CUDA-graph replays, bf16
channels-last, cuDNN's autotuning on, without the bias, which compiled graphs of ours add
outside the convolution) as `aten.convolution` and as `aten.convolution_backward` for the
input gradient alone and for the weight gradient alone. FLOPs are
`torch.utils.flop_counter`'s. Per model it sums each call's time over its calls per step; per
row it prints TFLOP/s, so a layer that cuDNN runs far below its neighbours' rate stands out.

ATen runs a transposed convolution (a folded upsampling) through cuDNN's kernels for the
ordinary convolution it transposes (its forward as that one's input gradient, its weight
gradient with input and output gradient exchanged), so its rows show those kernels' rates.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import conv_flop_count

try:
    import diffunet  # noqa: F401  (installed, or run from a checkout:)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffunet.accel import memory_format_for
from diffunet.model.introspect import example_inputs
from harness.layers import (
    kernel_time_ms,
    layer_benchmark_parser,
    layer_benchmark_setup,
    write_json_result,
)
from harness.models import ReferenceUnavailable, build_case, build_model

aten = torch.ops.aten


class ConvCall(NamedTuple):
    """One `aten.convolution` call's shapes and arguments, hashable."""

    input: tuple[int, ...]
    weight: tuple[int, ...]
    bias: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int
    input_grad: bool
    """Whether a training step needs this call's input gradient (not for the model's input)."""


class _RecordConvolutions(TorchDispatchMode):
    """Counts the `aten.convolution` calls made under it, keyed by `ConvCall`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[ConvCall] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten.convolution.default:
            x, w, b, stride, padding, dilation, transposed, output_padding, groups = args
            call = ConvCall(
                tuple(x.shape),
                tuple(w.shape),
                b is not None,
                tuple(stride),
                tuple(padding),
                tuple(dilation),
                bool(transposed),
                tuple(output_padding),
                int(groups),
                bool(x.requires_grad),
            )
            self.calls[call] += 1
        return func(*args, **(kwargs or {}))


def record_convolutions(model: torch.nn.Module, inputs: tuple) -> Counter[ConvCall]:
    """The `aten.convolution` calls of one forward of `model` (with gradients enabled, as in a
    training step), with their counts."""
    x, kwargs = inputs
    with _RecordConvolutions() as recorder:
        model(x, **kwargs)
    return recorder.calls


def _operands(call: ConvCall, device: torch.device, dtype: torch.dtype):
    """Random input and weight for `call`, in the channels-last layout cuDNN runs them in."""
    layout = memory_format_for(len(call.input) - 2)
    x = torch.randn(call.input, device=device, dtype=dtype).contiguous(memory_format=layout)
    w = torch.randn(call.weight, device=device, dtype=dtype).contiguous(memory_format=layout)
    return x, w / w[0].numel() ** 0.5


def _arguments(call: ConvCall) -> tuple:
    return (
        list(call.stride),
        list(call.padding),
        list(call.dilation),
        call.transposed,
        list(call.output_padding),
        call.groups,
    )


def directions(
    call: ConvCall, device: torch.device, dtype: torch.dtype
) -> dict[str, tuple[Callable[[], Any], int]]:
    """For `call`: each direction a training step runs ("forward", "input grad" where one is
    needed, "weight grad") as a function to time, with its FLOPs. Without the bias: compiled
    graphs add ours (and its gradient) outside the convolution."""
    x, w = _operands(call, device, dtype)
    args = _arguments(call)
    y = aten.convolution(x, w, None, *args)
    go = torch.randn_like(y)
    flops = conv_flop_count(list(x.shape), list(w.shape), list(y.shape), call.transposed)
    runs: dict[str, Callable[[], Any]] = {"forward": lambda: aten.convolution(x, w, None, *args)}
    if call.input_grad:
        runs["input grad"] = lambda: aten.convolution_backward(
            go, x, w, None, *args, [True, False, False]
        )
    runs["weight grad"] = lambda: aten.convolution_backward(
        go, x, w, None, *args, [False, True, False]
    )
    return {name: (run, flops) for name, run in runs.items()}


def measure_call(
    call: ConvCall, device: torch.device, dtype: torch.dtype, iters: int
) -> dict[str, dict[str, float]]:
    """Per direction of `call`: milliseconds per call (`kernel_time_ms`) and TFLOP/s."""
    timed = {}
    for name, (run, flops) in directions(call, device, dtype).items():
        ms = kernel_time_ms(run, iters, device)
        timed[name] = {"ms": ms, "tflops": flops / ms / 1e9}
    return timed


def model_rows(
    case: str, which: str, quick: bool, device: torch.device, dtype: torch.dtype, iters: int
) -> list[dict[str, Any]]:
    """One row per distinct convolution of `which` model ("ours" or "ref") of `case`: the
    call, its calls per forward and each direction's time."""
    spec = build_case(case, quick)
    torch.manual_seed(0)
    model = build_model(which, spec, device)
    inputs = example_inputs(spec.config, spec.batch, spec.size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with autocast:
        calls = record_convolutions(model, inputs)
    del model, inputs
    rows = []
    for call, count in calls.items():
        row: dict[str, Any] = {"case": case, "model": which, "count": count, **call._asdict()}
        row["directions"] = measure_call(call, device, dtype, iters)
        rows.append(row)
    return rows


def step_ms(row: dict[str, Any], kind: str) -> float:
    """`row`'s milliseconds per step, all its calls: the forward for "infer"; forward, input
    gradient (where needed) and weight gradient for "train"."""
    timed = row["directions"]
    names = ("forward",) if kind == "infer" else ("forward", "input grad", "weight grad")
    return row["count"] * sum(timed[n]["ms"] for n in names if n in timed)


def totals(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per "case / model": convolution milliseconds per inference and per training step."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        entry = out.setdefault(
            f"{row['case']} / {row['model']}", {"infer_ms": 0.0, "train_ms": 0.0}
        )
        entry["infer_ms"] += step_ms(row, "infer")
        entry["train_ms"] += step_ms(row, "train")
    return out


def _shape(values: tuple[int, ...]) -> str:
    return "x".join(map(str, values))


def format_rows(rows: list[dict[str, Any]], summed: dict[str, dict[str, float]]) -> str:
    """A table, slowest rows (by training-step share) first, then the per-model totals."""
    names = ("forward", "input grad", "weight grad")
    head = (
        f"{'case':<14}{'model':<6}{'input':<22}{'weight':<20}{'s':>2}{'T':>2}{'n':>3}"
        + "".join(f"{name:>21}" for name in names)
        + f"{'train ms':>10}"
    )
    note = "(s: stride, T: transposed, n: calls per step; each direction: ms / TFLOP/s)"
    lines = [note, head, "-" * len(head)]
    for row in sorted(rows, key=lambda r: (r["case"], r["model"], -step_ms(r, "train"))):
        cells = ""
        for name in names:
            timed = row["directions"].get(name)
            cells += (
                f"{'':>21}" if timed is None else f"{timed['ms']:>12.3f} /{timed['tflops']:>6.1f}"
            )
        lines.append(
            f"{row['case']:<14}{row['model']:<6}{_shape(row['input']):<22}"
            f"{_shape(row['weight']):<20}{max(row['stride']):>2}{'T' if row['transposed'] else '':>2}"
            f"{row['count']:>3}{cells}{step_ms(row, 'train'):>10.3f}"
        )
    lines.append("")
    for name, t in summed.items():
        lines.append(
            f"{name:<24} convolutions per inference {t['infer_ms']:8.3f} ms, "
            f"per training step {t['train_ms']:8.3f} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Record and time every case's convolutions for each model; print a table, write JSON."""
    parser = layer_benchmark_parser(__doc__.split("\n\n")[0], "conv_layers.json")
    parser.add_argument(
        "--models", default="ours,ref", help="ours, ref or both (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    models = args.models.split(",")
    if not models or set(models) - {"ours", "ref"}:
        parser.error(f"--models: expected ours, ref or both, got {args.models!r}")
    device, dtype, meta = layer_benchmark_setup(args, parser)
    rows, missing = [], []
    for case in args.cases.split(","):
        for which in models:
            try:
                rows += model_rows(case, which, args.quick, device, dtype, args.iters)
            except ReferenceUnavailable as err:
                missing.append(f"{case} / ref: {err}")
                print(f"skipped {case}'s reference: {err}", file=sys.stderr)
    summed = totals(rows)
    print(format_rows(rows, summed), flush=True)
    data = {
        "meta": {**meta, "argv": sys.argv[1:] if argv is None else argv},
        "rows": rows,
        "totals": summed,
        "skipped": missing,
    }
    write_json_result(data, args.out, "conv_layers.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
