"""Paired folders for restoration: `input/` → `target/`, matched by file name.

`PAIRS/input/a.png` is the conditioning image (`cond`) for `PAIRS/target/a.png`; the two must
have the same size. Nothing is resized: restoration learns a pixel-to-pixel mapping, and
resampling would change the noise and the resolution it is learning about. Instead the
training samples are random *aligned* crops of `--image-size` (default 64 for images): the
same window of the input and the target, with the same random flips and 90° turns, cut at
load time from a generator seeded by the run's seed (so a resumed run sees the same samples).
Every pair gives the same number of crops, enough for a set of a few thousand samples
(:func:`~diffunet.data.crops.crops_per_source`); the counts are recorded in `extra`.

Images are read to float32 `[0, 1]` by their bit depth (16-bit keeps its precision).
`.npy` samples `(C, *spatial)` (1D, 2D or 3D) are scaled per side over all files. They are
cropped like images when `--image-size` is given and smaller than a sample; otherwise they are
used whole (and must then all have one shape), as other arrays are.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from diffunet.data.arrays import _with_channels, load_array_file, scale_to_unit, unit_range
from diffunet.data.crops import crop_pairs
from diffunet.data.dataset import DataError, TensorDataset
from diffunet.data.images import IMAGE_SUFFIXES, check_folder, read_image

PAIR_SUFFIXES = (*IMAGE_SUFFIXES, ".npy")
#: The crop side for paired images when `--image-size` is not given.
DEFAULT_PAIRED_IMAGE_SIZE = 64


def is_paired_folder(path: Path) -> bool:
    """Whether `path` is a folder with `input/` and `target/` subfolders."""
    return path.is_dir() and (path / "input").is_dir() and (path / "target").is_dir()


def _by_stem(folder: Path) -> dict[str, Path]:
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in PAIR_SUFFIXES and not p.name.startswith(".")
    )
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise DataError(
                f"{folder}: {by_stem[path.stem].name} and {path.name} share the name "
                f"{path.stem!r}; pairs are matched by name without suffix"
            )
        by_stem[path.stem] = path
    return by_stem


def _matched_paths(folder: Path) -> tuple[list[Path], list[Path]]:
    """The input and target files of `folder`, pair by pair, or an error naming the odd ones."""
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
        raise DataError(
            f"{folder}: input/ and target/ must hold the same file names; " + "; ".join(parts)
        )
    stems = sorted(targets)
    return [inputs[s] for s in stems], [targets[s] for s in stems]


def _size_text(spatial: tuple[int, ...]) -> str:
    return "×".join(map(str, spatial))


def _check_pair(
    folder: Path,
    in_path: Path,
    tg_path: Path,
    cond: np.ndarray,
    x: np.ndarray,
    dims: int,
    size: int | None,
) -> None:
    """An input and its target must have one spatial size, at least `size` on every axis."""
    in_size, tg_size = tuple(cond.shape[-dims:]), tuple(x.shape[-dims:])
    if in_size != tg_size:
        raise DataError(
            f"{folder}: input/{in_path.name} is {_size_text(in_size)} but "
            f"target/{tg_path.name} is {_size_text(tg_size)}; an input and its target "
            "must have the same size (they are cropped at the same place), so "
            "resample or crop one of them to match"
        )
    if size is not None and min(tg_size) < size:
        raise DataError(
            f"{folder}: input/{in_path.name} and target/{tg_path.name} are "
            f"{_size_text(tg_size)}, smaller than the {size}-pixel training crop; pass "
            f"a smaller --image-size (at most {min(tg_size)}) or remove the pair"
        )


def _check_alike(folder: Path, side: str, paths: list[Path], samples: list[np.ndarray]) -> None:
    """Every `.npy` sample of one side needs the first one's channels and number of axes."""
    first = samples[0]
    for path, sample in zip(paths, samples):
        if sample.ndim != first.ndim or sample.shape[0] != first.shape[0]:
            raise DataError(
                f"{folder}: {side}/{path.name} has shape {sample.shape} but "
                f"{side}/{paths[0].name} has {first.shape}; every {side} sample needs "
                "the same channels and number of axes (C, *spatial)"
            )


