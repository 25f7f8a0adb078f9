#!/usr/bin/env python3
"""Side-by-side GPU benchmark of diffunet against reference models of identical architecture.

    python benchmarks/bench.py --help           (also `diffunet bench` in a source checkout)

One run measures, for each case, our `UNet` (built and accelerated as the library runs it) and
the reference model with the same parameter count (asserted): training-step and inference
throughput, peak memory, counted FLOPs and MFU, in the `--modes` eager, compile
(`torch.compile` in `--compile-mode`) and graphs (`torch.compile(mode="reduce-overhead")`,
CUDA graphs; GPU only), plus our model's peak training memory with gradient checkpointing and
a DDIM sampling loop. It ends with the table of ours ÷ reference per case: train and infer,
eager | `torch.compile()` | CUDA graphs, peak memory and MFU (markdown, also in the JSON).
`--profile CASE` instead groups the GPU kernel time of a few steps by class.

Cases (`--quick` swaps in tiny versions of the same topologies, for a CPU smoke test):

- ``ddpm-cifar10``: the preset at 32², batch 128, vs diffusers `UNet2DModel`.
- ``ldm``: the preset at 256², batch 16, vs diffusers `UNet2DModel`.
- ``3d``: a 3D U-Net at 64³, batch 4, vs MONAI `DiffusionModelUNet` (68.6M).
- ``sd15``: the preset at 64² latents, batch 8, 77 context tokens of width 768, vs diffusers
  `UNet2DConditionModel` (859.5M; ours takes the tokens as `context`, diffusers as
  `encoder_hidden_states`).
- ``sample``: 50-step DDIM of a 256² `ldm` batch of 4: ours through `Diffusion.sample`, the
  reference as a plain loop over the diffusers model.

The steps are those of `harness.timing`. FLOPs are counted by `torch.utils.flop_counter` at
batch 1 on the plain model: forward, and forward + backward for training (counted directly,
not 3× forward). MFU = FLOPs/s ÷ `--peak-flops`, both sides from the reference's count (the
architecture's: ours can do less work, e.g. folded upsampling). Timings: warm-up iterations first
(compilation happens there and is reported separately as `warmup_s`), then `--repeats` repeats
of `--iters` iterations, or of as many as fill `--min-repeat-s` seconds where a step is short
(one untimed repeat sets the number; the record's `iters`); the median repeat is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import diffunet
except ImportError:  # run from a checkout without installing diffunet
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import diffunet
from diffunet.accel import memory_format_for
from diffunet.accel import settings as accel_settings
from diffunet.diffusion import Diffusion
from diffunet.errors import InvalidValueError
from harness.fill import run_fill
from harness.models import (
    MODEL_CASES,
    Case,
    ReferenceUnavailable,
    build_case,
    build_model,
    build_ours,
    implementation,
    library_version,
    num_parameters,
    prepare_model,
    reference_kwargs,
)
from harness.profiling import format_profile, run_profile
from harness.resume import DEADLINE, Cell, ResumeError, kept, load_run, measurement_cell
from harness.timing import (
    GRAPHS_COMPILE_MODE,
    MODES,
    PEAK_BF16_FLOPS,
    Batch,
    Settings,
    benchmark_diffusion,
    count_flops,
    free_memory,
    infer_fn,
    make_batches,
    make_optimizer,
    measure,
    peak_bytes,
    release,
    reset_peak,
    sync,
    time_repeats,
    train_step_fn,
)

ALL_CASES = (*MODEL_CASES, "sample")
SAMPLE_MODES = ("eager", "compile")
KINDS = ("train", "infer")
MODELS = ("ours", "ref")


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
    probe = f", host probe {r['host_probe_ms']:.1f} ms" if r.get("host_probe_ms") else ""
    return (
        f"{head} {r['throughput']:9.1f} {r['unit']}/s  MFU {mfu:>6}  peak {mem}  "
        f"(warm-up {r['warmup_s']:.1f} s{probe})"
    )


def _jsonable(value: Any) -> Any:
    """An accelerator setting as JSON writes it: sets sorted, dataclasses as dicts."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


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
        "modes": {mode: settings.compile_mode_for(mode) for mode in MODES},
        "peak_flops": settings.peak_flops,
        "warmup": settings.warmup,
        "iters": settings.iters,
        "repeats": settings.repeats,
        "min_repeat_s": settings.min_repeat_s,
        "quick": settings.quick,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "ours": "diffunet.accel.accelerate(UNet(config))",
        "accel_settings": {k: _jsonable(v) for k, v in accel_settings.current().items()},
        "memory_format": "channels_last (2D) / channels_last_3d (3D)",
        "train_step": "bf16 autocast forward, fp32 MSE on eps, backward, fused AdamW, "
        "zero_grad(set_to_none)"
        if settings.precision == "bf16"
        else "fp32 forward, MSE on eps, backward, fused AdamW",
        "flops": "torch.utils.flop_counter at batch 1 on the eager plain model; train = forward + "
        "backward counted directly; MFU = flops_per_sample * samples/s / peak_flops, "
        "flops_per_sample the reference's count for both sides (own_flops_per_sample: each "
        "side's own)",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["multiprocessors"] = props.multi_processor_count
    return meta


