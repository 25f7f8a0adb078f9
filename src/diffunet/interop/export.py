"""Deployment formats: ONNX (dynamo exporter), `torch.export` programs (`.pt2`) and
AOTInductor packages — the modern replacements for TorchScript (deprecated since PyTorch 2.11).

Every format is traced from the same call, `model(x, t, cond=..., context=..., labels=...,
added_cond=..., time_ids=...)`, with only the inputs the config needs; `t` is float32 `(B,)`
(integer steps are exact in float32 up to 2**24), `labels` int64 `(B,)`, SDXL's `time_ids`
float32 `(B, 6)`. The batch axis is dynamic by default and the number of `context` tokens
always; spatial axes can be made dynamic in multiples of `config.size_multiple()`. Each
artifact carries the diffunet config JSON (ONNX metadata `diffunet_config`, `.pt2` extra file
`diffunet_config.json`, AOTI package metadata `diffunet_config`).

`torch.export.load` and `aoti_load_package` read PyTorch's own archive formats; load only
artifacts you trust, as with any model file that is not safetensors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffunet.accel import plain
from diffunet.errors import DiffunetError, InvalidValueError
from diffunet.model.checkpoint import unwrap_model
from diffunet.model.config import UNetConfig
from diffunet.model.introspect import example_inputs

FORMATS = ("onnx", "pt2", "aoti")
CONFIG_KEY = "diffunet_config"
INPUT_ORDER = ("x", "t", "cond", "context", "labels", "added_cond", "time_ids")


class ExportError(DiffunetError, RuntimeError):
    """An export that failed or whose artifact does not reproduce the PyTorch model."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how well the artifact reproduces the eager model."""

    path: Path
    format: str
    seconds: float
    max_relative_error: float | None


def max_relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """`max |output - reference| / max |reference|` (float64)."""
    output, reference = output.double(), reference.double()
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((output - reference).abs().max() / scale)


