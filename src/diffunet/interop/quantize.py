"""int8 post-training static quantization, the 2026 way (`torch.ao.quantization` is deprecated).

Two paths, both calibrated on a few batches of the inputs the model sees while sampling:

* **PT2E + X86InductorQuantizer** (`quantize_pt2e`, needs `torchao`): the model is captured
  with `torch.export`, observers are inserted by torchao's x86 Inductor quantizer, and the
  converted graph holds int8 weights with quantize/dequantize pairs that Inductor lowers to
  oneDNN int8 kernels under `torch.compile` (`QuantizedModel.compile()`). The quantizer covers
  `conv2d` and `linear`: 2D models get int8 convolutions and linears, 1D and 3D models get
  int8 linears only (their convolutions stay float32).
* **ONNX Runtime static QDQ** (`quantize_onnx`, needs `onnx` + `onnxruntime`): the exported
  ONNX model gets per-channel int8 weights and per-tensor uint8 activations (QDQ format) for
  every `Conv` (1D, 2D and 3D) and every `MatMul` with a constant weight (the linears);
  portable to any ONNX Runtime execution provider.

Norms, softmax, SiLU and the attention products stay in float. `docs/quantization.md` records
the measured error, size and latency of each path.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffunet.errors import InvalidValueError
from diffunet.interop.export import export_inputs, export_onnx, export_program
from diffunet.model.checkpoint import unwrap_model
from diffunet.model.config import UNetConfig

QUANT_BACKENDS = ("pt2e-x86", "onnx-qdq")
Batch = dict[str, torch.Tensor]


def _linear_alpha_bar(steps: int = 1000) -> torch.Tensor:
    """DDPM's linear beta schedule (1e-4 → 0.02), as cumulative products of 1 - beta."""
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0).float()


def calibration_inputs(
    config: UNetConfig,
    *,
    num_batches: int = 8,
    batch: int = 4,
    size: tuple[int, ...] | None = None,
    samples: torch.Tensor | None = None,
    num_timesteps: int = 1000,
    seed: int = 0,
) -> list[Batch]:
    """Calibration batches shaped like the inputs seen while sampling.

    Timesteps (or noise levels) are spread evenly over the whole range, so every noise level
    is observed. With `samples` (clean data `(N, in_channels, *spatial)`), `x` is those samples
    noised by DDPM's forward process (linear betas; for `noise_level` models `t` is the
    signal fraction gamma); without, `x` is Gaussian noise. `cond`, `context` and `labels` are
    random (labels include the null label).
    """
    if num_batches < 1 or batch < 1:
        raise InvalidValueError(
            f"num_batches and batch must be >= 1, got {num_batches} and {batch}"
        )
    generator = torch.Generator().manual_seed(seed)
    alpha_bar = _linear_alpha_bar(num_timesteps)
    total = num_batches * batch
    fractions = (torch.arange(total, dtype=torch.float32) + 0.5) / total
    fractions = fractions[torch.randperm(total, generator=generator)]
    batches = []
    for i in range(num_batches):
        inputs = export_inputs(config, batch, size, seed=seed * 1000 + i)
        frac = fractions[i * batch : (i + 1) * batch]
        if config.time_embed_type == "noise_level":
            signal = frac  # gamma: the fraction of signal variance
            t = frac
        else:
            steps = (frac * num_timesteps).long().clamp(max=num_timesteps - 1)
            signal, t = alpha_bar[steps], steps.float()
        if samples is not None:
            index = torch.randint(0, samples.shape[0], (batch,), generator=generator)
            clean = samples[index].to(inputs["x"].dtype)
            if clean.shape != inputs["x"].shape:
                raise InvalidValueError(
                    f"samples have shape {tuple(samples.shape[1:])} per item, "
                    f"the model input {tuple(inputs['x'].shape[1:])}"
                )
            noise = torch.randn(clean.shape, generator=generator)
            shape = (batch,) + (1,) * (clean.ndim - 1)
            inputs["x"] = (
                signal.view(shape).sqrt() * clean + (1 - signal).view(shape).sqrt() * noise
            )
        if config.use_timestep:
            inputs["t"] = t
        if "labels" in inputs:
            inputs["labels"] = torch.randint(
                0, config.num_classes + 1, (batch,), generator=generator
            )
        batches.append(inputs)
    return batches


def _call(fn: Callable[..., torch.Tensor], inputs: Batch) -> torch.Tensor:
    return fn(inputs["x"], **{k: v for k, v in inputs.items() if k != "x"})


