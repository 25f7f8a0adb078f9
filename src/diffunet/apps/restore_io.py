"""Files in and out of `diffunet restore`: images, TIFF stacks and `.npy` volumes.

Inputs are greyscale 2D images (PNG, JPEG, BMP, TIFF; 8 or 16 bit; an RGB file whose three
channels are equal counts as grey) or 3D volumes (`.npy` `(D, H, W)`, or a multi-page TIFF
stack). Each is read into float32 `[0, 1]` together with what is needed to write the result
back in the same form:

| input                        | restored image              | uncertainty map            |
|------------------------------|-----------------------------|----------------------------|
| 8-bit PNG / JPEG / BMP       | 8-bit PNG                   | float32 TIFF               |
| 16-bit PNG                   | 16-bit TIFF                 | float32 TIFF               |
| TIFF (8/16-bit, float)       | TIFF of the same dtype      | float32 TIFF               |
| `.npy` (any numeric dtype)   | `.npy` of the same dtype    | float32 `.npy`             |

The uncertainty map is a standard deviation in the input's own intensity units (grey levels
for integer images). A side-by-side PNG (input | restored | uncertainty; the middle slice of a
volume) is written next to them.

Clean targets (`--target`) are read like inputs, into the same [0, 1] units. `--input em-pairs`
(or `em-pairs:coins`, `em-pairs:page`) names the embedded held-out pictures instead of files:
noisy 8-bit inputs that bring their clean targets along.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffunet.data.arrays import load_array_file
from diffunet.data.dataset import DataError
from diffunet.data.em_pairs import HELD_OUT_IMAGES, held_out_pairs
from diffunet.data.images import read_image
from diffunet.errors import InvalidValueError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
ARRAY_SUFFIXES = (".npy",)
INPUT_SUFFIXES = IMAGE_SUFFIXES + TIFF_SUFFIXES + ARRAY_SUFFIXES
GAP = 4  # pixels between the panels of the side-by-side PNG
#: `--input` for the embedded held-out pictures (`em-pairs` or `em-pairs:NAME`).
EMBEDDED_INPUT = "em-pairs"


@dataclass
class RestoreInput:
    """One input: `pixels` float32 in [0, 1] with 2 or 3 axes, and how to write results back.

    `value_range` `(lo, hi)` maps [0, 1] back to stored values (`lo + (hi − lo) · v`); `dtype`
    is the stored pixel type and `kind` the file kind (`image`, `tiff` or `npy`).
    """

    path: Path
    pixels: np.ndarray
    dtype: np.dtype
    value_range: tuple[float, float]
    kind: str

    @property
    def bit_depth(self) -> str:
        """A short description of the stored pixel type, e.g. `8-bit` or `float32`."""
        if np.issubdtype(self.dtype, np.integer):
            return f"{8 * self.dtype.itemsize}-bit"
        return str(self.dtype)


def list_inputs(path: str | Path) -> list[Path]:
    """The input files named by `--input`: the file itself, or the supported files of a folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"--input {path} does not exist; pass an image, a volume (.npy, .tif "
            "stack) or a folder of them"
        )
    if path.is_file():
        if path.suffix.lower() not in INPUT_SUFFIXES:
            raise DataError(
                f"--input {path} has an unsupported suffix {path.suffix!r}; expected "
                f"one of {' '.join(INPUT_SUFFIXES)}"
            )
        return [path]
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in INPUT_SUFFIXES
    )
    if not files:
        raise DataError(
            f"--input folder {path} holds no images or volumes with suffix "
            f"{' '.join(INPUT_SUFFIXES)}"
        )
    stems: dict[str, Path] = {}
    for file in files:
        if file.stem in stems:
            raise DataError(
                f"--input folder {path}: {stems[file.stem].name} and {file.name} "
                "would write the same output names; rename one"
            )
        stems[file.stem] = file
    return files


def _integer_range(array: np.ndarray, path: Path) -> tuple[float, float]:
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise DataError(
            f"{path}: integer pixel values {lo}..{hi} are outside the 16-bit range "
            "0..65535; save the data as float32 instead"
        )
    return (0.0, 255.0) if array.dtype == np.uint8 else (0.0, 65535.0)


