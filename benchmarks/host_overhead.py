#!/usr/bin/env python3
"""Host (Python) cost of diffunet's layout-stable convolutions, measured on the CPU.

Compiled training on a fast GPU can be host-bound (docs/performance.md), so what each call costs
the host matters as much as what it costs the GPU. With tiny tensors on the CPU the kernels
cost next to nothing and the timings are host work: a compiled training step and a compiled
`no_grad` forward of the quick `ddpm-cifar10` case (65 convolutions, batch 1, 16², fp32), for
ours, for diffusers' `UNet2DModel` of the same architecture when diffusers is installed, and a
training step of ours with its convolutions called as `nn.ConvNd` modules rather than through
the layout-stable route (which only a backward pass takes). Ours routes its compiled
convolutions on the CPU here, as it does on a GPU.

    python benchmarks/host_overhead.py            # five compilations: minutes on a small CPU
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import diffunet  # noqa: F401  (installed, or run from a checkout:)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffunet.accel import settings
from harness.models import ReferenceUnavailable, build_case, build_ours, build_reference
from harness.timing import make_batches

#: Our compiled convolutions take the layout-stable route on the CPU too, as they do on a GPU.
ROUTED = frozenset({"cpu", "cuda"})


def microseconds_per_call(
    fn: Callable[[], object], calls: int = 20_000, warmup: int = 500
) -> float:
    """Median µs per call over 5 runs of `calls` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(5):
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - begin) / calls * 1e6)
    return statistics.median(runs)


def compiled_step_ms(model: torch.nn.Module, steps: int = 30) -> float:
    """Median ms of a compiled training step (forward, MSE, backward, AdamW, zero_grad)."""
    case = build_case("ddpm-cifar10", quick=True)
    batch = make_batches(case, 1, torch.device("cpu"))[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    compiled = torch.compile(model)

    def step() -> None:
        out = compiled(batch.x, batch.t)
        F.mse_loss(out.float(), batch.noise.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return microseconds_per_call(step, calls=steps, warmup=3) / 1e3


def compiled_forward_ms(model: torch.nn.Module, calls: int = 100) -> float:
    """Median ms of a compiled `no_grad` forward pass (what a sampler runs each step)."""
    case = build_case("ddpm-cifar10", quick=True)
    batch = make_batches(case, 1, torch.device("cpu"))[0]
    compiled = torch.compile(model.eval())
    with torch.no_grad():
        return (
            microseconds_per_call(lambda: compiled(batch.x, batch.t), calls=calls, warmup=3) / 1e3
        )


def main() -> int:
    """Print the table."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = build_case("ddpm-cifar10", quick=True).config
    models = {
        "ours": lambda: build_ours(config),
        "diffusers UNet2DModel": lambda: build_reference(config, "diffusers"),
    }
    print("compiled quick ddpm-cifar10, ms (host-dominated)")
    print(f"  {'':46s} {'train step':>10s} {'no_grad forward':>16s}")
    for name, build in models.items():
        try:
            with settings.override(ROUTED_DEVICES=ROUTED):
                step, forward = compiled_step_ms(build()), compiled_forward_ms(build())
        except ReferenceUnavailable as err:
            print(f"  {name}: skipped ({err})")
            continue
        print(f"  {name:46s} {step:10.2f} {forward:16.2f}")
        torch._dynamo.reset()
    with settings.override(ROUTED_DEVICES=frozenset()):  # convolve() calls conv(x) as in eager
        step = compiled_step_ms(build_ours(config))
    print(f"  {'ours, convolutions not routed':46s} {step:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
