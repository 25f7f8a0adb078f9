"""Side-by-side GPU benchmark of diffunet against reference models of identical architecture.

One run measures, for each case, our `UNet` and the reference model with the same parameter
count (asserted): training-step and inference throughput, peak memory, counted FLOPs and MFU,
in eager and `torch.compile` modes, plus our model's peak training memory with gradient
checkpointing and a 50-step DDIM sampling loop. `--profile CASE` instead groups the GPU kernel
time of a few training steps into the classes of `PERF-NOTES.md`.

Cases (`--quick` swaps in tiny versions of the same topologies, for a CPU smoke test):

- ``ddpm-cifar10``: the preset at 32², batch 128, vs diffusers `UNet2DModel`.
- ``ldm``: the preset at 256², batch 16, vs diffusers `UNet2DModel`.
- ``3d``: a 3D U-Net at 64³, batch 4, vs MONAI `DiffusionModelUNet` (68.6M).
- ``sample``: 50-step DDIM of a 256² `ldm` batch of 4, ours vs a plain loop over diffusers.

The training step is: bf16 autocast forward, MSE on the ε target (fp32), backward, fused
AdamW step, `zero_grad(set_to_none=True)`; model and inputs in channels_last (channels_last_3d).
Inference is a `no_grad` bf16 autocast forward. FLOPs are counted by
`torch.utils.flop_counter` at batch 1 on the eager model: forward, and forward + backward for
training (counted directly, not 3× forward). MFU = FLOPs/s ÷ `--peak-flops` (default 780e12,
the H100's measured dense bf16 matmul rate). Timings: warm-up iterations first (compilation
happens there and is reported separately as `warmup_s`), then `--repeats` repeats of `--iters`
iterations timed with CUDA events (perf_counter on the CPU); the median repeat is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffunet.accel import fused_norm as fused
from diffunet.accel import thin_conv
from diffunet.model.config import UNetConfig
from diffunet.model.introspect import flop_counter
from diffunet.model.layers import resample
from diffunet.model.presets import preset
from diffunet.model.unet import UNet, memory_format_for

PEAK_BF16_FLOPS = 780e12
"""Default peak for MFU: the H100's measured dense bf16 matmul rate (issue 6 uses ≈ 780 TFLOP/s)."""

MODEL_CASES = ("ddpm-cifar10", "ldm", "3d")
ALL_CASES = (*MODEL_CASES, "sample")
MODES = ("eager", "compile")
KINDS = ("train", "infer")
MODELS = ("ours", "ref")

KERNEL_CLASSES = (
    "convolution",
    "elementwise/copies",
    "norm/reductions",
    "attention+GEMM",
    "optimizer",
    "other",
)


# ---------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One benchmark case: our config, the reference library, batch and spatial size."""

    name: str
    config: UNetConfig
    reference: str  # "diffusers" or "monai"
    batch: int
    size: tuple[int, ...]
    unit: str  # "img" or "vol"
    description: str

    @property
    def dims(self) -> int:
        """Spatial dimensionality."""
        return self.config.dims


# The 3D configuration of issue 6, written as our config. MONAI's DiffusionModelUNet with
# channels (64, 128, 256, 256), attention at the last level, 32-channel heads, 2 res blocks,
# GroupNorm 32 / eps 1e-6, strided-conv down, nearest + conv up, per-block skips and an
# additive time embedding 64 → 256 has the same modules: 68,585,025 parameters.
UNET_3D = UNetConfig(
    dims=3,
    in_channels=1,
    cond_channels=1,
    out_channels=1,
    model_channels=64,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(8,),
    num_head_channels=32,
    norm_groups=32,
    norm_eps=1e-6,
    zero_init=False,
)


#: The 2D cases: preset → (size, batch) at full scale and in `--quick` mode.
_PRESET_CASES = {"ddpm-cifar10": ((32, 128), (16, 2)), "ldm": ((256, 16), (32, 2))}


def build_case(name: str, quick: bool = False) -> Case:
    """The :class:`Case` called `name` (one of ``MODEL_CASES``), tiny when `quick`."""
    if name in _PRESET_CASES:
        size, batch = _PRESET_CASES[name][1 if quick else 0]
        config = preset(name)
        if quick:
            config = config.replace(model_channels=16, norm_groups=8, image_size=size)
        return Case(
            name,
            config,
            "diffusers",
            batch,
            (size, size),
            "img",
            f"{name} preset, {size}², vs diffusers UNet2DModel",
        )
    if name == "3d":
        config = UNET_3D
        if quick:
            config = config.replace(model_channels=16, norm_groups=8, num_head_channels=8)
        size = 16 if quick else 64
        return Case(
            name,
            config,
            "monai",
            1 if quick else 4,
            (size,) * 3,
            "vol",
            f"3D U-Net, {size}³, vs MONAI DiffusionModelUNet",
        )
    raise ValueError(f"unknown benchmark case {name!r}; available: {', '.join(MODEL_CASES)}")


# ---------------------------------------------------------------------------------- models
class ReferenceUnavailable(RuntimeError):
    """The reference library (diffusers or MONAI) is not installed or cannot be imported."""


class Denoiser(nn.Module):
    """A uniform `forward(x, t, cond)` over our UNet and the reference models."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict ε for the noisy `x` at timesteps `t` (and the concatenated `cond`)."""
        if self.kind == "diffunet":
            return self.model(x, t, cond=cond)
        if cond is not None:
            x = torch.cat([x, cond], dim=1)
        if self.kind == "diffusers":
            return self.model(x, t, return_dict=False)[0]
        return self.model(x, t)


