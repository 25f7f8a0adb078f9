"""How the benchmarks run and time a model: settings (device, precision, compile mode), the
measurement modes (eager, `torch.compile`, CUDA graphs), input batches with each case's extra
inputs, the training step and the forward pass, warm-up and timed repeats, counted FLOPs.

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

from diffunet.accel import cache_compiled_functions, memory_format_for, plain, settings
from diffunet.diffusion import Diffusion
from diffunet.model.introspect import flop_counter
from harness.models import Case

PEAK_BF16_FLOPS = 780e12
"""Default peak for MFU: the H100's measured dense bf16 matmul rate."""

MODES = ("eager", "compile", "graphs")
"""The measurement modes: eager; `torch.compile` in the run's `compile_mode` (the default mode
unless set); CUDA graphs, `torch.compile(mode="reduce-overhead")` (GPU only)."""
GRAPHS_COMPILE_MODE = "reduce-overhead"
"""The `torch.compile` mode of the `graphs` measurement mode."""


# ---------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything a measurement needs besides the case."""

    device: torch.device
    warmup: int = 3
    iters: int = 10
    repeats: int = 3
    min_repeat_s: float = 0.0
    """Each timed repeat runs at least this long: more than `iters` iterations where one is
    short (a host-bound step of a few milliseconds), so that a hiccup of the host weighs
    little."""
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

    def compile_mode_for(self, mode: str) -> str | None:
        """The `torch.compile` mode of a measurement mode (see :data:`MODES`); None for
        eager."""
        if mode not in MODES:
            raise ValueError(f"unknown measurement mode {mode!r}; choose from {', '.join(MODES)}")
        return {"eager": None, "compile": self.compile_mode, "graphs": GRAPHS_COMPILE_MODE}[mode]

    def records_cuda_graphs_in(self, mode: str) -> bool:
        """Whether measurement mode `mode` records CUDA graphs."""
        return self.compile_mode_for(mode) in settings.CUDA_GRAPH_MODES

    def skip_reason(self, mode: str) -> str | None:
        """Why `mode` cannot be measured on this device (CUDA graphs off a GPU), or None."""
        if mode == "graphs" and self.device.type != "cuda":
            return f"CUDA graphs need a CUDA device (this run: {self.device.type})"
        return None

    def compile(self, model: nn.Module, mode: str = "compile") -> nn.Module:
        """`torch.compile(model)` in the `torch.compile` mode of measurement mode `mode`, both
        sides alike (with the fused GroupNorm kernels in our graphs where the mode records CUDA
        graphs, as the trainer compiles), AOTAutograd's cache keeping graphs with our
        `autograd.Function`s (`cache_compiled_functions`)."""
        compile_mode = self.compile_mode_for(mode)
        if compile_mode is None:
            raise ValueError("the eager mode compiles nothing")
        settings.configure_for_compile_mode(compile_mode)
        cache_compiled_functions()  # measuring processes load what `--compile-ahead` compiled
        return torch.compile(model, mode=None if compile_mode == "default" else compile_mode)

    def runner(self, model: nn.Module, mode: str) -> nn.Module:
        """What measurement mode `mode` runs: `model` itself (eager) or it compiled."""
        return model if mode == "eager" else self.compile(model, mode)


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
    """One training/inference batch: noisy input, timesteps, the ε target, and the case's
    extra model inputs (`cond` channels, `context` tokens), passed to both sides by name."""

    x: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    cond: torch.Tensor | None = None
    context: torch.Tensor | None = None

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """The keyword inputs of a model call besides `x` and `t` (the ones this case has)."""
        extra = {"cond": self.cond, "context": self.context}
        return {name: value for name, value in extra.items() if value is not None}

    def first(self, n: int = 1) -> Batch:
        """The first `n` samples of every tensor (FLOPs are counted at batch 1)."""
        return Batch(
            self.x[:n], self.t[:n], self.noise[:n], **{k: v[:n] for k, v in self.inputs.items()}
        )


def extra_inputs(
    case: Case, batch: int, gen: torch.Generator, device: torch.device
) -> dict[str, torch.Tensor]:
    """The case's model inputs besides `x` and `t`, random (from `gen`) and without gradients:
    `cond` (image channels concatenated to `x`, channels-last) and `context` (`context_tokens`
    tokens of width `context_dim`)."""
    config = case.config
    out = {}
    if config.cond_channels:
        cond = torch.randn((batch, config.cond_channels, *case.size), generator=gen)
        out["cond"] = cond.to(device).contiguous(memory_format=memory_format_for(case.dims))
    if case.context_tokens:
        context = torch.randn((batch, case.context_tokens, config.context_dim), generator=gen)
        out["context"] = context.to(device)
    return out