def _float_range(
    array: np.ndarray, path: Path, recorded: tuple[float, float] | None
) -> tuple[float, float]:
    if not np.isfinite(array).all():
        raise DataError(f"{path}: contains NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if recorded is not None:
        return float(recorded[0]), float(recorded[1])
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    if hi <= lo:
        raise DataError(f"{path}: every value is {lo:g}; there is nothing to restore")
    return lo, hi


def to_unit(
    array: np.ndarray, path: Path, float_range: tuple[float, float] | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """Scale stored pixels to float32 [0, 1]: integers by their bit depth (8 or 16 bit), floats
    by `float_range` (the range the model was trained on), else [0, 1] when they fit, else their
    own minimum and maximum."""
    if array.dtype == np.bool_:
        return array.astype(np.float32), (0.0, 1.0)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = _integer_range(array, path)
    elif np.issubdtype(array.dtype, np.floating):
        lo, hi = _float_range(array, path, float_range)
    else:
        raise DataError(f"{path}: unsupported pixel type {array.dtype}")
    unit = (array.astype(np.float64) - lo) / (hi - lo)
    return np.clip(unit, 0.0, 1.0).astype(np.float32), (lo, hi)


def _as_grey(array: np.ndarray, path: Path) -> np.ndarray:
    """`(H, W)` from `(H, W)`, `(H, W, 1)` or an RGB(A) image whose colour channels are equal."""
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        colour = array[..., :3] if array.shape[-1] >= 3 else array
        if colour.shape[-1] == 3 and not (
            np.array_equal(colour[..., 0], colour[..., 1])
            and np.array_equal(colour[..., 0], colour[..., 2])
        ):
            raise DataError(
                f"{path}: a colour image; restoration models here are greyscale, so "
                "convert it to greyscale first"
            )
        array = colour[..., 0]
    return array


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        array = tifffile.imread(path)
    except Exception as err:  # tifffile raises many types for corrupt files
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"cannot read TIFF {path}: {reason}") from err
    array = np.squeeze(array)
    if array.ndim == 3 and array.shape[-1] in (3, 4) and min(array.shape[:2]) > 4:
        array = _as_grey(array, path)
    return array


def _read_npy(path: Path) -> np.ndarray:
    array = load_array_file(path)  # refuses pickles, archives, empty, non-numeric, NaN / inf
    if array.ndim in (3, 4) and array.shape[0] == 1:  # a leading channel axis of 1
        array = array[0]
    return array


def _read_stored(
    path: Path, float_range: tuple[float, float] | None
) -> tuple[np.ndarray, np.dtype, tuple[float, float], str]:
    """Pixels in [0, 1] (any number of axes), stored dtype, value range and file kind of `path`."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        unit, depth = read_image(path)
        if unit.shape[-1] == 3 and not (
            np.array_equal(unit[..., 0], unit[..., 1])
            and np.array_equal(unit[..., 0], unit[..., 2])
        ):
            raise DataError(
                f"{path}: a colour image; restoration models here are greyscale, so "
                "convert it to greyscale first"
            )
        dtype = np.dtype(np.uint16) if depth == 16 else np.dtype(np.uint8)
        scale = 65535.0 if depth == 16 else 255.0
        return unit[..., 0], dtype, (0.0, scale), "image"
    array = _read_tiff(path) if suffix in TIFF_SUFFIXES else _read_npy(path)
    pixels, value_range = to_unit(array, path, float_range)
    dtype, kind = array.dtype, "tiff" if suffix in TIFF_SUFFIXES else "npy"
    if dtype == np.bool_:
        dtype = np.dtype(np.uint8)
        value_range = (0.0, 255.0)
    return pixels, np.dtype(dtype), value_range, kind


def read_input(
    path: str | Path, dims: int, float_range: tuple[float, float] | None = None
) -> RestoreInput:
    """Read one input for a model with `dims` spatial axes (2: images, 3: volumes).

    Raises a one-line :class:`DataError` naming the file for unreadable files, colour images
    and inputs whose number of axes does not match the model.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--input {path} does not exist or is not a file")
    pixels, dtype, value_range, kind = _read_stored(path, float_range)
    if pixels.ndim != dims:
        what = {2: "a 2D image (H, W)", 3: "a 3D volume (D, H, W)"}.get(
            pixels.ndim, f"{pixels.ndim} axes"
        )
        need = {2: "a 2D image", 3: "a 3D volume (.npy or a TIFF stack)"}[dims]
        fix = (
            "use a dims=3 model (e.g. preset emdiffuse-3d)"
            if pixels.ndim == 3
            else "use a dims=2 model (e.g. preset emdiffuse)"
        )
        raise DataError(
            f"{path} is {what} of shape {pixels.shape} but the model is {dims}D and "
            f"restores {need}; {fix}"
        )
    if min(pixels.shape) < 1:
        raise DataError(f"{path}: empty input of shape {pixels.shape}")
    return RestoreInput(path, np.ascontiguousarray(pixels), dtype, value_range, kind)


# ---------------------------------------------------------------------------- clean targets
def match_targets(inputs: list[Path], target: str | Path) -> list[Path]:
    """The clean reference of each input named by `--target`: the file itself (one input), or
    the file of the same name in a folder (else the only one with the same stem)."""
    target = Path(target)
    if not target.exists():
        raise DataError(
            f"--target {target} does not exist; pass the clean image of the input, or a "
            "folder of clean images named like the inputs"
        )
    if target.is_file():
        if len(inputs) != 1:
            raise DataError(
                f"--target {target} is one file but --input names {len(inputs)} files; pass "
                "a folder of clean images named like the inputs"
            )
        return [target]
    matched = []
    for file in inputs:
        same_name = target / file.name
        same_stem = sorted(
            p
            for p in target.iterdir()
            if p.stem == file.stem and p.is_file() and p.suffix.lower() in INPUT_SUFFIXES
        )
        if same_name.is_file():
            matched.append(same_name)
        elif len(same_stem) == 1:
            matched.append(same_stem[0])
        else:
            found = f"{len(same_stem)} files named {file.stem}.*" if same_stem else "none"
            raise DataError(
                f"--target folder {target} has no clean image for input {file.name} "
                f"(looked for {file.name}, else one {file.stem}.* file; found {found}); "
                "name each clean image like its input"
            )
    return matched


def read_target(path: str | Path, source: RestoreInput) -> np.ndarray:
    """The clean image at `path` in the [0, 1] units of `source` (the input it belongs to).

    Read like an input: integers by their bit depth, floats in the input's value range. Raises
    a one-line :class:`DataError` when its shape differs from the input's.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--target {path} does not exist or is not a file")
    pixels = _read_stored(path, source.value_range)[0]
    if pixels.shape != source.pixels.shape:
        raise DataError(
            f"--target {path} has shape {pixels.shape} but its input {source.path.name} has "
            f"{source.pixels.shape}; the clean image must match the input pixel for pixel"
        )
    return np.ascontiguousarray(pixels)


# ---------------------------------------------------------------------------- em-pairs
def is_embedded(spec: str | Path) -> bool:
    """Whether `--input` names the embedded held-out pictures (`em-pairs`, `em-pairs:NAME`)."""
    text = str(spec)
    return text == EMBEDDED_INPUT or text.startswith(EMBEDDED_INPUT + ":")


def embedded_names(spec: str) -> tuple[str, ...]:
    """The held-out pictures named by `--input em-pairs` (all) or `em-pairs:NAME`."""
    choices = ", ".join([EMBEDDED_INPUT, *(f"{EMBEDDED_INPUT}:{name}" for name in HELD_OUT_IMAGES)])
    if spec == EMBEDDED_INPUT:
        return HELD_OUT_IMAGES
    name = spec.partition(":")[2]
    if name not in HELD_OUT_IMAGES:
        raise DataError(
            f"--input {spec}: {name!r} is not an embedded held-out picture; expected one of "
            f"{choices}"
        )
    return (name,)


def embedded_inputs(names: tuple[str, ...], dims: int) -> list[tuple[RestoreInput, np.ndarray]]:
    """The noisy held-out pictures `names` as 8-bit inputs, each with its clean target.

    They are the benchmark's evaluation pairs (:func:`diffunet.data.em_pairs.held_out_pairs`),
    the noise rounded to 8 bits as in a pair folder, so `NAME_input.png` holds exactly what was
    restored.
    """
    if dims != 2:
        raise DataError(
            f"--input {EMBEDDED_INPUT} holds 2D pictures but the model is {dims}D; use a "
            "dims=2 model (e.g. preset emdiffuse)"
        )
    inputs = []
    for pair in held_out_pairs():
        if pair.name in names:
            noisy = np.rint(np.clip(pair.noisy, 0.0, 1.0) * 255) / 255
            source = RestoreInput(
                Path(f"{pair.name}.png"),
                noisy.astype(np.float32),
                np.dtype(np.uint8),
                (0.0, 255.0),
                "image",
            )
            inputs.append((source, pair.clean))
    return inputs


def from_unit(unit: np.ndarray, source: RestoreInput) -> np.ndarray:
    """Pixels in [0, 1] back to the input's stored type and range (integers rounded)."""
    lo, hi = source.value_range
    values = lo + (hi - lo) * np.clip(unit.astype(np.float64), 0.0, 1.0)
    if np.issubdtype(source.dtype, np.integer):
        info = np.iinfo(source.dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(source.dtype)
    return values.astype(source.dtype if np.issubdtype(source.dtype, np.floating) else np.float32)


def output_paths(source: RestoreInput, out_dir: Path) -> dict[str, Path]:
    """Where the restored image, the uncertainty map and the side-by-side PNG go."""
    stem = source.path.stem
    if source.kind == "npy":
        restored, uncertainty = f"{stem}_restored.npy", f"{stem}_uncertainty.npy"
    elif source.kind == "tiff" or source.dtype != np.uint8:
        restored, uncertainty = f"{stem}_restored.tif", f"{stem}_uncertainty.tif"
    else:
        restored, uncertainty = f"{stem}_restored.png", f"{stem}_uncertainty.tif"
    return {
        "restored": out_dir / restored,
        "uncertainty": out_dir / uncertainty,
        "comparison": out_dir / f"{stem}_comparison.png",
    }


def comparison_image(noisy: np.ndarray, restored: np.ndarray, std: np.ndarray) -> np.ndarray:
    """input | restored | uncertainty as one 8-bit image; volumes show their middle slice.

    The uncertainty panel is scaled so its 99.5th percentile is white.
    """
    if noisy.ndim == 3:
        middle = noisy.shape[0] // 2
        noisy, restored, std = noisy[middle], restored[middle], std[middle]
    top = float(np.percentile(std, 99.5)) if std.size else 0.0
    shown = std / top if top > 0 else np.zeros_like(std)
    panels = [np.clip(p, 0.0, 1.0) for p in (noisy, restored, shown)]
    height, width = noisy.shape
    canvas = np.ones((height, 3 * width + 2 * GAP), dtype=np.float64)
    for index, panel in enumerate(panels):
        left = index * (width + GAP)
        canvas[:, left : left + width] = panel
    return np.rint(canvas * 255).astype(np.uint8)


def _write(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        np.save(path, array)
    elif suffix in TIFF_SUFFIXES:
        import tifffile

        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)


def write_outputs(
    source: RestoreInput, restored: np.ndarray, std: np.ndarray, out_dir: str | Path
) -> dict[str, Path]:
    """Write the restored image, the uncertainty map and the side-by-side PNG.

    `restored` and `std` are float arrays in the [0, 1] units of `source.pixels`, of its shape.
    """
    if restored.shape != source.pixels.shape or std.shape != source.pixels.shape:
        raise InvalidValueError(
            f"restored {restored.shape} and std {std.shape} must have the input's "
            f"shape {source.pixels.shape}"
        )
    paths = output_paths(source, Path(out_dir))
    lo, hi = source.value_range
    _write(paths["restored"], from_unit(restored, source))
    _write(paths["uncertainty"], (std.astype(np.float64) * (hi - lo)).astype(np.float32))
    _write(paths["comparison"], comparison_image(source.pixels, restored, std))
    return paths


def write_references(
    source: RestoreInput, clean: np.ndarray, out_dir: str | Path
) -> dict[str, Path]:
    """Write the input itself (`NAME_input`) and its clean target (`NAME_target`) next to the
    results, in the restored image's format: for inputs that are not files of their own."""
    suffix = output_paths(source, Path(out_dir))["restored"].suffix
    paths = {
        "input": Path(out_dir) / f"{source.path.stem}_input{suffix}",
        "target": Path(out_dir) / f"{source.path.stem}_target{suffix}",
    }
    _write(paths["input"], from_unit(source.pixels, source))
    _write(paths["target"], from_unit(clean, source))
    return paths