def diffusers_kwargs(config: UNetConfig) -> dict[str, Any]:
    """`UNet2DModel` keyword arguments for the architecture of our 2D `config`.

    Raises ValueError for options `UNet2DModel` cannot express (scale-shift norm, one skip
    per level, linear attention, non-default embedding widths, ...).
    """
    c = config
    unsupported = {
        "dims != 2": c.dims != 2,
        "use_scale_shift_norm": c.use_scale_shift_norm,
        "skip_topology != per_block": c.skip_topology != "per_block",
        "resblock_updown": c.resblock_updown,
        "attention_type != full": c.attention_type != "full",
        "mid_attention_type": c.resolved_mid_attention_type() != "full",
        "context_dim": c.context_dim is not None,
        "num_classes": c.num_classes is not None,
        "cond_channels": c.cond_channels > 0,
        "time_embed_input_dim": c.resolved_time_embed_input_dim() != c.model_channels,
        "time_embed_dim": c.resolved_time_embed_dim() != 4 * c.model_channels,
        "time_embed_type": c.time_embed_type != "timestep",
        "pool_factor": c.pool_factor != 1,
        "downsample_type": c.downsample_type != "conv",
        "upsample_type": c.upsample_type != "nearest_conv",
        "aleatoric": c.aleatoric,
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"UNet2DModel cannot express this config: {', '.join(bad)}")
    widths = [c.level_channels(level) for level in range(c.num_levels)]
    attn_widths = {w for level, w in enumerate(widths) if c.attention_at(level)} | {widths[-1]}
    if c.num_head_channels is not None:
        head_dim: int | None = c.num_head_channels
    elif c.num_heads == 1:
        head_dim = None  # UNet2DModel: one head as wide as the block
    else:
        dims = {w // c.num_heads for w in attn_widths}
        if len(dims) != 1:
            raise ValueError("UNet2DModel needs one head width for every attention site")
        head_dim = dims.pop()
    down = tuple(
        "AttnDownBlock2D" if c.attention_at(level) else "DownBlock2D"
        for level in range(c.num_levels)
    )
    up = tuple(
        "AttnUpBlock2D" if c.attention_at(level) else "UpBlock2D"
        for level in reversed(range(c.num_levels))
    )
    return {
        "sample_size": (c.spatial_size() or (None,))[0],
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": tuple(widths),
        "layers_per_block": c.num_res_blocks,
        "down_block_types": down,
        "up_block_types": up,
        "norm_num_groups": c.norm_groups,
        "norm_eps": c.norm_eps,
        "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": int(c.freq_shift) if float(c.freq_shift).is_integer() else c.freq_shift,
        "attention_head_dim": head_dim,
        "dropout": c.dropout,
        # 0 pads one row/column at the end, then an unpadded strided conv (LDM, google's
        # ddpm-cifar10-32); 1 is a symmetric 'same' padding. Same parameters and FLOPs.
        "downsample_padding": 0 if c.downsample_padding == "asymmetric" else 1,
    }


def monai_kwargs(config: UNetConfig) -> dict[str, Any]:
    """MONAI `DiffusionModelUNet` keyword arguments for the architecture of our `config`."""
    c = config
    unsupported = {
        "use_scale_shift_norm": c.use_scale_shift_norm,
        "skip_topology != per_block": c.skip_topology != "per_block",
        "attention_type != full": c.attention_type != "full",
        "context_dim": c.context_dim is not None,
        "time_embed_input_dim": c.resolved_time_embed_input_dim() != c.model_channels,
        "time_embed_dim": c.resolved_time_embed_dim() != 4 * c.model_channels,
        "pool_factor": c.pool_factor != 1,
        "downsample_type": c.downsample_type != "conv",
        "upsample_type": c.upsample_type != "nearest_conv",
        "resample_axes": c.resample_axes is not None,
        "dropout": c.dropout != 0.0,
        "aleatoric": c.aleatoric,
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"DiffusionModelUNet cannot express this config: {', '.join(bad)}")
    widths = tuple(c.level_channels(level) for level in range(c.num_levels))
    head_channels = c.num_head_channels or widths[-1] // c.num_heads
    return {
        "spatial_dims": c.dims,
        "in_channels": c.input_channels,
        "out_channels": c.out_channels,
        "channels": widths,
        "attention_levels": tuple(c.attention_at(level) for level in range(c.num_levels)),
        "num_res_blocks": c.num_res_blocks,
        "num_head_channels": head_channels,
        "norm_num_groups": c.norm_groups,
        "norm_eps": c.norm_eps,
        "resblock_updown": c.resblock_updown,
        "num_class_embeds": c.num_classes,
    }


def library_version(name: str) -> str | None:
    """Version of an installed library, or None when it cannot be imported."""
    try:
        return str(importlib.import_module(name).__version__)
    except Exception:
        return None


def build_reference(config: UNetConfig, library: str) -> Denoiser:
    """The reference model (diffusers or MONAI) of the same architecture as `config`."""
    if library == "diffusers":
        try:
            from diffusers import UNet2DModel
        except Exception as err:
            raise ReferenceUnavailable(
                f"diffusers is not importable ({type(err).__name__}: {err}); "
                "install it (pip install diffusers) or carry its wheel to the device"
            ) from err
        return Denoiser(UNet2DModel(**diffusers_kwargs(config)), "diffusers")
    if library == "monai":
        try:
            from monai.networks.nets import DiffusionModelUNet
        except Exception as err:
            raise ReferenceUnavailable(
                f"MONAI is not importable ({type(err).__name__}: {err}); install monai "
                "(and einops) or carry the monai wheel to the device"
            ) from err
        return Denoiser(DiffusionModelUNet(**monai_kwargs(config)), "monai")
    raise ValueError(f"unknown reference library {library!r}")


def build_ours(config: UNetConfig) -> Denoiser:
    """Our UNet for `config`, wrapped in the common :class:`Denoiser` interface."""
    return Denoiser(UNet(config), "diffunet")


def num_parameters(model: nn.Module) -> int:
    """Number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())


def randomize_zero_weights(model: nn.Module, std: float = 0.02) -> None:
    """Give every all-zero weight matrix/kernel small random values.

    Zero-initialised output convs make parts of the network compute on zeros, which can time
    faster than real data; both sides of a comparison get the same treatment.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, std)


def prepare_model(model: Denoiser, dims: int, device: torch.device) -> Denoiser:
    """`model` with no all-zero weights, on `device` in the channels-last layout of `dims`."""
    randomize_zero_weights(model)
    return model.to(device=device, memory_format=memory_format_for(dims))


# ---------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything a measurement needs besides the case."""

    device: torch.device
    warmup: int = 3
    iters: int = 10
    repeats: int = 3
    precision: str = "bf16"
    compile_mode: str = "default"
    peak_flops: float = PEAK_BF16_FLOPS
    quick: bool = False
    deadline: float | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 under `--precision bf16`, None (no autocast) under fp32."""
        return torch.bfloat16 if self.precision == "bf16" else None

    def autocast(self) -> Any:
        """The autocast context of the measured forward passes."""
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def records_cuda_graphs(self) -> bool:
        """Whether `compile` records CUDA graphs (reduce-overhead, max-autotune)."""
        return self.compile_mode in fused.CUDA_GRAPH_MODES

    def time_left(self) -> float:
        """Seconds before `--deadline` (inf without one)."""
        if self.deadline is None:
            return math.inf
        return self.deadline - (time.perf_counter() - self.started)

    def compile(self, model: nn.Module) -> nn.Module:
        """`torch.compile(model)` in the configured mode (with the fused GroupNorm kernels in
        the graph where the mode records CUDA graphs, as the trainer does)."""
        fused.configure_for_compile_mode(self.compile_mode)
        mode = None if self.compile_mode == "default" else self.compile_mode
        return torch.compile(model, mode=mode)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def _release(device: torch.device) -> None:
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_repeats(
    fn: Callable[[int], Any], iters: int, repeats: int, device: torch.device
) -> list[float]:
    """Seconds per iteration of `fn(i)` for each of `repeats` runs of `iters` iterations.

    On CUDA the region is timed with events (so launch gaps count, host clocks don't); on the
    CPU with `perf_counter`.
    """
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(iters):
                fn(i)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            begin = time.perf_counter()
            for i in range(iters):
                fn(i)
            seconds.append((time.perf_counter() - begin) / iters)
    return seconds


def kernel_time_ms(
    fn: Callable[[], Any], iters: int, device: torch.device, graphs: bool = True
) -> float:
    """Milliseconds per call of `fn()`, after two warm-up calls.

    On CUDA with `graphs`, `iters` calls are captured in one CUDA graph and its replay is timed:
    the kernels' own time, as in a CUDA-graph step, without the host's launch and autograd
    overhead (which hides every fused-norm call below about 2²⁵ elements on an H200). Without,
    `iters` calls from Python between CUDA events; on the CPU, `perf_counter`.
    """
    if device.type != "cuda":
        for _ in range(2):
            fn()
        begin = time.perf_counter()
        for _ in range(iters):
            fn()
        return 1000 * (time.perf_counter() - begin) / iters
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as graph capture needs
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    replay, replays = fn, iters
    if graphs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        replay, replays = graph.replay, 1
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def layer_benchmark_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The options the per-layer timing scripts share (`benchmarks/conv_channels.py`,
    `benchmarks/upsample_fold.py`): --cases, --iters, --device, --quick and --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--cases",
        default="3d,ldm,ddpm-cifar10",
        help="benchmark cases, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--iters", type=int, default=20, help="timed calls per measurement (default: %(default)s)"
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--quick", action="store_true", help="the tiny benchmark cases, float32 (a CPU smoke test)"
    )
    parser.add_argument("--out", help=f"JSON path (default: $OUT/{default_out} when OUT is set)")
    return parser


def layer_benchmark_setup(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[torch.device, torch.dtype, dict[str, Any]]:
    """The device and dtype `layer_benchmark_parser`'s options ask for (bf16 on a GPU unless
    --quick, else float32), with cuDNN's autotuning on, and the result's "meta" entry."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    dtype = torch.bfloat16 if device.type == "cuda" and not args.quick else torch.float32
    torch.backends.cudnn.benchmark = True
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "cudnn": torch.backends.cudnn.version(),
    }
    return device, dtype, meta


