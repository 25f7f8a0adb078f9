#!/usr/bin/env python3
"""A model's upsampling convolutions timed as nearest upsampling then a 3×3 convolution, and
as the same function folded into one transposed convolution of the input
(`diffunet.accel.upsample.folded_upsample_weight`, what the accelerated model runs on the
devices of `diffunet.accel.settings.FOLDED_DEVICES`).

    python benchmarks/upsample_fold.py --cases 3d,ldm,ddpm-cifar10 --out $OUT/upsample_fold.json

Folding takes 8 products per output instead of 27 in 3D (4 instead of 9 in 2D) and never
writes the upsampled input, nor keeps it for the weight gradient; whether cuDNN's transposed
convolutions turn that into time is what this measures. A third way, for this benchmark only,
runs the same products as 2ᵈ stride-1 convolutions, one per output phase, interleaved
afterwards ("phase convs"). Each case's `Upsample` modules are found by running its model on
the meta device and timed at their benchmark shapes in bf16 channels-last (CUDA-graph
replays): forward alone, and a training step's share (forward, input, weight and bias
gradients). The per-step totals weight each shape by how often the model calls it. It also
times the folded convolution's weight gradient alone, as ATen runs it and by output phases
(`diffunet.accel.phase_gradient`: one stride-1 weight gradient per phase, cuDNN's stride-1
kernels). It checks that the ways agree, and counts each case's FLOPs per forward with and
without folding.
`--model-rounds N` also times eager training steps of each whole model both ways, alternating
for N rounds (on the CPU, e.g. `--device cpu --cases 3d --quick --model-size 32
--model-batch 2 --model-rounds 6 --no-layers`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

try:
    import diffunet  # noqa: F401  (installed, or run from a checkout:)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffunet.accel import memory_format_for, settings
from diffunet.accel.conv import convolve
from diffunet.accel.phase_gradient import weight_gradient_by_phases
from diffunet.accel.upsample import folded_upsample_weight, upsample_convolve, upsample_nearest
from diffunet.model.introspect import example_inputs
from diffunet.model.layers.resample import Upsample
from harness.layers import (
    kernel_time_ms,
    layer_benchmark_parser,
    layer_benchmark_setup,
    materialize,
    time_variants,
    write_json_result,
)
from harness.models import build_case, build_ours

#: The two ways the model can run (`--model-rounds`); the layers are timed a third way too.
VARIANTS = ("nearest + conv", "folded")


def upsample_calls(case: str, quick: bool) -> list[tuple[Upsample, tuple[int, ...], int]]:
    """(module on the meta device, input shape, calls per forward) for each distinct upsampling
    of the case's model at its benchmark size."""
    spec = build_case(case, quick)
    model = build_ours(spec.config, "meta")
    seen: Counter = Counter()
    modules: dict = {}

    def record(module, args):
        key = (tuple(args[0].shape), module.factors, module.conv.in_channels)
        seen[key] += 1
        modules.setdefault(key, module)

    hooks = [
        m.register_forward_pre_hook(record)
        for m in model.modules()
        if isinstance(m, Upsample) and m.mode == "nearest_conv"
    ]
    x, kwargs = example_inputs(spec.config, spec.batch, spec.size, device="meta")
    with torch.no_grad():
        model(x, **kwargs)
    for hook in hooks:
        hook.remove()
    return [(modules[key], key[0], count) for key, count in seen.items()]


def forward_flops(case: str, quick: bool) -> dict[str, int]:
    """FLOPs of one sample's forward pass of the case's model, each way, as
    `torch.utils.flop_counter` counts them (on the meta device: shapes only)."""
    spec = build_case(case, quick)
    model = build_ours(spec.config, "meta")
    x, kwargs = example_inputs(spec.config, 1, spec.size, device="meta")
    flops = {}
    for variant in VARIANTS:
        with (
            settings.folding_on(["meta"] if variant == "folded" else []),
            FlopCounterMode(display=False) as counter,
            torch.no_grad(),
        ):
            model(x, **kwargs)
        flops[variant] = counter.get_total_flops()
    return flops


def phase_convolutions(up: Upsample, x: torch.Tensor) -> torch.Tensor:
    """`up(x)` as 2ᵈ stride-1 convolutions of `x`, one per output phase (even or odd position
    along each doubled axis) with that phase's 2-tap folded kernel, interleaved afterwards: the
    products of the folded transposed convolution, run by cuDNN's forward kernels. Only a
    benchmark variant."""
    return _phases(up.conv, x, up.conv.weight, up.factors, 0, [])


