"""`TensorDataset`: every training set held in memory as one tensor, batched by index.

All data sources (the embedded digits, image folders, arrays, paired folders) decode their
files once, at start-up, into this one shape: `x` of `(N, C, *spatial)` with values in
`[0, 1]`, optionally a `cond` tensor of the same layout and integer `labels`. A batch is a
tensor of indices, so the data order is a plain permutation that a checkpoint can record.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from diffunet.errors import InvalidValueError


class DataError(InvalidValueError):
    """Data that cannot be used for training; the message names the file or folder."""


@dataclass
class TensorDataset:
    """Training samples in `[0, 1]`, with optional image conditioning and class labels.

    Attributes:
        x: `(N, C, *spatial)` float32 targets in `[0, 1]`.
        cond: `(N, C_cond, *spatial)` float32 conditioning inputs in `[0, 1]`, or None.
        labels: `(N,)` int64 class indices, or None.
        class_names: names of the classes (`labels` index into it), or None.
        source: a short description for logs and the resolved config.
        extra: JSON-ready facts about the data worth recording (e.g. the value range).
    """

    x: torch.Tensor
    cond: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.x.ndim < 3:
            raise DataError(
                f"{self.source}: samples must be (N, C, *spatial), got {tuple(self.x.shape)}"
            )
        if len(self.x) == 0:
            raise DataError(f"{self.source}: no samples")
        if self.cond is not None and (
            len(self.cond) != len(self.x) or self.cond.shape[2:] != self.x.shape[2:]
        ):
            raise DataError(
                f"{self.source}: cond {tuple(self.cond.shape)} does not match x {tuple(self.x.shape)}"
            )
        if self.labels is not None and tuple(self.labels.shape) != (len(self.x),):
            raise DataError(
                f"{self.source}: labels {tuple(self.labels.shape)} vs {len(self.x)} samples"
            )

    def __len__(self) -> int:
        return len(self.x)

    @property
    def dims(self) -> int:
        """Number of spatial axes: 1 (signals), 2 (images) or 3 (volumes)."""
        return self.x.ndim - 2

    @property
    def channels(self) -> int:
        """Channels of `x`."""
        return self.x.shape[1]

    @property
    def cond_channels(self) -> int:
        """Channels of `cond` (0 without conditioning)."""
        return 0 if self.cond is None else self.cond.shape[1]

    @property
    def spatial_size(self) -> tuple[int, ...]:
        """Spatial shape of one sample."""
        return tuple(self.x.shape[2:])

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None without labels."""
        if self.labels is None:
            return None
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    @property
    def nbytes(self) -> int:
        """Bytes held by `x`, `cond` and `labels`."""
        return sum(
            t.numel() * t.element_size() for t in (self.x, self.cond, self.labels) if t is not None
        )

    def to(self, device: torch.device | str) -> TensorDataset:
        """This data set with its tensors on `device` (itself if they are there already)."""
        device = torch.device(device)
        if self.x.device == device:
            return self
        return replace(
            self,
            x=self.x.to(device),
            cond=None if self.cond is None else self.cond.to(device),
            labels=None if self.labels is None else self.labels.to(device),
        )

    def batch(
        self, indices: torch.Tensor, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """The samples at `indices` on `device` (default: where they are), `x` and `cond` scaled
        to the model's `[-1, 1]`: keys `x`, `cond`, `labels`.

        The samples are picked where the data lives and then moved (from the host through
        pinned memory, without waiting for the GPU); the scaling runs on `device`.
        """
        device = self.x.device if device is None else torch.device(device)
        indices = move(indices, self.x.device)  # `to` keeps all of a data set's tensors together
        out = {}
        for key, values in (("x", self.x), ("cond", self.cond), ("labels", self.labels)):
            if values is None:
                continue
            picked = move(values[indices], device)
            out[key] = picked if key == "labels" else picked * 2 - 1
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the resolved config and the checkpoint's metadata."""
        info: dict[str, Any] = {
            "source": self.source,
            "samples": len(self),
            "dims": self.dims,
            "channels": self.channels,
            "cond_channels": self.cond_channels,
            "spatial_size": list(self.spatial_size),
            "num_classes": self.num_classes,
        }
        if self.class_names:
            info["class_names"] = list(self.class_names)
        info.update(self.extra)
        return info


def move(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a host tensor goes to a GPU through pinned memory, asynchronously
    (a copy from pageable memory can make the host wait for the GPU)."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