def _compare_variant(
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    inputs: list[torch.Tensor],
    expected: tuple | None,
) -> tuple[torch.Tensor, float, tuple]:
    """For one variant `run` of a computation: the output gradient to time it with, how far
    (relative to the largest magnitude) its output and its gradients with respect to `inputs`
    are from `expected` (the first variant's; None for the first), and `expected`.

    Nothing of the autograd graph outlives the call: a parameter's gradient accumulator kept
    from this default-stream call would belong to another stream than the timed calls and
    break their CUDA-graph capture."""
    out = run(x)
    grad = torch.randn_like(out) if expected is None else expected[1]
    grads = torch.autograd.grad(out, inputs, grad)
    if expected is None:
        expected = out.detach(), grad, [g.detach() for g in grads]
    difference = max(
        ((got - want).abs().max() / want.abs().max()).item()
        for got, want in zip([out, *grads], [expected[0], *expected[2]])
    )
    return grad, difference, expected


def time_variants(
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    inputs: list[torch.Tensor],
    iters: int,
) -> list[dict[str, Any]]:
    """Per variant of one computation of `x`: milliseconds of the forward alone and with the
    gradients with respect to `inputs` (`kernel_time_ms`: CUDA-graph replays on a GPU), and
    how far its output and gradients are from the first variant's."""
    rows, expected = [], None
    for variant, run in variants.items():
        grad, difference, expected = _compare_variant(run, x, inputs, expected)

        def forward(run=run) -> None:
            with torch.no_grad():
                run(x)

        def train(run=run, grad=grad) -> None:
            torch.autograd.grad(run(x), inputs, grad)

        rows.append(
            {
                "variant": variant,
                "forward_ms": kernel_time_ms(forward, iters, x.device),
                "train_ms": kernel_time_ms(train, iters, x.device),
                "max_relative_difference": difference,
            }
        )
    return rows


def materialize(
    module: nn.Module, device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format
) -> nn.Module:
    """A copy of `module` (e.g. from a model on the meta device) on `device` in `dtype` and
    `memory_format`, with N(0, 0.05) random parameters."""
    copy = deepcopy(module).to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in copy.parameters():
            p.normal_(0, 0.05)
    return copy.to(memory_format=memory_format)


# ---------------------------------------------------------------------------------- inputs
@dataclass
class Batch:
    """One training/inference batch: noisy input, timesteps, condition and the ε target."""

    x: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    cond: torch.Tensor | None


def linear_alphas_bar(steps: int = 1000) -> torch.Tensor:
    """ᾱ_t of the DDPM linear schedule (β from 1e-4 to 0.02), float64 on the CPU."""
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def make_batches(
    case: Case, batch: int, device: torch.device, count: int = 2, seed: int = 0
) -> list[Batch]:
    """`count` random batches (rotated during timing so no run re-reads one cached input)."""
    gen = torch.Generator().manual_seed(seed)
    fmt = memory_format_for(case.dims)
    alphas_bar = linear_alphas_bar()
    config = case.config
    out = []
    for _ in range(count):
        shape = (batch, config.in_channels, *case.size)
        x0 = torch.randn(shape, generator=gen)
        noise = torch.randn(shape, generator=gen)
        t = torch.randint(0, len(alphas_bar), (batch,), generator=gen)
        ab = alphas_bar[t].float().view(-1, *([1] * (case.dims + 1)))
        x = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        cond = None
        if config.cond_channels:
            cond = torch.randn((batch, config.cond_channels, *case.size), generator=gen)
            cond = cond.to(device).contiguous(memory_format=fmt)
        out.append(
            Batch(
                x.to(device).contiguous(memory_format=fmt),
                t.to(device),
                noise.to(device).contiguous(memory_format=fmt),
                cond,
            )
        )
    return out


# ---------------------------------------------------------------------------------- FLOPs
def count_flops(model: Denoiser, batch: Batch, settings: Settings) -> dict[str, int]:
    """Counted FLOPs per sample of the forward and of forward + backward (batch 1, eager): the
    architecture's (`introspect.count_flops`), the same count for both models."""
    one = Batch(
        batch.x[:1], batch.t[:1], batch.noise[:1], None if batch.cond is None else batch.cond[:1]
    )
    was_training = model.training
    model.train()
    forward, backward = flop_counter(), flop_counter()
    try:
        with resample.folding_on("none"):
            with forward, settings.autocast():
                out = model(one.x, one.t, one.cond)
            loss = F.mse_loss(out.float(), one.noise)
            with backward:
                loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    fwd = int(forward.get_total_flops())
    return {"forward": fwd, "train": fwd + int(backward.get_total_flops())}