def make_batches(
    case: Case, batch: int, device: torch.device, count: int = 2, seed: int = 0
) -> list[Batch]:
    """`count` random batches (rotated during timing so no run re-reads one cached input),
    the same for every run with the same `seed`."""
    gen = torch.Generator().manual_seed(seed)
    fmt = memory_format_for(case.dims)
    alphas_bar = benchmark_diffusion().schedule.alphas_cumprod
    out = []
    for _ in range(count):
        shape = (batch, case.config.in_channels, *case.size)
        x0 = torch.randn(shape, generator=gen)
        noise = torch.randn(shape, generator=gen)
        t = torch.randint(0, len(alphas_bar), (batch,), generator=gen)
        ab = alphas_bar[t].float().view(-1, *([1] * (case.dims + 1)))
        x = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        out.append(
            Batch(
                x.to(device).contiguous(memory_format=fmt),
                t.to(device),
                noise.to(device).contiguous(memory_format=fmt),
                **extra_inputs(case, batch, gen, device),
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
            pred = model(b.x, b.t, **b.inputs)
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
            model(b.x, b.t, **b.inputs)

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


def host_probe_ms(rounds: int = 5) -> float:
    """Milliseconds the host takes for a fixed piece of pure Python (the median of `rounds`):
    recorded beside each measurement, so that a host slower in one process or call than in
    another shows, which moves the throughput of a step bound by its launches."""
    times = []
    for _ in range(rounds):
        begin = time.perf_counter()
        total = 0
        for i in range(100_000):
            total += i & 7
        times.append(time.perf_counter() - begin)
    return 1e3 * statistics.median(times)


def iters_per_repeat(seconds_per_iter: float, settings: Settings) -> int:
    """Iterations in each timed repeat: `settings.iters`, or as many as fill
    `settings.min_repeat_s` at `seconds_per_iter`."""
    if settings.min_repeat_s <= 0 or seconds_per_iter <= 0:
        return settings.iters
    return max(settings.iters, math.ceil(settings.min_repeat_s / seconds_per_iter))


def measure(
    fn: Callable[[int], Any], settings: Settings, *, peak_from_start: bool = False
) -> dict[str, Any]:
    """Warm up `fn`, reset the peak-memory counter, time it; seconds and peak memory.

    With `settings.min_repeat_s`, one extra repeat of `settings.iters` iterations (not
    reported) first sets how many iterations each timed repeat runs (`iters` in the result).
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
    probe = host_probe_ms()
    iters = settings.iters
    if settings.min_repeat_s > 0:
        (sizing,) = time_repeats(fn, settings.iters, 1, device)
        iters = iters_per_repeat(sizing, settings)
    seconds = time_repeats(fn, iters, settings.repeats, device)
    peak = peak_bytes(device)
    return {
        "warmup_s": round(warmup_s, 3),
        "iters": iters,
        "host_probe_ms": round(probe, 3),
        "seconds_per_iter": statistics.median(seconds),
        "seconds_per_iter_repeats": seconds,
        "peak_mem_bytes": peak,
        "peak_mem_gib": None if peak is None else peak / 2**30,
    }


# ---------------------------------------------------------------------------------- FLOPs
def count_flops(model: nn.Module, batch: Batch, settings: Settings) -> dict[str, int]:
    """Counted FLOPs per sample of the forward and of forward + backward (batch 1, eager, the
    plain model: `diffunet.accel.plain`), with the case's extra inputs (`cond`, `context`).

    Identical architectures can count differently (our folded upsampling does less work), so
    the benchmark states MFU from the reference's count for both sides."""
    one = batch.first()
    was_training = model.training
    model.train()
    forward, backward = flop_counter(), flop_counter()
    try:
        with plain(model):
            with forward, settings.autocast():
                out = model(one.x, one.t, **one.inputs)
            loss = F.mse_loss(out.float(), one.noise)
            with backward:
                loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    fwd = int(forward.get_total_flops())
    return {"forward": fwd, "train": fwd + int(backward.get_total_flops())}
