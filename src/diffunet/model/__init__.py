"""The plain reference model: `UNetConfig` and its presets, `UNet` and its layers (`layers/`),
and the checkpoint format (`config.json` + `model.safetensors`, `checkpoint.py`).

Each forward is the straight line of the math, with no GPU concern: `diffunet.accel` makes a
model fast without changing its parameters, and export, quantization and interop use it as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffunet.model.checkpoint import CheckpointError, PretrainedMixin, save_pretrained
from diffunet.model.config import ConfigError, UNetConfig
from diffunet.model.presets import list_presets, preset, preset_info
from diffunet.model.unet import UNet, split_aleatoric


def load_pretrained(
    name_or_path: str | Path,
    *,
    model_class: type[UNet] | None = None,
    verify: bool = True,
    **kwargs: Any,
) -> UNet:
    """Load a checkpoint folder or Hub id as `model_class` (default `UNet`, or a subclass).

    `verify` checks the weights against the SHA-256 that `save_pretrained` recorded (a
    mismatch raises :class:`CheckpointError`; False loads them anyway). The other keyword
    options (`device`, `dtype`, `revision`, `cache_dir`, `local_files_only`, `token`) are those
    of :meth:`UNet.from_pretrained`. It lives here rather than in `checkpoint.py`, which must
    not import `unet.py` (that imports it).
    """
    return (model_class or UNet).from_pretrained(name_or_path, verify=verify, **kwargs)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "PretrainedMixin",
    "UNet",
    "UNetConfig",
    "list_presets",
    "load_pretrained",
    "preset",
    "preset_info",
    "save_pretrained",
    "split_aleatoric",
]