# ---------------------------------------------------------------------------------- report
class Report:
    """Measurements of one run; saved as JSON after every record when a path is given."""

    def __init__(self, path: str | Path | None, meta: dict[str, Any]) -> None:
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {"meta": meta, "cases": {}, "records": [], "errors": []}

    @property
    def records(self) -> list[dict[str, Any]]:
        """One dict per (case, model, mode, kind) measurement."""
        return self.data["records"]

    def case(self, name: str) -> dict[str, Any]:
        """The per-case entry (parameters, FLOPs, notes)."""
        return self.data["cases"].setdefault(name, {})

    def add(self, record: dict[str, Any]) -> None:
        """Append a measurement, print one progress line and save."""
        self.records.append(record)
        print(_progress_line(record), flush=True)
        self.save()

    def error(self, where: str, err: BaseException) -> dict[str, Any]:
        """Record an exception (type, message, last traceback lines) and print it."""
        text = f"{type(err).__name__}: {err}"
        entry = {
            "where": where,
            "error": text[:2000],
            "traceback": traceback.format_exc(limit=6)[-3000:],
        }
        self.data["errors"].append(entry)
        print(f"  ERROR {where}: {text[:300]}", flush=True)
        self.save()
        return entry

    def save(self) -> None:
        """Write the JSON (no-op without a path)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def _progress_line(r: dict[str, Any]) -> str:
    head = f"  {r['case']:<12} {r['model']:<9} {r['mode']:<7} {r['kind']:<6}"
    if r.get("skipped"):
        return f"{head} skipped: {r['skipped']}"
    if r.get("error"):
        return f"{head} ERROR: {r['error'][:200]}"
    if r["kind"] == "sample":
        return f"{head} {r['seconds_per_batch']:.3f} s/batch  (warm-up {r['warmup_s']:.1f} s)"
    mem = f"{r['peak_mem_gib']:.2f} GiB" if r.get("peak_mem_gib") is not None else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    return (
        f"{head} {r['throughput']:9.1f} {r['unit']}/s  MFU {mfu:>6}  peak {mem}  "
        f"(warm-up {r['warmup_s']:.1f} s)"
    )


def environment(settings: Settings, argv: list[str] | None) -> dict[str, Any]:
    """The run's metadata: GPU, versions, settings."""
    device = settings.device
    meta: dict[str, Any] = {
        "argv": argv,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": library_version("triton"),
        "diffusers": library_version("diffusers"),
        "monai": library_version("monai"),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "precision": settings.precision,
        "compile_mode": settings.compile_mode,
        "peak_flops": settings.peak_flops,
        "warmup": settings.warmup,
        "iters": settings.iters,
        "repeats": settings.repeats,
        "quick": settings.quick,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "thin_conv_kernels": thin_conv._ENABLED,
        "tap_product_forward": thin_conv.TAP_PRODUCT_FORWARD,
        "folded_upsample_devices": sorted(resample.FOLDED_DEVICES),
        "memory_format": "channels_last (2D) / channels_last_3d (3D)",
        "train_step": "bf16 autocast forward, fp32 MSE on eps, backward, fused AdamW, "
        "zero_grad(set_to_none)"
        if settings.precision == "bf16"
        else "fp32 forward, MSE on eps, backward, fused AdamW",
        "flops": "torch.utils.flop_counter at batch 1 on the eager model; train = forward + "
        "backward counted directly; MFU = flops_per_sample * samples/s / peak_flops",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["multiprocessors"] = props.multi_processor_count
    return meta


# ---------------------------------------------------------------------------------- measuring
def make_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The benchmark's AdamW: fused where the device supports it."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    except (RuntimeError, ValueError):  # fused unsupported on this device / dtype
        return torch.optim.AdamW(model.parameters(), lr=1e-5)


def train_step_fn(
    model: nn.Module, batches: list[Batch], optimizer: torch.optim.Optimizer, settings: Settings
) -> Callable[[int], None]:
    """Step `i` trains on batch `i` (rotating): forward under autocast, float32 MSE on the
    noise, backward, optimizer step, gradients set to None."""

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        with settings.autocast():
            pred = model(b.x, b.t, b.cond)
        loss = F.mse_loss(pred.float(), b.noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _infer_fn(model: nn.Module, batches: list[Batch], settings: Settings) -> Callable[[int], None]:
    def forward(i: int) -> None:
        b = batches[i % len(batches)]
        with torch.no_grad(), settings.autocast():
            model(b.x, b.t, b.cond)

    return forward


def measure(
    fn: Callable[[int], Any], settings: Settings, *, peak_from_start: bool = False
) -> dict[str, Any]:
    """Warm up `fn`, reset the peak-memory counter, time it; seconds and peak memory.

    `peak_from_start` counts the peak from before the warm-up instead: for compile modes that
    record CUDA graphs, whose memory pool is allocated while warming up.
    """
    device = settings.device
    if peak_from_start:
        _reset_peak(device)
    begin = time.perf_counter()
    for i in range(settings.warmup):
        fn(i)
    _sync(device)
    warmup_s = time.perf_counter() - begin
    if not peak_from_start:
        _reset_peak(device)
    seconds = time_repeats(fn, settings.iters, settings.repeats, device)
    peak = _peak(device)
    return {
        "warmup_s": round(warmup_s, 3),
        "seconds_per_iter": statistics.median(seconds),
        "seconds_per_iter_repeats": seconds,
        "peak_mem_bytes": peak,
        "peak_mem_gib": None if peak is None else peak / 2**30,
    }


def _record(case: Case, model: str, impl: str, mode: str, kind: str, batch: int) -> dict[str, Any]:
    return {
        "case": case.name,
        "model": model,
        "impl": impl,
        "mode": mode,
        "kind": kind,
        "batch": batch,
        "size": list(case.size),
        "unit": case.unit,
    }


def _finish(
    record: dict[str, Any], timing: dict[str, Any], flops: dict[str, int] | None, settings: Settings
) -> None:
    record.update(timing)
    record["iters"], record["repeats"] = settings.iters, settings.repeats
    record["throughput"] = record["batch"] / timing["seconds_per_iter"]
    per_sample = None
    if flops:
        per_sample = flops["train" if record["kind"] == "train" else "forward"]
    record["flops_per_sample"] = per_sample
    if per_sample:
        achieved = per_sample * record["throughput"]
        record["tflops_per_s"] = achieved / 1e12
        record["mfu"] = achieved / settings.peak_flops
    else:
        record["tflops_per_s"] = record["mfu"] = None


def measure_model(
    report: Report,
    case: Case,
    which: str,
    model: Denoiser,
    batches: list[Batch],
    modes: tuple[str, ...],
    kinds: tuple[str, ...],
    flops: dict[str, int] | None,
    settings: Settings,
) -> None:
    """Train and/or inference measurements of one model in each mode; errors are recorded."""
    device = settings.device
    impl = model.kind
    for mode in modes:
        runner: nn.Module = settings.compile(model) if mode == "compile" else model
        for kind in kinds:
            record = _record(case, which, impl, mode, kind, case.batch)
            if settings.time_left() <= 0:
                record["skipped"] = "deadline reached"
                report.add(record)
                continue
            optimizer = None
            try:
                if kind == "train":
                    model.train()
                    optimizer = make_optimizer(model, device)
                    fn = train_step_fn(runner, batches, optimizer, settings)
                else:
                    model.eval()
                    fn = _infer_fn(runner, batches, settings)
                graphs = mode == "compile" and settings.records_cuda_graphs
                _finish(record, measure(fn, settings, peak_from_start=graphs), flops, settings)
                record["peak_includes_warmup"] = graphs
            except Exception as err:
                record["error"] = report.error(f"{case.name}/{which}/{mode}/{kind}", err)["error"]
            finally:
                del optimizer
                model.zero_grad(set_to_none=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            report.add(record)
        del runner
        _release(device)


def run_case(
    report: Report,
    name: str,
    settings: Settings,
    modes: tuple[str, ...],
    kinds: tuple[str, ...],
    models: tuple[str, ...],
    checkpoint_modes: tuple[str, ...],
) -> None:
    """Every measurement of one model case (ours, the reference, ours with checkpointing)."""
    device = settings.device
    case = build_case(name, settings.quick)
    entry = report.case(name)
    entry.update(
        {
            "description": case.description,
            "batch": case.batch,
            "size": list(case.size),
            "unit": case.unit,
            "reference": case.reference,
            "ours_config": case.config.to_dict(),
        }
    )
    batches = make_batches(case, case.batch, device)

    ref_kwargs = (diffusers_kwargs if case.reference == "diffusers" else monai_kwargs)(case.config)
    entry["reference_kwargs"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in ref_kwargs.items()
    }
    ours_params = ref_params = None
    with torch.device(device):
        ours = prepare_model(build_ours(case.config), case.dims, device)
    ours_params = num_parameters(ours)
    ref: Denoiser | None = None
    try:
        with torch.device(device):
            ref = prepare_model(build_reference(case.config, case.reference), case.dims, device)
        ref_params = num_parameters(ref)
    except ReferenceUnavailable as err:
        entry["reference_skipped"] = str(err)
        print(f"  {name}: reference skipped: {err}", flush=True)
    entry["params"] = {
        "ours": ours_params,
        "ref": ref_params,
        "match": None if ref_params is None else ours_params == ref_params,
    }
    if ref_params is not None and ours_params != ref_params:
        del ours, ref
        _release(device)
        raise AssertionError(
            f"{name}: parameter counts differ: ours {ours_params:,} vs "
            f"{case.reference} {ref_params:,}; the comparison would not be like for like"
        )
    print(
        f"[{name}] {case.description}, batch {case.batch}: ours {ours_params:,} params, "
        f"{case.reference} {ref_params if ref_params is None else format(ref_params, ',')}",
        flush=True,
    )

    flops: dict[str, dict[str, int] | None] = {}
    for which, model in (("ours", ours), ("ref", ref)):
        if model is None:
            continue
        try:
            flops[which] = count_flops(model, batches[0], settings)
        except Exception as err:
            flops[which] = None
            report.error(f"{name}/{which}/flops", err)
    entry["flops_per_sample"] = flops

    if "ours" in models:
        measure_model(
            report, case, "ours", ours, batches, modes, kinds, flops.get("ours"), settings
        )
    del ours
    _release(device)
    if "ref" in models:
        if ref is None:
            for mode in modes:
                for kind in kinds:
                    record = _record(case, "ref", case.reference, mode, kind, case.batch)
                    record["skipped"] = entry["reference_skipped"]
                    report.add(record)
        else:
            measure_model(
                report, case, "ref", ref, batches, modes, kinds, flops.get("ref"), settings
            )
    del ref
    _release(device)

    if "ours" in models and checkpoint_modes and "train" in kinds:
        try:
            with torch.device(device):
                ckpt = prepare_model(
                    build_ours(case.config.replace(use_checkpoint=True)), case.dims, device
                )
            # Checkpointing recomputes the forward; MFU is stated in model FLOPs (no recompute).
            measure_model(
                report,
                case,
                "ours+ckpt",
                ckpt,
                batches,
                checkpoint_modes,
                ("train",),
                flops.get("ours"),
                settings,
            )
            del ckpt
        except Exception as err:
            report.error(f"{name}/ours+ckpt", err)
        _release(device)


# ---------------------------------------------------------------------------------- sampling
def ddim_timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """Evenly spaced ("leading") DDIM timesteps, from noisiest to cleanest."""
    stride = train_steps // steps
    return list(range(0, train_steps, stride))[:steps][::-1]


def ddim_sample(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    steps: int,
    settings: Settings,
    alphas_bar: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) with an ε-predicting `model(x, t)`: a plain loop.

    The schedule's coefficients are Python floats, so the loop never syncs with the device.
    """
    alphas_bar = linear_alphas_bar() if alphas_bar is None else alphas_bar
    ts = ddim_timesteps(steps, len(alphas_bar))
    batch = x.shape[0]
    t_tensors = [torch.full((batch,), t, dtype=torch.long, device=x.device) for t in ts]
    for i, t in enumerate(ts):
        ab = float(alphas_bar[t])
        ab_prev = float(alphas_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        with torch.no_grad(), settings.autocast():
            eps = model(x, t_tensors[i]).float()
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
    return x


def _ours_sampler(model: Denoiser, steps: int, settings: Settings, cuda_graph: bool):
    """Our side of the sampling case: `Diffusion.sample` (DDIM, η = 0, the same schedule)."""
    from diffunet.diffusion import Diffusion

    diffusion = Diffusion("linear", 1000, "eps", timestep_spacing="leading", clip_denoised=False)

    def sample(x_init: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(x_init.device).manual_seed(0)
        with settings.autocast():
            return diffusion.sample(
                model,
                tuple(x_init.shape),
                sampler="ddim",
                steps=steps,
                generator=generator,
                progress=False,
                cuda_graph=cuda_graph,
            )

    return sample


def run_sampling(
    report: Report,
    settings: Settings,
    modes: tuple[str, ...],
    models: tuple[str, ...],
    steps: int,
    batch: int,
) -> None:
    """Wall time of a `steps`-step DDIM of an `ldm` batch: ours vs a loop over diffusers.

    Ours runs through the library's own `Diffusion.sample`, once as it is used by default (the
    UNet replayed as a CUDA graph) and once without the graph; the reference is a plain Python
    loop over the diffusers model, the way diffusers users sample without a pipeline.
    """
    device = settings.device
    base = build_case("ldm", settings.quick)
    case = Case(
        "sample",
        base.config,
        "diffusers",
        batch,
        base.size,
        "img",
        f"{steps}-step DDIM, ldm {base.size[0]}², batch {batch}",
    )
    entry = report.case("sample")
    entry.update(
        {
            "description": case.description,
            "batch": batch,
            "steps": steps,
            "size": list(case.size),
            "sampler": "DDIM eta=0, linear betas 1e-4..0.02, "
            "1000 train steps, leading spacing; ours: Diffusion.sample, reference: a "
            "plain Python loop",
        }
    )
    fmt = memory_format_for(case.dims)
    gen = torch.Generator().manual_seed(1)
    x_init = torch.randn((batch, case.config.in_channels, *case.size), generator=gen)
    x_init = x_init.to(device).contiguous(memory_format=fmt)
    for which in models:
        try:
            with torch.device(device):
                model = (
                    build_ours(case.config)
                    if which == "ours"
                    else build_reference(case.config, "diffusers")
                )
            model = prepare_model(model, case.dims, device).eval()
        except ReferenceUnavailable as err:
            for mode in modes:
                record = _record(case, which, "diffusers", mode, "sample", batch)
                record["skipped"] = str(err)
                report.add(record)
            continue
        for mode in modes:
            graphs = (False, True) if which == "ours" and device.type == "cuda" else (False,)
            for cuda_graph in graphs:
                impl = model.kind + ("+cuda-graph" if cuda_graph else "")
                record = _record(case, which, impl, mode, "sample", batch)
                record["steps"] = steps
                if settings.time_left() <= 0:
                    record["skipped"] = "deadline reached"
                    report.add(record)
                    continue
                try:
                    runner = settings.compile(model) if mode == "compile" else model
                    if which == "ours":
                        draw = _ours_sampler(runner, steps, settings, cuda_graph)
                    else:

                        def draw(x: torch.Tensor, runner: nn.Module = runner) -> torch.Tensor:
                            return ddim_sample(runner, x, steps, settings)

                    begin = time.perf_counter()
                    draw(x_init)  # compiles / records (timestep values change, shapes do not)
                    _sync(device)
                    warmup_s = time.perf_counter() - begin
                    _reset_peak(device)
                    seconds = time_repeats(
                        lambda _, draw=draw: draw(x_init), 1, max(settings.repeats, 1), device
                    )
                    peak = _peak(device)
                    record.update(
                        {
                            "warmup_s": round(warmup_s, 3),
                            "seconds_per_batch": statistics.median(seconds),
                            "seconds_per_batch_repeats": seconds,
                            "ms_per_step": 1e3 * statistics.median(seconds) / steps,
                            "throughput": batch / statistics.median(seconds),
                            "peak_mem_bytes": peak,
                            "peak_mem_gib": None if peak is None else peak / 2**30,
                        }
                    )
                    del runner, draw
                except Exception as err:
                    record["error"] = report.error(f"sample/{impl}/{mode}", err)["error"]
                report.add(record)
                _release(device)
        del model
        _release(device)


# ---------------------------------------------------------------------------------- summary
def _find(records: list[dict[str, Any]], **keys: Any) -> dict[str, Any] | None:
    for r in records:
        if (
            all(r.get(k) == v for k, v in keys.items())
            and not r.get("error")
            and not r.get("skipped")
        ):
            return r
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Ours-over-reference ratios per case: throughput (per mode, and ours' best vs the
    reference compiled), peak training memory, and checkpointed memory vs the reference."""
    out: dict[str, Any] = {}
    cases = dict.fromkeys(r["case"] for r in records)
    for case in cases:
        rs = [r for r in records if r["case"] == case]
        entry: dict[str, Any] = {}
        if case == "sample":
            ref_compiled = _find(rs, model="ref", mode="compile")
            for mode in MODES:
                ref = _find(rs, model="ref", mode=mode)
                for ours in [
                    r
                    for r in rs
                    if r["model"] == "ours" and r["mode"] == mode and r.get("seconds_per_batch")
                ]:
                    for name, other in ((mode, ref), ("ref_compile", ref_compiled)):
                        if other and other.get("seconds_per_batch"):
                            entry[f"speedup_{ours['impl']}_{mode}_vs_{name}"] = (
                                other["seconds_per_batch"] / ours["seconds_per_batch"]
                            )
            out[case] = entry
            continue
        for kind in KINDS:
            best = None
            for mode in MODES:
                ours = _find(rs, model="ours", mode=mode, kind=kind)
                ref = _find(rs, model="ref", mode=mode, kind=kind)
                if ours and ref:
                    entry[f"{kind}_speedup_{mode}"] = ours["throughput"] / ref["throughput"]
                    if kind == "train":
                        entry[f"train_mem_ratio_{mode}"] = _ratio(
                            ours["peak_mem_bytes"], ref["peak_mem_bytes"]
                        )
                if ours and (best is None or ours["throughput"] > best["throughput"]):
                    best = ours
            ref_c = _find(rs, model="ref", mode="compile", kind=kind)
            if best and ref_c:
                entry[f"{kind}_ours_best_vs_ref_compiled"] = (
                    best["throughput"] / ref_c["throughput"]
                )
                entry[f"{kind}_ours_best_mode"] = best["mode"]
        for mode in MODES:
            ckpt = _find(rs, model="ours+ckpt", mode=mode, kind="train")
            if not ckpt:
                continue
            for ref_mode in MODES:
                ref = _find(rs, model="ref", mode=ref_mode, kind="train")
                if ref:
                    entry[f"ckpt_{mode}_mem_vs_ref_{ref_mode}"] = _ratio(
                        ckpt["peak_mem_bytes"], ref["peak_mem_bytes"]
                    )
        out[case] = entry
    return out


def format_table(data: dict[str, Any]) -> str:
    """The compact text table of a report's records and ratios."""
    meta = data["meta"]
    lines = [
        f"diffunet bench: {meta['device_name']}, torch {meta['torch']}, "
        f"{meta['precision']}, compile mode {meta['compile_mode']}, MFU vs "
        f"{meta['peak_flops'] / 1e12:.0f} TFLOP/s"
    ]
    header = (
        f"{'case':<12} {'model':<9} {'impl':<9} {'mode':<7} | {'train/s':>9} "
        f"{'MFU':>6} {'peakGiB':>7} | {'infer/s':>9} {'MFU':>6} {'peakGiB':>7}"
    )
    lines += [header, "-" * len(header)]
    rows: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in data["records"]:
        if r["kind"] in KINDS:
            rows.setdefault((r["case"], r["model"], r["impl"], r["mode"]), {})[r["kind"]] = r

    def cells(r: dict[str, Any] | None) -> str:
        if r is None:
            return f"{'':>9} {'':>6} {'':>7}"
        if r.get("skipped"):
            return f"{'skipped':>9} {'':>6} {'':>7}"
        if r.get("error"):
            err = "OOM" if "out of memory" in r["error"].lower() else "error"
            return f"{err:>9} {'':>6} {'':>7}"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") is not None else "-"
        return f"{r['throughput']:>9.1f} {mfu:>6} {mem:>7}"

    for (case, model, impl, mode), kinds in rows.items():
        lines.append(
            f"{case:<12} {model:<9} {impl:<9} {mode:<7} | {cells(kinds.get('train'))}"
            f" | {cells(kinds.get('infer'))}"
        )
    for name, entry in data["cases"].items():
        if name == "sample":
            continue
        params = entry.get("params", {})
        flops = entry.get("flops_per_sample") or {}
        fl = ", ".join(
            f"{k} fwd {v['forward'] / 1e9:.1f} / train {v['train'] / 1e9:.1f} GFLOP"
            for k, v in flops.items()
            if v
        )
        lines.append(
            f"{name}: params ours {params.get('ours')} ref {params.get('ref')} "
            f"match {params.get('match')}; per sample: {fl}"
        )
    samples = [r for r in data["records"] if r["kind"] == "sample"]
    if samples:
        desc = data["cases"].get("sample", {}).get("description", "sampling")
        parts = []
        for r in samples:
            if r.get("seconds_per_batch") is not None:
                parts.append(f"{r['model']}/{r['impl']} {r['mode']} {r['seconds_per_batch']:.3f} s")
            else:
                parts.append(f"{r['model']} {r['mode']} {r.get('skipped') or 'error'}")
        lines.append(f"sampling ({desc}): " + "; ".join(parts))
    for case, ratios in data.get("ratios", {}).items():
        if ratios:
            text = ", ".join(f"{k} {v:.2f}" for k, v in ratios.items() if isinstance(v, float))
            lines.append(f"ratios {case}: {text}")
    if data["errors"]:
        lines.append(f"{len(data['errors'])} error(s); see the JSON 'errors' list")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- profiling
_CLASS_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # diffunet's thin 3D convolutions (nn/thin_conv.py)
    ("convolution", ("_gather_conv", "_gather_weight_grad", "_tap_products", "_tap_sum")),
    ("optimizer", ("adam", "multi_tensor_apply", "sgd")),
    ("attention+GEMM", ("splitk",)),
    ("elementwise/copies", ("nchwtonhwc", "nhwctonchw", "nchw_to_nhwc", "nhwc_to_nchw")),
    ("attention+GEMM", ("flash", "fmha", "attention", "attn", "sdpa", "softmax", "dot_product")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "xmma_cudnn", "cudnn")),
    # GroupNorm kernels, PyTorch's and diffunet's fused Triton ones (nn/fused.py: _stats,
    # _stats_combine, _normalize, _backward_reduce, _backward_combine, _backward_dx).
    (
        "norm/reductions",
        (
            "norm",
            "moments",
            "welford",
            "reduce",
            "gammabeta",
            "internalgradients",
            "fusedparams",
            "_stats",
            "combine_kernel",
            "_dx_kernel",
            "gn_",
            "aten::sum",
            "aten::mean",
        ),
    ),
    (
        "attention+GEMM",
        (
            "gemm",
            "gemv",
            "nvjet",
            "cutlass",
            "cublas",
            "splitk",
            "aten::mm",
            "addmm",
            "bmm",
            "matmul",
            "aten::linear",
            "einsum",
        ),
    ),
    (
        "elementwise/copies",
        (
            "elementwise",
            "copy",
            "memcpy",
            "memset",
            "cat",
            "upsample",
            "interpolate",
            "fill",
            "index",
            "transpose",
            "dropout",
            "pad",
            "vectorized",
            "unrolled",
            "silu",
            "aten::add",
            "aten::mul",
            "aten::div",
            "aten::sub",
            "aten::to",
            "aten::clone",
            "aten::contiguous",
            "aten::zero",
            "aten::empty",
            "where",
            "aten::cos",
            "aten::sin",
            "aten::exp",
            "aten::neg",
            "aten::_to_copy",
            "aten::bernoulli",
            "threshold",
            "sigmoid",
        ),
    ),
)


