"""Throughput of `diffunet train` itself (the whole step: loss, backward, clipping, AdamW, EMA)
in each compile mode, one run after the other on the same device.

    python benchmarks/train_modes.py --modes eager,default,auto --steps 400 \\
        --run digits: --run "cifar:--preset ddpm-cifar10 --image-size 32 --batch-size 128"

Each `--run NAME:ARGS` is a `diffunet train` configuration (ARGS split as a shell would); each
mode is `eager` (no compilation) or a `--compile-mode`. `--launchers plain,torchrun` also
trains each under `torchrun --nproc-per-node N` (default 1: the data-parallel path of one
process, in a process group of one, against the same run without it). Throughput is read from the run's
`log.csv`: the last logged interval's steps per second times the batch, so compilation and
warm-up, in the first intervals, are not counted. Prints a table and writes JSON (`--out`, default
`$OUT/train_modes.json` when `OUT` is set).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def parse_run(text: str) -> tuple[str, list[str]]:
    """`NAME:ARGS` → (name, the arguments split as a shell would)."""
    name, _, args = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"--run {text!r}: expected NAME:ARGS, e.g. digits:")
    return name, shlex.split(args)


def batch_size(run_dir: Path) -> int:
    """The global batch the run trained with, from the config it wrote."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return int(config["train"]["batch_size"])


#: How `diffunet train` is started: as a process of its own, or by torchrun.
LAUNCHERS = ("plain", "torchrun")


def launcher_command(launcher: str, processes: int = 1) -> list[str]:
    """The command that starts `diffunet` under `launcher`."""
    if launcher == "plain":
        return [sys.executable, "-m", "diffunet"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "diffunet",
    ]


def train_once(
    args: list[str],
    mode: str,
    steps: int,
    log_every: int,
    out: Path,
    launcher: str = "plain",
    processes: int = 1,
) -> dict:
    """Run `diffunet train` once in `mode`; its last interval's throughput and wall time."""
    compile_args = [] if mode == "eager" else ["--compile-mode", mode]
    command = [
        *launcher_command(launcher, processes),
        "train",
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--log-every",
        str(log_every),
        "--checkpoint-every",
        "0",
        "--sample-every",
        "0",
        "--no-eval",
        *compile_args,
        *args,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1], "wall_s": wall}
    rows = list(csv.DictReader((out / "log.csv").open()))
    banner = next(
        (
            line
            for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("diffunet train:")
        ),
        "",
    )
    rate = float(rows[-1]["it_per_s"])
    return {
        "it_per_s": rate,
        "samples_per_s": rate * batch_size(out),
        "wall_s": wall,
        "it_per_s_all": [float(row["it_per_s"]) for row in rows],
        "banner": banner,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse options, train every run in every mode, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run",
        dest="runs",
        type=parse_run,
        action="append",
        required=True,
        help="NAME:ARGS, the `diffunet train` options of one configuration",
    )
    parser.add_argument(
        "--modes",
        default="eager,default,auto",
        help="comma-separated: eager and/or --compile-mode values",
    )
    parser.add_argument(
        "--launchers",
        default="plain",
        help=f"comma-separated subset of {','.join(LAUNCHERS)} (default: plain)",
    )
    parser.add_argument(
        "--nproc-per-node", type=int, default=1, help="processes under torchrun (default 1)"
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", help="JSON path (default $OUT/train_modes.json)")
    options = parser.parse_args(argv)
    out_path = options.out or (
        Path(os.environ["OUT"]) / "train_modes.json" if "OUT" in os.environ else None
    )
    modes = [mode for mode in options.modes.split(",") if mode]
    launchers = [launcher for launcher in options.launchers.split(",") if launcher]
    unknown = sorted(set(launchers) - set(LAUNCHERS))
    if unknown:
        parser.error(f"--launchers: unknown {', '.join(unknown)}; choose from {LAUNCHERS}")
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, args in options.runs:
            for mode in modes:
                for launcher in launchers:
                    # the plain launcher's key is the mode alone, as before launchers existed
                    key = mode if launcher == "plain" else f"{mode} {launcher}"
                    record = train_once(
                        args,
                        mode,
                        options.steps,
                        options.log_every,
                        Path(scratch) / f"{name}-{mode}-{launcher}",
                        launcher,
                        options.nproc_per_node,
                    )
                    results.setdefault(name, {})[key] = record
                    shown = (
                        f"{record['samples_per_s']:10.1f} samples/s ({record['it_per_s']:.2f} it/s)"
                        if "error" not in record
                        else f"failed: {record['error']}"
                    )
                    print(
                        f"{name:10s} {key:16s} {shown}  wall {record['wall_s']:.0f} s", flush=True
                    )
                if out_path:
                    Path(out_path).write_text(
                        json.dumps(
                            {
                                "steps": options.steps,
                                "nproc_per_node": options.nproc_per_node,
                                "log_every": options.log_every,
                                "runs": {n: a for n, a in options.runs},
                                "results": results,
                            },
                            indent=1,
                        )
                    )
    return 0 if all("error" not in r for run in results.values() for r in run.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
