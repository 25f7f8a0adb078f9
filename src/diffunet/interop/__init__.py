"""Weight import from other libraries' U-Nets: diffusers `UNet2DModel` and
`UNet2DConditionModel`, original Stable Diffusion single-file checkpoints, and the
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
from diffunet.interop.stable_diffusion import (
    from_stable_diffusion,
    state_dict_from_stable_diffusion,
)

__all__ = [
    "ConversionError",
    "config_from_diffusers",
    "from_diffusers",
    "from_guided_diffusion",
    "from_stable_diffusion",
    "read_weights",
    "state_dict_from_diffusers",
    "state_dict_from_guided_diffusion",
    "state_dict_from_stable_diffusion",
]
