"""diffunet: one dimension-agnostic U-Net for diffusion denoisers.

    import diffunet
    model = diffunet.UNet(diffunet.preset("ddpm-cifar10"))
    eps = model(x, t)
"""

from .config import ConfigError, UNetConfig, attention_factors_for_sizes
from .diffusion import Diffusion, NoiseSchedule
from .presets import list_presets, preset, preset_info
from .restoration import Restoration, restore
from .tiling import tiled_map
from .unet import UNet, split_aleatoric

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Diffusion",
    "NoiseSchedule",
    "Restoration",
    "UNet",
    "UNetConfig",
    "__version__",
    "attention_factors_for_sizes",
    "list_presets",
    "preset",
    "preset_info",
    "restore",
    "split_aleatoric",
    "tiled_map",
]
