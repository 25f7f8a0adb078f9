#!/usr/bin/env python3
"""Host cost of the training loop's safety checks, per step, on the device given.

The trainer notes every step's loss and gradient norm for the NaN watch
(`NonFiniteWatch.observe`, read at each log line) and asks whether a SIGTERM/SIGINT stop was
agreed (`StopSignals.stop_now`); the model checks its inputs on every forward. None of them
may wait for the GPU, so what they cost is host time, which bounds an eager or launch-bound
step. Prints µs per step for the watch + stop check, the watch's read at a log line, and the
`can_read_values` test a forward makes.

    python benchmarks/safety_checks.py               # CUDA when available, else the CPU
    python benchmarks/safety_checks.py --device cpu --steps 2000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import diffunet  # noqa: F401  (installed, or run from a checkout:)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffunet.model.validation import can_read_values
from diffunet.training.distributed import DistInfo
from diffunet.training.divergence import NonFiniteWatch
from diffunet.training.interrupts import StopSignals

LOG_EVERY = 50  # the trainer's default window between reads


def microseconds(fn: Callable[[], object], device: torch.device, steps: int) -> float:
    """Median host µs per call of `fn` over 5 runs of `steps` calls (the device drained
    around each run, so queued kernels count as launched, not as run)."""
    for _ in range(min(steps, 100)):
        fn()
    runs = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runs.append((time.perf_counter() - begin) / steps * 1e6)
    return statistics.median(runs)


def measure(device: torch.device, steps: int) -> dict[str, float]:
    """µs per step of each check on `device`."""
    info = DistInfo(device=device)
    watch, stops = NonFiniteWatch(device, LOG_EVERY, info), StopSignals(info)
    loss, norm = torch.rand((), device=device), torch.rand((), device=device)
    x = torch.randn(2, 3, 8, 8, device=device)
    counter = iter(range(1, 1 << 62))

    def step() -> None:
        number = next(counter)
        watch.observe(number, loss, norm)
        stops.stop_now()
        if number % LOG_EVERY == 0:  # the read at a log line, a sync
            watch.first_bad_step()

    def read() -> None:
        watch.observe(next(counter), loss, norm)
        watch.first_bad_step()

    return {
        "watch + stop check per step (read every 50)": microseconds(step, device, steps),
        "watch read at a log line (one sync)": microseconds(read, device, max(1, steps // 10)),
        "can_read_values per call": microseconds(lambda: can_read_values(x), device, steps),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse options, measure, print a table; returns the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=2000, help="calls per timed run")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = measure(device, args.steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"safety checks, host µs ({name}, median of 5 × {args.steps})")
    for what, value in results.items():
        print(f"  {what:48s} {value:8.1f}")
    return results


if __name__ == "__main__":
    main()