def classify_kernel(name: str) -> str:
    """The PERF-NOTES.md class of a GPU kernel (or, on the CPU, an aten op) name.

    Inductor's Triton kernels are classed by their prefix: ``triton_poi`` (pointwise) →
    elementwise, ``triton_red``/``triton_per`` (reductions) → norm/reductions,
    ``triton_tem`` (templates) → convolution or GEMM; other Triton kernels (hand-written, e.g.
    a fused GroupNorm) by the words in their name.
    """
    low = name.lower()
    if "triton_poi" in low:
        return "elementwise/copies"
    if "triton_red" in low or "triton_per" in low:
        return "norm/reductions"
    if "triton_tem" in low:
        return "convolution" if "conv" in low else "attention+GEMM"
    for cls, patterns in _CLASS_PATTERNS:
        if any(p in low for p in patterns):
            return cls
    return "other"


def _launch_chain(evt: Any, depth: int = 5) -> str:
    """The op that launched a kernel with up to `depth - 1` of its callers, outermost first.

    ``aten::copy_`` alone does not say why a copy ran; ``aten::convolution_backward >
    aten::contiguous > aten::copy_`` does.
    """
    names = []
    while evt is not None and len(names) < depth:
        names.append(evt.name)
        evt = evt.cpu_parent
    return " > ".join(reversed(names))


