"""Paired folders for restoration: `input/` → `target/`, matched by file name.

`PAIRS/input/a.png` is the conditioning image (`cond`) for `PAIRS/target/a.png`. Images are
resized and centre-cropped the same way on both sides; `.npy` samples `(C, *spatial)` are used
as they are (centre-cropped to `--image-size` when given).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .arrays import _with_channels, center_crop, load_array_file, to_unit_range
from .dataset import DataError, TensorDataset
from .images import IMAGE_SUFFIXES, check_folder, load_images

PAIR_SUFFIXES = (*IMAGE_SUFFIXES, ".npy")


def is_paired_folder(path: Path) -> bool:
    """Whether `path` is a folder with `input/` and `target/` subfolders."""
    return path.is_dir() and (path / "input").is_dir() and (path / "target").is_dir()


def _by_stem(folder: Path) -> dict[str, Path]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in PAIR_SUFFIXES and not p.name.startswith("."))
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise DataError(f"{folder}: {by_stem[path.stem].name} and {path.name} share the name "
                            f"{path.stem!r}; pairs are matched by name without suffix")
        by_stem[path.stem] = path
    return by_stem


def _load_npy(paths: list[Path], dims: int | None, size: int | None, what: str):
    samples = [_with_channels(load_array_file(p), str(p), dims, per_sample=True) for p in paths]
    shapes = {s.shape for s in samples}
    if len(shapes) > 1:
        raise DataError(f"{what}: samples differ in shape ({sorted(shapes)[:3]})")
    tensor, info = to_unit_range(np.stack(samples), what)
    return center_crop(tensor, size, what), info["value_range"]


def load_paired_folder(folder: str | Path, image_size: int | None,
                       dims: int | None = None) -> TensorDataset:
    """`folder/input` and `folder/target` as a :class:`TensorDataset` whose `cond` is the input."""
    folder = Path(folder)
    inputs, targets = _by_stem(folder / "input"), _by_stem(folder / "target")
    if not targets:
        check_folder(folder / "target", "target folder")
    only_in = sorted(set(inputs) - set(targets))
    only_tg = sorted(set(targets) - set(inputs))
    if only_in or only_tg:
        parts = []
        if only_in:
            parts.append(f"{len(only_in)} input(s) without a target, e.g. {only_in[:3]}")
        if only_tg:
            parts.append(f"{len(only_tg)} target(s) without an input, e.g. {only_tg[:3]}")
        raise DataError(f"{folder}: input/ and target/ must hold the same file names; "
                        + "; ".join(parts))
    stems = sorted(targets)
    in_paths, tg_paths = [inputs[s] for s in stems], [targets[s] for s in stems]
    kinds = {p.suffix.lower() == ".npy" for p in in_paths + tg_paths}
    if len(kinds) > 1:
        raise DataError(f"{folder}: mix of .npy and image files; use one kind for all pairs")
    extra: dict = {"pairs": len(stems)}
    if kinds == {True}:
        x, extra["value_range"] = _load_npy(tg_paths, dims, image_size, f"{folder}/target")
        cond, extra["cond_value_range"] = _load_npy(in_paths, x.ndim - 2, image_size,
                                                    f"{folder}/input")
        if cond.shape[2:] != x.shape[2:]:
            raise DataError(f"{folder}: input samples {tuple(cond.shape[2:])} and targets "
                            f"{tuple(x.shape[2:])} differ in spatial size")
    else:
        size = 64 if image_size is None else image_size
        x, depths = load_images(tg_paths, size)
        cond, in_depths = load_images(in_paths, size)
        extra["bit_depths"] = sorted(depths | in_depths)
    return TensorDataset(x=x, cond=cond, source=str(folder), extra=extra)