def _phases(
    conv: nn.Module,
    x: torch.Tensor,
    kernel: torch.Tensor,
    factors: tuple[int, ...],
    axis: int,
    pads: list[int],
) -> torch.Tensor:
    """The phases of the spatial axes from `axis` on, convolved and interleaved; `kernel` and
    `pads` (in `F.pad`'s order) already hold the earlier axes' choices."""
    if axis == len(factors):
        n = len(factors)
        return torch.convolution(
            F.pad(x, pads), kernel, conv.bias, [1] * n, [0] * n, [1] * n, False, [0] * n, 1
        )
    dim = axis + 2
    if factors[axis] != 2:
        return _phases(conv, x, kernel, factors, axis + 1, [1, 1, *pads])
    w0, w1, w2 = kernel.unbind(dim)
    # Even outputs 2j read x[j-1], x[j]; odd ones x[j], x[j+1].
    even = _phases(conv, x, torch.stack((w0, w1 + w2), dim), factors, axis + 1, [1, 0, *pads])
    odd = _phases(conv, x, torch.stack((w0 + w1, w2), dim), factors, axis + 1, [0, 1, *pads])
    return torch.stack((even, odd), dim + 1).flatten(dim, dim + 1)


def measure(
    module: Upsample, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, iters: int
) -> list[dict]:
    """Forward and training milliseconds of each way (nearest + conv, folded, phase convs),
    and how far each is from the first."""
    torch.manual_seed(0)
    layout = memory_format_for(len(shape) - 2)
    up = materialize(module, device, dtype, layout)
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
    x.requires_grad_()
    ways = {
        "nearest + conv": lambda x: convolve(up.conv, upsample_nearest(x, up.factors)),
        "folded": lambda x: upsample_convolve(up.conv, x, up.factors),  # what the model runs
        "phase convs": lambda x: phase_convolutions(up, x),
    }
    with settings.folding_on([device.type]):
        rows = time_variants(ways, x, [x, *up.parameters()], iters)
    return [{"shape": list(shape), "factors": list(module.factors), **row} for row in rows]


def measure_weight_gradient(
    module: Upsample, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, iters: int
) -> dict:
    """The folded transposed convolution's weight gradient alone, milliseconds as the model
    runs it (`aten.convolution_backward`) and by phases (`weight_gradient_by_phases`), and how far
    the phases' result is from ATen's (relative to its largest magnitude)."""
    torch.manual_seed(0)
    n = len(shape) - 2
    layout = memory_format_for(n)
    up = materialize(module, device, dtype, layout)
    factors = tuple(module.factors)
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
    weight = folded_upsample_weight(up.conv.weight, factors).contiguous(memory_format=layout)
    geometry = (list(factors), [1] * n, [1] * n, True, [0] * n, 1)
    grad = torch.randn_like(torch.ops.aten.convolution(x, weight, None, *geometry))

    def by_aten() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            grad, x, weight, None, *geometry, [False, True, False]
        )[1]

    def by_phases() -> torch.Tensor:
        return weight_gradient_by_phases(x, grad, factors)

    want, got = by_aten().float(), by_phases().float()
    return {
        "shape": list(shape),
        "factors": list(factors),
        "aten_ms": kernel_time_ms(by_aten, iters, device),
        "phases_ms": kernel_time_ms(by_phases, iters, device),
        "max_relative_difference": ((got - want).abs().max() / want.abs().max()).item(),
    }


