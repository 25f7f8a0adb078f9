"""Weight import from other libraries' U-Nets: diffusers `UNet2DModel` and the
guided-diffusion / Palette / EMDiffuse `UNetModel` layout."""

from diffunet.interop.common import ConversionError, read_weights
from diffunet.interop.diffusers import (
    config_from_diffusers,
    from_diffusers,
    state_dict_from_diffusers,
)
from diffunet.interop.guided_diffusion import (
    from_guided_diffusion,
    state_dict_from_guided_diffusion,
)

__all__ = [
    "ConversionError",
    "config_from_diffusers",
    "from_diffusers",
    "from_guided_diffusion",
    "read_weights",
    "state_dict_from_diffusers",
    "state_dict_from_guided_diffusion",
]
