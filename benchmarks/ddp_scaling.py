"""Data-parallel scaling of `diffunet train` under torchrun: img/s on 1, 2, 4, 8 GPUs.

Each measurement is a real `torchrun --nproc_per_node=N -m diffunet train` run (DDP, or FSDP
with `--parallel fsdp`; NCCL, bf16 autocast, fused AdamW, EMA, optionally `--compile`) on a
synthetic array data set, with a fixed *per-GPU* batch (the global batch grows with N).
Throughput comes from the run's own `log.csv`: the steps and elapsed time between two logged
rows after the warm-up (compilation, cuDNN autotuning), where each logged row waits for the GPU
because it reads the loss.

    python benchmarks/ddp_scaling.py --gpus 1,2 --cases ldm,ddpm-cifar10 --modes compile
    python benchmarks/ddp_scaling.py --gpus 1,2,4,8 --cases ldm --modes compile --steps 200
    python benchmarks/ddp_scaling.py --gpus 1,8 --cases ldm --parallel ddp,fsdp
    python benchmarks/ddp_scaling.py --gpus 1,2 --cases ldm --dynamo-ddp ddp_optimizer,no_optimization

Scaling efficiency = img/s on N GPUs ÷ (N × img/s on 1 GPU); the 1-GPU run is one plain
process, the baseline of both parallel modes. With `--concurrent-single`, the
1-GPU runs of different cases run at the same time, each on its own GPU (they share only the
host), to save wall time. `--dynamo-ddp` runs each compiled DDP measurement once per Dynamo
strategy for compiled DDP (`dynamo_ddp_train.py`). Writes `scaling.json` (and prints a table)
into `--out`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: case → (preset, image size, per-GPU batch, model overrides)
CASES = {
    "ldm": ("ldm", 256, 16, []),
    "ddpm-cifar10": ("ddpm-cifar10", 32, 128, []),
    # a CPU smoke test of this script (`--device cpu --cases tiny`)
    "tiny": (
        "ddpm-cifar10",
        16,
        8,
        [
            "model_channels=16",
            "norm_groups=8",
            "channel_mult=[1,2]",
            "attention_resolutions=[]",
            "num_res_blocks=1",
        ],
    ),
}


def write_data(folder: Path, size: int, count: int) -> Path:
    """`count` random RGB images `(N, 3, size, size)` in [0, 1] (content does not change speed)."""
    path = folder / f"data-{size}-{count}.npy"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.save(path, rng.random((count, 3, size, size), dtype=np.float32))
    return path


def run_config(folder: Path) -> Path:
    """A run config that keeps the end of the run short: a 4-sample grid in 2 steps."""
    path = folder / "run.yaml"
    path.write_text("sample: {num: 4, steps: 2}\n")
    return path


DYNAMO_DDP_TRAIN = Path(__file__).resolve().parent / "dynamo_ddp_train.py"


def command(
    case: str,
    gpus: int,
    mode: str,
    steps: int,
    log_every: int,
    data: Path,
    config: Path,
    out: Path,
    device: str = "cuda",
    parallel: str = "ddp",
    dynamo_ddp: str | None = None,
) -> list[str]:
    """The torchrun command line of one measurement (`dynamo_ddp`: the trainer through
    `dynamo_ddp_train.py` with that strategy)."""
    preset, size, per_gpu, overrides = CASES[case]
    entry = ["-m", "diffunet"] if dynamo_ddp is None else [str(DYNAMO_DDP_TRAIN), dynamo_ddp]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        *entry,
        "train",
        "--config",
        str(config),
        "--data",
        str(data),
        "--preset",
        preset,
        "--image-size",
        str(size),
        "--batch-size",
        str(per_gpu * gpus),
        "--steps",
        str(steps),
        "--precision",
        "bf16" if device == "cuda" else "fp32",
        "--device",
        device,
        "--checkpoint-every",
        "0",
        "--sample-every",
        "0",
        "--log-every",
        str(log_every),
        "--warmup",
        "10",
        "--no-eval",
        "--out",
        str(out),
        *overrides,
    ]
    if mode == "compile":  # the default mode on 1 GPU too, where --compile alone adds CUDA graphs
        cmd += ["--compile-mode", "default"]
    if parallel != "ddp":
        cmd += ["--parallel", parallel]
    if device == "cpu":  # a core per process, the 1-process baseline too (CPU: smoke tests)
        cmd += ["--threads", "1"]
    return cmd


def throughput(log_csv: Path, global_batch: int, skip_rows: int) -> dict[str, float]:
    """img/s between the first row after `skip_rows` and the last row of `log.csv`."""
    with open(log_csv) as f:
        rows = [(int(r["step"]), float(r["elapsed_s"])) for r in csv.DictReader(f)]
    if len(rows) < skip_rows + 2:
        raise RuntimeError(f"{log_csv}: {len(rows)} logged rows, need {skip_rows + 2}")
    (s0, t0), (s1, t1) = rows[skip_rows], rows[-1]
    return {
        "img_per_s": (s1 - s0) * global_batch / (t1 - t0),
        "timed_steps": s1 - s0,
        "timed_seconds": t1 - t0,
        "warmup_seconds": t0,
    }


def start(
    case: str,
    gpus: int,
    mode: str,
    args: argparse.Namespace,
    data: Path,
    config: Path,
    visible: str | None,
    parallel: str = "ddp",
    dynamo_ddp: str | None = None,
) -> tuple[subprocess.Popen, Path, float]:
    """Launch one measurement in the background; returns (process, run folder, start time)."""
    out = args.out / (
        f"{case}-{mode}-{gpus}gpu{'' if parallel == 'ddp' else '-' + parallel}"
        f"{'' if dynamo_ddp is None else '-' + dynamo_ddp}"
    )
    if out.exists():
        shutil.rmtree(out)
    env = dict(os.environ)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    cmd = command(
        case,
        gpus,
        mode,
        args.steps,
        args.log_every,
        data,
        config,
        out,
        args.device,
        parallel,
        dynamo_ddp,
    )
    with open(args.out / f"{out.name}.log", "w") as log:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, out, time.perf_counter()


def finish(
    job: tuple[subprocess.Popen, Path, float],
    case: str,
    gpus: int,
    mode: str,
    args: argparse.Namespace,
    parallel: str = "ddp",
    dynamo_ddp: str | None = None,
) -> dict:
    """Wait for a measurement and read its throughput."""
    proc, out, began = job
    record = {
        "case": case,
        "gpus": gpus,
        "mode": mode,
        "parallel": "single" if gpus == 1 else parallel,
        "per_gpu_batch": CASES[case][2],
        "global_batch": CASES[case][2] * gpus,
    }
    if dynamo_ddp is not None:
        record["dynamo_ddp"] = dynamo_ddp
    try:
        code = proc.wait(timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "timeout"
    record["wall_s"] = round(time.perf_counter() - began, 1)
    if code != 0:
        tail = (args.out / f"{out.name}.log").read_text()[-800:]
        record["error"] = f"exit {code}: {tail}"
        return record
    record.update(throughput(out / "log.csv", record["global_batch"], args.skip_rows))
    return record


def add_efficiency(records: list[dict]) -> None:
    """Scaling efficiency against the 1-GPU run of the same case and mode."""
    single = {(r["case"], r["mode"]): r.get("img_per_s") for r in records if r["gpus"] == 1}
    for r in records:
        base = single.get((r["case"], r["mode"]))
        if base and r.get("img_per_s"):
            r["efficiency"] = r["img_per_s"] / (r["gpus"] * base)


def table(records: list[dict]) -> str:
    """A Markdown table of the measurements."""
    lines = [
        "| case | mode | parallel | GPUs | global batch | img/s | efficiency | warm-up s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        parallel = r.get("parallel", "ddp") + (f" ({r['dynamo_ddp']})" if "dynamo_ddp" in r else "")
        head = f"| {r['case']} | {r['mode']} | {parallel} | {r['gpus']} | {r['global_batch']} | "
        if "error" in r:
            lines.append(f"{head}error: {r['error'][-120:]!r} | | |")
            continue
        eff = f"{r['efficiency']:.1%}" if "efficiency" in r else "–"
        lines.append(f"{head}{r['img_per_s']:.1f} | {eff} | {r['warmup_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1,2", help="GPU counts, comma-separated (1,2)")
    parser.add_argument("--cases", default="ldm,ddpm-cifar10", help=f"of {', '.join(CASES)}")
    parser.add_argument("--modes", default="compile", help="eager and/or compile")
    parser.add_argument(
        "--parallel", default="ddp", help="ddp and/or fsdp for the runs on more than one GPU (ddp)"
    )
    parser.add_argument(
        "--dynamo-ddp",
        default=None,
        help="compiled DDP runs once per Dynamo strategy, comma-separated, of "
        "ddp_optimizer (PyTorch's default) and no_optimization",
    )
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (150)")
    parser.add_argument("--log-every", type=int, default=10, help="log interval (10)")
    parser.add_argument(
        "--skip-rows",
        type=int,
        default=3,
        help="logged rows left out as warm-up (3, i.e. 30 steps)",
    )
    parser.add_argument("--count", type=int, default=256, help="synthetic samples per case (256)")
    parser.add_argument("--run-timeout", type=float, default=400, help="seconds per run (400)")
    parser.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: gloo processes, for a smoke test of this script",
    )
    parser.add_argument(
        "--concurrent-single",
        action="store_true",
        help="run the 1-GPU runs of all cases at once, one GPU each",
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "scaling")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    gpu_counts = [int(n) for n in args.gpus.split(",")]
    cases = args.cases.split(",")
    modes = args.modes.split(",")
    parallels = args.parallel.split(",")
    strategies = args.dynamo_ddp.split(",") if args.dynamo_ddp else [None]
    unknown = set(strategies) - {None, "ddp_optimizer", "no_optimization"}
    if unknown:
        parser.error(
            f"--dynamo-ddp: unknown {', '.join(sorted(unknown))}; choose from "
            "ddp_optimizer, no_optimization"
        )
    config = run_config(args.out)
    data = {
        c: write_data(args.out, CASES[c][1], max(args.count, CASES[c][2] * max(gpu_counts)))
        for c in cases
    }

    records: list[dict] = []

    def save() -> None:
        add_efficiency(records)
        (args.out / "scaling.json").write_text(json.dumps(records, indent=2))

    for mode in modes:
        plan = [(c, n) for n in gpu_counts for c in cases]
        if args.concurrent_single and 1 in gpu_counts:
            jobs = {
                c: start(c, 1, mode, args, data[c], config, str(i)) for i, c in enumerate(cases)
            }
            for c, job in jobs.items():
                records.append(finish(job, c, 1, mode, args))
                print(json.dumps(records[-1]), flush=True)
            save()
            plan = [(c, n) for c, n in plan if n != 1]
        for c, n in plan:
            for parallel in parallels if n > 1 else ["ddp"]:
                compiled_ddp = n > 1 and parallel == "ddp" and mode == "compile"
                for strategy in strategies if compiled_ddp else [None]:
                    job = start(c, n, mode, args, data[c], config, None, parallel, strategy)
                    records.append(finish(job, c, n, mode, args, parallel, strategy))
                    print(json.dumps(records[-1]), flush=True)
                    save()
    save()
    print(table(records))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