def kernel_breakdown(prof: Any, steps: int, device: torch.device, top: int = 40) -> dict[str, Any]:
    """Group a profile's GPU kernel time (self CPU time of aten ops on the CPU) by class.

    Also lists the top kernels, and for each class the ops that launched its kernels (the
    answer to "which ops launch the generic elementwise kernel?").
    """
    from torch.autograd import DeviceType

    events = prof.events()
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    launchers: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    if device.type == "cuda":
        for evt in events:
            # GPU-side ranges of `record_function` (DDP's forward, NCCL calls) span kernels
            # that are counted themselves.
            if evt.device_type == DeviceType.CUDA and not getattr(evt, "is_user_annotation", False):
                by_name[evt.name][0] += evt.device_time_total
                by_name[evt.name][1] += 1
            elif evt.device_type == DeviceType.CPU and getattr(evt, "kernels", None):
                for k in evt.kernels:
                    launchers[classify_kernel(k.name)][_launch_chain(evt)] += k.duration
    else:
        for evt in events:
            if evt.device_type == DeviceType.CPU and evt.name.startswith("aten::"):
                by_name[evt.name][0] += evt.self_cpu_time_total
                by_name[evt.name][1] += 1
    total_us = sum(v[0] for v in by_name.values())
    classes = {cls: 0.0 for cls in KERNEL_CLASSES}
    for name, (us, _) in by_name.items():
        classes[classify_kernel(name)] += us
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "time_source": "GPU kernel time" if device.type == "cuda" else "self CPU time of aten ops",
        "ms_per_step": total_us / 1e3 / steps,
        "classes": {
            cls: {"ms_per_step": us / 1e3 / steps, "share": us / total_us if total_us else 0.0}
            for cls, us in classes.items()
        },
        "top_kernels": [
            {
                "name": name[:200],
                "class": classify_kernel(name),
                "calls": calls,
                "ms_per_step": us / 1e3 / steps,
                "share": us / total_us if total_us else 0.0,
            }
            for name, (us, calls) in ranked
        ],
        "launchers": {
            cls: [
                {"op": op[:200], "ms_per_step": us / 1e3 / steps}
                for op, us in sorted(ops.items(), key=lambda kv: -kv[1])[:6]
            ]
            for cls, ops in launchers.items()
        },
    }