# ---------------------------------------------------------------------------------- models
def _record(
    case: Case,
    model: str,
    impl: str,
    mode: str,
    kind: str,
    batch: int,
    settings: Settings | None = None,
) -> dict[str, Any]:
    record = {
        "case": case.name,
        "model": model,
        "impl": impl,
        "mode": mode,
        "kind": kind,
        "batch": batch,
        "size": list(case.size),
        "unit": case.unit,
    }
    if settings is not None:
        record["compile_mode"] = settings.compile_mode_for(mode)
    return record


def _finish(
    record: dict[str, Any],
    timing: dict[str, Any],
    flops: dict[str, int] | None,
    settings: Settings,
    own_flops: dict[str, int] | None = None,
) -> None:
    """Fill `record` from its timing; MFU from `flops` (the reference's count), the model's own
    count kept as `own_flops_per_sample`."""
    record.update(timing)
    record["iters"] = timing.get("iters", settings.iters)
    record["repeats"] = settings.repeats
    record["throughput"] = record["batch"] / timing["seconds_per_iter"]
    key = "train" if record["kind"] == "train" else "forward"
    per_sample = flops[key] if flops else None
    record["flops_per_sample"] = per_sample
    record["own_flops_per_sample"] = own_flops[key] if own_flops else None
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
    model: nn.Module,
    batches: list[Batch],
    modes: tuple[str, ...],
    kinds: tuple[str, ...],
    flops: dict[str, int] | None,
    settings: Settings,
    own_flops: dict[str, int] | None = None,
    finished: frozenset[Cell] = frozenset(),
) -> None:
    """Train and/or inference measurements of one model in each mode; errors are recorded.

    MFU is stated from `flops` (the reference's count), the model's `own_flops` kept beside.
    Cells in `finished` (kept from the run this one resumes) are not measured.
    """
    device = settings.device
    impl = implementation(model)
    for mode in modes:
        todo = [k for k in kinds if measurement_cell(case.name, which, mode, k) not in finished]
        if not todo:
            continue
        skipped = settings.skip_reason(mode)
        runner: nn.Module = model if skipped else settings.runner(model, mode)
        for kind in todo:
            record = _record(case, which, impl, mode, kind, case.batch, settings)
            if skipped or settings.time_left() <= 0:
                record["skipped"] = skipped or DEADLINE
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
                    fn = infer_fn(runner, batches, settings)
                graphs = settings.records_cuda_graphs_in(mode)
                timing = measure(fn, settings, peak_from_start=graphs)
                _finish(record, timing, flops, settings, own_flops)
                record["peak_includes_warmup"] = graphs
            except Exception as err:
                record["error"] = report.error(f"{case.name}/{which}/{mode}/{kind}", err)["error"]
            finally:
                del optimizer
                model.zero_grad(set_to_none=True)
                free_memory(device)
            report.add(record)
        del runner
        release(device)


def case_cells(
    name: str,
    modes: tuple[str, ...],
    kinds: tuple[str, ...],
    models: tuple[str, ...],
    checkpoint_modes: tuple[str, ...],
    sample_modes: tuple[str, ...] = (),
) -> set[Cell]:
    """The cells a run measures for the case `name`."""
    if name == "sample":
        return {measurement_cell(name, "ours", mode, "sample") for mode in sample_modes}
    cells = {measurement_cell(name, "ours", mode, kind) for mode in modes for kind in kinds}
    if "ours" in models and "train" in kinds:
        cells |= {measurement_cell(name, "ours+ckpt", mode, "train") for mode in checkpoint_modes}
    return cells


