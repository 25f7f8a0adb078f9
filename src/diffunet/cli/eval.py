"""Score generated digits: the digits Fréchet distance and recognisability.

Both numbers come from a small CNN trained on scikit-learn's digits
(`scripts/train_digits_classifier.py`); this is not FID (no Inception network is involved) and
its values compare only with each other. Lower distance is better; recognisability is the share
of class-conditional samples the classifier reads as the class they were drawn for.

Score a model (`--from RUN`), a `.npy` file of samples (`--samples`), or — as a reference —
real digits (`--real`). With the defaults, `--from RUN` reproduces the numbers the end of
training wrote to `RUN/eval.json` (same samples, seed, sampler and steps: see
`diffunet.apps.evaluation`), prints how they were made, and rewrites that file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from diffunet.apps.evaluation import EVAL_NAME, EVAL_SAMPLES, EVAL_SEED, describe, evaluate_model
from diffunet.apps.generate import CHECKPOINT_DIR, load_model
from diffunet.apps.metrics import evaluate_digits
from diffunet.data import DataError, digits_arrays, resize_digits
from diffunet.data.arrays import load_array_file
from diffunet.errors import InvalidValueError
from diffunet.model.checkpoint import atomic_write_bytes
from diffunet.training.run_config import SAMPLERS


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
    parser.add_argument(
        "--num",
        type=int,
        default=EVAL_SAMPLES,
        metavar="N",
        help=f"samples (default {EVAL_SAMPLES}, as at the end of training)",
    )
    parser.add_argument("--sampler", choices=SAMPLERS, help="default: the run's")
    parser.add_argument(
        "--steps", type=int, metavar="N", help="sampling steps (default: the run's)"
    )
    parser.add_argument("--guidance", type=float, metavar="S", help="default: the run's")
    parser.add_argument(
        "--seed",
        type=int,
        default=EVAL_SEED,
        metavar="N",
        help=f"sampling seed (default {EVAL_SEED}, as at the end of training)",
    )
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
        record, scores, _ = evaluate_model(
            loaded,
            num=args.num,
            seed=args.seed,
            sampler=args.sampler,
            steps=args.steps,
            guidance=args.guidance,
            progress=sys.stderr.isatty(),
        )
        print(f"{scores.summary()} ({describe(record)})")
        record = {"source": str(loaded.checkpoint), **record}
        text = json.dumps(record, indent=2)
        run_dir = Path(args.source)
        if (run_dir / CHECKPOINT_DIR).is_dir():  # a run folder: its numbers live there
            atomic_write_bytes(run_dir / EVAL_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))
            print(f"written to {run_dir / EVAL_NAME}")
        if args.json:
            atomic_write_bytes(args.json, lambda tmp: Path(tmp).write_text(text + "\n"))
        return 0
    scores = evaluate_digits(samples, labels)
    print(scores.summary())
    if args.json:
        text = json.dumps({**what, **scores.to_dict()}, indent=2)
        atomic_write_bytes(args.json, lambda tmp: Path(tmp).write_text(text + "\n"))
    return 0
