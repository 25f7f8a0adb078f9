"""int8 post-training quantization vs float32, side by side: output error, model size and CPU
latency of every deployment path, for real preset configs.

    python benchmarks/quantization.py                      # ddpm-cifar10 @ 32², emdiffuse-3d @ 16³
    python benchmarks/quantization.py --threads 2 --repeats 30 --json results.json
    python benchmarks/quantization.py --quick              # small configs, a smoke test

Paths: PyTorch eager (float32); torch.compile / Inductor (float32); PT2E int8 (torchao
X86InductorQuantizer, run through torch.compile with freezing); ONNX Runtime float32; ONNX
Runtime int8 (static QDQ, per-channel weights). Weights are random (PyTorch's default init;
zero_init=False, so no layer is zero) unless --checkpoint names a trained model. Calibration is
8 batches of 4 inputs noised over the whole timestep range (Gaussian inputs, or noised
--calibration-data samples); error and latency are measured on another such batch (--batch).
Latencies are medians over --repeats calls, the variants measured round-robin so that load
from other processes hits them alike; idle threads sleep (OMP_WAIT_POLICY=PASSIVE, no ONNX
Runtime spinning) so the two runtimes do not slow each other down.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

# Idle OpenMP threads must sleep, not spin: PyTorch and ONNX Runtime alternate in one process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from diffunet import UNet, UNetConfig, preset
from diffunet.interop.export import (
    export_onnx,
    file_size,
    onnx_session,
    run_onnx,
)
from diffunet.interop.quantize import (
    QuantizationError,
    calibration_inputs,
    quantize_onnx,
    quantize_pt2e,
)
from diffunet.model import load_pretrained, save_pretrained
from diffunet.model.introspect import small_config


@dataclass
class Row:
    """One line of the table."""

    case: str
    path: str
    int8_layers: str
    max_rel_error: float | None
    rms_rel_error: float | None
    size_mb: float
    latency_ms: float
    prepare_s: float


CASES = {
    # name: (config, spatial size, what the int8 paths quantize)
    "ddpm-cifar10": (lambda: preset("ddpm-cifar10", dropout=0.0), (32, 32)),
    "emdiffuse-3d": (lambda: preset("emdiffuse-3d", dropout=0.0, zero_init=False), (16, 16, 16)),
}
QUICK = {
    "ddpm-cifar10 (small)": (lambda: small_config("ddpm-cifar10").replace(dropout=0.0), (16, 16)),
    "emdiffuse-3d (small)": (
        lambda: small_config("emdiffuse-3d").replace(dropout=0.0, zero_init=False),
        (8, 8, 8),
    ),
}


def _call(fn, inputs):
    return fn(inputs["x"], **{k: v for k, v in inputs.items() if k != "x"})


def _mb(nbytes: int) -> float:
    return round(nbytes / 1e6, 2)


def _pt2_size(model_or_quantized, config: UNetConfig, example, folder: Path, name: str) -> int:
    from diffunet.interop.export import export_program, save_program

    path = folder / name
    if hasattr(model_or_quantized, "save"):
        model_or_quantized.save(path, example)
    else:
        save_program(export_program(model_or_quantized, inputs=example), path, config)
    return os.path.getsize(path)


def run_case(
    name: str,
    model: UNet,
    size: tuple[int, ...],
    *,
    batch: int,
    repeats: int,
    compile_models: bool,
    folder: Path,
    samples: torch.Tensor | None = None,
) -> list[Row]:
    """Measure every path for one model (calibrated on noised `samples` when given)."""
    config = model.config
    calibration = calibration_inputs(config, num_batches=8, batch=4, size=size, samples=samples)
    # The measured batch: like calibration (noised samples, spread timesteps), another seed.
    test = calibration_inputs(
        config, num_batches=1, batch=batch, size=size, samples=samples, seed=99
    )[0]
    int8_what = "conv2d + linear" if config.dims == 2 else "linear only (conv stays fp32)"
    with torch.no_grad():
        reference = _call(model, test)

    variants: dict[str, dict] = {}
    save_pretrained(model, folder / "ckpt")
    variants["PyTorch eager fp32"] = dict(
        fn=lambda: _call(model, test),
        layers="-",
        size=file_size(folder / "ckpt" / "model.safetensors"),
        prepare=0.0,
    )
    if compile_models:
        start = time.perf_counter()
        compiled = torch.compile(model, options={"freezing": True})
        with torch.no_grad():
            _call(compiled, test)
        variants["torch.compile fp32"] = dict(
            fn=lambda: _call(compiled, test),
            layers="-",
            prepare=time.perf_counter() - start,
            size=_pt2_size(model, config, calibration[0], folder, "fp32.pt2"),
        )
        start = time.perf_counter()
        quantized = quantize_pt2e(model, calibration)
        compiled_q = quantized.compile()
        with torch.no_grad():
            _call(compiled_q, test)
        variants["PT2E int8 + torch.compile"] = dict(
            fn=lambda: _call(compiled_q, test),
            layers=int8_what,
            prepare=time.perf_counter() - start,
            size=_pt2_size(quantized, config, calibration[0], folder, "int8.pt2"),
        )
    start = time.perf_counter()
    onnx_fp32 = export_onnx(model, folder / "fp32.onnx", size=size)
    session = onnx_session(onnx_fp32, spinning=False)
    variants["ONNX Runtime fp32"] = dict(
        fn=lambda: run_onnx(session, test),
        layers="-",
        size=file_size(onnx_fp32),
        prepare=time.perf_counter() - start,
    )
    start = time.perf_counter()
    onnx_int8 = quantize_onnx(onnx_fp32, folder / "int8.onnx", calibration)
    session_q = onnx_session(onnx_int8, spinning=False)
    variants["ONNX Runtime int8 (QDQ)"] = dict(
        fn=lambda: run_onnx(session_q, test),
        layers=f"Conv{config.dims}d + linear",
        size=file_size(onnx_int8),
        prepare=time.perf_counter() - start,
    )

    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        outputs = {k: v["fn"]() for k, v in variants.items()}  # also a warm-up
        for _ in range(repeats):
            for key, variant in variants.items():
                start = time.perf_counter()
                variant["fn"]()
                times[key].append(time.perf_counter() - start)
    rows = []
    for key, variant in variants.items():
        error = QuantizationError.between(outputs[key], reference)
        rows.append(
            Row(
                name,
                key,
                variant["layers"],
                error.max_relative,
                error.rms_relative,
                _mb(variant["size"]),
                round(statistics.median(times[key]) * 1e3, 2),
                round(variant["prepare"], 1),
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| model | path | int8 layers | max rel. error | RMS rel. error | size (MB) "
        "| latency (ms) | prepare (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = "-" if r.path == "PyTorch eager fp32" else f"{r.max_rel_error:.2e}"
        rms = "-" if r.path == "PyTorch eager fp32" else f"{r.rms_rel_error:.2e}"
        lines.append(
            f"| {r.case} | {r.path} | {r.int8_layers} | {err} | {rms} | {r.size_mb} "
            f"| {r.latency_ms} | {r.prepare_s} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the cases, print the table (and write JSON if asked)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", help=f"comma-separated subset of {list(CASES)}")
    parser.add_argument("--quick", action="store_true", help="small configs (smoke test)")
    parser.add_argument("--batch", type=int, default=4, help="batch of the measured calls")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile paths (and PT2E, which needs them)",
    )
    parser.add_argument("--checkpoint", help="measure this trained checkpoint folder instead")
    parser.add_argument(
        "--calibration-data",
        help=".npy of clean samples (N, C, *spatial) to noise for calibration (with --checkpoint)",
    )
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    cases = QUICK if args.quick else CASES
    if args.cases:
        cases = {k: v for k, v in cases.items() if k.split(" ")[0] in args.cases.split(",")}
    warnings.filterwarnings("ignore")
    jobs = []  # (name, model, size, samples)
    if args.checkpoint:
        model = load_pretrained(args.checkpoint).float()
        samples = None
        if args.calibration_data:
            import numpy as np

            samples = torch.from_numpy(np.load(args.calibration_data)).float()
        size = model.config.spatial_size() or (samples.shape[2:] if samples is not None else None)
        if size is None:
            parser.error("the checkpoint has no image_size; pass --calibration-data")
        jobs.append((Path(args.checkpoint).name, model, tuple(size), samples))
    else:
        for name, (make, size) in cases.items():
            torch.manual_seed(0)
            jobs.append((name, UNet(make()).eval(), size, None))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, size, samples in jobs:
            folder = Path(tmp) / name.replace(" ", "_")
            folder.mkdir()
            print(f"# {name} {size}", file=sys.stderr, flush=True)
            with contextlib.redirect_stdout(io.StringIO()):
                rows += run_case(
                    name,
                    model,
                    size,
                    batch=args.batch,
                    repeats=args.repeats,
                    compile_models=not args.no_compile,
                    folder=folder,
                    samples=samples,
                )
    cpu = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
        f"batch {args.batch}, median of {args.repeats}"
    )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
