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


def check_added_conditioning(
    added_cond: torch.Tensor | None,
    time_ids: torch.Tensor | None,
    *,
    batch: int,
    added_cond_dim: int | None,
    added_time_embed_dim: int | None,
) -> None:
    """Raise unless `added_cond` / `time_ids` are what the config's added conditioning takes.

    `added_cond` is `(B, D)` floating point; `time_ids` `(B, n)` real numbers, present exactly
    when `added_time_embed_dim` is set; together `D + n · added_time_embed_dim` must be
    `added_cond_dim` (SDXL: a pooled text embedding of 1280 and 6 ids of 256 features, 2816).
    """
    for name, value in (("added_cond", added_cond), ("time_ids", time_ids)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise InvalidTypeError(
                f"{name} must be a torch.Tensor or None, got {type(value).__name__}"
            )
    if added_cond_dim is None:
        if added_cond is not None or time_ids is not None:
            given = "added_cond" if added_cond is not None else "time_ids"
            raise InvalidValueError(
                f"{given} was given but the model has added_cond_dim=None; build it with "
                "added_cond_dim=<vector width> (and added_time_embed_dim for time ids) to add a "
                "vector conditioning to the time embedding"
            )
        return
    if time_ids is not None and added_time_embed_dim is None:
        raise InvalidValueError(
            "time_ids were given but the model has added_time_embed_dim=None; pass the whole "
            f"vector as added_cond (B={batch}, {added_cond_dim})"
        )

    def expected() -> str:
        # Formatted only when raising: under torch.compile `batch` is symbolic.
        if added_time_embed_dim is None:
            return f"pass added_cond (B={batch}, D) with D = {added_cond_dim}"
        return (
            f"pass added_cond (B={batch}, D) and time_ids (B={batch}, n) with "
            f"D + n × {added_time_embed_dim} = {added_cond_dim} (SDXL: D = 1280, n = 6)"
        )

    if added_cond is None or (added_time_embed_dim is not None and time_ids is None):
        missing = "added_cond" if added_cond is None else "time_ids"
        raise InvalidValueError(
            f"this model adds a vector conditioning to its time embedding and {missing} is "
            f"missing; {expected()}"
        )
    if not added_cond.is_floating_point():
        raise InvalidTypeError(
            f"added_cond must be a floating-point tensor (e.g. a pooled text embedding), got "
            f"dtype {added_cond.dtype}"
        )
    if added_cond.ndim != 2 or added_cond.shape[0] != batch:
        raise InvalidValueError(f"added_cond has shape {tuple(added_cond.shape)}: {expected()}")
    width = added_cond.shape[1]
    if time_ids is not None:
        if time_ids.dtype.is_complex or time_ids.dtype == torch.bool:
            raise InvalidTypeError(
                f"time_ids must be real numbers (sizes and crop offsets), got dtype {time_ids.dtype}"
            )
        if time_ids.ndim != 2 or time_ids.shape[0] != batch:
            raise InvalidValueError(f"time_ids has shape {tuple(time_ids.shape)}: {expected()}")
        assert added_time_embed_dim is not None
        width += time_ids.shape[1] * added_time_embed_dim
    if width != added_cond_dim:
        shapes = f"added_cond {tuple(added_cond.shape)}"
        if time_ids is not None:
            shapes += f" and time_ids {tuple(time_ids.shape)}"
        raise InvalidValueError(
            f"{shapes} make {width} features but the model's added_cond_dim is "
            f"{added_cond_dim}; {expected()}"
        )


__all__ = [
    "CHECK_VALUES_ENV",
    "can_read_values",
    "check_added_conditioning",
    "check_finite",
    "check_labels",
    "set_value_checks",
    "value_checks",
    "value_checks_enabled",
]