def run_case(
    report: Report,
    name: str,
    settings: Settings,
    modes: tuple[str, ...],
    kinds: tuple[str, ...],
    models: tuple[str, ...],
    checkpoint_modes: tuple[str, ...],
    finished: frozenset[Cell] = frozenset(),
) -> None:
    """Every measurement of one model case (ours, the reference, ours with checkpointing)
    but those of the `finished` cells."""
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
            "context_tokens": case.context_tokens,
            "ours_config": case.config.to_dict(),
        }
    )
    batches = make_batches(case, case.batch, device)

    ref_kwargs = reference_kwargs(case.config, case.reference)
    entry["reference_kwargs"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in ref_kwargs.items()
    }
    ours_params = ref_params = None
    ours = build_model("ours", case, device)
    ours_params = num_parameters(ours)
    ref: nn.Module | None = None
    try:
        if "ref" in models:  # built only to be measured
            ref = build_model("ref", case, device)
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
        release(device)
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
    # MFU from the architecture's count, the reference's, for both sides (ours' own count
    # where the reference was not counted).
    entry["mfu_flops_from"] = "ref" if flops.get("ref") else "ours"
    mfu_flops = flops.get(entry["mfu_flops_from"])
    if ref is not None and device.type == "cuda":
        ref.to("cpu")  # off the GPU while ours is measured: its weights are not ours' peak

    if "ours" in models:
        measure_model(
            report,
            case,
            "ours",
            ours,
            batches,
            modes,
            kinds,
            mfu_flops,
            settings,
            flops.get("ours"),
            finished,
        )
    del ours
    release(device)
    if "ref" in models:
        if ref is None:
            for mode in modes:
                for kind in kinds:
                    if measurement_cell(name, "ref", mode, kind) in finished:
                        continue
                    record = _record(case, "ref", case.reference, mode, kind, case.batch, settings)
                    record["skipped"] = entry["reference_skipped"]
                    report.add(record)
        else:
            ref.to(device)
            measure_model(
                report,
                case,
                "ref",
                ref,
                batches,
                modes,
                kinds,
                mfu_flops,
                settings,
                flops.get("ref"),
                finished,
            )
    del ref
    release(device)

    checkpoint_modes = tuple(
        m
        for m in checkpoint_modes
        if measurement_cell(name, "ours+ckpt", m, "train") not in finished
    )
    if "ours" in models and checkpoint_modes and "train" in kinds:
        try:
            checkpointed = case.config.replace(use_checkpoint=True)
            ckpt = prepare_model(build_ours(checkpointed, device), case.dims, device)
            # Checkpointing recomputes the forward; MFU is stated in model FLOPs (no recompute).
            measure_model(
                report,
                case,
                "ours+ckpt",
                ckpt,
                batches,
                checkpoint_modes,
                ("train",),
                mfu_flops,
                settings,
                flops.get("ours"),
            )
            del ckpt
        except Exception as err:
            report.error(f"{name}/ours+ckpt", err)
        release(device)


# ---------------------------------------------------------------------------------- sampling
def reference_ddim(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    steps: int,
    diffusion: Diffusion,
    settings: Settings,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) with an ε-predicting `model(x, t)`: the plain loop a
    diffusers user writes without a pipeline, over `diffusion`'s schedule and timesteps.

    The schedule's coefficients are Python floats, so the loop never syncs with the device.
    """
    schedule = diffusion.schedule
    ts = schedule.timesteps_for(steps, diffusion.timestep_spacing)
    batch = x.shape[0]
    t_tensors = [torch.full((batch,), t, dtype=torch.long, device=x.device) for t in ts]
    for i, t in enumerate(ts):
        ab = schedule.alpha_bar(t)
        ab_prev = schedule.alpha_bar(ts[i + 1]) if i + 1 < len(ts) else 1.0
        with torch.no_grad(), settings.autocast():
            eps = model(x, t_tensors[i]).float()
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
    return x


def sampler(
    which: str, model: nn.Module, steps: int, settings: Settings, cuda_graph: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`draw(x_init)` of the sampling case: for ours the library's `Diffusion.sample` (DDIM,
    η = 0; its network replayed as a CUDA graph with `cuda_graph`), for the reference
    :func:`reference_ddim` from `x_init`; both on :func:`benchmark_diffusion`'s schedule."""
    diffusion = benchmark_diffusion()
    if which != "ours":
        return lambda x_init: reference_ddim(model, x_init, steps, diffusion, settings)

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
            model = build_model(which, case, device).eval()
        except ReferenceUnavailable as err:
            for mode in modes:
                record = _record(case, which, "diffusers", mode, "sample", batch, settings)
                record["skipped"] = str(err)
                report.add(record)
            continue
        for mode in modes:
            graphs = (False, True) if which == "ours" and device.type == "cuda" else (False,)
            for cuda_graph in graphs:
                impl = implementation(model) + ("+cuda-graph" if cuda_graph else "")
                record = _record(case, which, impl, mode, "sample", batch, settings)
                record["steps"] = steps
                if settings.time_left() <= 0:
                    record["skipped"] = DEADLINE
                    report.add(record)
                    continue
                try:
                    runner = settings.runner(model, mode)
                    draw = sampler(which, runner, steps, settings, cuda_graph)
                    begin = time.perf_counter()
                    draw(x_init)  # compiles / records (timestep values change, shapes do not)
                    sync(device)
                    warmup_s = time.perf_counter() - begin
                    reset_peak(device)
                    seconds = time_repeats(
                        lambda _, draw=draw: draw(x_init), 1, max(settings.repeats, 1), device
                    )
                    peak = peak_bytes(device)
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
                release(device)
        del model
        release(device)


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


