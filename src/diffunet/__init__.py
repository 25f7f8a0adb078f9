"""diffunet: one dimension-agnostic U-Net for diffusion denoisers.

import diffunet
model = diffunet.UNet(diffunet.preset("ddpm-cifar10"))   # the plain reference model
diffunet.accelerate(model)                               # fast forwards, same weights
eps = model(x, t)
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from diffunet.accel import accelerate
    from diffunet.apps.restoration import Restoration, restore
    from diffunet.apps.tiling import tiled_map
    from diffunet.diffusion import EDM, Diffusion, FlowMatching, NoiseSchedule
    from diffunet.errors import DiffunetError
    from diffunet.interop import (
        ConversionError,
        from_diffusers,
        from_guided_diffusion,
        from_stable_diffusion,
    )
    from diffunet.interop.export import export_model
    from diffunet.model import load_pretrained
    from diffunet.model.checkpoint import CheckpointError, save_pretrained
    from diffunet.model.config import ConfigError, UNetConfig, attention_factors_for_sizes
    from diffunet.model.presets import list_presets, preset, preset_info
    from diffunet.model.surgery import widen_input_channels
    from diffunet.model.unet import UNet, split_aleatoric

#: Public name → the module that defines it. Imported on first use (PEP 562), so the command
#: line starts without loading torch, and Ctrl-C while it loads is answered by `diffunet.cli`.
_EXPORTS = {
    "accelerate": "diffunet.accel",
    "Restoration": "diffunet.apps.restoration",
    "restore": "diffunet.apps.restoration",
    "tiled_map": "diffunet.apps.tiling",
    "Diffusion": "diffunet.diffusion",
    "EDM": "diffunet.diffusion",
    "FlowMatching": "diffunet.diffusion",
    "NoiseSchedule": "diffunet.diffusion",
    "DiffunetError": "diffunet.errors",
    "ConversionError": "diffunet.interop",
    "from_diffusers": "diffunet.interop",
    "from_guided_diffusion": "diffunet.interop",
    "from_stable_diffusion": "diffunet.interop",
    "export_model": "diffunet.interop.export",
    "load_pretrained": "diffunet.model",
    "CheckpointError": "diffunet.model.checkpoint",
    "save_pretrained": "diffunet.model.checkpoint",
    "ConfigError": "diffunet.model.config",
    "UNetConfig": "diffunet.model.config",
    "attention_factors_for_sizes": "diffunet.model.config",
    "list_presets": "diffunet.model.presets",
    "preset": "diffunet.model.presets",
    "preset_info": "diffunet.model.presets",
    "widen_input_channels": "diffunet.model.surgery",
    "UNet": "diffunet.model.unet",
    "split_aleatoric": "diffunet.model.unet",
}

__version__ = "0.1.0"

__all__ = [
    "EDM",
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "DiffunetError",
    "Diffusion",
    "FlowMatching",
    "NoiseSchedule",
    "Restoration",
    "UNet",
    "UNetConfig",
    "__version__",
    "accelerate",
    "attention_factors_for_sizes",
    "export_model",
    "from_diffusers",
    "from_guided_diffusion",
    "from_stable_diffusion",
    "list_presets",
    "load_pretrained",
    "preset",
    "preset_info",
    "restore",
    "save_pretrained",
    "split_aleatoric",
    "tiled_map",
    "widen_input_channels",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffunet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
