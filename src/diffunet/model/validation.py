"""Checks of tensor *values* at the model's boundary, and the switch that turns on the costly ones.

What diffunet checks, and what it costs:

- **Metadata** (type, dtype, shape, number of dimensions) is checked on every call, on every
  device: it is read from the tensor's header, never from its data, so it costs nothing.
- **Label range** (`0 <= label <= num_classes`, `num_classes` being the null label) needs the
  values. A CPU tensor of labels is checked on every call (a pass over B integers); a GPU tensor
  only while value checks are on, since reading it waits for the GPU (one sync per call).
- **NaN / inf** in `x`, `cond` and `context` needs a pass over all the data (and on a GPU a
  sync), so it is checked only while value checks are on, on any device.
- Nothing that reads values runs while `torch.compile` traces (a data-dependent branch would
  break the graph) or while a CUDA graph is being captured (a sync is illegal there).

Value checks are off unless turned on: `set_value_checks(True)`, `with value_checks(): ...`,
or the environment variable ``DIFFUNET_CHECK_VALUES=1`` (read once, at import). Turn them on
while debugging a run that produces NaN or an indexing error deep inside torch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from diffunet.errors import InvalidTypeError, InvalidValueError

#: The environment variable that turns value checks on ("1") or off ("0", the default).
CHECK_VALUES_ENV = "DIFFUNET_CHECK_VALUES"


def _enabled_from_env() -> bool:
    """Whether `DIFFUNET_CHECK_VALUES` turns value checks on; another value warns and keeps off."""
    text = os.environ.get(CHECK_VALUES_ENV, "0").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text not in ("0", "false", "no", "off", ""):
        warnings.warn(
            f"{CHECK_VALUES_ENV}={text!r} is not 1 or 0; value checks stay off",
            stacklevel=2,
        )
    return False


_enabled = _enabled_from_env()


def value_checks_enabled() -> bool:
    """Whether the value checks that cost a pass over the data or a GPU sync are on."""
    return _enabled


def set_value_checks(enabled: bool) -> None:
    """Turn the costly value checks (label range on a GPU, NaN / inf anywhere) on or off."""
    global _enabled
    if not isinstance(enabled, bool):
        raise InvalidTypeError(
            f"set_value_checks(enabled=...) takes True or False, got {type(enabled).__name__} "
            f"{enabled!r}"
        )
    _enabled = enabled


@contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """Value checks on (or off) inside the `with` block; the previous state is restored after."""
    previous = _enabled
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def can_read_values(tensor: torch.Tensor) -> bool:
    """Whether reading `tensor`'s values is allowed now: not while `torch.compile` traces and
    not while the current CUDA stream captures a graph."""
    if torch.compiler.is_compiling():
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def check_labels(labels: torch.Tensor, num_classes: int | None, name: str = "labels") -> None:
    """Raise unless `labels` is an integer tensor with values in [0, num_classes].

    `num_classes` itself is the null label (classifier-free guidance); None skips the range. The
    dtype is always checked; the range on the CPU always and elsewhere only while value checks
    are on (see the module docstring).
    """
    if not isinstance(labels, torch.Tensor):
        raise InvalidTypeError(
            f"{name} must be an integer torch.Tensor of class indices, got {type(labels).__name__}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise InvalidTypeError(
            f"{name} must be an integer tensor of class indices, got dtype {labels.dtype}; "
            f"convert with {name}.long()"
        )
    if num_classes is None or not can_read_values(labels):
        return
    if labels.device.type != "cpu" and not _enabled:
        return
    bad = (labels < 0) | (labels > num_classes)
    if bool(bad.any()):
        values = sorted({int(v) for v in labels[bad].tolist()})
        shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
        raise InvalidValueError(
            f"{name} has value(s) {shown} outside the valid range [0, {num_classes}]: class "
            f"indices 0..{num_classes - 1}, and {num_classes} (the null label) for unconditional"
        )


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise when `tensor` holds NaN or inf; only while value checks are on (see the module
    docstring), and never while compiling or capturing a CUDA graph."""
    if not can_read_values(tensor) or not _enabled or not tensor.is_floating_point():
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        nan = int(torch.isnan(tensor).sum())
        inf = tensor.numel() - int(finite.sum()) - nan
        raise InvalidValueError(
            f"{name} holds {nan} NaN and {inf} inf value(s) of {tensor.numel()}; the model needs "
            f"finite inputs (check the data, or an earlier step that diverged)"
        )


__all__ = [
    "CHECK_VALUES_ENV",
    "can_read_values",
    "check_finite",
    "check_labels",
    "set_value_checks",
    "value_checks",
    "value_checks_enabled",
]
