"""The embedded restoration data: scikit-image's greyscale pictures with EM-like noise.

Electron micrographs recorded with a short dwell time are dominated by shot noise (the
number of electrons that reach a pixel is Poisson-distributed around a mean proportional to
the local signal) plus the detector's additive read noise. :class:`PoissonGaussianNoise`
models exactly that, and :class:`EMPairs` turns the pictures that ship inside scikit-image
(no network needed) into noisy → clean training pairs by random aligned crops.

Two whole pictures are never used for training: `coins` (bright particles on a dark
background, the closest to EM particle images) and `page` (thin high-contrast strokes, like
membranes). :meth:`EMPairs.evaluation_pairs` returns them, whole, with noise drawn from a
fixed seed, for measuring restoration quality (`benchmarks/restoration_quality.py`).

Everything is a function of the seed: the same seed gives the same crops and the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from diffunet.data.crops import crops_per_source, random_window
from diffunet.data.dataset import DataError, TensorDataset
from diffunet.errors import InvalidValueError

#: The pictures used for training (all load from scikit-image without a network).
TRAIN_IMAGES = ("camera", "moon", "brick", "grass", "gravel", "text", "clock", "horse", "cell")
#: The pictures kept out of training, for evaluation.
HELD_OUT_IMAGES = ("coins", "page")
ALL_IMAGES = TRAIN_IMAGES + HELD_OUT_IMAGES
#: The seed of the noise on the held-out pictures (:func:`held_out_pairs`).
EVALUATION_SEED = 1234
#: Gaussian blur (pixels) that gives the binary `horse` silhouette the soft edges of an image.
BINARY_EDGE_SIGMA = 1.0


@dataclass(frozen=True)
class PoissonGaussianNoise:
    """Shot noise plus read noise: `noisy = Poisson(photons · clean) / photons + N(0, read_noise²)`.

    `clean` is in [0, 1], where 1 is the brightest signal; `photons` is the mean number of
    electrons a pixel of intensity 1 collects (20: a low-dose, short-dwell-time image whose
    relative noise is 1/sqrt(20) ≈ 22 % at full intensity and more in dark regions);
    `read_noise` is the standard deviation of the detector's Gaussian noise, in units of the
    full intensity. The result is clipped to [0, 1], as a detector saturates and an image file
    stores no negative values.
    """

    photons: float = 20.0
    read_noise: float = 0.02

    def __post_init__(self) -> None:
        if not (isinstance(self.photons, (int, float)) and self.photons > 0):
            raise InvalidValueError(
                f"photons={self.photons!r} is invalid: expected a positive number "
                "(electrons per pixel at full intensity; 20 is a low dose)"
            )
        if not (isinstance(self.read_noise, (int, float)) and self.read_noise >= 0):
            raise InvalidValueError(
                f"read_noise={self.read_noise!r} is invalid: expected a number >= 0 "
                "(detector noise std in units of full intensity; 0.02 is typical)"
            )

    def __call__(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A noisy float32 copy of `clean` (values in [0, 1]), drawn from `rng`."""
        counts = rng.poisson(np.clip(clean, 0.0, 1.0).astype(np.float64) * self.photons)
        noisy = counts / self.photons + rng.normal(0.0, self.read_noise, clean.shape)
        return np.clip(noisy, 0.0, 1.0).astype(np.float32)

    def std(self, clean: np.ndarray) -> np.ndarray:
        """The per-pixel noise standard deviation at intensity `clean` (before clipping)."""
        return np.sqrt(np.clip(clean, 0.0, 1.0) / self.photons + self.read_noise**2)

    def describe(self) -> dict[str, float | str]:
        """JSON-ready description, for logs and run metadata."""
        return {
            "model": "poisson-gaussian",
            "photons": float(self.photons),
            "read_noise": float(self.read_noise),
        }


