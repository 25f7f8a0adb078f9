"""Checkpoints in the Hugging Face layout: a folder with `config.json` + `model.safetensors`.

Weights never go through pickle. Loading checks the weights against the config and names
every missing, unexpected or mis-shaped tensor.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, UNetConfig
from .unet import UNet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "diffunet"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says what is wrong with it."""


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (`module.` from DDP, `_orig_mod.` from torch.compile)."""
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key.replace("._orig_mod.", ".")] = value
    return cleaned


def unwrap_model(model: torch.nn.Module) -> UNet:
    """The `UNet` inside DDP / FSDP / torch.compile / AveragedModel wrappers."""
    seen = 0
    while not isinstance(model, UNet):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or seen > 8:
            raise TypeError(f"expected a diffunet UNet (possibly wrapped), got {type(model).__name__}")
        model, seen = inner, seen + 1
    return model


def atomic_write_bytes(path: str | Path, write) -> None:
    """Call `write(tmp_path)` then fsync and rename onto `path`, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_pretrained(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` for `model` into `directory` (atomically)."""
    unet = unwrap_model(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in clean_state_dict(unet.state_dict()).items()}
    atomic_write_bytes(directory / WEIGHTS_NAME,
                       lambda tmp: save_file(state, tmp, metadata={"format": "pt", "library": FORMAT_TAG}))
    config_text = unet.config.to_json()
    atomic_write_bytes(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text + "\n"))
    return directory


def load_config(directory: str | Path) -> UNetConfig:
    """Read and validate the `config.json` of a checkpoint folder."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a folder; a checkpoint is a folder with "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}; is it a diffunet checkpoint?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err
    try:
        return UNetConfig.from_dict(data)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from err


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never pickle), with a clear error for a missing or corrupt one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def check_state_dict(model: UNet, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming missing/unexpected/mis-shaped/mis-typed tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    dtypes = sorted(
        f"{k}: {state[k].dtype}" for k in set(state) & set(expected)
        if not state[k].is_floating_point() and expected[k].is_floating_point()
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape (file vs config)", shapes), ("non-float dtype", dtypes)):
        if items:
            shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not match its config: " + "; ".join(problems))


def load_pretrained(directory: str | Path, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> UNet:
    """Build the `UNet` described by `directory/config.json` and load its safetensors weights."""
    config = load_config(directory)
    state = load_state_dict(Path(directory) / WEIGHTS_NAME)
    model = UNet(config)
    check_state_dict(model, state, source=str(Path(directory) / WEIGHTS_NAME))
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype)
    return model.eval()
