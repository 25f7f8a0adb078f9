"""diffunet: one dimension-agnostic U-Net for diffusion denoisers.

import diffunet
model = diffunet.UNet(diffunet.preset("ddpm-cifar10"))   # the plain reference model
diffunet.accelerate(model)                               # fast forwards, same weights
eps = model(x, t)
"""

from diffunet.accel import accelerate
from diffunet.apps.restoration import Restoration, restore
from diffunet.apps.tiling import tiled_map
from diffunet.diffusion import Diffusion, NoiseSchedule
from diffunet.errors import DiffunetError
from diffunet.interop import ConversionError, from_diffusers, from_guided_diffusion
from diffunet.interop.export import export_model
from diffunet.model import load_pretrained
from diffunet.model.checkpoint import CheckpointError, save_pretrained
from diffunet.model.config import ConfigError, UNetConfig, attention_factors_for_sizes
from diffunet.model.presets import list_presets, preset, preset_info
from diffunet.model.surgery import widen_input_channels
from diffunet.model.unet import UNet, split_aleatoric

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "DiffunetError",
    "Diffusion",
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
