"""Score generated digits: the digits Fréchet distance and recognisability.

Both numbers come from a small CNN trained on scikit-learn's digits
(`scripts/train_digits_classifier.py`); this is not FID (no Inception network is involved) and
its values compare only with each other. Lower distance is better; recognisability is the share
of class-conditional samples the classifier reads as the class they were drawn for.

Score a model (`--from RUN`), a `.npy` file of samples (`--samples`), or — as a reference —
real digits (`--real`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from diffunet.apps.generate import default_labels, generate, load_model
from diffunet.apps.metrics import evaluate_digits
from diffunet.data import DataError, digits_arrays, resize_digits
from diffunet.data.arrays import load_array_file
from diffunet.errors import InvalidValueError
from diffunet.model.checkpoint import atomic_write_bytes
from diffunet.training.run_config import SAMPLERS

HELP = "digits Fréchet distance and recognisability of a model's samples (not FID)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffunet eval`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from",
        dest="source",
        metavar="RUN_OR_CHECKPOINT",
        help="sample from this run or checkpoint, then score",
    )
    source.add_argument(
        "--samples", metavar="FILE.npy", help="score saved samples (N, C, H, W) in [0, 1]"
    )
    source.add_argument(
        "--real", action="store_true", help="score real digits (a reference for the numbers)"
    )
    parser.add_argument(
        "--labels",
        metavar="cycle|FILE.npy",
        help="with --samples: the intended classes ('cycle' = 0, 1, ..., 9, "
        "as `diffunet sample` draws them)",
    )
    parser.add_argument("--num", type=int, default=500, metavar="N", help="samples (default 500)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="default: the run's")
    parser.add_argument(
        "--steps", type=int, metavar="N", help="sampling steps (default: the run's)"
    )
    parser.add_argument("--guidance", type=float, metavar="S", help="default: the run's")
    parser.add_argument("--seed", type=int, default=0, metavar="N")
    parser.add_argument(
        "--image-size",
        type=int,
        default=16,
        metavar="N",
        help="with --real: the size the real digits are resized to (default 16)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="load the weights even if they fail their SHA-256 check (changed since saved)",
    )


def _samples_from_file(
    path: str, labels_arg: str | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    array = load_array_file(Path(path))
    if array.ndim != 4 or not np.issubdtype(array.dtype, np.floating):
        raise DataError(
            f"--samples {path}: expected a float array (N, C, H, W) in [0, 1], got "
            f"{array.dtype} {array.shape}"
        )
    samples = torch.from_numpy(array.astype(np.float32))
    labels = None
    if labels_arg == "cycle":
        labels = torch.arange(len(samples)) % 10
    elif labels_arg:
        labels = torch.from_numpy(load_array_file(Path(labels_arg)).astype(np.int64))
    return samples, labels


def run(args: argparse.Namespace) -> int:
    """Produce or read the samples, score them, print (and optionally write) the numbers."""
    if args.num < 2:
        raise InvalidValueError(
            f"--num must be at least 2 (a Fréchet distance needs a covariance), got {args.num}"
        )
    if args.labels and not args.samples:
        raise InvalidValueError(
            "--labels goes with --samples (models and --real know their labels)"
        )
    what: dict = {}
    if args.real:
        images, labels = digits_arrays()
        index = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
        index = index[: args.num]
        samples, labels = resize_digits(images[index], args.image_size), labels[index]
        what = {"source": "real digits", "image_size": args.image_size}
    elif args.samples:
        samples, labels = _samples_from_file(args.samples, args.labels)
        what = {"source": args.samples}
    else:
        loaded = load_model(args.source, verify=not args.no_verify)
        config = loaded.model.config
        if config.dims != 2 or config.cond_channels:
            raise InvalidValueError(
                "diffunet eval scores 2D digits from an unconditioned (or "
                "class-conditional) model; this checkpoint is not one"
            )
        defaults = loaded.sample_defaults
        labels = default_labels(loaded.model, args.num)
        sampler = args.sampler or defaults.get("sampler", "dpm++")
        steps = args.steps or defaults.get("steps", 20)
        guidance = args.guidance if args.guidance is not None else defaults.get("guidance", 1.0)
        if labels is None:
            guidance = 1.0
        samples = generate(
            loaded,
            args.num,
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            seed=args.seed,
            labels=labels,
            progress=sys.stderr.isatty(),
        )
        what = {
            "source": str(loaded.checkpoint),
            "sampler": sampler,
            "steps": steps,
            "guidance": guidance,
            "seed": args.seed,
        }
    scores = evaluate_digits(samples, labels)
    print(scores.summary())
    if args.json:
        text = json.dumps({**what, **scores.to_dict()}, indent=2)
        atomic_write_bytes(args.json, lambda tmp: Path(tmp).write_text(text + "\n"))
    return 0
