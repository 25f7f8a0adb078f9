"""The digits evaluation of a model, defined once: what the end of `diffunet train` writes to
`RUN/eval.json` and what `diffunet eval --from RUN` prints (and writes there) are the same
numbers, from the same samples.

The definition: `EVAL_SAMPLES` samples drawn with seed `EVAL_SEED` by :func:`generate`, with
the run's sampler, steps and guidance (labels cycling 0..9 for class-conditional models),
scored by :func:`diffunet.apps.metrics.evaluate_digits`. The numbers are written together
with that definition, and printed with it.
"""

from __future__ import annotations

from typing import Any

import torch

from diffunet.apps.generate import LoadedModel, default_labels, generate
from diffunet.apps.metrics import DigitsScores, evaluate_digits

EVAL_NAME = "eval.json"
EVAL_SAMPLES = 500
EVAL_SEED = 0


def evaluate_model(
    loaded: LoadedModel,
    *,
    num: int | None = None,
    seed: int = EVAL_SEED,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], DigitsScores, torch.Tensor]:
    """Sample `num` (default `EVAL_SAMPLES`) digits from `loaded` and score them.

    Unset sampling options take the run's defaults. Returns the JSON-ready record (scores and
    how the samples were made), the scores, and the samples in [0, 1].
    """
    num = EVAL_SAMPLES if num is None else num
    defaults = loaded.sample_defaults
    labels = default_labels(loaded.model, num)
    sampler = sampler or loaded.default_sampler
    steps = steps or loaded.steps_for(sampler)
    guidance = guidance if guidance is not None else defaults.get("guidance", 1.0)
    if labels is None:
        guidance = 1.0  # nothing to guide
    samples = generate(
        loaded,
        num,
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        seed=seed,
        labels=labels,
        progress=progress,
    )
    scores = evaluate_digits(samples, labels)
    record = {
        **scores.to_dict(),
        "samples": num,
        "seed": seed,
        "sampler": sampler,
        "sampling_steps": steps,
        "guidance": guidance,
    }
    return record, scores, samples


def describe(record: dict[str, Any]) -> str:
    """How the samples of `record` were drawn (the scores' summary gives their number), for
    printing after the numbers."""
    guidance = record["guidance"]
    return f"seed {record['seed']}, {record['sampler']} {record['sampling_steps']} steps" + (
        f", guidance {guidance:g}" if guidance != 1 else ""
    )
