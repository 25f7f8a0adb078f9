"""Restoration data: the embedded EM-like pairs (noise model, crops, held-out split) and the
errors of paired folders that `data/test_data.py` does not cover."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffunet.data import DataError, open_dataset
from diffunet.data.em_pairs import (
    HELD_OUT_IMAGES,
    TRAIN_IMAGES,
    EMPairs,
    PoissonGaussianNoise,
    blob_volume,
    load_picture,
)


@pytest.fixture(scope="module")
def text_pairs():
    """Pairs cropped from one small picture only (fast, and crops can be located in it)."""
    return EMPairs(crop=16, train=("text",), augment=False)


# ---------------------------------------------------------------------- noise model
def test_poisson_gaussian_noise_has_the_documented_mean_and_variance():
    noise = PoissonGaussianNoise(photons=20.0, read_noise=0.02)
    clean = np.full(200_000, 0.5, dtype=np.float32)
    noisy = noise(clean, np.random.default_rng(0)).astype(np.float64)
    # Poisson(10)/20 has mean 0.5 and variance 10/400; plus 0.02² read noise. At 0.5 the
    # clipping to [0, 1] removes almost nothing (Poisson(10) > 20 has probability 0.2 %).
    assert abs(noisy.mean() - 0.5) < 0.003
    assert abs(noisy.var() - (10 / 400 + 0.02**2)) < 0.0015
    assert noise.std(np.array([0.5]))[0] == pytest.approx(np.sqrt(10 / 400 + 0.02**2))
    assert noisy.min() >= 0 and noisy.max() <= 1
    with pytest.raises(ValueError, match="photons"):
        PoissonGaussianNoise(photons=0)


# ---------------------------------------------------------------------- embedded pairs
def test_pictures_load_offline_in_unit_range():
    for name in (*TRAIN_IMAGES, *HELD_OUT_IMAGES):
        picture = load_picture(name)
        assert picture.ndim == 2 and picture.dtype == np.float32 and min(picture.shape) >= 172
        assert picture.min() >= 0 and picture.max() <= 1 and picture.std() > 0.05


def test_held_out_pictures_are_never_trained_on():
    assert len(HELD_OUT_IMAGES) >= 2 and not set(HELD_OUT_IMAGES) & set(TRAIN_IMAGES)
    with pytest.raises(DataError, match=r"\['coins'\] are both in train and held_out"):
        EMPairs(train=("camera", "coins"))
    with pytest.raises(DataError, match="at least two held-out"):
        EMPairs(held_out=("coins",))
    with pytest.raises(DataError, match="unknown picture"):
        EMPairs(train=("astronaut",))


def test_crops_are_aligned_and_come_from_the_training_pictures(text_pairs):
    noisy, clean = text_pairs.sample(6, seed=3)
    assert noisy.shape == clean.shape == (6, 1, 16, 16)
    picture = load_picture("text")
    windows = np.lib.stride_tricks.sliding_window_view(picture, (16, 16))
    for crop in clean[:, 0]:
        assert np.any(np.all(windows == crop, axis=(-2, -1)))  # an exact window of `text`
    # Aligned: the noisy input scatters around its own target, not another crop.
    own = np.abs(noisy - clean).mean()
    shuffled = np.abs(noisy - np.roll(clean, 1, axis=0)).mean()
    assert own < shuffled


def test_pairs_are_deterministic_given_the_seed(text_pairs):
    first, second = text_pairs.sample(4, seed=7), text_pairs.sample(4, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[1], text_pairs.sample(4, seed=8)[1])


def test_dataset_and_evaluation_pairs(text_pairs):
    data = text_pairs.dataset(8, seed=0)
    assert data.x.shape == data.cond.shape == (8, 1, 16, 16)
    assert data.extra["held_out_images"] == list(HELD_OUT_IMAGES)
    assert data.extra["train_images"] == ["text"] and data.extra["noise"]["photons"] == 20.0
    pairs, again = text_pairs.evaluation_pairs(), text_pairs.evaluation_pairs()
    assert [p.name for p in pairs] == list(HELD_OUT_IMAGES)
    for pair, repeat in zip(pairs, again):  # whole pictures, noise drawn from a fixed seed
        assert pair.clean.shape == load_picture(pair.name).shape == pair.noisy.shape
        assert np.array_equal(pair.noisy, repeat.noisy)
        assert 0.05 < np.abs(pair.noisy - pair.clean).mean() < 0.3


def test_blob_volume_is_a_soft_3d_object():
    volume = blob_volume(24, seed=0)
    assert volume.shape == (24, 24, 24) and volume.dtype == np.float32
    assert 0.1 <= volume.min() < 0.3 and 0.7 < volume.max() <= 0.9
    assert not np.array_equal(volume, blob_volume(24, seed=1))


# ---------------------------------------------------------------------- paired folders
def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_paired_folder_names_the_input_without_a_target(tmp_path):
    """(data/test_data.py covers a target without an input.)"""
    for name in ("a", "b"):
        _png(tmp_path / "input" / f"{name}.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "target" / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"1 input\(s\) without a target, e\.g\. \['b'\]"):
        open_dataset(str(tmp_path), image_size=8)


def test_paired_npy_spatial_mismatch_is_an_error(tmp_path):
    for side, shape in (("input", (1, 8, 8)), ("target", (1, 8, 10))):
        (tmp_path / side).mkdir()
        np.save(tmp_path / side / "a.npy", np.zeros(shape, np.float32) + np.arange(shape[-1]))
    with pytest.raises(DataError, match="differ in spatial size|must have the same size"):
        open_dataset(str(tmp_path))


def test_paired_images_of_different_sizes_are_an_error_naming_the_files(tmp_path):
    _png(tmp_path / "input" / "a.png", np.zeros((32, 30), np.uint8))
    _png(tmp_path / "target" / "a.png", np.zeros((64, 60), np.uint8))
    with pytest.raises(DataError, match=r"input/a\.png is 32×30 but target/a\.png is 64×60"):
        open_dataset(str(tmp_path), image_size=16)


def test_paired_npy_spatial_mismatch_names_the_files(tmp_path):
    for side, shape in (("input", (1, 8, 8)), ("target", (1, 8, 10))):
        (tmp_path / side).mkdir()
        np.save(tmp_path / side / "a.npy", np.zeros(shape, np.float32) + np.arange(shape[-1]))
    with pytest.raises(DataError, match=r"input/a\.npy is 8×8 but target/a\.npy is 8×10"):
        open_dataset(str(tmp_path))


# ---------------------------------------------------------------------- aligned crops
def _dihedral(array):
    """The 8 turns and mirrors of a 2D array."""
    turns = [np.rot90(array, k) for k in range(4)]
    return turns + [t[:, ::-1] for t in turns]


def _turn_of(crop, picture):
    """Which of the 8 turns and mirrors of `picture` has `crop` as a window (None: none)."""
    size = crop.shape[-1]
    for index, variant in enumerate(_dihedral(picture)):
        windows = np.lib.stride_tricks.sliding_window_view(variant, (size, size))
        if np.any(np.all(windows == crop, axis=(-2, -1))):
            return index
    return None


@pytest.fixture
def shifted_pairs(tmp_path):
    """Two 8-bit pairs of different native sizes where input = target + 40 grey levels."""
    rng = np.random.default_rng(0)
    targets = {
        "a": rng.integers(0, 200, (40, 50), dtype=np.uint8),
        "b": rng.integers(0, 200, (37, 45), dtype=np.uint8),
    }
    for name, target in targets.items():
        _png(tmp_path / "target" / f"{name}.png", target)
        _png(tmp_path / "input" / f"{name}.png", target + 40)
    return tmp_path, targets


def test_paired_images_become_aligned_native_crops(shifted_pairs):
    folder, targets = shifted_pairs
    data = open_dataset(str(folder), image_size=16, seed=0)
    per_pair = data.extra["crops_per_pair"]
    assert data.x.shape == data.cond.shape == (2 * per_pair, 1, 16, 16)
    assert data.extra["pairs"] == 2 and data.extra["crops"] == 2 * per_pair >= 4096
    # Aligned: every input crop is its target crop + 40 grey levels, pixel for pixel.
    assert torch.allclose(data.cond - data.x, torch.full_like(data.x, 40 / 255), atol=1e-6)
    # Native pixels (no resizing): each crop is a window of its picture, turned or mirrored
    # (and the turns vary).
    turns = []
    for index in [*range(12), per_pair, 2 * per_pair - 1]:
        crop = np.rint(data.x[index, 0].numpy() * 255).astype(np.uint8)
        turns.append(_turn_of(crop, targets["a" if index < per_pair else "b"]))
    assert None not in turns and len(set(turns)) > 1


def test_paired_crops_are_deterministic_given_the_seed(shifted_pairs):
    folder, _ = shifted_pairs
    first, again = (open_dataset(str(folder), image_size=16, seed=5) for _ in range(2))
    other = open_dataset(str(folder), image_size=16, seed=6)
    assert torch.equal(first.x, again.x) and torch.equal(first.cond, again.cond)
    assert not torch.equal(first.x, other.x)
    assert first.extra["crop_seed"] == 5


def test_paired_16bit_images_keep_their_precision(tmp_path):
    target = np.random.default_rng(1).integers(0, 65000, (20, 24), dtype=np.uint16)
    _png(tmp_path / "target" / "a.png", target)
    _png(tmp_path / "input" / "a.png", target + 1)  # one 16-bit grey level apart
    data = open_dataset(str(tmp_path), image_size=8)
    assert data.extra["bit_depths"] == [16]
    assert torch.allclose(data.cond - data.x, torch.full_like(data.x, 1 / 65535), atol=1e-7)


def test_paired_images_smaller_than_the_crop_name_the_file(tmp_path):
    _png(tmp_path / "input" / "small.png", np.zeros((12, 20), np.uint8))
    _png(tmp_path / "target" / "small.png", np.zeros((12, 20), np.uint8))
    with pytest.raises(
        DataError,
        match=r"target/small\.png are 12×20, smaller than the 16-pixel "
        r"training crop; pass a smaller --image-size \(at most 12\)",
    ):
        open_dataset(str(tmp_path), image_size=16)
    with pytest.raises(DataError, match="64-pixel"):  # the default crop for paired images
        open_dataset(str(tmp_path))


@pytest.mark.parametrize("shape", [(1, 40), (2, 20, 24), (1, 10, 12, 11)])
def test_paired_npy_larger_than_the_crop_become_aligned_crops(tmp_path, shape):
    """1D, 2D and 3D: input = target + 100 (16-bit), kept exactly in every crop."""
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        target = rng.integers(0, 60000, shape, dtype=np.uint16)
        for side, array in (("target", target), ("input", target + 100)):
            (tmp_path / side).mkdir(exist_ok=True)
            np.save(tmp_path / side / f"{name}.npy", array)
    dims = len(shape) - 1
    data = open_dataset(str(tmp_path), image_size=8, seed=0)
    assert data.x.shape == data.cond.shape == (data.extra["crops"], shape[0], *(8,) * dims)
    assert data.extra["pairs"] == 2 and data.extra["value_range"] == [0, 65535]
    assert torch.allclose(data.cond - data.x, torch.full_like(data.x, 100 / 65535), atol=1e-6)
    # Samples already at the training size, or without --image-size, are used whole.
    assert open_dataset(str(tmp_path)).x.shape == (2, *shape)


def test_paired_npy_of_the_training_size_are_used_whole(tmp_path):
    for side in ("input", "target"):
        (tmp_path / side).mkdir()
        for name in ("a", "b", "c"):
            np.save(tmp_path / side / f"{name}.npy", np.arange(64, dtype=np.uint8).reshape(1, 8, 8))
    data = open_dataset(str(tmp_path), image_size=8)  # what a resumed run passes back
    assert data.x.shape == (3, 1, 8, 8) and "crops" not in data.extra


def test_paired_npy_channel_mismatch_names_the_file(tmp_path):
    for side in ("input", "target"):
        (tmp_path / side).mkdir()
        np.save(tmp_path / side / "a.npy", np.zeros((1, 8, 8), np.float32) + np.arange(8))
        np.save(tmp_path / side / "b.npy", np.zeros((2, 8, 8), np.float32) + np.arange(8))
    with pytest.raises(DataError, match=r"target/b\.npy has shape \(2, 8, 8\) but target/a\.npy"):
        open_dataset(str(tmp_path))


def test_npz_pairs_larger_than_the_crop_become_aligned_crops(tmp_path):
    target = np.random.default_rng(3).random((3, 1, 20, 20)).astype(np.float32)
    np.savez(tmp_path / "pairs.npz", x=target, cond=target.copy(), labels=np.arange(3))
    data = open_dataset(str(tmp_path / "pairs.npz"), image_size=8, seed=0)
    per_pair = data.extra["crops_per_pair"]
    assert data.x.shape == (3 * per_pair, 1, 8, 8) and torch.equal(data.x, data.cond)
    assert torch.equal(data.labels, torch.arange(3).repeat_interleave(per_pair))


# ---------------------------------------------------------------------- tasks
def test_restore_needs_pairs_and_generate_drops_the_inputs(shifted_pairs, tmp_path):
    folder, _ = shifted_pairs
    with pytest.raises(DataError, match="--task restore needs paired data, but 'digits'"):
        open_dataset("digits", task="restore")
    data = open_dataset(str(folder), image_size=16, task="generate")
    assert data.cond is None and data.x.shape[1:] == (1, 16, 16)
    assert "cond_value_range" not in data.extra and "targets only" in data.extra["inputs"]
    assert open_dataset(str(folder), image_size=16, task="restore").cond is not None
