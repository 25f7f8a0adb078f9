"""Draw samples from a trained model: a PNG grid (`--out x.png`) or a float32 array (`--out x.npy`).

The array is `(N, C, *spatial)` with values in [0, 1]. Sampler, steps and guidance default to
what the run was trained with (`checkpoint/run.json`). Class-conditional models cycle through
their classes (one class per grid column) unless `--label` picks one. Image-conditioned
(restoration) models need `--cond`: an image, or a `.npy` array `(C, *spatial)` or
`(N, C, *spatial)`, repeated to `--num`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from diffunet.accel.layout import enable_cudnn_autotuning
from diffunet.apps.generate import default_labels, generate, load_model
from diffunet.apps.grids import save_array, save_grid
from diffunet.data import DataError, read_image
from diffunet.data.arrays import load_array_file, to_unit_range
from diffunet.data.images import resize_and_crop
from diffunet.errors import InvalidValueError
from diffunet.model.config import UNetConfig
from diffunet.training.distributed import resolve_device
from diffunet.training.run_config import SAMPLERS

OUTPUT_SUFFIXES = (".png", ".npy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffunet sample`."""
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="RUN_OR_CHECKPOINT",
        help="a run folder or a checkpoint folder",
    )
    parser.add_argument("--num", type=int, default=100, metavar="N", help="samples (default 100)")
    parser.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help="default: the run's (ddpm: ddim, ddpm, dpm++; flow: euler, heun; edm: heun, euler)",
    )
    parser.add_argument(
        "--steps", type=int, metavar="N", help="sampling steps (default: the run's)"
    )
    parser.add_argument("--eta", type=float, metavar="ETA", help="DDIM noise scale in [0, 1]")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    parser.add_argument(
        "--guidance",
        type=float,
        metavar="S",
        help="classifier-free guidance scale (class-conditional models; 1 = off)",
    )
    parser.add_argument("--label", type=int, metavar="K", help="draw only class K")
    parser.add_argument(
        "--cond", metavar="PATH", help="conditioning image/array for image-conditioned models"
    )
    parser.add_argument(
        "--batch-size", type=int, default=250, metavar="N", help="samples per batch (default 250)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", required=True, metavar="FILE", help="output .png or .npy")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="load the weights even if they fail their SHA-256 check (changed since saved)",
    )


def check_positive(name: str, value: int | None) -> None:
    """Raise a ValueError unless `value` is None or a positive integer."""
    if value is not None and value < 1:
        raise InvalidValueError(f"{name} must be a positive integer, got {value}")


def load_cond(
    path: str, num: int, channels: int, dims: int, spatial: tuple[int, ...] | None
) -> torch.Tensor:
    """A conditioning input `(num, C, *spatial)` in [-1, 1] from an image or a `.npy` file."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--cond {file} does not exist")
    if file.suffix == ".npy":
        array = load_array_file(file)
        if array.ndim == dims + 1:
            array = array[None]
        if array.ndim != dims + 2:
            raise DataError(
                f"--cond {file} has shape {array.shape}; expected (C, *spatial) or "
                f"(N, C, *spatial) with {dims} spatial axes"
            )
        tensor, _ = to_unit_range(array, str(file))
    else:
        image, _ = read_image(file)
        if spatial is None or len(set(spatial)) != 1:
            raise DataError("--cond images need a model trained on square images")
        tensor = resize_and_crop(image, spatial[0])[None]
    if tensor.shape[1] != channels:
        if tensor.shape[1] == 3 and channels == 1:
            tensor = tensor.mean(dim=1, keepdim=True)
        elif tensor.shape[1] == 1:
            tensor = tensor.expand(-1, channels, *tensor.shape[2:])
        else:
            raise DataError(
                f"--cond {file} has {tensor.shape[1]} channels; the model expects {channels}"
            )
    tensor = tensor[torch.arange(num) % len(tensor)]
    return tensor * 2 - 1


def check_no_text_conditioning(config: UNetConfig) -> None:
    """Refuse models that need context tokens or an added vector embedding (Stable Diffusion's
    U-Nets): this command has no text encoder to make them, the Python API takes them."""
    needs = [
        f"{name}={value}"
        for name, value in (
            ("context_dim", config.context_dim),
            ("added_cond_dim", config.added_cond_dim),
        )
        if value is not None
    ]
    if needs:
        raise InvalidValueError(
            f"this model is conditioned on text embeddings ({', '.join(needs)}, as Stable "
            "Diffusion's U-Nets are), which `diffunet sample` cannot make (it has no text "
            "encoder); sample it from Python with Diffusion.sample(model, shape, context=...), "
            "see docs/interop.md, 'Running an SD 1.5 U-Net from a local file'"
        )


def run(args: argparse.Namespace) -> int:
    """Load, sample, write."""
    out = Path(args.out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InvalidValueError(f"--out {out} must end in .png (a grid) or .npy (a float32 array)")
    check_positive("--num", args.num)
    check_positive("--steps", args.steps)
    check_positive("--batch-size", args.batch_size)
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise InvalidValueError(f"--eta must be in [0, 1], got {args.eta}")
    if args.guidance is not None and args.guidance < 0:
        raise InvalidValueError(f"--guidance must be >= 0, got {args.guidance}")
    device = resolve_device(args.device)

    loaded = load_model(args.source, device=device, verify=not args.no_verify)
    enable_cudnn_autotuning(device, loaded.model.config.dims)
    config = loaded.model.config
    check_no_text_conditioning(config)
    defaults = loaded.sample_defaults
    labels = default_labels(loaded.model, args.num, args.label)
    cond = None
    if config.cond_channels:
        if not args.cond:
            raise InvalidValueError(
                f"this model is conditioned on an input image ({config.cond_channels} "
                "channel(s)); pass --cond IMAGE_OR_NPY (or use `diffunet restore`)"
            )
        cond = load_cond(
            args.cond, args.num, config.cond_channels, config.dims, config.spatial_size()
        )
    elif args.cond:
        raise InvalidValueError(
            "--cond was given but the model has no image conditioning (cond_channels=0)"
        )
    guidance = args.guidance if args.guidance is not None else defaults.get("guidance", 1.0)
    if labels is None:
        guidance = 1.0 if args.guidance is None else guidance
    sampler = args.sampler or loaded.default_sampler
    samples = generate(
        loaded,
        args.num,
        sampler=sampler,
        steps=args.steps or loaded.steps_for(sampler),
        eta=args.eta if args.eta is not None else defaults.get("eta", 0.0),
        guidance=guidance,
        seed=args.seed,
        labels=labels,
        cond=cond,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npy":
        save_array(samples, out)
    else:
        nrow = config.num_classes if labels is not None and args.label is None else None
        scale = min(4, max(1, 64 // samples.shape[-1])) if samples.ndim == 4 else 1
        save_grid(samples, out, nrow=nrow, scale=scale)
    shape = tuple(np.shape(samples))
    print(f"wrote {out}: {shape[0]} samples of {tuple(shape[1:])} from {loaded.checkpoint}")
    return 0