def export_inputs(
    config: UNetConfig,
    batch: int = 2,
    size: tuple[int, ...] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Example inputs in the exported signature's order: `x` first, then what the config needs."""
    generator = torch.Generator().manual_seed(seed)
    x, kwargs = example_inputs(config, batch, size, generator=generator)
    if "t" in kwargs:
        kwargs["t"] = kwargs["t"].float()
    inputs = {"x": x, **kwargs}
    return {name: inputs[name].to(device) for name in INPUT_ORDER if name in inputs}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def dynamic_shapes(
    config: UNetConfig, inputs: dict[str, torch.Tensor], dynamic_batch: bool, dynamic_spatial: bool
) -> dict[str, Any] | None:
    """Dynamic axes: batch, optionally spatial, and always the number of context tokens."""
    if not dynamic_batch and not dynamic_spatial and "context" not in inputs:
        return None
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=4096) if dynamic_batch else None
    spatial: dict[int, Any] = {}
    if dynamic_spatial:
        for axis, multiple in enumerate(config.size_multiple()):
            base = Dim(f"n{axis}", min=1, max=8192 // multiple)
            spatial[2 + axis] = base * multiple if multiple > 1 else base
    shapes: dict[str, Any] = {}
    for name in inputs:
        axes: dict[int, Any] = {0: batch} if batch is not None else {}
        if name in ("x", "cond"):
            axes.update(spatial)
        if name == "context":
            axes[1] = Dim("tokens", min=1, max=65536)
        shapes[name] = axes or None
    return shapes


def _prepare(model: nn.Module) -> nn.Module:
    unet = unwrap_model(model)
    if any(p.device.type == "meta" for p in unet.parameters()):
        raise ExportError("the model has no weights (meta tensors); load a checkpoint first")
    return unet.eval()


def export_program(
    model: nn.Module,
    *,
    batch: int = 2,
    size: tuple[int, ...] | None = None,
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
    inputs: dict[str, torch.Tensor] | None = None,
) -> torch.export.ExportedProgram:
    """`torch.export` the model's inference forward (eval mode) with a dynamic batch."""
    unet = _prepare(model)
    inputs = inputs or export_inputs(unet.config, batch, size, device=_device(unet))
    if dynamic_batch and inputs["x"].shape[0] < 2:
        # torch.export specializes a batch of 1; trace with 2 to keep the axis dynamic.
        inputs = {k: torch.cat([v, v]) for k, v in inputs.items()}
    x, kwargs = inputs["x"], {k: v for k, v in inputs.items() if k != "x"}
    shapes = dynamic_shapes(unet.config, inputs, dynamic_batch, dynamic_spatial)
    try:
        with torch.no_grad(), plain(unet):  # the reference forwards, whatever runs on a GPU
            return torch.export.export(unet, (x,), kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as err:
        raise ExportError(
            f"torch.export failed for this config: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def save_program(
    program: torch.export.ExportedProgram, path: str | Path, config: UNetConfig
) -> Path:
    """Write an exported program as a `.pt2` archive with the config as an extra file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path, extra_files={f"{CONFIG_KEY}.json": config.to_json()})
    return path


def _uses_quantized_ops(path: str | Path) -> bool:
    """Whether a `.pt2` archive's serialized graph calls `quantized_decomposed` ops."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(
                b"quantized_decomposed" in archive.read(name)
                for name in archive.namelist()
                if name.endswith("model.json")
            )
    except (zipfile.BadZipFile, OSError):
        return False


def _register_quantized_ops() -> bool:
    """Import torchao's PT2E module (registers `quantized_decomposed`); False if unavailable."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import torchao.quantization.pt2e  # noqa: F401
    except ImportError:
        return False
    return True


def load_program(path: str | Path) -> tuple[torch.export.ExportedProgram, UNetConfig | None]:
    """Load a `.pt2` program and the diffunet config stored next to it (None if absent)."""
    extra = {f"{CONFIG_KEY}.json": ""}
    if _uses_quantized_ops(path):
        # An int8 program (diffunet.interop.quantize) uses torchao's quantized_decomposed ops, which
        # exist only once torchao is imported.
        _register_quantized_ops()
    program = torch.export.load(Path(path), extra_files=extra)
    text = extra[f"{CONFIG_KEY}.json"]
    return program, (UNetConfig.from_json(text) if text else None)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    batch: int = 2,
    size: tuple[int, ...] | None = None,
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
    opset: int | None = None,
) -> Path:
    """Export to ONNX with the dynamo exporter; inputs named as in :data:`INPUT_ORDER`."""
    import onnx

    unet = _prepare(model)
    program = export_program(
        unet, batch=batch, size=size, dynamic_batch=dynamic_batch, dynamic_spatial=dynamic_spatial
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = unet.num_parameters() * 4 > 1_800_000_000  # beyond ONNX's 2 GB protobuf limit
    try:
        onnx_program = torch.onnx.export(
            program, dynamo=True, opset_version=opset, verbose=False, external_data=big
        )
    except Exception as err:
        raise ExportError(f"ONNX export failed: {type(err).__name__}: {err}") from err
    proto = onnx_program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = CONFIG_KEY, unet.config.to_json()
    if big:
        onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))
    return path


def onnx_session(path: str | Path, threads: int | None = None, spinning: bool = True):
    """An onnxruntime CPU `InferenceSession` for an exported model.

    `spinning=False` stops idle worker threads from busy-waiting, which matters when the
    session shares the CPU with other work (e.g. PyTorch in the same process).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session_or_path: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run an exported ONNX model on named inputs (e.g. from :func:`export_inputs`)."""
    session = session_or_path
    if isinstance(session_or_path, (str, Path)):
        session = onnx_session(session_or_path)
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise InvalidValueError(f"the ONNX model needs inputs {names}; missing {missing}")
    feed = {n: inputs[n].detach().cpu().numpy() for n in names}
    return torch.from_numpy(session.run(None, feed)[0])


def export_aoti(
    model: nn.Module,
    path: str | Path,
    *,
    batch: int = 2,
    size: tuple[int, ...] | None = None,
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
) -> Path:
    """Compile an AOTInductor package (`.pt2`) for the model's device (CPU here)."""
    from torch._inductor import aoti_compile_and_package

    unet = _prepare(model)
    program = export_program(
        unet, batch=batch, size=size, dynamic_batch=dynamic_batch, dynamic_spatial=dynamic_spatial
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = {"aot_inductor.metadata": {CONFIG_KEY: unet.config.to_json()}}
    try:
        return Path(
            aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
        )
    except Exception as err:
        raise ExportError(f"AOTInductor compilation failed: {type(err).__name__}: {err}") from err


def load_aoti(path: str | Path) -> Callable[..., torch.Tensor]:
    """Load an AOTInductor package; call it like the model: `runner(x, t=..., ...)`."""
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path))


