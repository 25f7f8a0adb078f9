"""Image files: PNG, JPEG, TIFF and BMP; 8- or 16-bit; greyscale or RGB.

Every image is decoded once, converted to float32 in `[0, 1]` (8-bit / 255, 16-bit / 65535),
its shorter side resized to the training size (antialiased bilinear) and centre-cropped to a
square. A file that cannot be decoded stops the run before anything is written, naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffunet.data.dataset import DataError, TensorDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively, sorted, hidden files skipped)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _scale(array: np.ndarray, path: Path) -> tuple[np.ndarray, int]:
    """Integer images → [0, 1] by their bit depth; float images must already be in [0, 1]."""
    if array.dtype == np.bool_:
        return array.astype(np.float32), 1
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0, 8
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise DataError(
                f"{path}: integer pixel values {array.min()}..{array.max()} are "
                "outside the 16-bit range 0..65535"
            )
        return array.astype(np.float32) / 65535.0, 16
    if np.issubdtype(array.dtype, np.floating):
        lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if not np.isfinite(array).all() or lo < 0.0 or hi > 1.0:
            raise DataError(
                f"{path}: floating-point pixels must be finite and in [0, 1], got "
                f"{lo:g}..{hi:g}; save 8/16-bit integers or rescale the image"
            )
        return array.astype(np.float32), 32
    raise DataError(f"{path}: unsupported pixel type {array.dtype}")


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    array = tifffile.imread(path)
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"{path}: a {array.shape} TIFF looks like a stack or volume; train on "
            "volumes from .npy/.npz arrays (N, C, D, H, W) instead"
        )
    if array.ndim not in (2, 3):
        raise DataError(f"{path}: expected a 2D greyscale or RGB image, got shape {array.shape}")
    return array


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        mode = image.mode
        if mode in ("1", "L", "RGB") or mode.startswith("I") or mode == "F":
            converted = image
        elif mode in ("LA", "La"):
            converted = image.convert("L")
        else:  # P, RGBA, CMYK, YCbCr, ...
            converted = image.convert("RGB")
        return np.array(converted)


def read_image(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode one image to `(H, W, C)` float32 in `[0, 1]` (C = 1 or 3) and its bit depth."""
    path = Path(path)
    try:
        is_tiff = path.suffix.lower() in (".tif", ".tiff")
        array = _read_tiff(path) if is_tiff else _read_pil(path)
    except DataError:
        raise
    except Exception as err:  # PIL/tifffile raise many types for corrupt files
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"cannot read image {path}: {reason}") from err
    array, depth = _scale(array, path)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[-1] == 4:
        array = array[:, :, :3]
    if array.shape[-1] not in (1, 3):
        raise DataError(f"{path}: expected 1 (grey) or 3 (RGB) channels, got {array.shape[-1]}")
    if min(array.shape[:2]) < 1:
        raise DataError(f"{path}: empty image of shape {array.shape}")
    return array, depth


def resize_and_crop(image: np.ndarray, size: int) -> torch.Tensor:
    """`(H, W, C)` → `(C, size, size)`: shorter side to `size` (antialiased), centre crop."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    h, w = tensor.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        tensor = F.interpolate(
            tensor, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return tensor[0, :, top : top + size, left : left + size].clamp(0.0, 1.0).contiguous()


def load_images(paths: list[Path], size: int) -> tuple[torch.Tensor, set[int]]:
    """Decode, resize and stack `paths` to `(N, C, size, size)`; grey is widened to RGB if mixed."""
    images, depths = [], set()
    for path in paths:
        array, depth = read_image(path)
        images.append(resize_and_crop(array, size))
        depths.add(depth)
    channels = max(image.shape[0] for image in images)
    stacked = torch.stack([image.expand(channels, -1, -1) for image in images])
    return stacked, depths


def check_folder(folder: Path, what: str = "data folder") -> list[Path]:
    """The images of `folder`, or a :class:`DataError` for a missing, non-folder or empty one."""
    if not folder.exists():
        raise DataError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{what} {folder} is not a folder")
    paths = list_images(folder)
    if not paths:
        others = [p.name for p in folder.rglob("*") if p.is_file()][:3]
        found = f" (found other files, e.g. {', '.join(others)})" if others else " (it is empty)"
        raise DataError(
            f"{what} {folder} has no images with suffix {'/'.join(IMAGE_SUFFIXES)}{found}"
        )
    return paths


def load_image_folder(folder: str | Path, image_size: int | None) -> TensorDataset:
    """Every image under `folder` as an unlabelled :class:`TensorDataset` at `image_size`."""
    folder = Path(folder)
    paths = check_folder(folder)
    size = 32 if image_size is None else image_size
    x, depths = load_images(paths, size)
    return TensorDataset(
        x=x, source=str(folder), extra={"files": len(paths), "bit_depths": sorted(depths)}
    )