def run_profile(
    case_name: str,
    settings: Settings,
    modes: tuple[str, ...],
    models: tuple[str, ...],
    steps: int = 3,
    kinds: tuple[str, ...] = ("train",),
) -> dict[str, Any]:
    """torch.profiler over `steps` training steps or forward passes (`kinds`) per (model,
    mode), grouped by kernel class."""
    from torch.profiler import ProfilerActivity, profile

    device = settings.device
    case = build_case(case_name, settings.quick)
    batches = make_batches(case, case.batch, device)
    result: dict[str, Any] = {
        "case": case_name,
        "description": case.description,
        "batch": case.batch,
        "steps": steps,
        "kinds": list(kinds),
        "runs": [],
        "errors": [],
    }
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    for which in models:
        try:
            with torch.device(device):
                model = (
                    build_ours(case.config)
                    if which == "ours"
                    else build_reference(case.config, case.reference)
                )
            model = prepare_model(model, case.dims, device).train()
        except Exception as err:
            result["errors"].append(
                {"where": f"{which}/build", "error": f"{type(err).__name__}: {err}"}
            )
            print(f"  {which}: not built: {err}", flush=True)
            continue
        for mode, kind in itertools.product(modes, kinds):
            try:
                runner = settings.compile(model) if mode == "compile" else model
                model.train(kind == "train")
                optimizer = make_optimizer(model, device) if kind == "train" else None
                step = (
                    train_step_fn(runner, batches, optimizer, settings)
                    if optimizer
                    else _infer_fn(runner, batches, settings)
                )
                for i in range(max(settings.warmup, 1)):
                    step(i)
                _sync(device)
                begin = time.perf_counter()
                with profile(activities=activities) as prof:
                    for i in range(steps):
                        step(i)
                    _sync(device)
                wall = (time.perf_counter() - begin) / steps
                run = {
                    "model": which,
                    "impl": model.kind,
                    "mode": mode,
                    "kind": kind,
                    "wall_ms_per_step_profiled": 1e3 * wall,
                    **kernel_breakdown(prof, steps, device),
                }
                result["runs"].append(run)
                del optimizer, runner, prof
            except Exception as err:
                where = f"{which}/{mode}/{kind}"
                result["errors"].append(
                    {"where": where, "error": f"{type(err).__name__}: {err}"[:2000]}
                )
                print(f"  {where}: ERROR {type(err).__name__}: {err}", flush=True)
            model.zero_grad(set_to_none=True)
            _release(device)
        del model
        _release(device)
    return result