def model_steps(
    case: str,
    quick: bool,
    device: torch.device,
    dtype: torch.dtype,
    rounds: int,
    steps: int = 3,
    size: int | None = None,
    batch: int | None = None,
) -> dict[str, dict[str, float]]:
    """Eager training steps of the case's whole model (bf16 autocast where `dtype` is bf16,
    AdamW, no compilation), both ways in alternating order for `rounds` rounds of `steps`
    steps: per way the median and the fastest round's milliseconds per step. `size` and
    `batch` replace the case's."""
    spec = build_case(case, quick)
    shape = spec.size if size is None else (size,) * spec.dims
    torch.manual_seed(0)
    model = build_ours(spec.config, device).to(memory_format=memory_format_for(spec.dims))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x, kwargs = example_inputs(spec.config, batch or spec.batch, shape, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step() -> None:
        with autocast:
            out = model(x, **kwargs)
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for turn in range(rounds):
        for variant in VARIANTS if turn % 2 == 0 else reversed(VARIANTS):
            with settings.folding_on([device.type] if variant == "folded" else []):
                step()  # warm-up, and cuDNN's autotuning
                times[variant].append(kernel_time_ms(step, steps, device, graphs=False))
    return {
        variant: {"median_ms": statistics.median(t), "min_ms": min(t)}
        for variant, t in times.items()
    }


def totals(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per case and variant: milliseconds per forward and per training step (each shape's time
    times its calls per forward)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        entry = out.setdefault(
            f"{r['case']} / {r['variant']}", {"forward_ms": 0.0, "train_ms": 0.0}
        )
        entry["forward_ms"] += r["count"] * r["forward_ms"]
        entry["train_ms"] += r["count"] * r["train_ms"]
    return out


def format_rows(
    rows: list[dict], summed: dict[str, dict[str, float]], flops: dict[str, dict[str, int]]
) -> str:
    """One line per (case, shape, variant), then the per-step totals and the model's FLOPs."""
    head = (
        f"{'case':<14}{'input':<24}{'factors':<10}{'calls':>6}  {'variant':<16}"
        f"{'fwd ms':>9}{'train ms':>10}{'rel diff':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:<14}{'x'.join(map(str, r['shape'])):<24}"
            f"{','.join(map(str, r['factors'])):<10}{r['count']:>6}  {r['variant']:<16}"
            f"{r['forward_ms']:>9.3f}{r['train_ms']:>10.3f}"
            f"{r['max_relative_difference']:>10.1e}"
        )
    lines.append("")
    for name, t in summed.items():
        lines.append(
            f"{name:<40} per forward {t['forward_ms']:8.3f} ms   "
            f"per training step {t['train_ms']:8.3f} ms"
        )
    for case, counted in flops.items():
        plain, folded = counted["nearest + conv"], counted["folded"]
        lines.append(
            f"{case:<14}forward GFLOP per sample: nearest + conv {plain / 1e9:.1f}, "
            f"folded {folded / 1e9:.1f} ({1 - folded / plain:.1%} fewer)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Time every case's upsampling both ways; print a table and write JSON."""
    parser = layer_benchmark_parser(__doc__.split("\n\n")[0], "upsample_fold.json")
    parser.add_argument(
        "--model-rounds",
        type=int,
        default=0,
        help="also time eager training steps of each case's whole model both "
        "ways, alternating, this many rounds (default: %(default)s)",
    )
    parser.add_argument(
        "--model-size", type=int, help="spatial size of the whole-model steps (default: the case's)"
    )
    parser.add_argument(
        "--model-batch", type=int, help="batch of the whole-model steps (default: the case's)"
    )
    parser.add_argument(
        "--layers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time each upsampling layer both ways (default: yes)",
    )
    args = parser.parse_args(argv)
    device, dtype, meta = layer_benchmark_setup(args, parser)
    rows, weight_gradients, flops, steps = [], [], {}, {}
    for case in args.cases.split(","):
        flops[case] = forward_flops(case, args.quick)
        for module, shape, count in upsample_calls(case, args.quick) if args.layers else []:
            rows += [
                {"case": case, "count": count, **row}
                for row in measure(module, shape, device, dtype, args.iters)
            ]
            weight_gradients.append(
                {
                    "case": case,
                    "count": count,
                    **measure_weight_gradient(module, shape, device, dtype, args.iters),
                }
            )
        if args.model_rounds:
            steps[case] = model_steps(
                case,
                args.quick,
                device,
                dtype,
                args.model_rounds,
                size=args.model_size,
                batch=args.model_batch,
            )
    summed = totals(rows)
    print(format_rows(rows, summed, flops), flush=True)
    for r in weight_gradients:
        print(
            f"{r['case']:<14}{'x'.join(map(str, r['shape'])):<24}{r['count']:>3} calls  folded "
            f"weight gradient: ATen {r['aten_ms']:.3f} ms, by phases {r['phases_ms']:.3f} ms "
            f"(rel. diff {r['max_relative_difference']:.1e})",
            flush=True,
        )
    for case, timing in steps.items():
        print(
            f"{case:<14}whole-model training step, eager: "
            + ", ".join(
                f"{variant} {t['median_ms']:.1f} ms (fastest {t['min_ms']:.1f})"
                for variant, t in timing.items()
            ),
            flush=True,
        )
    data = {
        "meta": {**meta, "argv": sys.argv[1:] if argv is None else argv},
        "rows": rows,
        "weight_gradients": weight_gradients,
        "totals": summed,
        "forward_flops_per_sample": flops,
        "model_steps": steps,
    }
    write_json_result(data, args.out, "upsample_fold.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
