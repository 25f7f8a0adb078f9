"""Where the time of a step goes: GPU kernels (or, on the CPU, aten ops) grouped into classes
(convolution, elementwise/copies, norm/reductions, attention+GEMM, optimizer, other), the top
kernels, the ops that launched each class's kernels, the host's CPU time by op and, without the
profiler, samples of the Python stack (`host_sampler`); `bench.py --profile CASE` runs it over
a few steps of ours and the reference, `train_profile.py` over a window of `diffunet train`."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from typing import Any

import torch

from harness.host_sampler import sample_steps
from harness.models import build_case, build_model, implementation
from harness.timing import (
    Settings,
    infer_fn,
    make_batches,
    make_optimizer,
    release,
    sync,
    train_step_fn,
)

KERNEL_CLASSES = (
    "convolution",
    "elementwise/copies",
    "norm/reductions",
    "attention+GEMM",
    "optimizer",
    "other",
)


_CLASS_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # diffunet's thin 3D convolutions (diffunet/accel/thin_conv/kernels.py)
    ("convolution", ("_gather_conv", "_gather_weight_grad", "_tap_products", "_tap_sum")),
    ("optimizer", ("adam", "multi_tensor_apply", "sgd")),
    ("attention+GEMM", ("splitk",)),
    ("elementwise/copies", ("nchwtonhwc", "nhwctonchw", "nchw_to_nhwc", "nhwc_to_nchw")),
    ("attention+GEMM", ("flash", "fmha", "attention", "attn", "sdpa", "softmax", "dot_product")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "xmma_cudnn", "cudnn")),
    # GroupNorm kernels, PyTorch's and diffunet's fused Triton ones (accel/norm/kernels.py: _stats,
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
    """The class (`KERNEL_CLASSES`) of a GPU kernel (or, on the CPU, an aten op) name.

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


def launch_chain(evt: Any, depth: int = 5) -> str:
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
                    launchers[classify_kernel(k.name)][launch_chain(evt)] += k.duration
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


def host_breakdown(prof: Any, steps: int, top: int = 15) -> dict[str, Any]:
    """Where the host's time goes: CPU events by self time per step (the Python and C++ ops,
    the CUDA runtime calls), and how many kernels the host launched per step.

    A step whose wall time exceeds its GPU kernel time is bound by the host; this names what
    the host spends that time on (custom operators' Python kernels, Inductor's launches, ...).
    """
    from torch.autograd import DeviceType

    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    launches = 0
    for evt in prof.events():
        if evt.device_type != DeviceType.CPU or getattr(evt, "is_user_annotation", False):
            continue
        by_name[evt.name][0] += evt.self_cpu_time_total
        by_name[evt.name][1] += 1
        if "LaunchKernel" in evt.name or evt.name in ("cuLaunchKernelEx", "cudaGraphLaunch"):
            launches += 1
    total_us = sum(v[0] for v in by_name.values())
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "self_cpu_ms_per_step": total_us / 1e3 / steps,
        "launches_per_step": launches / steps,
        "top_host_ops": [
            {"name": name[:200], "calls_per_step": calls / steps, "ms_per_step": us / 1e3 / steps}
            for name, (us, calls) in ranked
        ],
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
            model = build_model(which, case, device).train()
        except Exception as err:
            result["errors"].append(
                {"where": f"{which}/build", "error": f"{type(err).__name__}: {err}"}
            )
            print(f"  {which}: not built: {err}", flush=True)
            continue
        for mode, kind in itertools.product(modes, kinds):
            skipped = settings.skip_reason(mode)
            if skipped:
                result.setdefault("skipped", []).append(
                    {"where": f"{which}/{mode}/{kind}", "reason": skipped}
                )
                print(f"  {which}/{mode}/{kind}: skipped: {skipped}", flush=True)
                continue
            try:
                runner = settings.runner(model, mode)
                model.train(kind == "train")
                optimizer = make_optimizer(model, device) if kind == "train" else None
                step = (
                    train_step_fn(runner, batches, optimizer, settings)
                    if optimizer
                    else infer_fn(runner, batches, settings)
                )
                for i in range(max(settings.warmup, 1)):
                    step(i)
                sync(device)
                begin = time.perf_counter()
                with profile(activities=activities) as prof:
                    for i in range(steps):
                        step(i)
                    sync(device)
                wall = (time.perf_counter() - begin) / steps
                # The same steps again without the profiler, their Python stacks sampled.
                samples = sample_steps(step, max(2 * steps, 10), lambda: sync(device))
                run = {
                    "model": which,
                    "impl": implementation(model),
                    "mode": mode,
                    "kind": kind,
                    "wall_ms_per_step_profiled": 1e3 * wall,
                    **kernel_breakdown(prof, steps, device),
                    "host": host_breakdown(prof, steps),
                    "host_samples": samples,
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
            release(device)
        del model
        release(device)
    return result


def format_profile(result: dict[str, Any]) -> str:
    """The profile as a table of class shares per run, plus the top kernels."""
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
        host = run.get("host")
        if host:
            lines.append(
                f"  host: {host['self_cpu_ms_per_step']:.1f} ms of CPU self time and "
                f"{host['launches_per_step']:.0f} kernel launches per step; top ops:"
            )
            lines += [
                f"    {e['ms_per_step']:7.2f} ms {e['calls_per_step']:7.1f}×  {e['name'][:110]}"
                for e in host["top_host_ops"][:12]
            ]
        samples = run.get("host_samples")
        if samples:
            lines.append(
                f"  without the profiler: {samples['wall_ms_per_step']:.1f} ms per step "
                f"({samples.get('wall_ms_per_step_sampled', float('nan')):.1f} while sampled); "
                f"{samples['samples']} samples of the Python stacks, by self share:"
            )
            lines += [
                f"    {100 * e['share']:5.1f}%  {e['function']}" for e in samples["self"][:10]
            ]
        for cls, ops in run.get("launchers", {}).items():
            lines.append(f"  {cls} launched by:")
            lines += [f"    {e['ms_per_step']:7.2f} ms  {e['op'][:150]}" for e in ops[:5]]
    for err in result["errors"]:
        lines.append(f"error {err['where']}: {err['error'][:200]}")
    return "\n".join(lines)