def format_profile(result: dict[str, Any]) -> str:
    """The profile as a PERF-NOTES.md-style table plus the top kernels."""
    short = {
        "convolution": "conv",
        "elementwise/copies": "elem/copy",
        "norm/reductions": "norm/red",
        "attention+GEMM": "attn+GEMM",
        "optimizer": "optim",
        "other": "other",
    }
    lines = [
        f"profile {result['case']} ({result['description']}, batch {result['batch']}, "
        f"{result['steps']} steps of {'/'.join(result.get('kinds', ['train']))})"
    ]
    head = f"{'model':<6} {'impl':<9} {'mode':<7} {'kind':<5} {'step ms':>8} " + " ".join(
        f"{short[c]:>9}" for c in KERNEL_CLASSES
    )
    lines += [head, "-" * len(head)]
    for run in result["runs"]:
        shares = " ".join(f"{100 * run['classes'][c]['share']:>8.1f}%" for c in KERNEL_CLASSES)
        lines.append(
            f"{run['model']:<6} {run['impl']:<9} {run['mode']:<7} "
            f"{run.get('kind', 'train'):<5} {run['ms_per_step']:>8.1f} {shares}"
        )
    for run in result["runs"]:
        lines.append(
            f"top kernels: {run['model']} {run['mode']} {run.get('kind', 'train')} "
            f"({run['time_source']})"
        )
        for k in run["top_kernels"][:8]:
            lines.append(
                f"  {100 * k['share']:5.1f}% {k['ms_per_step']:8.2f} ms "
                f"{k['class']:<18} {k['name'][:90]}"
            )
        for cls, ops in run.get("launchers", {}).items():
            lines.append(f"  {cls} launched by:")
            lines += [f"    {e['ms_per_step']:7.2f} ms  {e['op'][:150]}" for e in ops[:5]]
    for err in result["errors"]:
        lines.append(f"error {err['where']}: {err['error'][:200]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- CLI
def _csv(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown value(s) {', '.join(bad)}; choose from {', '.join(choices)}"
            )
        return items

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `benchmarks/bench.py` and `diffunet bench`."""
    parser.add_argument(
        "--cases",
        type=_csv(ALL_CASES),
        default=ALL_CASES,
        help=f"comma-separated subset of {','.join(ALL_CASES)} (default: all)",
    )
    parser.add_argument(
        "--modes",
        type=_csv(MODES),
        default=MODES,
        help="comma-separated subset of eager,compile (default: both)",
    )
    parser.add_argument(
        "--kinds",
        type=_csv(KINDS),
        default=KINDS,
        help="comma-separated subset of train,infer (default: both)",
    )
    parser.add_argument(
        "--models",
        type=_csv(MODELS),
        default=MODELS,
        help="comma-separated subset of ours,ref (default: both)",
    )
    parser.add_argument(
        "--checkpoint-modes",
        type=_csv((*MODES, "none")),
        default=("eager",),
        help="modes in which ours with use_checkpoint=True is trained for its "
        "peak memory (default: eager; 'none' to skip)",
    )
    parser.add_argument(
        "--iters", type=int, help="timed iterations per repeat (default 10, quick 2)"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed repeats, median reported (default 3, quick 1)"
    )
    parser.add_argument(
        "--warmup", type=int, help="warm-up iterations, compilation included (default 3, quick 1)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny versions of every case and few iterations (CPU smoke test)",
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        help="bf16 autocast or plain fp32 forward (default: bf16 on CUDA, fp32 "
        "on the CPU, where bf16 convolutions are slow)",
    )
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode (default: default)",
    )
    parser.add_argument(
        "--peak-flops",
        type=float,
        default=PEAK_BF16_FLOPS,
        help="peak FLOP/s for MFU (default 780e12, H100 bf16 matmul)",
    )
    parser.add_argument(
        "--sample-steps", type=int, help="DDIM steps of the sample case (default 50, quick 3)"
    )
    parser.add_argument(
        "--sample-batch", type=int, help="batch of the sample case (default 4, quick 1)"
    )
    parser.add_argument(
        "--sample-modes",
        type=_csv(MODES),
        default=("compile",),
        help="modes of the sample case (default: compile)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        help="seconds after which remaining measurements are skipped (the JSON "
        "is written after every measurement anyway)",
    )
    parser.add_argument(
        "--compile-ahead",
        type=int,
        default=0,
        metavar="JOBS",
        help="first compile every model the run compiles in JOBS parallel "
        "processes, which fill Inductor's on-disk caches, then measure in "
        "this process with warm caches (default 0: compile while measuring)",
    )
    parser.add_argument("--fill-caches-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-cudnn-benchmark", action="store_true", help="leave torch.backends.cudnn.benchmark off"
    )
    parser.add_argument(
        "--profile",
        metavar="CASE",
        choices=MODEL_CASES,
        help=f"instead of the benchmark, profile {'/'.join(MODEL_CASES)}: "
        "kernel classes over --profile-steps steps of each --kinds",
    )
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=3,
        help="training steps or forward passes under the profiler (default 3)",
    )
    parser.add_argument(
        "--out",
        help="JSON path (default: $OUT/bench.json, or "
        "$OUT/profile-CASE.json with --profile, when OUT is set)",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """A :class:`Settings` from parsed options (quick defaults applied)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    quick = args.quick

    def pick(value: int | None, normal: int, small: int) -> int:
        return value if value is not None else (small if quick else normal)

    return Settings(
        device=device,
        warmup=pick(args.warmup, 3, 1),
        iters=pick(args.iters, 10, 2),
        repeats=pick(args.repeats, 3, 1),
        precision=args.precision or ("bf16" if device.type == "cuda" else "fp32"),
        compile_mode=args.compile_mode,
        peak_flops=args.peak_flops,
        quick=quick,
        deadline=args.deadline,
    )


def write_json_result(data: Any, out: str | None, default_name: str) -> str | None:
    """Write `data` as JSON to `out`, or to `$OUT/default_name` when OUT is set (the device
    machine's folder that comes back); print and return the path (None: nothing written)."""
    if not out and os.environ.get("OUT"):
        out = str(Path(os.environ["OUT"]) / default_name)
    if not out:
        return None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")
    return out


def _default_out(args: argparse.Namespace) -> str | None:
    if args.out:
        return args.out
    if os.environ.get("OUT"):
        name = f"profile-{args.profile}.json" if args.profile else "bench.json"
        return str(Path(os.environ["OUT"]) / name)
    return None


_ENTRY = "import sys; from diffunet.benchmark import main; sys.exit(main(sys.argv[1:]))"


def _fill_cache_argv(
    args: argparse.Namespace, settings: Settings, case: str, model: str
) -> list[str]:
    argv = [
        "--cases",
        case,
        "--models",
        model,
        "--modes",
        "compile",
        "--kinds",
        ",".join(args.kinds),
        "--checkpoint-modes",
        "none",
        "--warmup",
        "1",
        "--iters",
        "1",
        "--repeats",
        "1",
        "--compile-mode",
        args.compile_mode,
        "--precision",
        settings.precision,
        "--device",
        settings.device.type,
        "--fill-caches-only",
    ]
    return argv + ["--quick"] * args.quick + ["--no-cudnn-benchmark"] * args.no_cudnn_benchmark


def compile_ahead(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Compile each (case, model) of the run once, `--compile-ahead` processes at a time,
    before measuring.

    Each process runs this benchmark for one model with one warm-up step, which fills
    Inductor's FX-graph and AOTAutograd caches on disk; the measuring process then loads the
    compiled graphs instead of compiling them (`warmup_s` drops from minutes to seconds), so a
    same-run comparison of several compiled models fits a much shorter GPU lease. The
    processes do not store their Triton autotuning choices (they ran beside each other on the
    GPU): the measuring process makes those alone.
    """
    jobs = args.compile_ahead
    cases = [c for c in args.cases if c in MODEL_CASES]
    if jobs < 1 or "compile" not in args.modes or not cases:
        return {}
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(
        os.environ,
        OUT="",
        PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    )

    def fill(case_model: tuple[str, str]) -> dict[str, Any]:
        case, model = case_model
        begin = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", _ENTRY, *_fill_cache_argv(args, settings, case, model)],
            env=env,
            capture_output=True,
            text=True,
        )
        result = {"case": case, "model": model, "seconds": round(time.perf_counter() - begin, 1)}
        if done.returncode != 0:
            result["error"] = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return result

    begin = time.perf_counter()
    print(f"compiling {len(cases) * len(args.models)} models ahead, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        processes = list(pool.map(fill, [(c, m) for c in cases for m in args.models]))
    for p in processes:
        if "error" in p:
            print(f"  compiling {p['case']}/{p['model']} ahead failed: {p['error']}", flush=True)
    return {"jobs": jobs, "seconds": round(time.perf_counter() - begin, 1), "processes": processes}


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or the profile) the options ask for; returns the JSON data."""
    settings = settings_from_args(args)
    for name in ("iters", "repeats"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    # diffusers' `is_torch_version` is lru_cached; Dynamo says so once per call site.
    warnings.filterwarnings("ignore", message=r".*functools\.lru_cache.*")
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = None if args.fill_caches_only else _default_out(args)
    if args.fill_caches_only:
        import torch._inductor.config as inductor_config

        inductor_config.autotune_local_cache = False

    if args.profile:
        result = run_profile(
            args.profile,
            settings,
            args.modes,
            args.models,
            steps=args.profile_steps,
            kinds=args.kinds,
        )
        result["meta"] = environment(settings, argv)
        print(format_profile(result), flush=True)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=1, default=str) + "\n")
            print(f"wrote {out}")
        return result

    ahead = compile_ahead(args, settings)
    report = Report(out, environment(settings, argv))
    if ahead:
        report.data["meta"]["compiled_ahead"] = ahead
    print(
        f"diffunet bench on {report.data['meta']['device_name']} "
        f"(torch {torch.__version__}, diffusers {report.data['meta']['diffusers']}, "
        f"monai {report.data['meta']['monai']})",
        flush=True,
    )
    checkpoint_modes = tuple(m for m in args.checkpoint_modes if m != "none")
    for name in args.cases:
        begin = time.perf_counter()
        try:
            if name == "sample":
                run_sampling(
                    report,
                    settings,
                    args.sample_modes,
                    args.models,
                    steps=args.sample_steps or (3 if settings.quick else 50),
                    batch=args.sample_batch or (1 if settings.quick else 4),
                )
            else:
                run_case(
                    report, name, settings, args.modes, args.kinds, args.models, checkpoint_modes
                )
        except Exception as err:
            report.error(name, err)
        report.case(name)["elapsed_s"] = round(time.perf_counter() - begin, 1)
        print(f"[{name}] done in {time.perf_counter() - begin:.0f} s", flush=True)
        _release(settings.device)
    report.data["ratios"] = summarize(report.records)
    report.data["meta"]["elapsed_s"] = round(time.perf_counter() - settings.started, 1)
    report.save()
    print(format_table(report.data), flush=True)
    if out:
        print(f"wrote {out}")
    return report.data


def main(argv: list[str] | None = None) -> int:
    """Entry point of `benchmarks/bench.py`."""
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    data = run_from_args(args, sys.argv[1:] if argv is None else argv)
    return 1 if data.get("errors") else 0


__all__ = [
    "ALL_CASES",
    "KERNEL_CLASSES",
    "PEAK_BF16_FLOPS",
    "UNET_3D",
    "Case",
    "Denoiser",
    "ReferenceUnavailable",
    "Report",
    "Settings",
    "add_arguments",
    "build_case",
    "build_ours",
    "build_reference",
    "classify_kernel",
    "count_flops",
    "ddim_sample",
    "diffusers_kwargs",
    "format_profile",
    "format_table",
    "kernel_breakdown",
    "kernel_time_ms",
    "main",
    "monai_kwargs",
    "run_from_args",
    "run_profile",
    "summarize",
    "write_json_result",
]
