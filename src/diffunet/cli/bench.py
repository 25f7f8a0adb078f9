"""Benchmark diffunet against the reference models of identical architecture (diffusers
`UNet2DModel`, MONAI `DiffusionModelUNet`): training and inference throughput, peak memory,
counted FLOPs and MFU, eager and compiled, plus checkpointed memory and DDIM sampling; or, with
`--profile CASE`, where the GPU time of a training step goes. Same code as
`benchmarks/bench.py`; see `diffunet.benchmark`."""

from __future__ import annotations

import argparse

from diffunet import benchmark

HELP = "GPU benchmark vs diffusers / MONAI (throughput, memory, MFU), or --profile a case"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffunet bench` (those of `benchmarks/bench.py`)."""
    benchmark.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; exit code 1 if any measurement failed."""
    data = benchmark.run_from_args(args)
    return 1 if data.get("errors") else 0
