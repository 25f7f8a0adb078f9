"""`accelerate(model)`: swap the fast forwards of `accel.blocks` into a UNet, in place.

Only module classes change, never parameters or buffers, so state dicts, checkpoints and
optimizers see the same model. `plain(model)` restores the reference forwards for a while
(export, quantization, counting the architecture's FLOPs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from diffunet.accel.blocks import (
    AcceleratedAttention,
    AcceleratedCrossAttention,
    AcceleratedDownsample,
    AcceleratedEmbedSequential,
    AcceleratedResBlock,
    AcceleratedSelfAttention,
    AcceleratedUNet,
    AcceleratedUpsample,
    FusedGroupNorm,
)
from diffunet.errors import InvalidTypeError
from diffunet.model.layers.attention import CrossAttention, SelfAttention
from diffunet.model.layers.resample import Downsample, Upsample
from diffunet.model.layers.resblock import ResBlock
from diffunet.model.layers.transformer import Attention
from diffunet.model.unet import EmbedSequential, UNet

#: Each plain class and the accelerated subclass that replaces it. Subclasses of the plain
#: classes (a user's own blocks) are left as they are.
ACCELERATED: dict[type[nn.Module], type[nn.Module]] = {
    UNet: AcceleratedUNet,
    EmbedSequential: AcceleratedEmbedSequential,
    ResBlock: AcceleratedResBlock,
    Downsample: AcceleratedDownsample,
    Upsample: AcceleratedUpsample,
    nn.GroupNorm: FusedGroupNorm,
    Attention: AcceleratedAttention,
    SelfAttention: AcceleratedSelfAttention,
    CrossAttention: AcceleratedCrossAttention,
}
PLAIN: dict[type[nn.Module], type[nn.Module]] = {fast: slow for slow, fast in ACCELERATED.items()}


def _unets(model: nn.Module) -> list[UNet]:
    """The UNets in `model` (itself, or inside DDP / torch.compile / EMA wrappers)."""
    unets = [m for m in model.modules() if isinstance(m, UNet)]
    if not unets:
        raise InvalidTypeError(
            f"accelerate expects a diffunet UNet or a module holding one, got "
            f"{type(model).__name__}"
        )
    return unets


def accelerate(model: nn.Module) -> nn.Module:
    """Make every UNet in `model` run the accelerator's forwards, in place; returns `model`.

    Results equal the plain model's up to floating-point rounding; parameters, buffers and
    state-dict keys are untouched. Calling it again does nothing.
    """
    for unet in _unets(model):
        for module in unet.modules():
            fast = ACCELERATED.get(type(module))
            if fast is not None:
                module.__class__ = fast
    return model


def is_accelerated(model: nn.Module) -> bool:
    """Whether the UNets in `model` run the accelerator's forwards."""
    return all(isinstance(unet, AcceleratedUNet) for unet in _unets(model))


@contextlib.contextmanager
def plain(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every accelerated module of `model` runs its plain forward."""
    swapped = []
    for module in model.modules():
        slow = PLAIN.get(type(module))
        if slow is not None:
            swapped.append((module, module.__class__))
            module.__class__ = slow
    try:
        yield model
    finally:
        for module, fast in swapped:
            module.__class__ = fast
