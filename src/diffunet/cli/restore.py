"""Restore images or volumes with a trained restoration model, with a per-pixel uncertainty map.

For every input (an image, a `.npy` / TIFF-stack volume, or each of those in a folder) this
writes the restored image in the input's size and bit depth (TIFF for 16-bit), an uncertainty
map (a standard deviation in the input's intensity units, float32) and a side-by-side PNG
(input | restored | uncertainty). Two kinds of uncertainty (`--uncertainty`):

- `samples` (EMDiffuse): draw `--samples K` restorations from the diffusion model; the result
  is their mean and the uncertainty their per-pixel standard deviation.
- `aleatoric`: a model with an aleatoric head (preset `emdiffuse-aleatoric`, trained with the
  Gaussian NLL) predicts the mean and the variance of the clean image directly, in one network
  evaluation per draw at the highest noise level (needs prediction x0 or v).

Inputs larger than the tile (default: the training crop) are restored in overlapping tiles
blended without seams; memory is bounded by the tile size. Sizes the network cannot take are
padded (replicating the border) and cropped back.

With clean references (`--target FILE_OR_FOLDER`, or `--input em-pairs[:NAME]`, the embedded
held-out pictures, which bring their own) it prints PSNR / SSIM of the input and of the
restoration and the uncertainty–error rank correlation per input, and writes them to
`metrics.json`. On a CPU it draws fewer samples unless `--samples` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffunet.accel.layout import enable_cudnn_autotuning
from diffunet.apps.generate import LoadedModel, SamplingError, load_model
from diffunet.apps.restoration import Restoration, restore
from diffunet.apps.restoration_quality import json_ready, restoration_metrics
from diffunet.apps.restore_io import (
    EMBEDDED_INPUT,
    RestoreInput,
    embedded_inputs,
    embedded_names,
    is_embedded,
    list_inputs,
    match_targets,
    output_paths,
    read_input,
    read_target,
    write_outputs,
    write_references,
)
from diffunet.apps.tiling import resolve_tiling, tile_starts, tiled_map
from diffunet.diffusion import Diffusion, call_model, draw_noise
from diffunet.errors import InvalidValueError
from diffunet.model.unet import split_aleatoric
from diffunet.training.distributed import resolve_device
from diffunet.training.run_config import SAMPLERS

UNCERTAINTY_KINDS = ("auto", "samples", "aleatoric")
#: Samples (or aleatoric noise draws) per input when --samples is not given: on a GPU, and on
#: a CPU, where each one costs a full sampling run per tile.
DEFAULT_SAMPLES = 8
CPU_SAMPLES = 4
METRICS_FILE = "metrics.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffunet restore`."""
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="RUN_OR_CHECKPOINT",
        help="a run folder or a checkpoint folder of an image-conditioned model",
    )
    parser.add_argument(
        "--input",
        required=True,
        metavar="IMG_OR_FOLDER_OR_VOLUME",
        help="an image (PNG/JPEG/BMP/TIFF), a volume (.npy, TIFF stack) or a folder of them; "
        f"or {EMBEDDED_INPUT} / {EMBEDDED_INPUT}:coins / {EMBEDDED_INPUT}:page: the embedded "
        "held-out noisy pictures, restored and scored against their clean versions",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--target",
        metavar="FILE_OR_FOLDER",
        help="the clean image of the input (or a folder of them, named like the inputs): "
        "prints PSNR / SSIM of the input and of the restoration and the uncertainty-error "
        f"rank correlation, and writes them to DIR/{METRICS_FILE}; compared in the model's "
        "[0, 1] units (integers scaled by their bit depth, floats by the input's range)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        metavar="K",
        help="restorations drawn per input (samples mode) or noise draws "
        f"(aleatoric mode); default {DEFAULT_SAMPLES}, {CPU_SAMPLES} on a CPU",
    )
    parser.add_argument(
        "--steps", type=int, metavar="N", help="sampling steps (default: the run's)"
    )
    parser.add_argument("--sampler", choices=SAMPLERS, help="default: the run's")
    parser.add_argument("--eta", type=float, metavar="ETA", help="DDIM noise scale in [0, 1]")
    parser.add_argument(
        "--uncertainty",
        choices=UNCERTAINTY_KINDS,
        default="auto",
        help="samples: spread of K diffusion samples; aleatoric: the model's "
        "predicted variance; auto (default): aleatoric for models with an "
        "aleatoric head trained to predict x0 or v, else samples",
    )
    parser.add_argument(
        "--tile",
        metavar="T",
        help="tile side, or one per axis as H,W / D,H,W (default: the training crop)",
    )
    parser.add_argument(
        "--overlap",
        metavar="O",
        help="tile overlap, or one per axis (default: a quarter of the tile)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="most samples per network call (default: all K of a tile)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="load the weights even if they fail their SHA-256 check (changed since saved)",
    )