@contextlib.contextmanager
def _quiet():
    """Silence torchao's import-time chatter about optional CUDA extensions."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _x86_quantizer():
    with _quiet():
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    return xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())


@dataclass
class QuantizedModel:
    """A PT2E-quantized U-Net: call it like the model; `compile()` for int8 CPU kernels."""

    module: torch.fx.GraphModule
    config: UNetConfig
    example: Batch  # inputs the graph was traced with (their spatial size is baked in)

    def __call__(self, x: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """Run the quantized graph (reference int8 arithmetic, not yet fast: see `compile`)."""
        with torch.no_grad():
            return self.module(x, **inputs)

    def compile(self) -> Callable[..., torch.Tensor]:
        """`torch.compile` with Inductor freezing, which lowers the q/dq pairs to int8 kernels.

        Freezing must be on in the global Inductor config whenever the graph is (re)compiled
        (`torch.compile(options={"freezing": True})` fails on the int8 prepack ops), so every
        call runs inside `torch._inductor.config.patch(freezing=True)`.
        """
        import torch._inductor.config as inductor_config

        compiled = torch.compile(self.module)

        def run(x: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
            with inductor_config.patch(freezing=True), torch.no_grad():
                return compiled(x, **inputs)

        return run

    def save(self, path: str | Path, example: Batch | None = None) -> Path:
        """Re-export the quantized graph (dynamic batch) and save it as a `.pt2` archive."""
        from diffunet.interop.export import dynamic_shapes, save_program

        example = example or self.example
        if example["x"].shape[0] < 2:  # a batch of 1 would be specialized
            example = {k: torch.cat([v, v]) for k, v in example.items()}
        x, kwargs = example["x"], {k: v for k, v in example.items() if k != "x"}
        shapes = dynamic_shapes(self.config, example, True, False)
        program = torch.export.export(
            self.module, (x,), kwargs, dynamic_shapes=shapes, strict=False
        )
        return save_program(program, path, self.config)


def quantize_pt2e(model: nn.Module, calibration: Iterable[Batch]) -> QuantizedModel:
    """Static int8 PT2E quantization with torchao's X86InductorQuantizer.

    `calibration` yields input dicts (`x`, `t`, ... as from :func:`calibration_inputs`); the
    observers see every batch. Covers conv2d and linear (see the module docstring).
    """
    with _quiet():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    unet = unwrap_model(model).eval()
    batches = list(calibration)
    if not batches:
        raise InvalidValueError("calibration is empty: pass at least one batch of inputs")
    graph = export_program(unet, inputs=batches[0]).module()
    prepared = prepare_pt2e(graph, _x86_quantizer())
    with torch.no_grad():
        for inputs in batches:
            _call(prepared, inputs)
    return QuantizedModel(_drop_unused_tensors(convert_pt2e(prepared)), unet.config, batches[0])


def _drop_unused_tensors(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Delete the float weights that conversion replaced by int8 copies (so they are not saved)."""
    used = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, attr)
    return graph


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of input dicts."""

    def __init__(self, batches: list[Batch], names: list[str]) -> None:
        self._feeds = iter([{n: b[n].numpy() for n in names} for b in batches])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # part of the protocol; calibration runs once
        pass


def quantize_onnx(
    model_or_path: nn.Module | str | Path,
    out_path: str | Path,
    calibration: Iterable[Batch],
    *,
    per_channel: bool = True,
    reduce_range: bool = True,
) -> Path:
    """Static QDQ int8 quantization of an ONNX model with ONNX Runtime.

    `model_or_path` is a `UNet` (exported first) or an exported `.onnx` file. Weights of
    `Conv` and constant-weight `MatMul` are int8 per output channel, activations uint8 per
    tensor (min/max calibration).

    `reduce_range` keeps the weights to 7 bits, so that the file's accuracy does not depend on
    the x86 CPU it runs on: without VNNI (AVX2, or AVX-512 without VNNI) ONNX Runtime multiplies uint8 by
    int8 with `VPMADDUBSW`, whose 16-bit pair sums saturate on full-range weights. On an AVX2
    EPYC the small 1D test model's error went from 19.3 % to 4.6 % RMS with it
    (docs/quantization.md). `False` keeps 8-bit weights for runtimes known to have VNNI (or a
    GPU provider).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    batches = list(calibration)
    if not batches:
        raise InvalidValueError("calibration is empty: pass at least one batch of inputs")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "float.onnx"
        if isinstance(model_or_path, (str, Path)):
            source = Path(model_or_path)
        else:  # traced at the calibration size, with a dynamic batch
            export_onnx(model_or_path, source, size=tuple(batches[0]["x"].shape[2:]))
        names = [i.name for i in onnx.load(str(source), load_external_data=False).graph.input]
        missing = [n for n in names if n not in batches[0]]
        if missing:
            raise InvalidValueError(f"calibration batches lack the ONNX inputs {missing}")
        quantize_static(
            str(source),
            str(out_path),
            _Reader(batches, names),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=["Conv", "MatMul"],
            reduce_range=reduce_range,
            extra_options={"MatMulConstBOnly": True},  # attention's q·k and w·v stay float
        )
    return out_path


@dataclass(frozen=True)
class QuantizationError:
    """How far a quantized output is from the float32 one."""

    max_relative: float
    rms_relative: float

    @classmethod
    def between(cls, output: torch.Tensor, reference: torch.Tensor) -> QuantizationError:
        """`max|e| / max|ref|` and `‖e‖₂ / ‖ref‖₂` for `e = output - reference`."""
        e, ref = (output.double() - reference.double()), reference.double()
        tiny = torch.finfo(torch.float64).tiny
        return cls(
            float(e.abs().max() / ref.abs().max().clamp_min(tiny)),
            float(e.norm() / ref.norm().clamp_min(tiny)),
        )


def state_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (for the float32 baseline)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def snr_db(error: QuantizationError) -> float:
    """Signal-to-noise ratio in dB implied by the RMS relative error."""
    return math.inf if error.rms_relative == 0 else -20 * math.log10(error.rms_relative)


__all__ = [
    "QUANT_BACKENDS",
    "QuantizationError",
    "QuantizedModel",
    "calibration_inputs",
    "quantize_onnx",
    "quantize_pt2e",
    "snr_db",
    "state_bytes",
]
