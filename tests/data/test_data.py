"""Data sources: digits, image folders (8/16-bit, grey/RGB, PNG/JPEG/TIFF), arrays, pairs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from diffunet.data import DataError, TensorDataset, digits, open_dataset


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_digits_default_size_range_and_labels():
    data = open_dataset("digits")
    assert data.x.shape == (1797, 1, 16, 16)
    assert data.x.min() >= 0 and data.x.max() <= 1
    assert data.num_classes == 10 and data.labels.shape == (1797,)
    batch = data.batch(torch.tensor([0, 5]))
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1 and batch["labels"].tolist() == [0, 5]
    assert open_dataset("digits", image_size=8).x.shape[-1] == 8


@pytest.mark.parametrize("file_found", [True, False])
def test_digits_are_scikit_learns_read_from_its_file_or_through_its_loader(monkeypatch, file_found):
    from sklearn.datasets import load_digits

    if not file_found:
        monkeypatch.setattr(digits, "_digits_file", lambda: None)
    else:
        assert digits._digits_file() is not None  # the fast path is the one under test
    images, labels = digits.digits_arrays()
    bunch = load_digits()
    assert images.dtype == torch.float32 and images.shape == (1797, 1, 8, 8)
    torch.testing.assert_close(images, torch.from_numpy(bunch.images).float().unsqueeze(1) / 16)
    assert labels.dtype == torch.int64 and labels.tolist() == bunch.target.tolist()


def test_loading_the_digits_does_not_import_scikit_learn():
    code = (
        "import sys; from diffunet.data import open_dataset; open_dataset('digits'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_digits_too_small_is_rejected():
    with pytest.raises(DataError, match="too small"):
        open_dataset("digits", image_size=4)


def test_image_folder_bit_depths_modes_and_resizing(tmp_path):
    rng = np.random.default_rng(0)
    _png(tmp_path / "a_gray8.png", rng.integers(0, 256, (40, 60), dtype=np.uint8))
    _png(tmp_path / "b_gray16.png", np.full((30, 30), 65535, dtype=np.uint16))
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "c_rgb.jpg")
    tifffile.imwrite(tmp_path / "d_rgb16.tif", np.full((16, 16, 3), 32768, dtype=np.uint16))
    (tmp_path / "notes.txt").write_text("not an image")
    data = open_dataset(str(tmp_path), image_size=12)
    assert data.x.shape == (4, 3, 12, 12)  # grey widened to RGB because one image is RGB
    assert data.x.min() >= 0 and data.x.max() <= 1
    assert torch.allclose(data.x[1], torch.ones(3, 12, 12))  # 16-bit white is 1.0
    assert torch.allclose(data.x[3], torch.full((3, 12, 12), 32768 / 65535), atol=1e-4)
    assert data.extra["bit_depths"] == [8, 16]


def test_grey_folder_stays_single_channel(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", np.full((8, 8), 40 * i, dtype=np.uint8))
    data = open_dataset(str(tmp_path), image_size=8)
    assert data.x.shape == (3, 1, 8, 8)
    assert torch.allclose(data.x[2], torch.full((1, 8, 8), 80 / 255))


def test_corrupt_image_names_the_file(tmp_path):
    _png(tmp_path / "good.png", np.zeros((8, 8), dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="broken.png"):
        open_dataset(str(tmp_path), image_size=8)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="neither an embedded set"):
        open_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        open_dataset(str(tmp_path / "empty"))


def test_npy_signals_and_volumes(tmp_path):
    signals = np.random.default_rng(0).normal(size=(10, 2, 32)).astype(np.float32)
    np.save(tmp_path / "signals.npy", signals)
    data = open_dataset(str(tmp_path / "signals.npy"))
    assert data.dims == 1 and data.x.shape == (10, 2, 32)
    assert data.x.min() == 0 and data.x.max() == 1
    assert data.extra["value_range"] == [
        pytest.approx(float(signals.min())),
        pytest.approx(float(signals.max())),
    ]
    volumes = np.random.default_rng(1).integers(0, 256, (4, 1, 8, 12, 12), dtype=np.uint8)
    np.save(tmp_path / "volumes.npy", volumes)
    data = open_dataset(str(tmp_path / "volumes.npy"), image_size=8)
    assert data.dims == 3 and data.x.shape == (4, 1, 8, 8, 8)  # centre-cropped
    # no channel axis: accepted when the model's dims say so
    np.save(tmp_path / "plain.npy", signals[:, 0])
    assert open_dataset(str(tmp_path / "plain.npy"), dims=1).x.shape == (10, 1, 32)


def test_npz_with_cond_and_labels_and_npy_folder(tmp_path):
    x = np.random.default_rng(0).random((6, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "pairs.npz", x=x, cond=x * 2, labels=np.arange(6) % 3)
    data = open_dataset(str(tmp_path / "pairs.npz"))
    assert data.cond.shape == data.x.shape and data.num_classes == 3
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"{i}.npy", np.full((1, 16), i, dtype=np.uint8))
    assert open_dataset(str(folder)).x.shape == (3, 1, 16)


def test_bad_arrays(tmp_path):
    nan = np.zeros((2, 1, 8, 8), dtype=np.float32)
    nan[0, 0, :3, 0] = [np.nan, np.inf, -np.inf]
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(DataError, match=r"nan\.npy holds 3 non-finite value.*\(2, 1, 8, 8\)"):
        open_dataset(str(tmp_path / "nan.npy"))
    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 16, 16), dtype=np.float32))
    with pytest.raises(DataError, match=r"empty\.npy holds no samples \(shape \(0, 1, 16, 16\)\)"):
        open_dataset(str(tmp_path / "empty.npy"))
    np.savez(tmp_path / "words.npz", x=np.array([["a", "b"]]))
    with pytest.raises(DataError, match=r"words\.npz\[x\] holds <U1 values \(shape \(1, 2\)\)"):
        open_dataset(str(tmp_path / "words.npz"))
    samples = tmp_path / "samples"
    samples.mkdir()
    np.save(samples / "0.npy", np.ones((1, 8)))
    np.save(samples / "1.npy", np.ones((1, 0)))
    with pytest.raises(DataError, match=r"1\.npy holds no values \(shape \(1, 0\)\)"):
        open_dataset(str(samples))
    np.save(tmp_path / "flat.npy", np.zeros((5, 7)))
    with pytest.raises(DataError, match="channel axis"):
        open_dataset(str(tmp_path / "flat.npy"))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.npy"):
        open_dataset(str(tmp_path / "junk.npy"))


def test_paired_folders(tmp_path):
    for name in ("a", "b"):
        _png(tmp_path / "input" / f"{name}.png", np.full((10, 10), 50, dtype=np.uint8))
        _png(tmp_path / "target" / f"{name}.png", np.full((10, 10), 200, dtype=np.uint8))
    data = open_dataset(str(tmp_path), image_size=8)  # random aligned 8×8 crops, 2,048 a pair
    assert data.x.shape == data.cond.shape == (4096, 1, 8, 8)
    assert data.extra["pairs"] == 2 and data.extra["crops"] == 4096
    assert torch.allclose(data.cond, torch.full_like(data.cond, 50 / 255))
    _png(tmp_path / "target" / "c.png", np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(DataError, match="without an input"):
        open_dataset(str(tmp_path), image_size=8)


def _pairs() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        x=torch.rand(6, 2, 4, 4, generator=g),
        cond=torch.rand(6, 1, 4, 4, generator=g),
        labels=torch.arange(6) % 3,
        source="pairs",
    )


def test_batch_picks_scales_and_moves():
    data = _pairs()
    idx = torch.tensor([4, 0, 4])
    batch = data.batch(idx)
    torch.testing.assert_close(batch["x"], data.x[idx] * 2 - 1, rtol=0, atol=0)
    torch.testing.assert_close(batch["cond"], data.cond[idx] * 2 - 1, rtol=0, atol=0)
    assert batch["labels"].tolist() == [1, 0, 1]
    assert data.nbytes == (192 + 96) * 4 + 6 * 8
    held = data.to("meta")  # a data set held on another device picks there
    assert held.x.device.type == "meta" and held.labels.device.type == "meta"
    assert data.to("cpu") is data
    moved = data.batch(idx, "meta")
    assert {k: (v.device.type, tuple(v.shape)) for k, v in moved.items()} == {
        "x": ("meta", (3, 2, 4, 4)),
        "cond": ("meta", (3, 1, 4, 4)),
        "labels": ("meta", (3,)),
    }


def test_small_data_sets_are_held_on_the_gpu(monkeypatch):
    from types import SimpleNamespace

    from diffunet.training import trainer as train

    data = _pairs()  # 1200 bytes
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: SimpleNamespace(total_memory=1200 / train.RESIDENT_DATA_SHARE),
    )
    assert train.resident_on(data, torch.device("cuda"))
    assert not train.resident_on(data, torch.device("cpu"))
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: SimpleNamespace(total_memory=1199 / train.RESIDENT_DATA_SHARE),
    )
    assert not train.resident_on(data, torch.device("cuda"))


@pytest.mark.gpu
def test_batches_held_on_the_gpu_equal_batches_moved_there():
    data = _pairs()
    idx = torch.tensor([5, 1, 2])
    on_gpu = data.to("cuda").batch(idx, "cuda")
    moved = data.batch(idx, "cuda")
    for key, expected in data.batch(idx).items():
        assert on_gpu[key].device.type == moved[key].device.type == "cuda"
        torch.testing.assert_close(on_gpu[key].cpu(), expected, rtol=0, atol=0)
        torch.testing.assert_close(moved[key].cpu(), expected, rtol=0, atol=0)
