"""Export a checkpoint for deployment: ONNX (dynamo exporter, runs in onnxruntime), a
`torch.export` program (`.pt2`) or an AOTInductor package (`.pt2`, compiled for this CPU).

The batch axis is dynamic unless --static-batch; --dynamic-spatial also frees the spatial axes
(in multiples of the model's size multiple). The checkpoint's weights are checked against their
SHA-256, and the artifact is reloaded and compared with the PyTorch model on fresh inputs,
unless --no-verify. With --int8, the ONNX model is quantized with ONNX Runtime (static QDQ,
per channel) and the pt2 program with PT2E (x86 Inductor quantizer), calibrated on
--calibration-batches batches (noised --calibration-data samples, a .npy of clean data, or
Gaussian noise).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffunet.errors import InvalidValueError
from diffunet.interop.export import FORMATS, export_inputs, export_model, file_size
from diffunet.model import load_pretrained


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffunet export`."""
    parser.add_argument("--from", dest="checkpoint", required=True, help="checkpoint folder")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", required=True, help="output file (.onnx or .pt2)")
    parser.add_argument("--batch", type=int, default=2, help="example batch used for tracing")
    parser.add_argument(
        "--size",
        type=int,
        nargs="+",
        help="spatial size of the example input (default: config.image_size)",
    )
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size")
    parser.add_argument(
        "--dynamic-spatial",
        action="store_true",
        help="make spatial axes dynamic (multiples of the size multiple)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the checks: the weights' SHA-256 and the artifact's reload-and-compare",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="max relative error accepted by the check (float export)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="post-training int8 quantization (onnx: ORT QDQ; pt2: PT2E)",
    )
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--calibration-data", help=".npy of clean samples (N, C, *spatial)")


def _size(args: argparse.Namespace, dims: int) -> tuple[int, ...] | None:
    if args.size is None:
        return None
    if len(args.size) == 1:
        return tuple(args.size) * dims
    if len(args.size) != dims:
        raise InvalidValueError(
            f"--size takes 1 or {dims} values for a dims={dims} model, got {args.size}"
        )
    return tuple(args.size)


def _export_int8(model, args: argparse.Namespace, size) -> dict:
    import numpy as np
    import torch

    from diffunet.data.arrays import load_array_file
    from diffunet.interop.quantize import (
        QuantizationError,
        calibration_inputs,
        quantize_onnx,
        quantize_pt2e,
    )

    if args.format == "aoti":
        raise InvalidValueError(
            "--int8 supports --format onnx or pt2 (compile the int8 pt2 with "
            "torch.compile, see docs/quantization.md)"
        )
    samples = None
    if args.calibration_data:
        array = load_array_file(Path(args.calibration_data))  # numeric, finite, not a pickle
        samples = torch.from_numpy(np.asarray(array, dtype=np.float32))
    batches = calibration_inputs(
        model.config, num_batches=args.calibration_batches, batch=4, size=size, samples=samples
    )
    test = export_inputs(model.config, 2, size, seed=123)
    with torch.no_grad():
        reference = model(test["x"], **{k: v for k, v in test.items() if k != "x"})
    if args.format == "onnx":
        from diffunet.interop.export import run_onnx

        path = quantize_onnx(model, args.out, batches)
        output = run_onnx(path, test)
    else:
        quantized = quantize_pt2e(model, batches)
        path = quantized.save(args.out, test)
        output = quantized(test["x"], **{k: v for k, v in test.items() if k != "x"})
    error = QuantizationError.between(output, reference)
    return {
        "path": str(path),
        "int8": True,
        "max_relative_error": error.max_relative,
        "rms_relative_error": error.rms_relative,
    }


def run(args: argparse.Namespace) -> int:
    """Export and print a JSON summary (path, bytes, seconds, error vs PyTorch)."""
    model = load_pretrained(args.checkpoint, dtype=None, verify=not args.no_verify).float()
    size = _size(args, model.config.dims)
    if args.int8:
        summary = {"format": args.format, **_export_int8(model, args, size)}
    else:
        result = export_model(
            model,
            args.out,
            args.format,
            batch=args.batch,
            size=size,
            dynamic_batch=not args.static_batch,
            dynamic_spatial=args.dynamic_spatial,
            verify=not args.no_verify,
            tolerance=args.tolerance,
        )
        summary = {
            "path": str(result.path),
            "format": result.format,
            "seconds": round(result.seconds, 2),
            "max_relative_error": result.max_relative_error,
        }
    summary["bytes"] = file_size(Path(summary["path"]))
    print(json.dumps(summary))
    return 0
