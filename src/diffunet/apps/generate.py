"""Load a trained model for sampling and draw samples from it: what `diffunet sample` and
`diffunet eval` share.

`--from` accepts a run folder (its `checkpoint/` holds the EMA weights) or a checkpoint folder
(`config.json` + `model.safetensors`, plus `run.json` with the diffusion settings when diffunet
trained it). Without `run.json` the diffusion defaults are used. A checkpoint whose weights
hold NaN or inf is refused, and so is sampling that produces them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffunet.accel import accelerate
from diffunet.diffusion.processes import (
    DEFAULT_SAMPLERS,
    LEGACY_PROCESS,
    Process,
    default_steps,
    make_process,
    process_name,
)
from diffunet.errors import DiffunetError, InvalidValueError
from diffunet.model import load_pretrained
from diffunet.model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from diffunet.model.unet import UNet

#: The run-folder layout the trainer writes and `load_model` reads: the EMA checkpoint folder
#: of a run, and the file in it with the diffusion and sampling settings.
CHECKPOINT_DIR = "checkpoint"
RUN_META = "run.json"
#: The sections of `run.json` that `load_model` reads; each, when present, is a JSON object.
_META_SECTIONS = ("diffusion", "sample", "data")


class SamplingError(DiffunetError, RuntimeError):
    """Sampling that produced NaN or inf; the message names the checkpoint and the settings."""


@dataclass
class LoadedModel:
    """A model with the diffusion process and sampling defaults it was trained with."""

    model: UNet
    diffusion: Process
    checkpoint: Path
    sample_defaults: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def default_sampler(self) -> str:
        """The run's sampler, or its process's default."""
        name = process_name(self.diffusion)
        return self.sample_defaults.get("sampler") or DEFAULT_SAMPLERS[name]

    def steps_for(self, sampler: str) -> int:
        """The run's sampling steps, or the default for `sampler` (about 20 evaluations)."""
        return self.sample_defaults.get("steps") or default_steps(sampler)


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint folder of a run folder or checkpoint folder, or a clear error."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"--from {path} does not exist; pass a run folder or a checkpoint "
            "folder (with config.json and model.safetensors)"
        )
    if not path.is_dir():
        raise CheckpointError(f"--from {path} is a file; pass a run folder or a checkpoint folder")
    if (path / CONFIG_NAME).exists():
        return path
    if (path / CHECKPOINT_DIR).is_dir():
        return path / CHECKPOINT_DIR
    raise CheckpointError(
        f"--from {path} is neither a run folder (no {CHECKPOINT_DIR}/ yet: did "
        f"training reach its first checkpoint?) nor a checkpoint folder (no "
        f"{CONFIG_NAME})"
    )


def load_model(
    path: str | Path, device: torch.device | str = "cpu", *, verify: bool = True
) -> LoadedModel:
    """The EMA model of a run (or a checkpoint) with its diffusion settings.

    `verify` checks the weights against the SHA-256 recorded when they were saved (False loads
    a changed file anyway). Weights holding NaN or inf are refused either way: such a model
    samples only NaN.
    """
    folder = checkpoint_folder(path)
    model = load_pretrained(folder, device=device, verify=verify)
    check_finite_weights(model, folder / WEIGHTS_NAME)
    accelerate(model)  # in place
    meta = read_run_meta(folder / RUN_META)
    d = meta.get("diffusion", {})
    try:
        diffusion = make_process(
            d.get("process", LEGACY_PROCESS),  # written before processes had names
            schedule=d.get("schedule", "cosine"),
            timesteps=d.get("timesteps", 1000),
            prediction=d.get("prediction", "eps"),
            zero_terminal_snr=d.get("zero_terminal_snr", False),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / RUN_META}: invalid diffusion settings ({err})") from err
    return LoadedModel(model, diffusion, folder, meta.get("sample", {}), meta.get("data", {}))


