"""Estimate a training step's peak memory without a GPU: fake tensors under PyTorch's MemTracker.

    python benchmarks/memory_estimate.py --preset ldm --image-size 256 --batch-size 16
    python benchmarks/memory_estimate.py --preset ldm --image-size 256 --batch-size 32 \\
        model_channels=256 'channel_mult=[1,1,2,2,4,4]' --checkpoint --ema

The model, AdamW and a batch are built under `FakeTensorMode` (no memory is allocated, nothing
is computed); one warm-up step creates the optimizer state, then
`torch.distributed._tools.mem_tracker.MemTracker` follows the next step's tensors: forward under
bf16 autocast (the CPU's casting rules), float32 MSE, backward, AdamW step. The peak is the sum
of live tensor bytes; `--ema` adds a float32 copy of the weights, as `diffunet train` keeps.

The norms follow the GPU's eager rule: those of at least `settings.eager_min_elements()`
elements (2²⁴) run the fused op (its fake implementation: a bf16 output, and for backward the
bf16 input and two float32 statistics per sample and channel), the others the reference path
in float32 as CUDA's autocast runs it (GroupNorm and SiLU keep float32 copies, the next
convolution a bf16 one); `--norm-from N` moves that threshold (0: every norm fused, about as
a CUDA-graph step calls them from 2²⁰).

It is an estimate: the GPU adds cuDNN workspaces and allocator slack; docs/performance.md
compares it with the peaks `bench.py` measures on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffunet import UNetConfig
from diffunet.accel import decoder_entry, settings
from diffunet.accel.norm import functional as norm_functional
from diffunet.accel.norm.ops import group_norm_act_fake
from diffunet.model.introspect import example_inputs
from diffunet.model.presets import preset
from diffunet.training.run_config import parse_override
from harness.models import build_ours

GiB = 2**30


@contextmanager
def gpu_norms(min_elements: int) -> Iterator[None]:
    """Norms as on the GPU: every `group_norm_act` of at least `min_elements` elements goes to
    the fused op `diffunet::group_norm_act` whatever the device (under `FakeTensorMode` its
    fake implementation stands in for the kernels; real CPU tensors have none), decoder
    blocks take `(h, skip)` apart (`decoder_entry`) where their concatenation has that many
    elements, and the others run their reference path in float32 under autocast, as CUDA's
    autocast runs `group_norm` (the CPU's keeps bfloat16)."""
    routed, reference = (
        norm_functional.compiled_fused_wanted,
        norm_functional.group_norm_act_reference,
    )

    def float32_reference(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu"):
            x = x.float()
        return reference(x, *args, **kwargs)

    def kernels_backward(grad, x, weight, bias, *args, out=None):
        return (
            torch.empty_like(x) if out is None else out,
            torch.empty_like(weight),
            torch.empty_like(bias),
            None,
            None,
            None,
        )

    saved = (
        decoder_entry.concat_fused_wanted,
        decoder_entry.norm_forward,
        decoder_entry.norm_backward,
    )
    norm_functional.compiled_fused_wanted = lambda x: x.numel() >= min_elements
    norm_functional.group_norm_act_reference = float32_reference
    decoder_entry.concat_fused_wanted = lambda x, skip: x.numel() + skip.numel() >= min_elements
    decoder_entry.norm_forward = group_norm_act_fake  # the kernels' outputs, computing nothing
    decoder_entry.norm_backward = kernels_backward
    try:
        yield
    finally:
        norm_functional.compiled_fused_wanted, norm_functional.group_norm_act_reference = (
            routed,
            reference,
        )
        (
            decoder_entry.concat_fused_wanted,
            decoder_entry.norm_forward,
            decoder_entry.norm_backward,
        ) = saved


def peak_training_bytes(
    config: UNetConfig, batch: int, *, fake: bool = True, norm_from: int | None = None
) -> tuple[dict[str, int], int]:
    """Peak bytes of one training step of `config` at `batch`, by kind ("Total", "PARAM",
    "GRAD", "ACT", "OPT", ...), and the number of parameters.

    Norms behave as on the GPU (`gpu_norms`): those of at least `norm_from` elements run the
    fused op (default: the GPU's eager rule, `settings.eager_min_elements()`). `fake=False` runs
    the same step on real CPU tensors (slow; for checking the estimate), where every norm takes
    the float32 reference path.
    """
    if norm_from is None:
        norm_from = settings.eager_min_elements()
    if not fake:
        norm_from = sys.maxsize
    with gpu_norms(norm_from), FakeTensorMode() if fake else torch.device("cpu"):
        model = build_ours(config)
        params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        x, inputs = example_inputs(config, batch)
        noise = torch.randn(batch, config.out_channels, *x.shape[2:])

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, **inputs)
            F.mse_loss(out.float(), noise).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # creates AdamW's state
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            step()
    parts: dict[str, int] = {}
    for by_kind in tracker.get_tracker_snapshot("peak").values():
        for kind, nbytes in by_kind.items():
            name = str(kind).split(".")[-1]
            parts[name] = parts.get(name, 0) + nbytes
    return parts, params


def main(argv: list[str] | None = None) -> int:
    """Print the estimate for the preset, overrides and batch given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ldm")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16, help="per device (16)")
    parser.add_argument("--checkpoint", action="store_true", help="use_checkpoint=True")
    parser.add_argument("--ema", action="store_true", help="add a float32 EMA of the weights")
    parser.add_argument(
        "--norm-from",
        type=int,
        default=None,
        metavar="N",
        help="norms of at least N elements run the fused op (default: the "
        "GPU's eager rule, 2^24; 0: all, as in a CUDA-graph step)",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="model overrides")
    args = parser.parse_args(argv)
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    try:
        config = preset(args.preset, use_checkpoint=args.checkpoint, **overrides)
    except (KeyError, TypeError, ValueError) as err:
        parser.error(str(err).strip("'\""))
    if config.image_size is None:
        parser.error(f"preset {args.preset!r} has no image size; pass --image-size")
    if config.context_dim is not None:
        parser.error("models with cross-attention (context_dim) are not estimated here")
    if args.norm_from is not None and args.norm_from < 0:
        parser.error(f"--norm-from must be at least 0, got {args.norm_from}")
    parts, params = peak_training_bytes(config, args.batch_size, norm_from=args.norm_from)
    total = parts["Total"] + (4 * params if args.ema else 0)
    print(
        f"{args.preset} {' '.join(args.overrides)} ({params / 1e6:.1f}M parameters), "
        f"{config.image_size}^{config.dims}, batch {args.batch_size}"
        f"{', checkpointing' if args.checkpoint else ''}{', EMA' if args.ema else ''}: "
        f"estimated peak {total / GiB:.2f} GiB"
    )
    shown = {k: v for k, v in parts.items() if k != "Total" and v}
    print(
        "  at the peak: "
        + ", ".join(f"{k} {v / GiB:.2f}" for k, v in shown.items())
        + (f", EMA {4 * params / GiB:.2f}" if args.ema else "")
        + " GiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