# ---------------------------------------------------------------------------- options
def parse_sizes(text: str | None, dims: int, option: str) -> tuple[int, ...] | None:
    """`"64"` or `"16,64,64"` → one int per spatial axis; None stays None."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * dims
    if len(values) != dims:
        raise InvalidValueError(
            f"{option} {text!r} is invalid: expected one integer or {dims} "
            "comma-separated integers (one per spatial axis)"
        )
    return values


def tile_geometry(
    model, tile: Sequence[int] | None, overlap: Sequence[int] | None, spatial: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """The tile size (a multiple of what the network needs) and overlap for an input.

    The default tile is the model's training size (`config.image_size`), else the whole input.
    """
    config = model.config
    multiple = config.size_multiple()
    if tile is None:
        trained = config.spatial_size()
        tile = (
            tuple(trained) if trained else tuple(-(-s // m) * m for s, m in zip(spatial, multiple))
        )
    for t, m in zip(tile, multiple):
        if t < m or t % m:
            raise InvalidValueError(
                f"--tile {','.join(map(str, tile))} is invalid for this model: every "
                f"tile side must be a positive multiple of {','.join(map(str, multiple))} "
                "(2 per downsampling level)"
            )
    if overlap is not None:
        for t, o in zip(tile, overlap):
            if not 0 <= o < t:
                raise InvalidValueError(
                    f"--overlap {','.join(map(str, overlap))} is invalid for tile "
                    f"{','.join(map(str, tile))}: expected 0 <= overlap < tile "
                    "(a quarter of the tile is a good choice)"
                )
    return tuple(tile), None if overlap is None else tuple(overlap)


def pad_to_multiple(image: torch.Tensor, multiple: Sequence[int]) -> torch.Tensor:
    """Pad `(B, C, *spatial)` at the far end of each axis (replicating) to a multiple."""
    spatial = image.shape[2:]
    pads: list[int] = []
    for s, m in zip(reversed(spatial), reversed(multiple)):
        pads += [0, (-s) % m]
    if not any(pads):
        return image
    return F.pad(image, pads, mode="replicate")


# ---------------------------------------------------------------------------- aleatoric
def aleatoric_x0(
    prediction: str,
    mean: torch.Tensor,
    log_variance: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of x₀ implied by an aleatoric prediction of kind `prediction` at x_t."""
    variance = log_variance.float().exp()
    if prediction == "x0":
        return mean, variance
    if prediction == "v":  # x₀ = sqrt(ᾱ) x_t − sqrt(1 − ᾱ) v
        a, s = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
        return a * x_t - s * mean, s * s * variance
    raise InvalidValueError(
        f"aleatoric uncertainty needs a model trained to predict x0 or v; this one predicts "
        f"{prediction!r}, whose x₀ = (x_t − sqrt(1−ᾱ) ε) / sqrt(ᾱ) is unusable at the noise level "
        "where x_t carries no signal. Use --uncertainty samples, or train with prediction x0 or v"
    )


