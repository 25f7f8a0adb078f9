"""What data parallelism itself costs: all-reduce bandwidth and a bare DDP training step.

Run under torchrun, one process per GPU (NCCL; gloo on the CPU):

    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_overhead.py --case ldm

1. `all_reduce` of `--sizes-mib` (float32 and bfloat16): milliseconds and algorithm bandwidth.
2. The case's training step (its per-GPU batch, bf16 autocast on a GPU, channels-last, fused
   AdamW, gradient clipping; no EMA, data loading or logging), timed in every process, in
   these variants:

   - `alone`: no DDP; every process trains its own copy (the same host and GPUs busy);
   - `ddp`: DDP as `diffunet train` wraps the model (`gradient_as_bucket_view=True`);
   - `ddp no_sync`: the same inside `no_sync()`, i.e. without any communication;
   - `ddp 5 MB` / `ddp 100 MB` buckets, `ddp static_graph`, `ddp bf16 hook` (gradients
     all-reduced in bfloat16).

`ddp` against `alone` is what DDP costs; `diffunet train`'s scaling (`ddp_scaling.py`) below
that is the trainer's. Each variant also records whether the processes' weights are still
equal after training on different data (`replicas_in_sync`): true for every variant that
communicates. Prints a table; writes JSON to `--out` (default `$OUT/ddp_overhead.json`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddp_scaling import CASES
from diffunet import UNetConfig
from diffunet.accel import memory_format_for
from diffunet.model.presets import preset
from diffunet.training.distributed import cleanup
from diffunet.training.parallel import place_model
from diffunet.training.run_config import parse_override
from harness.models import build_ours

#: variant → (DDP keyword arguments or None for no DDP, communication hook, inside no_sync)
VARIANTS: dict[str, tuple[dict | None, Callable | None, bool]] = {
    "alone": (None, None, False),
    "ddp": ({}, None, False),
    "ddp no_sync": ({}, None, True),
    "ddp 5 MB buckets": ({"bucket_cap_mb": 5}, None, False),
    "ddp 100 MB buckets": ({"bucket_cap_mb": 100}, None, False),
    "ddp static_graph": ({"static_graph": True}, None, False),
    "ddp bf16 hook": ({}, default_hooks.bf16_compress_hook, False),
}


def all_reduce_times(sizes_mib: list[float], device: torch.device, repeats: int) -> list[dict]:
    """Milliseconds and algorithm bandwidth of one all_reduce per size and dtype."""
    rows = []
    for mib in sizes_mib:
        for dtype in (torch.float32, torch.bfloat16):
            numel = max(1, int(mib * 2**20) // dtype.itemsize)
            tensor = torch.ones(numel, dtype=dtype, device=device)
            for _ in range(2):
                dist.all_reduce(tensor)
            seconds = timed(lambda t=tensor: dist.all_reduce(t), repeats, device)
            size = tensor.numel() * tensor.element_size()
            rows.append(
                {
                    "mib": size / 2**20,
                    "dtype": str(dtype).removeprefix("torch."),
                    "ms": seconds * 1e3,
                    "algbw_gb_s": size / seconds / 1e9,
                }
            )
    return rows


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Seconds per call of `fn`, waiting for the device at both ends."""
    sync(device)
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - begin) / repeats


def sync(device: torch.device) -> None:
    """Wait for `device`'s queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_variant(
    name: str,
    config: UNetConfig,
    batch: int,
    size: int,
    device: torch.device,
    steps: int,
    warmup: int,
) -> dict:
    """Time `steps` training steps of the variant `name`; ms per step of every process."""
    ddp_kwargs, hook, no_sync = VARIANTS[name]
    gc.collect()  # the last variant's DDP objects sit in reference cycles
    torch.manual_seed(0)  # the same initial weights in every process
    model = build_ours(config).to(device)
    place_model(model, device)  # channels-last weights on a GPU, as `diffunet train` does
    net = model
    if ddp_kwargs is not None:
        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.index is not None else None,
            gradient_as_bucket_view=True,
            **ddp_kwargs,
        )
        if hook is not None:
            net.register_comm_hook(None, hook)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(1 + dist.get_rank())  # different data per process
    shape = (batch, config.in_channels, size, size)
    x, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    x, noise = x.to(device), noise.to(device)
    if device.type == "cuda":
        layout = memory_format_for(config.dims)
        x, noise = (t.contiguous(memory_format=layout) for t in (x, noise))
    t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with net.no_sync() if no_sync else nullcontext():
            with autocast:
                loss = F.mse_loss(net(x, t).float(), noise)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    dist.barrier()
    ms = timed(step, steps, device) * 1e3
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, ms)
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    checksums = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(checksums, checksum)
    return {
        "variant": name,
        "ms_per_step": every,
        "mean_ms_per_step": sum(every) / len(every),
        "replicas_in_sync": all(bool(c == checksums[0]) for c in checksums),
    }


def table(records: list[dict]) -> str:
    """Markdown table of the variants, with the cost over `alone`."""
    alone = next((r["mean_ms_per_step"] for r in records if r["variant"] == "alone"), None)
    lines = [
        "| variant | ms per step (each process) | over alone | replicas in sync |",
        "|---|---|---|---|",
    ]
    for r in records:
        over = f"{r['mean_ms_per_step'] / alone - 1:+.1%}" if alone else "–"
        each = " / ".join(f"{m:.2f}" for m in r["ms_per_step"])
        lines.append(f"| {r['variant']} | {each} | {over} | {r['replicas_in_sync']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure, print, write the JSON (rank 0)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="ldm", choices=sorted(CASES))
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, of: {', '.join(VARIANTS)} (default: all; the bf16 hook needs NCCL)",
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (30)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing (5)")
    parser.add_argument(
        "--sizes-mib", default="25,100,300", help="all_reduce sizes in MiB (25,100,300); '' to skip"
    )
    parser.add_argument("--repeats", type=int, default=10, help="all_reduce calls timed (10)")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "ddp_overhead.json"
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    variants = (
        args.variants.split(",")
        if args.variants
        else [v for v in VARIANTS if cuda or v != "ddp bf16 hook"]
    )
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if "WORLD_SIZE" not in os.environ:
        parser.error(
            "run it under torchrun, e.g. torchrun --standalone --nproc_per_node=2 "
            "benchmarks/ddp_overhead.py"
        )
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    name, size, batch, overrides = CASES[args.case]
    config = preset(name, **dict(parse_override(o) for o in overrides))
    sizes = [float(s) for s in args.sizes_mib.split(",") if s.strip()]
    result = {
        "case": args.case,
        "per_process_batch": batch,
        "image_size": size,
        "world_size": dist.get_world_size(),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "all_reduce": all_reduce_times(sizes, device, args.repeats),
        "variants": [
            train_variant(v, config, batch, size, device, args.steps, args.warmup) for v in variants
        ],
    }
    if dist.get_rank() == 0:
        for row in result["all_reduce"]:
            print(
                f"all_reduce {row['mib']:7.1f} MiB {row['dtype']:9s} {row['ms']:8.3f} ms  "
                f"{row['algbw_gb_s']:7.1f} GB/s"
            )
        print(table(result["variants"]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    cleanup()  # collects the DDP objects first: gloo may abort if they outlive the group
    return 0


if __name__ == "__main__":
    sys.exit(main())