# ---------------------------------------------------------------------------------- ratio table
#: The columns of the ratio table: each kind in each of eager, `torch.compile()` (the default
#: mode) and CUDA graphs (`reduce-overhead`), keyed `train_eager`, ..., `infer_graphs`.
TABLE_COLUMNS = tuple(f"{kind}_{column}" for kind in KINDS for column in MODES)
_COLUMN_TITLES = {"eager": "eager", "compile": "`torch.compile()`", "graphs": "CUDA graphs"}
_REFERENCE_NAMES = {"diffusers": "diffusers", "monai": "MONAI"}


def table_column(record: dict[str, Any], compile_mode: str = "default") -> str | None:
    """The ratio-table column of a record's mode: `eager`; `compile` for `torch.compile`'s
    default mode, `graphs` for `reduce-overhead` (whether asked as `--modes graphs` or as
    `--modes compile --compile-mode reduce-overhead`); None for other compile modes.
    `compile_mode` is the run's, for records that do not carry their own."""
    if record["mode"] == "eager":
        return "eager"
    mode = record.get("compile_mode") or (compile_mode if record["mode"] == "compile" else None)
    return {"default": "compile", GRAPHS_COMPILE_MODE: "graphs"}.get(mode or "")


def _case_label(name: str, entry: dict[str, Any]) -> str:
    size = entry.get("size") or []
    power = {1: "", 2: "²", 3: "³"}.get(len(size), "")
    shape = f"{size[0]}{power}" if size and len(set(size)) == 1 else "×".join(map(str, size))
    tokens = f", {entry['context_tokens']} tokens" if entry.get("context_tokens") else ""
    reference = _REFERENCE_NAMES.get(entry.get("reference", ""), entry.get("reference"))
    return f"`{name}` {shape}, B{entry.get('batch')}{tokens} vs {reference}"


def _status(record: dict[str, Any] | None) -> str | None:
    """Why a record has no numbers (`skipped`, `OOM`, `error`, `–` if absent), or None."""
    if record is None:
        return "–"
    if record.get("error"):
        return "OOM" if "out of memory" in record["error"].lower() else "error"
    if record.get("skipped"):
        return "skipped"
    return None


def ratio_table(data: dict[str, Any]) -> dict[str, Any]:
    """Ours ÷ reference per model case in the six columns of :data:`TABLE_COLUMNS`:
    throughput, peak memory, and each side's MFU (from the reference's FLOP count), as data
    and as markdown; skipped columns are named with their reason in `notes`."""
    compile_mode = data["meta"].get("compile_mode", "default")
    titles = {
        key: f"{key.split('_')[0]} {_COLUMN_TITLES[key.split('_', 1)[1]]}" for key in TABLE_COLUMNS
    }
    rows: list[dict[str, Any]] = []
    notes: dict[str, dict[str, None]] = {}  # reason -> the columns it emptied, in order
    for name, entry in data["cases"].items():
        if name == "sample":
            continue
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for r in data["records"]:
            column = table_column(r, compile_mode)
            if r["case"] == name and r["kind"] in KINDS and column and r["model"] in MODELS:
                found.setdefault((r["model"], f"{r['kind']}_{column}"), r)
        cells: dict[str, dict[str, Any]] = {}
        for key in TABLE_COLUMNS:
            ours, ref = found.get(("ours", key)), found.get(("ref", key))
            for r in (ours, ref):
                if r is not None and r.get("skipped"):
                    notes.setdefault(r["skipped"], {})[titles[key]] = None
            cell: dict[str, Any] = {
                "mfu_ours": None if _status(ours) else ours.get("mfu"),
                "mfu_ref": None if _status(ref) else ref.get("mfu"),
            }
            status = _status(ours) or _status(ref)
            if status:
                cell["status"] = status
            else:
                cell.update(
                    ours=ours["throughput"],
                    ref=ref["throughput"],
                    speedup=ours["throughput"] / ref["throughput"],
                    peak_mem_ratio=_ratio(ours.get("peak_mem_bytes"), ref.get("peak_mem_bytes")),
                )
            cells[key] = cell
        rows.append({"case": name, "label": _case_label(name, entry), "cells": cells})
    table = {
        "columns": titles,
        "rows": rows,
        "mfu_flops": "the reference's counted FLOPs per sample, for both sides",
        "notes": [f"{', '.join(where)}: skipped, {why}" for why, where in notes.items()],
    }
    table["markdown"] = ratio_markdown(table, data["meta"])
    return table


