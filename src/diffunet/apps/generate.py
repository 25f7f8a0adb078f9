"""Load a trained model for sampling and draw samples from it: what `diffunet sample` and
`diffunet eval` share.

`--from` accepts a run folder (its `checkpoint/` holds the EMA weights) or a checkpoint folder
(`config.json` + `model.safetensors`, plus `run.json` with the diffusion settings when diffunet
trained it). Without `run.json` the diffusion defaults are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffunet.accel import accelerate
from diffunet.diffusion import Diffusion
from diffunet.model import load_pretrained
from diffunet.model.checkpoint import CONFIG_NAME, CheckpointError
from diffunet.model.unet import UNet

#: The run-folder layout the trainer writes and `load_model` reads: the EMA checkpoint folder
#: of a run, and the file in it with the diffusion and sampling settings.
CHECKPOINT_DIR = "checkpoint"
RUN_META = "run.json"


@dataclass
class LoadedModel:
    """A model with the diffusion process and sampling defaults it was trained with."""

    model: UNet
    diffusion: Diffusion
    checkpoint: Path
    sample_defaults: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


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


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """The EMA model of a run (or a checkpoint) with its diffusion settings."""
    folder = checkpoint_folder(path)
    model = accelerate(load_pretrained(folder, device=device))
    meta: dict[str, Any] = {}
    meta_path = folder / RUN_META
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{meta_path} is not valid JSON ({err})") from err
    d = meta.get("diffusion", {})
    try:
        diffusion = Diffusion(
            d.get("schedule", "cosine"),
            d.get("timesteps", 1000),
            d.get("prediction", "eps"),
            zero_terminal_snr=d.get("zero_terminal_snr", False),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{meta_path}: invalid diffusion settings ({err})") from err
    return LoadedModel(model, diffusion, folder, meta.get("sample", {}), meta.get("data", {}))


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

    `labels` `(N,)` and `cond` `(N, C_cond, *spatial)` in [-1, 1] are the conditioning.
    """
    config = loaded.model.config
    if spatial is None:
        if cond is not None:
            spatial = tuple(cond.shape[2:])
        else:
            spatial = config.spatial_size() or tuple(loaded.data.get("spatial_size") or ())
    if not spatial:
        raise ValueError("the checkpoint does not record its image size; pass --image-size")
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
        chunks.append(((x.float().cpu() + 1) / 2).clamp(0, 1))
    return torch.cat(chunks)


def default_labels(model: UNet, num: int, label: int | None = None) -> torch.Tensor | None:
    """Labels for a class-conditional model: `label` for all, or cycling 0, 1, ..., K-1."""
    classes = model.config.num_classes
    if classes is None:
        if label is not None:
            raise ValueError(
                f"--label {label} was given but the model is not class-conditional "
                "(its num_classes is None)"
            )
        return None
    if label is not None:
        if not 0 <= label < classes:
            raise ValueError(
                f"--label {label} is out of range: the model has classes 0..{classes - 1}"
            )
        return torch.full((num,), label, dtype=torch.long)
    return torch.arange(num) % classes
