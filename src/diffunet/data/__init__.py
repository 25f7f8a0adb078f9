"""Training data: the embedded digits and EM-like pairs, image folders, NumPy arrays, pairs.

`open_dataset(spec, image_size)` turns the `--data` value into a :class:`TensorDataset`:

| `--data`                                   | what it loads                                  |
|--------------------------------------------|------------------------------------------------|
| `digits` (default)                         | scikit-learn's handwritten digits, labelled    |
| `em-pairs` (default for `--task restore`)  | noisy → clean crops of scikit-image's pictures |
| a folder with `input/` and `target/`       | pairs for restoration; the input is `cond`;    |
|                                            | random aligned crops at native resolution      |
| a folder of images (PNG/JPEG/TIFF/BMP)     | every image, resized and centre-cropped        |
| a `.npy` / `.npz` file, a folder of `.npy` | 1D signals, 2D images or 3D volumes            |

`task` says what the data is for: `restore` needs pairs (a `cond`); `generate` trains on the
targets alone (a pair's input is dropped); None infers it (pairs → restore).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from diffunet.data.arrays import load_array_source
from diffunet.data.dataset import DataError, TensorDataset
from diffunet.data.digits import digits_arrays, load_digits_dataset, resize_digits
from diffunet.data.em_pairs import em_pairs_dataset
from diffunet.data.images import list_images, load_image_folder, read_image
from diffunet.data.paired import is_paired_folder, load_paired_folder

EMBEDDED = ("digits", "em-pairs")
TASKS = ("restore", "generate")


def open_dataset(
    spec: str,
    image_size: int | None = None,
    dims: int | None = None,
    *,
    task: str | None = None,
    seed: int = 0,
) -> TensorDataset:
    """Load the data named by `spec` (see the module docstring) at `image_size`, for `task`.

    `dims`, when given, is the model's dimensionality; arrays without a channel axis are
    accepted for it. `seed` fixes the random crops of restoration pairs.
    """
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"--image-size must be a positive integer, got {image_size!r}")
    if task not in (None, *TASKS):
        raise DataError(f"--task {task!r} is invalid: expected one of {', '.join(TASKS)}")
    data = _load(spec, image_size, dims, seed)
    if task == "restore" and data.cond is None:
        raise DataError(
            f"--task restore needs paired data, but {spec!r} has no inputs to restore "
            "from; pass a folder with input/ and target/ subfolders, an .npz with "
            "'cond' (or 'input') next to 'x', or --data em-pairs (the embedded EM-like pairs)"
        )
    if task == "generate" and data.cond is not None:
        extra = {k: v for k, v in data.extra.items() if k != "cond_value_range"}
        extra["inputs"] = "dropped (--task generate trains on the targets only)"
        return dataclasses.replace(data, cond=None, extra=extra)
    return data


def _load(spec: str, image_size: int | None, dims: int | None, seed: int) -> TensorDataset:
    if spec == "digits":
        return load_digits_dataset(image_size)
    if spec == "em-pairs":
        if dims not in (None, 2):
            raise DataError(
                f"em-pairs are 2D images but the model has dims={dims}; use a 2D "
                "preset such as emdiffuse"
            )
        return em_pairs_dataset(image_size, seed=seed)
    path = Path(spec)
    if not path.exists():
        raise DataError(
            f"data {spec!r} is neither an embedded set ({', '.join(EMBEDDED)}) nor an "
            "existing file or folder"
        )
    if path.is_file():
        if path.suffix in (".npy", ".npz"):
            return load_array_source(path, image_size, dims, seed)
        raise DataError(f"data file {path} is not a .npy/.npz array; for images pass their folder")
    if is_paired_folder(path):
        return load_paired_folder(path, image_size, dims, seed)
    has_npy = any(p.suffix == ".npy" for p in path.iterdir())
    if has_npy and not list_images(path):
        return load_array_source(path, image_size, dims, seed)
    return load_image_folder(path, image_size)


__all__ = [
    "EMBEDDED",
    "TASKS",
    "DataError",
    "TensorDataset",
    "digits_arrays",
    "list_images",
    "load_array_source",
    "load_digits_dataset",
    "load_image_folder",
    "load_paired_folder",
    "open_dataset",
    "read_image",
    "resize_digits",
]