def load_picture(name: str) -> np.ndarray:
    """The scikit-image picture `name` as float32 `(H, W)` in [0, 1].

    Binary pictures (`horse`) are blurred by :data:`BINARY_EDGE_SIGMA` pixels.
    """
    import skimage.data
    from skimage.filters import gaussian

    if name not in ALL_IMAGES:
        raise DataError(f"unknown picture {name!r}; expected one of {', '.join(ALL_IMAGES)}")
    image = getattr(skimage.data, name)()
    if image.dtype == np.bool_:
        return gaussian(image.astype(np.float64), sigma=BINARY_EDGE_SIGMA).astype(np.float32)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise DataError(
            f"scikit-image picture {name!r} is {image.dtype} {image.shape}; "
            "expected an 8-bit greyscale image"
        )
    return image.astype(np.float32) / 255.0


class EvalPair(NamedTuple):
    """A whole held-out picture: its name, the noisy input and the clean target, `(H, W)`."""

    name: str
    noisy: np.ndarray
    clean: np.ndarray


class EMPairs:
    """Noisy → clean pairs from scikit-image's pictures, with held-out pictures for evaluation.

    Args:
        crop: side of the square training crops in pixels.
        noise: the noise model (default: 20 photons at full intensity, read noise 0.02).
        train: the pictures to crop from.
        held_out: the pictures never cropped from (at least two, disjoint from `train`).
        augment: randomly flip and rotate crops by multiples of 90°.
    """

    def __init__(
        self,
        crop: int = 64,
        noise: PoissonGaussianNoise | None = None,
        *,
        train: tuple[str, ...] = TRAIN_IMAGES,
        held_out: tuple[str, ...] = HELD_OUT_IMAGES,
        augment: bool = True,
    ) -> None:
        train, held_out = tuple(train), tuple(held_out)
        unknown = sorted(set(train + held_out) - set(ALL_IMAGES))
        if unknown:
            raise DataError(
                f"unknown picture(s) {unknown}; expected names from {', '.join(ALL_IMAGES)}"
            )
        overlap = sorted(set(train) & set(held_out))
        if overlap:
            raise DataError(
                f"picture(s) {overlap} are both in train and held_out; a held-out "
                "picture must never be cropped for training"
            )
        if len(held_out) < 2 or not train:
            raise DataError(
                f"need at least two held-out pictures and one training picture, got "
                f"held_out={held_out}, train={train}"
            )
        self.noise = noise or PoissonGaussianNoise()
        self.train_names, self.held_out_names = train, held_out
        self.augment = augment
        self._pictures = {name: load_picture(name) for name in train}
        smallest = min(min(p.shape) for p in self._pictures.values())
        if not isinstance(crop, int) or isinstance(crop, bool) or not 8 <= crop <= smallest:
            raise DataError(
                f"crop={crop!r} is invalid: expected an integer in [8, {smallest}] "
                "(the smallest training picture's side)"
            )
        self.crop = crop
        # Every crop position is equally likely: a picture is picked in proportion to its number
        # of positions.
        positions = np.array(
            [(p.shape[0] - crop + 1) * (p.shape[1] - crop + 1) for p in self._pictures.values()],
            dtype=np.float64,
        )
        self._weights = positions / positions.sum()

    def clean_crops(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """`count` random clean crops `(count, crop, crop)` float32 in [0, 1]."""
        pictures = list(self._pictures.values())
        choice = rng.choice(len(pictures), size=count, p=self._weights)
        crops = np.empty((count, self.crop, self.crop), dtype=np.float32)
        for i, index in enumerate(choice):
            crops[i] = random_window([pictures[index]], self.crop, rng, 2, self.augment)[0]
        return crops

    def sample(self, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """`count` aligned pairs: noisy inputs and clean targets, each `(count, 1, crop, crop)`."""
        if not isinstance(count, int) or count < 1:
            raise DataError(f"count={count!r} is invalid: expected a positive number of pairs")
        rng = np.random.default_rng(seed)
        clean = self.clean_crops(count, rng)
        noisy = self.noise(clean, rng)
        return noisy[:, None], clean[:, None]

    def dataset(self, count: int = 4096, seed: int = 0) -> TensorDataset:
        """`count` pairs as a :class:`TensorDataset` (`cond` = noisy input, `x` = clean target)."""
        noisy, clean = self.sample(count, seed)
        extra = {
            "pairs": count,
            "crop": self.crop,
            "noise": self.noise.describe(),
            "train_images": list(self.train_names),
            "held_out_images": list(self.held_out_names),
            "seed": seed,
            "value_range": [0, 1],
            "cond_value_range": [0, 1],
        }
        return TensorDataset(
            x=torch.from_numpy(clean), cond=torch.from_numpy(noisy), source="em-pairs", extra=extra
        )

    def write_pair_folder(self, folder: str | Path, count: int = 4096, seed: int = 0) -> Path:
        """Write `count` pairs as 8-bit PNGs `folder/input/NNNNN.png` → `folder/target/NNNNN.png`.

        The folder is what `diffunet train --data FOLDER` reads as paired restoration data (with
        `--image-size` equal to the crop, every training sample is one of these pairs, turned or
        mirrored at random).
        """
        from PIL import Image

        folder = Path(folder)
        noisy, clean = self.sample(count, seed)
        for side, arrays in (("input", noisy), ("target", clean)):
            (folder / side).mkdir(parents=True, exist_ok=True)
            for index, array in enumerate(arrays[:, 0]):
                pixels = np.rint(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / side / f"{index:05d}.png")
        return folder

    def evaluation_pairs(self, seed: int = EVALUATION_SEED) -> list[EvalPair]:
        """The held-out pictures, whole, with noise drawn from `seed` (one stream per picture)."""
        return held_out_pairs(self.held_out_names, seed, self.noise)


def held_out_pairs(
    names: tuple[str, ...] = HELD_OUT_IMAGES,
    seed: int = EVALUATION_SEED,
    noise: PoissonGaussianNoise | None = None,
) -> list[EvalPair]:
    """`EMPairs(held_out=names).evaluation_pairs(seed)` without loading the training pictures.

    The default gives the two held-out pictures exactly as the benchmark evaluates them.
    """
    noise = noise or PoissonGaussianNoise()
    pairs = []
    for index, name in enumerate(names):
        clean = load_picture(name)
        noisy = noise(clean, np.random.default_rng([seed, index]))
        pairs.append(EvalPair(name, noisy, clean))
    return pairs


def em_pairs_dataset(
    image_size: int | None = None, count: int | None = None, seed: int = 0
) -> TensorDataset:
    """The embedded restoration set (`--data em-pairs`): `count` pairs of `image_size` crops.

    Defaults: 64-pixel crops, and as many pairs as paired folders get (4,096 at 64², fewer
    for crops so large that they would not fit in the crop memory budget).
    """
    size = 64 if image_size is None else image_size
    return EMPairs(size).dataset(crops_per_source(1, size, 2, 2) if count is None else count, seed)


def blob_volume(
    size: int = 48, seed: int = 0, blob_size_fraction: float = 0.25, smoothing: float = 1.5
) -> np.ndarray:
    """A synthetic 3D test object: `skimage.data.binary_blobs(n_dim=3)` smoothed, `(S, S, S)`.

    The blobs are Gaussian-smoothed by `smoothing` pixels and scaled to [0.1, 0.9], so they have
    soft boundaries like stained compartments in a volume EM stack.
    """
    from skimage.data import binary_blobs
    from skimage.filters import gaussian

    blobs = binary_blobs(
        length=size, blob_size_fraction=blob_size_fraction, n_dim=3, volume_fraction=0.4, rng=seed
    )
    smooth = gaussian(blobs.astype(np.float64), sigma=smoothing)
    return (0.1 + 0.8 * smooth).astype(np.float32)