def ratio_markdown(table: dict[str, Any], meta: dict[str, Any]) -> str:
    """The ratio table as three markdown tables (throughput, peak memory, MFU) and notes."""
    header = "| | " + " | ".join(table["columns"].values()) + " |"
    rule = "|---" * (len(table["columns"]) + 1) + "|"

    def section(title: str, cell_text: Callable[[dict[str, Any]], str]) -> list[str]:
        lines = [title, "", header, rule]
        for row in table["rows"]:
            texts = [cell_text(row["cells"][key]) for key in table["columns"]]
            lines.append(f"| {row['label']} | " + " | ".join(texts) + " |")
        return [*lines, ""]

    def ratio(key: str) -> Callable[[dict[str, Any]], str]:
        def text(cell: dict[str, Any]) -> str:
            if cell.get("status"):
                return cell["status"]
            return "–" if cell.get(key) is None else f"{cell[key]:.2f}×"

        return text

    def mfu(cell: dict[str, Any]) -> str:
        def pct(v: float | None) -> str:
            return "–" if v is None else f"{100 * v:.1f} %"

        if cell["mfu_ours"] is None and cell["mfu_ref"] is None:
            return cell.get("status", "–")
        return f"{pct(cell['mfu_ours'])} / {pct(cell['mfu_ref'])}"

    lines = section(
        f"Ours ÷ reference, throughput ({meta.get('device_name')}, {meta.get('precision')}; "
        'CUDA graphs = `torch.compile(mode="reduce-overhead")`, ours after '
        "`configure_for_compile_mode`):",
        ratio("speedup"),
    )
    lines += section("Peak memory, ours ÷ reference:", ratio("peak_mem_ratio"))
    peak = meta.get("peak_flops")
    lines += section(
        "MFU, ours / reference, both from the reference's FLOP count"
        + (f" (peak {peak / 1e12:.0f} TFLOP/s):" if peak else ":"),
        mfu,
    )
    lines += table["notes"]
    return "\n".join(lines).rstrip() + "\n"