def _stack(crops: list[np.ndarray]) -> torch.Tensor:
    """Concatenate crops `(k, C, *spatial)`, widening grey to the largest channel count."""
    channels = max(c.shape[1] for c in crops)
    wide = [np.broadcast_to(c, (c.shape[0], channels, *c.shape[2:])) for c in crops]
    return torch.from_numpy(np.concatenate(wide)).contiguous()


def _load_images(
    folder: Path, in_paths: list[Path], tg_paths: list[Path], size: int, seed: int, augment: bool
) -> TensorDataset:
    depths: set[int] = set()

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for in_path, tg_path in zip(in_paths, tg_paths):
            (cond, in_depth), (x, tg_depth) = read_image(in_path), read_image(tg_path)
            cond, x = np.moveaxis(cond, -1, 0), np.moveaxis(x, -1, 0)  # (C, H, W)
            _check_pair(folder, in_path, tg_path, cond, x, 2, size)
            depths.update((in_depth, tg_depth))
            yield cond, x

    conds, xs, per_pair = crop_pairs(pairs(), len(in_paths), size, 2, seed, augment)
    extra = {
        "pairs": len(in_paths),
        "crops": per_pair * len(in_paths),
        "crops_per_pair": per_pair,
        "crop_seed": seed,
        "bit_depths": sorted(depths),
    }
    return TensorDataset(x=_stack(xs), cond=_stack(conds), source=str(folder), extra=extra)


def _load_npy(
    folder: Path,
    in_paths: list[Path],
    tg_paths: list[Path],
    size: int | None,
    dims: int | None,
    seed: int,
    augment: bool,
) -> TensorDataset:
    xs = [_with_channels(load_array_file(p), str(p), dims, per_sample=True) for p in tg_paths]
    dims = xs[0].ndim - 1
    conds = [_with_channels(load_array_file(p), str(p), dims, per_sample=True) for p in in_paths]
    _check_alike(folder, "target", tg_paths, xs)
    _check_alike(folder, "input", in_paths, conds)
    for in_path, tg_path, cond, x in zip(in_paths, tg_paths, conds, xs):
        _check_pair(folder, in_path, tg_path, cond, x, dims, size)
    x_range = unit_range(xs, f"{folder}/target")
    cond_range = unit_range(conds, f"{folder}/input")
    extra: dict = {"pairs": len(xs), "value_range": x_range, "cond_value_range": cond_range}
    if size is None or all(x.shape[1:] == (size,) * dims for x in xs):
        shapes = {x.shape for x in xs}  # (inputs match their targets, checked above)
        if len(shapes) > 1:
            raise DataError(
                f"{folder}/target: samples differ in shape ({sorted(shapes)[:3]}); "
                "pass --image-size N to train on random crops of side N"
            )
        x, cond = np.stack(xs), np.stack(conds)
    else:
        cond_crops, x_crops, per_pair = crop_pairs(
            zip(conds, xs), len(xs), size, dims, seed, augment
        )
        x, cond = np.concatenate(x_crops), np.concatenate(cond_crops)
        extra.update(crops=len(x), crops_per_pair=per_pair, crop_seed=seed)
    return TensorDataset(
        x=scale_to_unit(x, x_range),
        cond=scale_to_unit(cond, cond_range),
        source=str(folder),
        extra=extra,
    )


def load_paired_folder(
    folder: str | Path,
    image_size: int | None,
    dims: int | None = None,
    seed: int = 0,
    augment: bool = True,
) -> TensorDataset:
    """`folder/input` and `folder/target` as a :class:`TensorDataset` whose `cond` is the input.

    Images (and `.npy` samples larger than `image_size`) become random aligned crops of side
    `image_size`, drawn from `seed`; `augment` adds random flips and 90° turns.
    """
    folder = Path(folder)
    in_paths, tg_paths = _matched_paths(folder)
    kinds = {p.suffix.lower() == ".npy" for p in in_paths + tg_paths}
    if len(kinds) > 1:
        raise DataError(f"{folder}: mix of .npy and image files; use one kind for all pairs")
    if kinds == {True}:
        return _load_npy(folder, in_paths, tg_paths, image_size, dims, seed, augment)
    size = DEFAULT_PAIRED_IMAGE_SIZE if image_size is None else image_size
    return _load_images(folder, in_paths, tg_paths, size, seed, augment)
