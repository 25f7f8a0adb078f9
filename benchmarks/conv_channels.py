#!/usr/bin/env python3
"""cuDNN's time for a model's stem and head convolutions, as they are and with their channel
counts zero-padded to a multiple of 8.

    python benchmarks/conv_channels.py --cases 3d,ldm,ddpm-cifar10 --out $OUT/conv_channels.json

Channel counts that are not multiples of 8 can make cuDNN pick slower kernels for a model's
stem (2 or 3 input channels) and head (1 or 3 output channels). Zero channels change no
result: the padded stem convolves its input with zero channels appended against zero weight
columns, and the padded head computes zero-weight output channels that are sliced off.

This script times both variants at each case's benchmark shape (and, for the 3D ones on a GPU
with Triton, `diffunet.accel.thin_conv`'s kernels as a third, and for a head those with the
tap-product forward as a fourth), bf16 channels-last, forward alone and a training step's
share (forward, weight and bias gradients, and the input gradient where the model needs one:
the head's, not the stem's), with the padding itself inside the timed region. It also checks
that the variants agree.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import diffunet  # noqa: F401  (installed, or run from a checkout:)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffunet.accel import settings, thin_conv
from diffunet.accel.layout import memory_format_for
from harness.layers import (
    layer_benchmark_parser,
    layer_benchmark_setup,
    materialize,
    time_variants,
    write_json_result,
)
from harness.models import build_case, build_ours

MULTIPLE = settings.CHANNEL_MULTIPLE


def padded_convolution(conv: nn.Module, x: torch.Tensor, multiple: int = MULTIPLE) -> torch.Tensor:
    """`conv(x)` computed with input and output channels zero-padded to `multiple`."""
    weight, bias = conv.weight, conv.bias
    dims = weight.ndim - 2
    layout = memory_format_for(dims)
    extra_in, extra_out = -weight.shape[1] % multiple, -weight.shape[0] % multiple
    if extra_in:  # F.pad lists the last axis first; the channels are axis 1 of both
        x = F.pad(x, [0, 0] * dims + [0, extra_in]).contiguous(memory_format=layout)
        weight = F.pad(weight, [0, 0] * dims + [0, extra_in])
    if extra_out:
        weight = F.pad(weight, [0, 0] * dims + [0, 0, 0, extra_out])
        bias = None if bias is None else F.pad(bias, [0, extra_out])
    out = conv._conv_forward(x, weight.contiguous(memory_format=layout), bias)
    return out[:, : conv.out_channels] if extra_out else out


def stem_and_head(case: str, quick: bool) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """The case's stem and head convolutions (on the meta device) and their input shapes."""
    spec = build_case(case, quick)
    model = build_ours(spec.config, "meta")
    stem, head = model.input_blocks[0][0], model.out[-1]
    batch, size = spec.batch, tuple(spec.size)
    return {
        "stem": (stem, (batch, stem.in_channels, *size)),
        "head": (head, (batch, head.in_channels, *size)),
    }


def _variants(
    conv: nn.Module, x: torch.Tensor
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    variants = {"as is": conv, f"padded to {MULTIPLE}": lambda x: padded_convolution(conv, x)}
    if thin_conv.fits(conv, x):  # a 3D stem or head on a GPU with Triton
        variants["thin_conv"] = lambda x: _thin_conv(conv, x, "never")
        if conv.out_channels < conv.in_channels:
            variants["+ tap products"] = lambda x: _thin_conv(conv, x, "always")
    return variants


def _thin_conv(conv: nn.Module, x: torch.Tensor, tap_products: str) -> torch.Tensor:
    """`thin_conv3d` with a head's forward by cuDNN ("never") or by tap products ("always")."""
    with settings.override(TAP_PRODUCT_FORWARD=tap_products):
        return thin_conv.thin_conv3d(x, conv.weight, conv.bias)


def measure(
    name: str,
    module: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    iters: int,
) -> list[dict]:
    """Forward and training milliseconds of each variant, and how far each is from `as is`."""
    torch.manual_seed(0)
    layout = memory_format_for(len(shape) - 2)
    conv = materialize(module, device, dtype, layout)
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
    x.requires_grad_(name == "head")  # the stem's input is data: no gradient
    inputs = [x, *conv.parameters()] if x.requires_grad else list(conv.parameters())
    rows = time_variants(_variants(conv, x), x, inputs, iters)
    return [
        {
            "conv": name,
            "shape": list(shape),
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            **row,
        }
        for row in rows
    ]


def format_rows(rows: list[dict]) -> str:
    """One line per (case, convolution, variant)."""
    head = (
        f"{'case':<14}{'conv':<6}{'input':<22}{'channels':<10}{'variant':<14}"
        f"{'fwd ms':>9}{'train ms':>10}{'rel diff':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:<14}{r['conv']:<6}{'x'.join(map(str, r['shape'])):<22}"
            f"{str(r['in_channels']) + '->' + str(r['out_channels']):<10}"
            f"{r['variant']:<14}"
            f"{r['forward_ms']:>9.3f}{r['train_ms']:>10.3f}"
            f"{r['max_relative_difference']:>10.1e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Time every case's stem and head, plain and padded; print a table and write JSON."""
    parser = layer_benchmark_parser(__doc__.split("\n\n")[0], "conv_channels.json")
    args = parser.parse_args(argv)
    device, dtype, meta = layer_benchmark_setup(args, parser)
    rows = []
    for case in args.cases.split(","):
        for name, (module, shape) in stem_and_head(case, args.quick).items():
            rows += [
                {"case": case, **row}
                for row in measure(name, module, shape, device, dtype, args.iters)
            ]
    print(format_rows(rows), flush=True)
    data = {"meta": {**meta, "argv": sys.argv[1:] if argv is None else argv}, "rows": rows}
    write_json_result(data, args.out, "conv_channels.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
