"""Where the accelerator's Triton kernels can run: Triton itself (None on installs without it),
whether it interprets kernels on the CPU (the tests), and a GPU's multiprocessor count."""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs run the eager paths.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None


def interpreting() -> bool:
    """Whether Triton runs its kernels in the CPU interpreter (`TRITON_INTERPRET=1`, the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def sm_count(device: torch.device) -> int:
    """The multiprocessors of `device`; under Triton's interpreter, a large GPU's count."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


__all__ = ["interpreting", "sm_count", "tl", "triton"]