def _run_artifact(fmt: str, path: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    x, kwargs = inputs["x"], {k: v for k, v in inputs.items() if k != "x"}
    if fmt == "onnx":
        return run_onnx(path, inputs)
    if fmt == "pt2":
        program, _ = load_program(path)
        return program.module()(x, **kwargs)
    return load_aoti(path)(x, **kwargs)


def export_model(
    model: nn.Module,
    path: str | Path,
    format: str,
    *,
    batch: int = 2,
    size: tuple[int, ...] | None = None,
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
    verify: bool = True,
    tolerance: float = 1e-4,
) -> ExportResult:
    """Export `model` to `format` ("onnx", "pt2" or "aoti") at `path`, and check the artifact.

    With `verify`, the artifact is reloaded and run on fresh inputs (batch + 1 when the batch is
    dynamic); a max relative error above `tolerance` raises :class:`ExportError`.
    """
    if format not in FORMATS:
        raise InvalidValueError(f"unknown export format {format!r}; expected one of {FORMATS}")
    unet = _prepare(model)
    start = time.perf_counter()
    options = {
        "batch": batch,
        "size": size,
        "dynamic_batch": dynamic_batch,
        "dynamic_spatial": dynamic_spatial,
    }
    if format == "onnx":
        written = export_onnx(unet, path, **options)
    elif format == "pt2":
        written = save_program(export_program(unet, **options), path, unet.config)
    else:
        written = export_aoti(unet, path, **options)
    seconds = time.perf_counter() - start
    error = None
    if verify:
        check_size = size
        if dynamic_spatial:  # a size other than the traced one
            traced = (
                size
                or unet.config.spatial_size()
                or tuple(2 * m for m in unet.config.size_multiple())
            )
            check_size = tuple(s + m for s, m in zip(traced, unet.config.size_multiple()))
        check = export_inputs(
            unet.config,
            batch + 1 if dynamic_batch else batch,
            check_size,
            seed=1,
            device=_device(unet),
        )
        with torch.no_grad():
            reference = unet(check["x"], **{k: v for k, v in check.items() if k != "x"})
            output = _run_artifact(format, written, check)
        error = max_relative_error(output.to(reference.device), reference)
        if not error <= tolerance:
            raise ExportError(
                f"the {format} artifact at {written} differs from the PyTorch model: "
                f"max relative error {error:.3g} > {tolerance:g}"
            )
    return ExportResult(Path(written), format, seconds, error)


def file_size(path: str | Path) -> int:
    """Bytes on disk of an artifact, including an ONNX external-data file next to it."""
    path = Path(path)
    extra = path.with_name(path.name + ".data")
    return os.path.getsize(path) + (os.path.getsize(extra) if extra.exists() else 0)


__all__ = [
    "FORMATS",
    "ExportError",
    "ExportResult",
    "dynamic_shapes",
    "export_aoti",
    "export_inputs",
    "export_model",
    "export_onnx",
    "export_program",
    "file_size",
    "load_aoti",
    "load_program",
    "max_relative_error",
    "onnx_session",
    "run_onnx",
    "save_program",
]