def read_run_meta(path: Path) -> dict[str, Any]:
    """The settings in a checkpoint's `run.json`, {} when there is none; a file that is not a
    JSON object of objects raises :class:`CheckpointError` naming it."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err
    # Deleting it is no general fix: the defaults suit only a model trained with them.
    fix = "restore it from the run it came from (the trainer writes it with the weights)"
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{path} must hold a JSON object (the run's diffusion and sampling settings), "
            f"got a {type(meta).__name__}; {fix}"
        )
    for section in _META_SECTIONS:
        if section in meta and not isinstance(meta[section], dict):
            raise CheckpointError(
                f"{path}: {section!r} must be a JSON object, got a "
                f"{type(meta[section]).__name__}; {fix}"
            )
    return meta


def check_finite_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming `path` when any of `model`'s tensors hold NaN or
    inf (the weights of a diverged run)."""
    state = model.state_dict()
    names = [name for name, t in state.items() if t.is_floating_point()]
    if not names:
        return
    # One device-to-host transfer for all tensors, not one per tensor.
    bad = torch.stack([~torch.isfinite(state[name]).all() for name in names]).tolist()
    broken = [name for name, flag in zip(names, bad) if flag]
    if broken:
        raise CheckpointError(
            f"{path} holds non-finite weights ({len(broken)} of {len(state)} tensors, e.g. "
            f"{broken[0]}); it was saved from a diverged run — use an earlier checkpoint"
        )


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    num: int,
    *,
    sampler: str,
    steps: int,
    eta: float = 0.0,
    guidance: float = 1.0,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
    batch_size: int = 250,
    spatial: tuple[int, ...] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """`num` samples `(N, C, *spatial)` in [0, 1], drawn in batches from one seeded generator.

    `labels` `(N,)` and `cond` `(N, C_cond, *spatial)` in [-1, 1] are the conditioning. A batch
    that comes out with NaN or inf raises :class:`SamplingError` (it stops there).
    """
    config = loaded.model.config
    if spatial is None:
        if cond is not None:
            spatial = tuple(cond.shape[2:])
        else:
            spatial = config.spatial_size() or tuple(loaded.data.get("spatial_size") or ())
    if not spatial:
        raise InvalidValueError("the checkpoint does not record its image size; pass --image-size")
    device = next(loaded.model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, num, batch_size):
        stop = min(num, start + batch_size)
        shape = (stop - start, config.in_channels, *spatial)
        x = loaded.diffusion.sample(
            loaded.model,
            shape,
            sampler=sampler,
            steps=steps,
            eta=eta,
            guidance=guidance,
            labels=None if labels is None else labels[start:stop],
            cond=None if cond is None else cond[start:stop],
            generator=generator,
            progress=progress,
            device=device,
        )
        x = x.float().cpu()
        # Checked before clamping, which would turn inf into valid-looking 0 and 1.
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        if not bool(finite.all()):
            raise SamplingError(
                f"sampling from {loaded.checkpoint} produced NaN or inf in "
                f"{int((~finite).sum())} of the {stop - start} samples {start}..{stop - 1} "
                f"({sampler}, {steps} steps, guidance {guidance:g}): the model's output "
                "overflowed; try --guidance closer to 1, another --sampler, or float32 weights"
            )
        chunks.append(((x + 1) / 2).clamp(0, 1))
    return torch.cat(chunks)


def default_labels(model: UNet, num: int, label: int | None = None) -> torch.Tensor | None:
    """Labels for a class-conditional model: `label` for all, or cycling 0, 1, ..., K-1."""
    classes = model.config.num_classes
    if classes is None:
        if label is not None:
            raise InvalidValueError(
                f"--label {label} was given but the model is not class-conditional "
                "(its num_classes is None)"
            )
        return None
    if label is not None:
        if not 0 <= label < classes:
            raise InvalidValueError(
                f"--label {label} is out of range: the model has classes 0..{classes - 1}"
            )
        return torch.full((num,), label, dtype=torch.long)
    return torch.arange(num) % classes
