"""NumPy arrays: 1D signals, 2D images and 3D volumes from `.npy` / `.npz` files.

Layouts (N samples, C channels, `*spatial` with 1, 2 or 3 axes):

- one `.npy` file holding `(N, C, *spatial)`;
- one `.npz` file with `x` (or `target`) of that shape, optionally `cond` (or `input`) of the
  same layout for image-to-image training, and `labels` `(N,)` integer classes;
- a folder of `.npy` files, one sample `(C, *spatial)` each.

Integer arrays are scaled to `[0, 1]` by their bit depth (8 or 16 bit); floating-point arrays
by the data set's minimum and maximum, which the resolved config records as `value_range`.
Every array read is checked first (:func:`check_array`): an empty array, a non-numeric dtype or
NaN/inf values raise a :class:`DataError` naming the file and the array's shape.
`--image-size` centre-crops; pairs (`cond`) larger than it are cut into random aligned crops
instead, as paired folders are (:mod:`diffunet.data.crops`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffunet.data.crops import crop_pairs
from diffunet.data.dataset import DataError, TensorDataset

X_KEYS = ("x", "target", "data", "images", "arr_0")
COND_KEYS = ("cond", "input")
LABEL_KEYS = ("labels", "y")


def load_array_file(path: Path) -> np.ndarray:
    """Read one `.npy` array (pickles refused) and :func:`check_array` it, naming the file on
    failure."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"cannot read array file {path}: {reason}") from err
    if not isinstance(array, np.ndarray):  # an .npz archive read through this function
        array.close()
        raise DataError(f"{path} is an .npz archive; expected one .npy array")
    return check_array(array, str(path))


def check_array(array: np.ndarray, what: str) -> np.ndarray:
    """`array` (read from `what`, a file name) if it can be data; else a :class:`DataError`
    naming `what` and the shape: no values, a dtype other than bool/integer/float, or NaN/inf."""
    shape = tuple(array.shape)
    kind = array.dtype
    if not (
        kind == np.bool_ or np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.floating)
    ):
        raise DataError(
            f"{what} holds {kind} values (shape {shape}); data must be integers or floats: "
            "save it with a numeric dtype, e.g. a.astype(np.float32)"
        )
    if array.size == 0:
        empty = "no samples" if array.ndim and shape[0] == 0 else "no values"
        raise DataError(f"{what} holds {empty} (shape {shape}); save at least one sample")
    if np.issubdtype(kind, np.floating):
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise DataError(
                f"{what} holds {bad:,} non-finite value(s) (NaN or inf) in shape {shape}; "
                "clean the data (drop those samples, or np.nan_to_num)"
            )
    return array


def unit_range(arrays: Sequence[np.ndarray], what: str) -> list[float]:
    """The stored values `[lo, hi]` that map to `[0, 1]` for all of `arrays` together.

    Booleans: `[0, 1]`; integers: their bit depth (`[0, 255]` for uint8, else `[0, 65535]`);
    floats: their joint minimum and maximum.
    """
    if not arrays or any(a.size == 0 for a in arrays):
        raise DataError(f"{what} holds no values; save at least one sample")
    dtype = np.result_type(*{a.dtype for a in arrays})
    if dtype == np.bool_:
        return [0, 1]
    if np.issubdtype(dtype, np.integer):
        lo, hi = min(int(a.min()) for a in arrays), max(int(a.max()) for a in arrays)
        if lo < 0 or hi > 65535:
            raise DataError(
                f"{what}: integer values {lo}..{hi} are outside 0..65535; "
                "save them as float32 instead (they are then min-max scaled)"
            )
        return [0, 255 if hi <= 255 and dtype == np.uint8 else 65535]
    if not np.issubdtype(dtype, np.floating):
        raise DataError(f"{what}: unsupported dtype {dtype}; use integers or floats")
    # NaN propagates through min and max, so finite bounds mean finite data.
    low, high = min(float(a.min()) for a in arrays), max(float(a.max()) for a in arrays)
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = sum(a.size - int(np.count_nonzero(np.isfinite(a))) for a in arrays)
        raise DataError(
            f"{what} holds {bad:,} non-finite value(s) (NaN or inf); clean the data "
            "(drop those samples, or np.nan_to_num)"
        )
    # The range of the float32 values that training sees (rounding keeps the order).
    with np.errstate(over="ignore"):
        lo32, hi32 = float(np.float32(low)), float(np.float32(high))
    if not (math.isfinite(lo32) and math.isfinite(hi32)):
        raise DataError(
            f"{what}: values {low:g}..{high:g} overflow float32, which training uses; rescale them"
        )
    if hi32 <= lo32:
        raise DataError(f"{what}: every value is {lo32:g}; there is nothing to learn")
    return [lo32, hi32]


def scale_to_unit(array: np.ndarray, value_range: Sequence[float]) -> torch.Tensor:
    """`array` mapped by `value_range` (from :func:`unit_range`) to float32 `[0, 1]`."""
    lo, hi = value_range
    return torch.from_numpy((array.astype(np.float32) - lo) / (hi - lo))


