"""Training data: the embedded digits, image folders, NumPy arrays and paired folders.

`open_dataset(spec, image_size)` turns the `--data` value into a :class:`TensorDataset`:

| `--data`                                   | what it loads                                  |
|--------------------------------------------|------------------------------------------------|
| `digits` (default)                         | scikit-learn's handwritten digits, labelled    |
| a folder with `input/` and `target/`       | pairs for restoration; the input is `cond`     |
| a folder of images (PNG/JPEG/TIFF/BMP)     | every image, resized and centre-cropped        |
| a `.npy` / `.npz` file, a folder of `.npy` | 1D signals, 2D images or 3D volumes            |
"""

from __future__ import annotations

from pathlib import Path

from .arrays import load_array_source
from .dataset import DataError, TensorDataset
from .digits import digits_arrays, load_digits_dataset, resize_digits
from .images import list_images, load_image_folder, read_image
from .paired import is_paired_folder, load_paired_folder

EMBEDDED = ("digits",)


def open_dataset(spec: str, image_size: int | None = None, dims: int | None = None) -> TensorDataset:
    """Load the data named by `spec` (see the module docstring) at `image_size`.

    `dims`, when given, is the model's dimensionality; arrays without a channel axis are
    accepted for it.
    """
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"--image-size must be a positive integer, got {image_size!r}")
    if spec == "digits":
        return load_digits_dataset(image_size)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data {spec!r} is neither an embedded set ({', '.join(EMBEDDED)}) nor an "
                        "existing file or folder")
    if path.is_file():
        if path.suffix in (".npy", ".npz"):
            return load_array_source(path, image_size, dims)
        raise DataError(f"data file {path} is not a .npy/.npz array; for images pass their folder")
    if is_paired_folder(path):
        return load_paired_folder(path, image_size, dims)
    has_npy = any(p.suffix == ".npy" for p in path.iterdir())
    if has_npy and not list_images(path):
        return load_array_source(path, image_size, dims)
    return load_image_folder(path, image_size)


__all__ = [
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