def _measured_cells(report: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The table cells (case, `kind_column`) of a run that measured both sides, each with its
    records, `compile_mode` filled in from the run's where a record has none."""
    compile_mode = report["meta"].get("compile_mode", "default")
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in report.get("records", []):
        column = table_column(r, compile_mode)
        if r["case"] in MODEL_CASES and column and r.get("kind") in KINDS:
            record = {**r, "compile_mode": r.get("compile_mode") or compile_mode}
            cells.setdefault((r["case"], f"{r['kind']}_{column}"), []).append(record)
    return {
        cell: records
        for cell, records in cells.items()
        if {r["model"] for r in records if r.get("throughput")} >= set(MODELS)
        and cell[0] in report.get("cases", {})
    }


def merge_reports(reports: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """One report of the model cases of several runs, for a ratio table that no single device
    call has time for: each cell (case, kind and mode) comes from the last of `reports` that
    measured both sides of it (ours and the reference of a cell always from one run, so its
    ratio compares), and the table's notes say which run, on which device, gave which cells."""
    merged: dict[str, Any] = {"meta": {}, "cases": {}, "records": []}
    sources: dict[tuple[str, str], int] = {}
    measured = [_measured_cells(report) for report in reports]
    for index, cells in enumerate(measured):
        for cell in cells:
            sources[cell] = index
    merged_from: dict[str, dict[str, str]] = {}
    for (name, key), index in sources.items():
        merged["cases"][name] = reports[index]["cases"][name]
        merged["records"] += measured[index][name, key]
        merged_from.setdefault(name, {})[key] = names[index]
    devices = {reports[i]["meta"].get("device_name") for i in sources.values()}
    merged["meta"] = {
        **(reports[max(sources.values())]["meta"] if sources else {}),
        "device_name": " / ".join(sorted(filter(None, devices))) or None,
        # A case measured by one run: its name; else, by cell, each cell's run.
        "merged_from": {
            name: next(iter(set(by_cell.values())))
            if len(set(by_cell.values())) == 1
            else dict(sorted(by_cell.items(), key=lambda item: TABLE_COLUMNS.index(item[0])))
            for name, by_cell in merged_from.items()
        },
    }
    return merged


AB_TREES = ("base", "change")


def _median_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's records of a cell over several rounds as one: the median throughput (its
    time per iteration and MFU scaled to match) and the highest peak memory."""
    first = records[0]
    throughput = statistics.median(r["throughput"] for r in records)
    scale = throughput / first["throughput"]
    merged = {**first, "throughput": throughput, "rounds": len(records)}
    for key in ("mfu", "tflops_per_s"):
        if first.get(key) is not None:
            merged[key] = first[key] * scale
    if first.get("seconds_per_iter") is not None:
        merged["seconds_per_iter"] = first["seconds_per_iter"] / scale
    for key in ("peak_mem_bytes", "peak_mem_gib"):
        peaks = [r[key] for r in records if r.get(key) is not None]
        if peaks:
            merged[key] = max(peaks)
    return merged


def report_from_ab(
    data: dict[str, Any], tree: str, kinds: tuple[str, ...] = KINDS
) -> dict[str, Any]:
    """An `ab.py` run as one bench.py report of `tree`'s side ("base" or "change"): per case,
    kind (of `kinds`) and mode, `tree`'s ours and the reference (measured with the base) from
    the same call, each the median of its rounds as `ab.py`'s summary takes it
    (:func:`_median_record`)."""
    side: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    cases: dict[str, Any] = {}
    meta: dict[str, Any] | None = None
    for run in data["runs"]:
        result = run.get("result") or {}
        if run["tree"] == tree and meta is None:
            meta = result.get("meta")
        for r in result.get("records", []):
            ours, ref = r.get("model") == "ours", r.get("model") == "ref"
            wanted = (ours and run["tree"] == tree) or (ref and run["tree"] == "base")
            if wanted and r.get("kind") in kinds and r.get("throughput") and not r.get("skipped"):
                key = (r["case"], r["kind"], r["mode"], r.get("compile_mode") or "", r["model"])
                side.setdefault(key, []).append(r)
                cases.setdefault(r["case"], result.get("cases", {}).get(r["case"]))
    return {
        "meta": {**(meta or {}), "ab_tree": tree},
        "cases": {name: entry for name, entry in cases.items() if entry is not None},
        "records": [_median_record(records) for records in side.values()],
    }


def _report_from(path: str) -> dict[str, Any]:
    """A run's JSON, as `--out` wrote it; `AB.json:base` or `AB.json:change` reads one side of
    an `ab.py` run (:func:`report_from_ab`), `AB.json:change:train` its training cells only."""
    file, kinds = path, KINDS
    head, _, last = path.rpartition(":")
    if last in KINDS and head:
        file, kinds = head, (last,)
    head, _, tree = file.rpartition(":")
    if tree in AB_TREES and head:
        file = head
    else:
        tree = ""
    if kinds != KINDS and not tree:
        raise InvalidValueError(
            f"--table-from {path}: a kind is chosen only from one tree of an ab.py JSON, "
            "as AB.json:change:train"
        )
    try:
        report = json.loads(Path(file).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InvalidValueError(
            f"--table-from {path}: not readable as a bench.py JSON ({err})"
        ) from None
    is_ab = isinstance(report, dict) and {"runs", "summary"} <= report.keys()
    if is_ab and not tree:
        raise InvalidValueError(
            f"--table-from {path}: an ab.py JSON holds two trees; name the one to tabulate, "
            f"{path}:base or {path}:change"
        )
    if is_ab:
        return report_from_ab(report, tree, kinds)
    if tree:
        raise InvalidValueError(
            f"--table-from {path}: ':{tree}' names a tree of an ab.py JSON, but {file} is not one"
        )
    if not isinstance(report, dict) or not {"meta", "cases", "records"} <= report.keys():
        raise InvalidValueError(
            f"--table-from {path}: no meta, cases and records: not a bench.py JSON"
        )
    return report


def table_from_files(paths: list[str], out: str | None) -> dict[str, Any]:
    """`--table-from`: the ratio table of earlier runs' JSON files, printed and written to
    `out`."""
    reports = [_report_from(p) for p in paths]
    data = merge_reports(reports, paths)
    if not data["cases"]:
        raise InvalidValueError(f"--table-from: no measured model case in {', '.join(paths)}")
    data["table"] = ratio_table(data)
    device_of = {path: report["meta"].get("device_name") for path, report in zip(paths, reports)}
    sources = []
    for name, source in data["meta"]["merged_from"].items():
        if isinstance(source, str):
            sources.append(f"`{name}`: {source} ({device_of[source]})")
            continue
        by_path: dict[str, list[str]] = {}
        for key, path in source.items():
            by_path.setdefault(path, []).append(data["table"]["columns"][key])
        sources += [
            f"`{name}` {', '.join(columns)}: {path} ({device_of[path]})"
            for path, columns in by_path.items()
        ]
    data["table"]["notes"].append("Cells from: " + "; ".join(sources) + ".")
    data["table"]["markdown"] = ratio_markdown(data["table"], data["meta"])
    print(data["table"]["markdown"], end="", flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(data, indent=1, default=str) + "\n")
        print(f"wrote {out}")
    return data


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
        default=("eager", "compile"),
        help="comma-separated subset of eager,compile,graphs: compile = torch.compile in "
        "--compile-mode, graphs = torch.compile(mode='reduce-overhead'), CUDA graphs, "
        "skipped off a GPU (default: eager,compile)",
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
        "--repeats", type=int, help="timed repeats, median reported (default 5, quick 1)"
    )
    parser.add_argument(
        "--min-repeat-s",
        type=float,
        help="each timed repeat runs at least this many seconds, with more than --iters "
        "iterations where a step is short (default 1, quick 0: --iters exactly)",
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
        help="torch.compile mode of --modes compile (default: default)",
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
        type=_csv(SAMPLE_MODES),
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
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out: keep each cell (case, mode, kind) it measured on "
        "every side, measure the others (both sides again), and write them all to --out; "
        "the same command again until the table is complete",
    )
    parser.add_argument("--fill-caches-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--table-from",
        nargs="+",
        metavar="JSON",
        help="measure nothing: print the ratio table of earlier runs' JSON files, each cell "
        "from the last file that measured both sides of it (to build the table over several "
        "device calls); an ab.py JSON as AB.json:base or AB.json:change (its rounds' medians; "
        "AB.json:change:train for one kind's cells); "
        "--out writes the merged JSON",
    )
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
        raise InvalidValueError("--device cuda was asked for but CUDA is not available")
    quick = args.quick

    def pick(value: int | None, normal: int, small: int) -> int:
        return value if value is not None else (small if quick else normal)

    return Settings(
        device=device,
        warmup=pick(args.warmup, 3, 1),
        iters=pick(args.iters, 10, 2),
        repeats=pick(args.repeats, 5, 1),
        min_repeat_s=args.min_repeat_s if args.min_repeat_s is not None else 0.0 if quick else 1.0,
        precision=args.precision or ("bf16" if device.type == "cuda" else "fp32"),
        compile_mode=args.compile_mode,
        peak_flops=args.peak_flops,
        quick=quick,
        deadline=args.deadline,
    )


def _default_out(args: argparse.Namespace) -> str | None:
    if args.out:
        return args.out
    if os.environ.get("OUT"):
        name = f"profile-{args.profile}.json" if args.profile else "bench.json"
        return str(Path(os.environ["OUT"]) / name)
    return None


def _fill_cache_argv(
    args: argparse.Namespace,
    settings: Settings,
    case: str,
    model: str,
    mode: str,
    kind: str,
) -> list[str]:
    argv = [
        "--cases",
        case,
        "--models",
        model,
        "--modes",
        mode,
        "--kinds",
        kind,
        "--checkpoint-modes",
        "none",
        "--warmup",
        "1",
        "--iters",
        "1",
        "--repeats",
        "1",
        "--min-repeat-s",
        "0",
        "--compile-mode",
        args.compile_mode,
        "--precision",
        settings.precision,
        "--device",
        settings.device.type,
        "--fill-caches-only",
    ]
    return argv + ["--quick"] * args.quick + ["--no-cudnn-benchmark"] * args.no_cudnn_benchmark


def compile_ahead(
    args: argparse.Namespace, settings: Settings, finished: frozenset[Cell] = frozenset()
) -> dict[str, Any]:
    """Compile each (case, model, compiled mode, kind) of the run once, `--compile-ahead`
    processes at a time, before measuring (but those of the `finished` cells of a resumed run).

    Each process runs this benchmark for one model in one mode and kind with one warm-up step,
    which fills Inductor's FX-graph and AOTAutograd caches on disk; the measuring process then
    loads the compiled graphs instead of compiling them (`warmup_s` drops from minutes to
    seconds), so a same-run comparison of several compiled models fits a much shorter GPU
    lease. The processes do not store their Triton autotuning choices (they ran beside each
    other on the GPU): the measuring process makes those alone. Under `--deadline` a process
    still compiling when the time is up is stopped (its model is then compiled, or skipped,
    while measuring).
    """
    jobs = args.compile_ahead
    cases = [c for c in args.cases if c in MODEL_CASES]
    modes = [m for m in args.modes if m != "eager" and not settings.skip_reason(m)]
    if jobs < 1 or not modes or not cases:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    # The processes import the diffunet this one imports.
    package_root = str(Path(diffunet.__file__).resolve().parents[1])
    env = dict(
        os.environ,
        OUT="",
        PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    )

    def fill(job: tuple[str, str, str, str]) -> dict[str, Any]:
        case, model, mode, kind = job
        left = settings.time_left()
        return run_fill(
            [sys.executable, __file__, *_fill_cache_argv(args, settings, case, model, mode, kind)],
            env,
            None if math.isinf(left) else max(left, 1.0),
            {"case": case, "model": model, "mode": mode, "kind": kind},
            "stopped at the deadline",
        )

    todo = [
        (c, m, mode, kind)
        for c in cases
        for m in args.models
        for mode in modes
        for kind in args.kinds
        if measurement_cell(c, m, mode, kind) not in finished
    ]
    if not todo:
        return {}
    begin = time.perf_counter()
    print(f"compiling {len(todo)} models ahead, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        processes = list(pool.map(fill, todo))
    for p in processes:
        if "error" in p:
            where = f"{p['case']}/{p['model']}/{p['mode']}/{p['kind']}"
            print(f"  compiling {where} ahead failed: {p['error']}", flush=True)
    return {"jobs": jobs, "seconds": round(time.perf_counter() - begin, 1), "processes": processes}


def resume(report: Report, args: argparse.Namespace) -> frozenset[Cell]:
    """`--resume`: keep in `report` the finished cells of the run in its `--out` file (their
    records and case entries) and return those cells; none where there is no such file yet."""
    if report.path is None:
        raise InvalidValueError("--resume continues the run in --out: give --out (or set OUT)")
    try:
        earlier = load_run(report.path, report.data["meta"])
    except ResumeError as err:
        raise InvalidValueError(str(err)) from err
    if earlier is None:
        return frozenset()
    records, finished = kept(earlier, args.models)
    report.data["records"] = records
    report.data["cases"] = earlier["cases"]
    runs = earlier["meta"].get("resumed", {}).get("runs", [])
    report.data["meta"]["resumed"] = {
        "from": str(report.path),
        "kept_records": len(records),
        "runs": [*runs, {k: earlier["meta"].get(k) for k in ("started_utc", "elapsed_s")}],
    }
    print(f"resuming {report.path}: {len(finished)} finished cells kept", flush=True)
    return frozenset(finished)


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or the profile) the options ask for; returns the JSON data."""
    if args.table_from:
        return table_from_files(args.table_from, args.out)
    settings = settings_from_args(args)
    for name in ("iters", "repeats"):
        if getattr(settings, name) < 1:
            raise InvalidValueError(f"--{name} must be at least 1")
    if not math.isfinite(settings.min_repeat_s) or settings.min_repeat_s < 0:
        raise InvalidValueError(
            f"--min-repeat-s must be a number of seconds >= 0, got {settings.min_repeat_s}"
        )
    if {"compile", "graphs"} <= set(args.modes) and args.compile_mode == GRAPHS_COMPILE_MODE:
        raise InvalidValueError(
            f"--modes compile,graphs with --compile-mode {GRAPHS_COMPILE_MODE} would measure "
            "CUDA graphs twice; leave --compile-mode at default (graphs is reduce-overhead)"
        )
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

    report = Report(out, environment(settings, argv))
    checkpoint_modes = tuple(m for m in args.checkpoint_modes if m != "none")
    finished = resume(report, args) if args.resume else frozenset()
    ahead = compile_ahead(args, settings, finished)
    if ahead:
        report.data["meta"]["compiled_ahead"] = ahead
    print(
        f"diffunet bench on {report.data['meta']['device_name']} "
        f"(torch {torch.__version__}, diffusers {report.data['meta']['diffusers']}, "
        f"monai {report.data['meta']['monai']})",
        flush=True,
    )
    skipped_modes = {
        m: settings.skip_reason(m)
        for m in dict.fromkeys((*args.modes, *args.checkpoint_modes))
        if m != "none" and settings.skip_reason(m)
    }
    if skipped_modes:
        report.data["meta"]["skipped_modes"] = skipped_modes
        for mode, why in skipped_modes.items():
            print(f"note: mode {mode} is skipped: {why}", flush=True)
    for name in args.cases:
        cells = case_cells(
            name, args.modes, args.kinds, args.models, checkpoint_modes, args.sample_modes
        )
        if cells <= finished:
            print(f"[{name}] kept from the run resumed", flush=True)
            continue
        begin = time.perf_counter()
        if name == "sample":  # measured again as a whole: drop what the earlier run left
            report.data["records"] = [r for r in report.records if r["case"] != "sample"]
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
                    report,
                    name,
                    settings,
                    args.modes,
                    args.kinds,
                    args.models,
                    checkpoint_modes,
                    finished,
                )
        except Exception as err:
            report.error(name, err)
        report.case(name)["elapsed_s"] = round(time.perf_counter() - begin, 1)
        print(f"[{name}] done in {time.perf_counter() - begin:.0f} s", flush=True)
        release(settings.device)
    report.data["ratios"] = summarize(report.records)
    if any(name in MODEL_CASES for name in args.cases):
        report.data["table"] = ratio_table(report.data)
    report.data["meta"]["elapsed_s"] = round(time.perf_counter() - settings.started, 1)
    report.save()
    print(format_table(report.data), flush=True)
    if report.data.get("table"):
        print("\n" + report.data["table"]["markdown"], end="", flush=True)
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


if __name__ == "__main__":
    sys.exit(main())