def to_unit_range(array: np.ndarray, what: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Scale an array to float32 `[0, 1]`; return it and how it was scaled."""
    value_range = unit_range([array], what)
    return scale_to_unit(array, value_range), {"value_range": value_range}


def _with_channels(array: np.ndarray, what: str, dims: int | None, per_sample: bool) -> np.ndarray:
    """Add the channel axis where `dims` says it is missing; check the rank."""
    lead = 1 if per_sample else 2
    if dims is not None and array.ndim == dims + lead - 1:
        array = array[:, None] if not per_sample else array[None]
    spatial = array.ndim - lead
    if spatial not in (1, 2, 3):
        layout = "(C, *spatial)" if per_sample else "(N, C, *spatial)"
        raise DataError(
            f"{what}: shape {array.shape} is not {layout} with 1, 2 or 3 spatial axes; "
            "add the channel axis, e.g. a[:, None] for single-channel data"
        )
    if dims is not None and spatial != dims:
        raise DataError(
            f"{what}: shape {array.shape} has {spatial} spatial axes but the model has dims={dims}"
        )
    return array


def _check_fits(spatial: tuple[int, ...], size: int, what: str) -> None:
    if any(s < size for s in spatial):
        raise DataError(
            f"{what}: --image-size {size} is larger than the data's spatial size "
            f"{tuple(spatial)}; arrays are cropped, never enlarged"
        )


def center_crop(x: torch.Tensor, size: int | None, what: str) -> torch.Tensor:
    """Centre-crop every spatial axis of `(N, C, *spatial)` to `size` (None keeps the size)."""
    if size is None:
        return x
    spatial = x.shape[2:]
    _check_fits(spatial, size, what)
    index = tuple(slice((s - size) // 2, (s - size) // 2 + size) for s in spatial)
    return x[(slice(None), slice(None), *index)].contiguous()


def _pick(archive: Any, keys: tuple[str, ...], path: Path, required: bool) -> np.ndarray | None:
    for key in keys:
        if key in archive.files:
            return archive[key]
    if len(archive.files) == 1 and required:
        return archive[archive.files[0]]
    if required:
        raise DataError(f"{path}: no array named {'/'.join(keys)} (it holds {archive.files})")
    return None


def load_array_source(
    path: str | Path, image_size: int | None, dims: int | None = None, seed: int = 0
) -> TensorDataset:
    """A `.npy` file, a `.npz` file or a folder of `.npy` samples as a :class:`TensorDataset`.

    Arrays are centre-cropped to `image_size`; pairs (an `.npz` with `cond`) larger than it
    become random aligned crops instead, drawn from `seed` (see :mod:`diffunet.data.crops`).
    """
    path = Path(path)
    labels = cond_array = None
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.suffix == ".npy" and not p.name.startswith(".")
        )
        if not files:
            raise DataError(f"{path} has no .npy files")
        samples = [_with_channels(load_array_file(p), str(p), dims, per_sample=True) for p in files]
        shapes = {s.shape for s in samples}
        if len(shapes) > 1:
            raise DataError(
                f"{path}: the .npy samples differ in shape ({sorted(shapes)[:3]}); "
                "every sample must have the same (C, *spatial)"
            )
        x_array = np.stack(samples)
    elif path.suffix == ".npz":
        try:
            archive = np.load(path, allow_pickle=False)
        except Exception as err:
            raise DataError(f"cannot read array file {path}: {err}") from err
        with archive:
            x_array = _pick(archive, X_KEYS, path, required=True)
            cond_array = _pick(archive, COND_KEYS, path, required=False)
            labels = _pick(archive, LABEL_KEYS, path, required=False)
        x_array = check_array(x_array, f"{path}[x]")
        if cond_array is not None:
            cond_array = check_array(cond_array, f"{path}[cond]")
        x_array = _with_channels(x_array, f"{path}[x]", dims, per_sample=False)
    else:
        x_array = _with_channels(load_array_file(path), str(path), dims, per_sample=False)

    x, info = to_unit_range(x_array, str(path))
    extra: dict[str, Any] = {"value_range": info["value_range"]}
    cond = None
    if cond_array is not None:
        cond_array = _with_channels(cond_array, f"{path}[cond]", x.ndim - 2, per_sample=False)
        if cond_array.shape[0] != x.shape[0] or cond_array.shape[2:] != x.shape[2:]:
            raise DataError(
                f"{path}: cond {cond_array.shape} does not match x {tuple(x.shape)} "
                "in samples and spatial size"
            )
        cond, cond_info = to_unit_range(cond_array, f"{path}[cond]")
        extra["cond_value_range"] = cond_info["value_range"]
    label_tensor = None
    if labels is not None:
        if (
            labels.shape != (x.shape[0],)
            or not np.issubdtype(labels.dtype, np.integer)
            or labels.min() < 0
        ):
            raise DataError(
                f"{path}: labels must be ({x.shape[0]},) non-negative integers, got "
                f"{labels.dtype} {labels.shape}"
            )
        label_tensor = torch.from_numpy(labels.astype(np.int64))
    if cond is not None and image_size is not None and any(s != image_size for s in x.shape[2:]):
        # Restoration pairs larger than the training size: random aligned crops.
        _check_fits(x.shape[2:], image_size, str(path))
        conds, xs, per_pair = crop_pairs(
            zip(cond.numpy(), x.numpy()), len(x), image_size, x.ndim - 2, seed
        )
        x, cond = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(conds))
        if label_tensor is not None:
            label_tensor = label_tensor.repeat_interleave(per_pair)
        extra.update(pairs=len(xs), crops=len(x), crops_per_pair=per_pair, crop_seed=seed)
    else:
        x = center_crop(x, image_size, str(path))
    return TensorDataset(x=x, cond=cond, labels=label_tensor, source=str(path), extra=extra)