@torch.no_grad()
def restore_aleatoric(
    model,
    diffusion: Diffusion,
    image: torch.Tensor,
    num_draws: int = 8,
    *,
    tile_size: int | Sequence[int] | None = None,
    overlap: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> Restoration:
    """The aleatoric model's own mean and standard deviation of the clean image.

    The model is evaluated at the schedule's highest noise level, where x_t is pure noise, so
    its output is its estimate of E[x₀ | input] and, from the aleatoric head, Var[x₀ | input].
    The `num_draws` noise draws are averaged (the variances too, plus the small spread of the
    means). `image` is the model's cond `(B, C, *spatial)` in [−1, 1]; the mean is clipped to it.
    """
    if not getattr(model.config, "aleatoric", False):
        raise InvalidValueError(
            "--uncertainty aleatoric needs a model with an aleatoric head "
            "(config.aleatoric = true, e.g. preset emdiffuse-aleatoric); this one has "
            "none: use --uncertainty samples"
        )
    step = diffusion.num_timesteps - 1
    alpha_bar = diffusion.schedule.alpha_bar(step)
    device = next(model.parameters()).device
    channels = model.config.in_channels

    def region_fn(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, total = region.shape[0], region.shape[0] * num_draws
        cond = region.to(device).repeat_interleave(num_draws, dim=0)
        chunk = batch_size or total
        means, variances = [], []
        for first in range(0, total, chunk):
            part = cond[first : first + chunk]
            size = part.shape[0]
            x_t = draw_noise((size, channels, *region.shape[2:]), generator, device)
            t = torch.full((size,), step, dtype=torch.long)
            levels = torch.full((size,), alpha_bar, dtype=torch.float64)
            mean, log_variance = split_aleatoric(call_model(model, x_t, t, levels, cond=part))
            mean, variance = aleatoric_x0(diffusion.prediction, mean, log_variance, x_t, alpha_bar)
            means.append(mean)
            variances.append(variance)
        shape = (batch, num_draws, channels, *region.shape[2:])
        mean = torch.cat(means).reshape(shape)
        variance = torch.cat(variances).reshape(shape).mean(1) + mean.var(1, correction=0)
        return mean.mean(1).clamp(-1.0, 1.0).cpu(), variance.cpu()

    if tile_size is None:
        tile_size = model.config.spatial_size() or tuple(image.shape[2:])
    mean, variance = tiled_map(region_fn, image, tile_size, overlap, progress=progress)
    return Restoration(mean, variance.clamp(min=0).sqrt())


# ---------------------------------------------------------------------------- one input
def restore_pixels(
    loaded: LoadedModel,
    pixels: np.ndarray,
    *,
    kind: str = "samples",
    samples: int = 8,
    steps: int = 20,
    sampler: str = "dpm++",
    eta: float = 0.0,
    tile: Sequence[int] | None = None,
    overlap: Sequence[int] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Restore one image or volume `pixels` (float in [0, 1], no channel axis).

    Returns the restoration and its per-pixel standard deviation, both in [0, 1] units and of
    `pixels`' shape. This is exactly what `diffunet restore` runs for each input.
    """
    model, config = loaded.model, loaded.model.config
    tensor = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None] * 2 - 1
    tensor = tensor.expand(-1, config.cond_channels, *tensor.shape[2:])
    spatial = tuple(pixels.shape)
    tile_size, overlap = tile_geometry(model, tile, overlap, spatial)
    padded = pad_to_multiple(tensor, config.size_multiple())
    generator = torch.Generator().manual_seed(seed)
    # One tile when the input fits: tiled_map then returns the tile's result unchanged.
    common: dict[str, Any] = dict(
        tile_size=tile_size,
        overlap=overlap,
        batch_size=batch_size,
        generator=generator,
        progress=progress,
    )
    if kind == "aleatoric":
        result = restore_aleatoric(model, loaded.diffusion, padded, samples, **common)
    else:
        fits = [
            all(s <= t for s, t in zip(padded.shape[2:], limit))
            for limit in (tile_size, config.spatial_size() or tile_size)
        ]
        if all(fits):
            # One tile, which `restore` then does not tile either: the same result, and its
            # progress bar counts the sampling steps instead of a single tile.
            common["tile_size"] = None
        result = restore(
            model,
            loaded.diffusion,
            padded,
            samples,
            sampler=sampler,
            steps=steps,
            eta=eta,
            **common,
        )
    crop: tuple[Any, ...] = (0, slice(None), *(slice(0, s) for s in spatial))
    # Checked before clamping, which would turn inf into valid-looking 0 and 1.
    bad = (~torch.isfinite(result.mean[crop]) | ~torch.isfinite(result.std[crop])).sum()
    if int(bad):
        how = f"{sampler}, {steps} steps" if kind == "samples" else "aleatoric head"
        raise SamplingError(
            f"restoring with {loaded.checkpoint} produced NaN or inf at {int(bad)} pixel(s) "
            f"({how}): the model's output overflowed; try another --sampler or more --steps, "
            "or check the checkpoint (does `diffunet sample` from it give finite samples?)"
        )
    mean = ((result.mean[crop].mean(0) + 1) / 2).clamp(0, 1)
    std = result.std[crop].mean(0) / 2
    return mean.numpy().astype(np.float32), std.numpy().astype(np.float32)


def uncertainty_kind(requested: str, loaded: LoadedModel) -> str:
    """`samples` or `aleatoric` for `--uncertainty`.

    `auto` is `aleatoric` for a model with an aleatoric head trained to predict x0 or v, else
    `samples`.
    """
    aleatoric = bool(loaded.model.config.aleatoric)
    usable = aleatoric and loaded.diffusion.prediction in ("x0", "v")
    kind = ("aleatoric" if usable else "samples") if requested == "auto" else requested
    if kind == "aleatoric" and not aleatoric:
        raise InvalidValueError(
            "--uncertainty aleatoric needs a model with an aleatoric head (preset "
            "emdiffuse-aleatoric); this model has none: use --uncertainty samples"
        )
    if kind == "aleatoric":
        zeros = torch.zeros(1)
        aleatoric_x0(loaded.diffusion.prediction, zeros, zeros, zeros, 0.5)  # x0 or v, else error
    return kind


def check_model(loaded: LoadedModel) -> None:
    """A restoration model takes the degraded image as cond and outputs as many channels."""
    config = loaded.model.config
    if not config.cond_channels:
        raise InvalidValueError(
            f"{loaded.checkpoint} is not a restoration model: it has no image "
            "conditioning (cond_channels=0); train one on paired data "
            "(input/ → target/) or with preset emdiffuse"
        )
    if config.dims not in (2, 3):
        raise InvalidValueError(
            f"{loaded.checkpoint} is a {config.dims}D model; `diffunet restore` "
            "restores 2D images and 3D volumes"
        )


def check_options(args: argparse.Namespace) -> None:
    """One-line errors for option values that cannot work."""
    for name in ("samples", "steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidValueError(
                f"--{name.replace('_', '-')} must be a positive integer, got {value}"
            )
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise InvalidValueError(f"--eta must be in [0, 1], got {args.eta}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InvalidValueError(
            "--device cuda was given but no CUDA device is available; use --device cpu"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidValueError(f"--out {out} is a file; pass a folder for the results")


# ---------------------------------------------------------------------------- the command
#: One input: a file to read, or an embedded picture already in memory; and its clean target.
Job = tuple[Path | RestoreInput, Path | np.ndarray | None]


def open_job(
    job: Job, dims: int, float_range: tuple[float, float] | None
) -> tuple[RestoreInput, np.ndarray | None]:
    """Read a job's input and its clean target (in the input's [0, 1] units), if any."""
    source, target = job
    if isinstance(source, Path):
        source = read_input(source, dims, float_range)
    if isinstance(target, Path):
        target = read_target(target, source)
    return source, target


def tile_count(
    model, spatial: Sequence[int], tile: Sequence[int] | None, overlap: Sequence[int] | None
) -> int:
    """How many tiles `restore_pixels` cuts an input of size `spatial` into."""
    padded = [-(-s // m) * m for s, m in zip(spatial, model.config.size_multiple())]
    tile_size, overlap = tile_geometry(model, tile, overlap, spatial)
    tiles, overlaps = resolve_tiling(padded, tile_size, overlap)
    return math.prod(len(tile_starts(n, t, o)) for n, t, o in zip(padded, tiles, overlaps))


def _figure(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def metrics_line(name: str, scores: dict[str, dict[str, float]]) -> str:
    """One line of scores for an input: PSNR and SSIM of the input → the restoration, and ρ."""
    noisy, restored = scores["input"], scores["restored"]
    rho = scores["uncertainty"]["spearman"]
    rho_text = (
        _figure(rho, 2) if math.isfinite(rho) else "n/a (the uncertainty or error is constant)"
    )
    return (
        f"  {name} against its target: PSNR {_figure(noisy['psnr'], 2)} → "
        f"{_figure(restored['psnr'], 2)} dB, SSIM {_figure(noisy['ssim'], 3)} → "
        f"{_figure(restored['ssim'], 3)} (input → restored); uncertainty-error "
        f"rank correlation ρ {rho_text}"
    )


def run(args: argparse.Namespace) -> int:
    """Check everything, then restore each input, write its outputs and, given a clean target,
    print and record its scores."""
    check_options(args)
    embedded = is_embedded(args.input)
    if embedded:
        if args.target is not None:
            raise InvalidValueError(
                f"--input {args.input} brings its own clean targets; drop --target "
                f"{args.target} (it is for inputs read from files)"
            )
        names = embedded_names(args.input)
    else:
        files = list_inputs(args.input)
        targets = match_targets(files, args.target) if args.target else [None] * len(files)
    device = resolve_device(args.device)
    loaded = load_model(args.source, device=device, verify=not args.no_verify)
    enable_cudnn_autotuning(device, loaded.model.config.dims)
    check_model(loaded)
    config, defaults = loaded.model.config, loaded.sample_defaults
    kind = uncertainty_kind(args.uncertainty, loaded)
    tile = parse_sizes(args.tile, config.dims, "--tile")
    overlap = parse_sizes(args.overlap, config.dims, "--overlap")
    value_range = loaded.data.get("cond_value_range")
    float_range = (
        tuple(value_range) if isinstance(value_range, list) and len(value_range) == 2 else None
    )
    jobs: list[Job] = (
        list(embedded_inputs(names, config.dims)) if embedded else list(zip(files, targets))
    )
    for job in jobs:  # read every input and target once first: a bad file stops before any work
        source, _ = open_job(job, config.dims, float_range)
        tile_geometry(loaded.model, tile, overlap, source.pixels.shape)
    samples = args.samples
    if samples is None:
        samples = CPU_SAMPLES if device.type == "cpu" else DEFAULT_SAMPLES
        if device.type == "cpu":
            what = "samples" if kind == "samples" else "noise draws"
            print(
                f"on the CPU: {samples} {what} per input instead of {DEFAULT_SAMPLES}, "
                f"to save time; pass --samples {DEFAULT_SAMPLES} for the full count",
                file=sys.stderr,
            )
    sampler = args.sampler or loaded.default_sampler
    options = dict(
        kind=kind,
        samples=samples,
        steps=args.steps or loaded.steps_for(sampler),
        sampler=sampler,
        eta=args.eta if args.eta is not None else defaults.get("eta", 0.0),
        tile=tile,
        overlap=overlap,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    what = (
        f"spread of {samples} samples ({options['sampler']}, {options['steps']} steps)"
        if kind == "samples"
        else f"aleatoric variance ({samples} draws)"
    )
    print(
        f"restoring {len(jobs)} input(s) with {loaded.checkpoint}; uncertainty: {what}",
        file=sys.stderr,
    )
    out_dir = Path(args.out)
    report: dict = {
        "units": "[0, 1], the model's units: integer pixels divided by 255 or 65535, "
        "float pixels scaled by the input's range",
        "checkpoint": str(loaded.checkpoint),
        "uncertainty": kind,
        "samples": samples,
        **({"sampler": options["sampler"], "steps": options["steps"]} if kind == "samples" else {}),
        "seed": args.seed,
        "inputs": {},
    }
    written = 0
    for index, job in enumerate(jobs, 1):
        source, clean = open_job(job, config.dims, float_range)
        name = f"{EMBEDDED_INPUT}:{source.path.stem}" if embedded else source.path.name
        shape = "×".join(map(str, source.pixels.shape))
        tiles = tile_count(loaded.model, source.pixels.shape, tile, overlap)
        work = f"{tiles} tile(s) × {samples} " + (
            f"samples × {options['steps']} steps" if kind == "samples" else "draws"
        )
        # Before the work, so a log that is not a terminal (no progress bar) shows where it is.
        print(f"[{index}/{len(jobs)}] restoring {name} ({shape}): {work} ...", file=sys.stderr)
        sys.stderr.flush()
        started = time.perf_counter()
        restored, std = restore_pixels(loaded, source.pixels, **options)
        seconds = time.perf_counter() - started
        paths = write_outputs(source, restored, std, out_dir)
        if embedded and clean is not None:
            paths.update(write_references(source, clean, out_dir))
        written += len(paths)
        print(
            f"[{index}/{len(jobs)}] {name} ({shape}, {source.bit_depth}) → "
            f"{', '.join(p.name for p in paths.values())} ({seconds:.1f} s)"
        )
        if clean is None:
            continue
        scores = restoration_metrics(clean, source.pixels, restored, std)
        print(metrics_line(name, scores))
        report["inputs"][name] = {
            "input_file": str(paths["input"] if embedded else job[0]),
            "target_file": str(paths["target"] if embedded else job[1]),
            "shape": list(source.pixels.shape),
            **scores,
            "seconds": round(seconds, 1),
        }
        # Rewritten after every input, so an interrupted run keeps the scores so far.
        text = json.dumps(json_ready(report), indent=2, ensure_ascii=False) + "\n"
        (out_dir / METRICS_FILE).write_text(text, encoding="utf-8")
    if report["inputs"]:
        written += 1
    print(f"wrote {written} file(s) to {out_dir}")
    return 0


__all__ = [
    "add_arguments",
    "metrics_line",
    "output_paths",
    "restore_aleatoric",
    "restore_pixels",
    "run",
]
