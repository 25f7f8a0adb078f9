"""The accelerator: every speed technique, applied to a plain model by `accelerate(model)`.

`accelerate` swaps fast forwards into a `UNet` in place (same parameters, same state-dict
keys): fused GroupNorm + FiLM + SiLU kernels (`norm`), convolutions that keep cuDNN's
layout under `torch.compile` (`conv`), thin 3D convolutions (`thin_conv`), nearest upsampling
folded into its convolution (`upsample`), a decoder entry that never keeps a concatenation
(`decoder_entry`), channels-last activations (`layout`); `cuda_graph` replays a model's
forward as CUDA graphs, `training_graph` its forward and backward. Every switch and threshold
is in `settings`. `cache_compiled_functions` (`compile_cache`) lets AOTAutograd's on-disk cache
keep the compiled graphs, for warm starts.
"""

from diffunet.accel.apply import accelerate, is_accelerated, plain
from diffunet.accel.compile_cache import cache_compiled_functions
from diffunet.accel.layout import memory_format_for

__all__ = ["accelerate", "cache_compiled_functions", "is_accelerated", "memory_format_for", "plain"]
