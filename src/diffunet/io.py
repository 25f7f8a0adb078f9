"""Checkpoints in the Hugging Face layout (`config.json` + `model.safetensors`): the public API.

The format itself, its checks and `PretrainedMixin` live in :mod:`diffunet.pretrained`, which
knows no model class so that `UNet` can inherit from it; this module adds what needs `UNet`,
`load_pretrained`, and re-exports the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import pretrained
from .pretrained import *  # noqa: F403  (the public names, listed in pretrained.__all__)
from .unet import UNet


def load_pretrained(name_or_path: str | Path, *, model_class: type[UNet] = UNet,
                    **kwargs: Any) -> UNet:
    """Load a checkpoint folder or Hub id as `model_class` (a `UNet` or subclass).

    The keyword options (`device`, `dtype`, `revision`, `cache_dir`, `local_files_only`,
    `token`) are those of :meth:`UNet.from_pretrained`.
    """
    return model_class.from_pretrained(name_or_path, **kwargs)


__all__ = [*pretrained.__all__, "load_pretrained"]
