"""GroupNorm → (scale-shift) → SiLU as one fused GPU operation, with an exact eager fallback.

Every ResBlock normalizes twice and the second norm carries the time embedding's FiLM, so in
eager PyTorch one "norm" is four or five memory-bound kernels plus layout conversions (the
CUDA GroupNorm is not channels_last-native) and float32 intermediates under autocast. The
Triton path reads the activation in whatever layout it has (NCHW or channels_last, 1D/2D/3D),
keeps statistics in float32, and writes the result once in the input dtype: forward = a
statistics pass + a tiny combine + a normalize pass, backward = a reduction pass + a tiny
combine + a gradient pass; small calls run each direction as one kernel.

`group_norm_act` picks the fused path for CUDA tensors when Triton is importable and
`settings.FUSED_NORM` is on, from `settings.FUSED_EAGER_MIN_ELEMENTS` elements; everything
else takes the eager path, which is the reference the fused kernels are tested against.
Compiled graphs reach the same kernels through the operators `diffunet::group_norm_act` and
`diffunet::group_norm_act_backward` (ops.py, on `accel.library`), which Inductor calls as
they are, from the sizes `configure_for_compile_mode` sets for the compile mode.

Modules: functional.py (the calls and the reference), ops.py (the operators and their
`autograd.Function`), launchers.py (the host side of a forward or backward), launch.py (launch
shapes), kernels.py (the Triton kernels).
"""

from diffunet.accel.norm import functional, kernels, launch, launchers, ops  # noqa: F401
from diffunet.accel.norm.functional import (
    compiled_fused_wanted,
    fused_available,
    group_norm_act,
    group_norm_act_reference,
    norm_act,
    per_channel_operand,
)

__all__ = [
    "compiled_fused_wanted",
    "fused_available",
    "group_norm_act",
    "group_norm_act_reference",
    "norm_act",
    "per_channel_operand",
]
