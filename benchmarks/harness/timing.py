"""How the benchmarks run and time a model: settings (device, precision, compile mode), input
batches, the training step and the forward pass, warm-up and timed repeats, counted FLOPs.

The training step is: forward under autocast, float32 MSE on the ε target, backward, fused
AdamW step, `zero_grad(set_to_none=True)`; inference is a `no_grad` forward under autocast.
Timings on CUDA are taken between CUDA events (launch gaps count, host clocks don't), on the
CPU with `perf_counter`; the warm-up (where compilation happens) is timed apart.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffunet.accel import memory_format_for, plain, settings
from diffunet.diffusion import Diffusion
from diffunet.model.introspect import flop_counter
from harness.models import Case

PEAK_BF16_FLOPS = 780e12
"""Default peak for MFU: the H100's measured dense bf16 matmul rate."""


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
        return self.compile_mode in settings.CUDA_GRAPH_MODES

    def time_left(self) -> float:
        """Seconds before `--deadline` (inf without one)."""
        if self.deadline is None:
            return math.inf
        return self.deadline - (time.perf_counter() - self.started)

    def compile(self, model: nn.Module) -> nn.Module:
        """`torch.compile(model)` in the configured mode, both sides alike (with the fused
        GroupNorm kernels in our graphs where the mode records CUDA graphs, as the trainer
        compiles)."""
        settings.configure_for_compile_mode(self.compile_mode)
        mode = None if self.compile_mode == "default" else self.compile_mode
        return torch.compile(model, mode=mode)


def sync(device: torch.device) -> None:
    """Wait for the device's work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Restart the device's peak-memory counter (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Peak memory allocated on the device since the last reset (None on the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def free_memory(device: torch.device) -> None:
    """On a GPU, free what the last measurement left, so that the next one's peak is its own
    (a no-op on the CPU, where peaks are not measured and a collection only costs time)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def release(device: torch.device) -> None:
    """Forget compiled graphs and free the device's memory between models."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    free_memory(device)


# ---------------------------------------------------------------------------------- inputs
def benchmark_diffusion() -> Diffusion:
    """The diffusion process of every benchmark: DDPM's linear β (1e-4 to 0.02, T = 1000), ε
    prediction, DDIM's "leading" timesteps, no clipping of x₀."""
    return Diffusion("linear", 1000, "eps", timestep_spacing="leading", clip_denoised=False)


@dataclass
class Batch:
    """One training/inference batch: noisy input, timesteps, condition and the ε target."""

    x: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    cond: torch.Tensor | None


def make_batches(
    case: Case, batch: int, device: torch.device, count: int = 2, seed: int = 0
) -> list[Batch]:
    """`count` random batches (rotated during timing so no run re-reads one cached input)."""
    gen = torch.Generator().manual_seed(seed)
    fmt = memory_format_for(case.dims)
    alphas_bar = benchmark_diffusion().schedule.alphas_cumprod
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


# ---------------------------------------------------------------------------------- steps
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
            pred = model(b.x, b.t, cond=b.cond)
        loss = F.mse_loss(pred.float(), b.noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def infer_fn(model: nn.Module, batches: list[Batch], settings: Settings) -> Callable[[int], None]:
    """Call `i` runs a `no_grad` forward under autocast on batch `i` (rotating)."""

    def forward(i: int) -> None:
        b = batches[i % len(batches)]
        with torch.no_grad(), settings.autocast():
            model(b.x, b.t, cond=b.cond)

    return forward


# ---------------------------------------------------------------------------------- timing
def time_repeats(
    fn: Callable[[int], Any], iters: int, repeats: int, device: torch.device
) -> list[float]:
    """Seconds per iteration of `fn(i)` for each of `repeats` runs of `iters` iterations."""
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


def measure(
    fn: Callable[[int], Any], settings: Settings, *, peak_from_start: bool = False
) -> dict[str, Any]:
    """Warm up `fn`, reset the peak-memory counter, time it; seconds and peak memory.

    `peak_from_start` counts the peak from before the warm-up instead: for compile modes that
    record CUDA graphs, whose memory pool is allocated while warming up.
    """
    device = settings.device
    if peak_from_start:
        reset_peak(device)
    begin = time.perf_counter()
    for i in range(settings.warmup):
        fn(i)
    sync(device)
    warmup_s = time.perf_counter() - begin
    if not peak_from_start:
        reset_peak(device)
    seconds = time_repeats(fn, settings.iters, settings.repeats, device)
    peak = peak_bytes(device)
    return {
        "warmup_s": round(warmup_s, 3),
        "seconds_per_iter": statistics.median(seconds),
        "seconds_per_iter_repeats": seconds,
        "peak_mem_bytes": peak,
        "peak_mem_gib": None if peak is None else peak / 2**30,
    }


# ---------------------------------------------------------------------------------- FLOPs
def count_flops(model: nn.Module, batch: Batch, settings: Settings) -> dict[str, int]:
    """Counted FLOPs per sample of the forward and of forward + backward (batch 1, eager, the
    plain model: `diffunet.accel.plain`), the architecture's count, the same for both sides."""
    one = Batch(
        batch.x[:1], batch.t[:1], batch.noise[:1], None if batch.cond is None else batch.cond[:1]
    )
    was_training = model.training
    model.train()
    forward, backward = flop_counter(), flop_counter()
    try:
        with plain(model):
            with forward, settings.autocast():
                out = model(one.x, one.t, cond=one.cond)
            loss = F.mse_loss(out.float(), one.noise)
            with backward:
                loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    fwd = int(forward.get_total_flops())
    return {"forward": fwd, "train": fwd + int(backward.get_total_flops())}
