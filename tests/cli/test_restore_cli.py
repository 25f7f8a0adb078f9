"""`diffunet restore`: exact round trips through tiles and files, bit depths, both uncertainty
kinds, one-line errors, and a tiny real model end to end (2D, 3D, aleatoric)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from diffunet import UNet
from diffunet.apps.generate import LoadedModel, SamplingError
from diffunet.apps.restore_io import GAP, read_input
from diffunet.cli import main
from diffunet.cli import restore as restore_command
from diffunet.cli.restore import restore_aleatoric, restore_pixels
from diffunet.diffusion import Diffusion
from diffunet.model.checkpoint import save_pretrained
from diffunet.model.introspect import small_config


class ReturnsCond(torch.nn.Module):
    """An x₀-predicting "model" that returns its conditioning image (optionally with a log σ²)."""

    def __init__(self, config, log_variance: float | None = None):
        super().__init__()
        self.config = config
        self.log_variance = log_variance
        self.calls: list[tuple[int, ...]] = []
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x, t, *, cond):
        self.calls.append(tuple(x.shape[2:]))
        if self.log_variance is None:
            return cond.clone()
        return torch.cat([cond, torch.full_like(cond, self.log_variance)], dim=1)


def identity_model(preset: str, image_size: int, aleatoric_log_variance=None) -> LoadedModel:
    config = small_config(preset).replace(image_size=image_size)
    return LoadedModel(
        ReturnsCond(config, aleatoric_log_variance), Diffusion("cosine", 50, "x0"), Path("identity")
    )


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def identity(monkeypatch):
    """Make `diffunet restore --from ANYTHING` load the given identity model."""
    holder = {}
    monkeypatch.setattr(
        restore_command, "load_model", lambda source, device, **kwargs: holder["model"]
    )

    def use(preset: str, image_size: int, **kwargs) -> LoadedModel:
        holder["model"] = identity_model(preset, image_size, **kwargs)
        return holder["model"]

    return use


# ---------------------------------------------------------------------- exact round trips
@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [
        ((45, 71), None, None),  # odd sizes, default tile = training size 16: padded, tiled
        ((45, 71), (16, 24), (5, 3)),  # per-axis tiles and overlaps
        ((9, 13), None, None),  # smaller than one tile (padded to 16 × 16)
    ],
)
def test_identity_model_reproduces_an_8bit_png_exactly(tmp_path, identity, shape, tile, overlap):
    model = identity("emdiffuse", 16)
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    write_png(tmp_path / "in.png", image)
    args = [
        "restore",
        "--from",
        "x",
        "--input",
        str(tmp_path / "in.png"),
        "--out",
        str(tmp_path / "out"),
        "--samples",
        "3",
        "--steps",
        "2",
        "--sampler",
        "ddim",
    ]
    if tile:
        args += ["--tile", ",".join(map(str, tile)), "--overlap", ",".join(map(str, overlap))]
    assert main(args) == 0
    restored = np.array(Image.open(tmp_path / "out" / "in_restored.png"))
    assert restored.dtype == np.uint8 and np.array_equal(restored, image)
    std = tifffile.imread(tmp_path / "out" / "in_uncertainty.tif")
    assert std.dtype == np.float32 and std.shape == shape and np.all(std == 0)
    side = np.array(Image.open(tmp_path / "out" / "in_comparison.png"))
    assert side.shape == (shape[0], 3 * shape[1] + 2 * GAP)
    expected_tile = tile or (16, 16)
    padded = tuple(math.ceil(s / 8) * 8 for s in shape)  # the network needs multiples of 8
    assert set(model.model.calls) == {tuple(min(t, p) for t, p in zip(expected_tile, padded))}


def test_identity_model_reproduces_16bit_tiff_and_png_as_16bit_tiff(tmp_path, identity):
    identity("emdiffuse", 16)
    rng = np.random.default_rng(1)
    tiff = rng.integers(0, 65536, (37, 29), dtype=np.uint16)
    png = rng.integers(0, 65536, (21, 18), dtype=np.uint16)
    folder = tmp_path / "inputs"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", tiff)
    Image.fromarray(png).save(folder / "b.png")
    (folder / "notes.txt").write_text("ignored")
    assert (
        main(
            [
                "restore",
                "--from",
                "x",
                "--input",
                str(folder),
                "--out",
                str(tmp_path / "o"),
                "--samples",
                "2",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    for name, original in (("a", tiff), ("b", png)):
        restored = tifffile.imread(tmp_path / "o" / f"{name}_restored.tif")
        assert restored.dtype == np.uint16 and np.array_equal(restored, original)
        assert tifffile.imread(tmp_path / "o" / f"{name}_uncertainty.tif").shape == original.shape


@pytest.mark.parametrize(("dtype", "tile"), [(np.uint16, None), (np.float32, "8,16,16")])
def test_identity_model_reproduces_a_volume(tmp_path, identity, dtype, tile):
    model = identity("emdiffuse-3d", 8)
    rng = np.random.default_rng(2)
    shape = (11, 19, 13)
    volume = (
        rng.integers(0, 65536, shape).astype(dtype)
        if dtype == np.uint16
        else rng.random(shape, dtype=np.float32)
    )
    np.save(tmp_path / "vol.npy", volume)
    tifffile.imwrite(tmp_path / "stack.tif", volume)
    for name in ("vol.npy", "stack.tif"):
        args = [
            "restore",
            "--from",
            "x",
            "--input",
            str(tmp_path / name),
            "--out",
            str(tmp_path / "o"),
            "--samples",
            "2",
            "--steps",
            "1",
            "--overlap",
            "3",
        ]
        assert main([*args, *(["--tile", tile] if tile else [])]) == 0
    restored = np.load(tmp_path / "o" / "vol_restored.npy")
    stack = tifffile.imread(tmp_path / "o" / "stack_restored.tif")
    for result in (restored, stack):
        assert result.dtype == dtype and result.shape == shape
        if dtype == np.uint16:
            assert np.array_equal(result, volume)
        else:
            np.testing.assert_allclose(result, volume, rtol=0, atol=1e-6)
    assert np.load(tmp_path / "o" / "vol_uncertainty.npy").shape == shape
    assert len(set(model.model.calls)) == 1 and len(model.model.calls) > 2  # several 3D tiles


def test_float_input_outside_unit_range_keeps_its_range(tmp_path, identity):
    identity("emdiffuse", 16)
    image = np.linspace(-3.0, 250.0, 20 * 24, dtype=np.float32).reshape(20, 24)
    np.save(tmp_path / "f.npy", image)
    assert (
        main(
            [
                "restore",
                "--from",
                "x",
                "--input",
                str(tmp_path / "f.npy"),
                "--out",
                str(tmp_path / "o"),
                "--samples",
                "1",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(np.load(tmp_path / "o" / "f_restored.npy"), image, atol=1e-4)


# ---------------------------------------------------------------------- clean targets
def test_target_folder_prints_and_records_the_scores(tmp_path, identity, capsys):
    """Targets matched by name (a.png) and by stem (b.png ↔ b.tif, 16-bit), each in [0, 1]."""
    identity("emdiffuse", 16)
    rng = np.random.default_rng(5)
    inputs, targets = tmp_path / "in", tmp_path / "clean"
    inputs.mkdir(), targets.mkdir()
    clean = {"a": rng.integers(0, 256, (20, 24), dtype=np.uint8)}
    clean["b"] = rng.integers(0, 65536, (18, 21), dtype=np.uint16)
    noisy = {
        "a": np.clip(clean["a"] + rng.integers(-40, 41, (20, 24)), 0, 255).astype(np.uint8),
        "b": rng.integers(0, 256, (18, 21), dtype=np.uint8),
    }
    for name in "ab":
        write_png(inputs / f"{name}.png", noisy[name])
    write_png(targets / "a.png", clean["a"])
    tifffile.imwrite(targets / "b.tif", clean["b"])
    out = tmp_path / "o"
    args = ["restore", "--from", "x", "--input", str(inputs), "--target", str(targets)]
    assert main([*args, "--out", str(out), "--samples", "1", "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    for name, scale in (("a", 255), ("b", 65535)):
        expected = peak_signal_noise_ratio(clean[name] / scale, noisy[name] / 255, data_range=1)
        scores = metrics["inputs"][f"{name}.png"]
        assert scores["input"]["psnr"] == pytest.approx(expected, abs=1e-6)
        assert scores["restored"]["psnr"] == pytest.approx(expected, abs=1e-4)  # the identity
        assert scores["target_file"] == str(targets / ("a.png" if name == "a" else "b.tif"))
        assert f"{name}.png against its target: PSNR {expected:.2f} → {expected:.2f} dB" in printed
    assert metrics["inputs"]["a.png"]["uncertainty"]["spearman"] is None  # one sample: std 0


def test_embedded_held_out_picture_is_restored_and_scored(tmp_path, identity, capsys):
    from diffunet.data.em_pairs import held_out_pairs

    identity("emdiffuse", 64)
    out = tmp_path / "o"
    args = ["--from", "x", "--input", "em-pairs:coins", "--out", str(out), "--device", "cpu"]
    assert main(["restore", *args, "--steps", "1"]) == 0
    captured = capsys.readouterr()
    assert "on the CPU: 4 samples per input instead of 8" in captured.err
    assert "--samples 8" in captured.err
    assert "[1/1] restoring em-pairs:coins (303×384): 48 tile(s) × 4 samples" in captured.err
    pair = held_out_pairs()[0]
    noisy = np.array(Image.open(out / "coins_input.png"))
    target = np.array(Image.open(out / "coins_target.png"))
    assert np.array_equal(noisy, np.rint(pair.noisy * 255))
    assert np.array_equal(target, np.rint(pair.clean * 255))
    assert np.array_equal(np.array(Image.open(out / "coins_restored.png")), noisy)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 4 and list(metrics["inputs"]) == ["em-pairs:coins"]
    expected = peak_signal_noise_ratio(target / 255, noisy / 255, data_range=1)
    assert metrics["inputs"]["em-pairs:coins"]["input"]["psnr"] == pytest.approx(expected)
    assert f"em-pairs:coins against its target: PSNR {expected:.2f}" in captured.out


def test_bad_targets_and_embedded_names_are_one_line_errors(tmp_path, identity, capsys):
    identity("emdiffuse", 16)
    write_png(tmp_path / "in.png", np.zeros((12, 16), np.uint8))
    write_png(tmp_path / "small.png", np.zeros((12, 15), np.uint8))
    base = ["--from", "x", "--out", str(tmp_path / "o")]
    one = [*base, "--input", str(tmp_path / "in.png")]
    err = run_error([*one, "--target", str(tmp_path / "small.png")], capsys)
    assert "has shape (12, 15) but its input in.png has (12, 16)" in err
    err = run_error([*one, "--target", str(tmp_path / "nope.png")], capsys)
    assert "--target" in err and "nope.png does not exist" in err
    (tmp_path / "clean").mkdir()
    err = run_error([*one, "--target", str(tmp_path / "clean")], capsys)
    assert "no clean image for input in.png" in err
    err = run_error([*base, "--input", "em-pairs:lena"], capsys)
    assert "'lena'" in err and "em-pairs, em-pairs:coins, em-pairs:page" in err
    err = run_error([*base, "--input", "em-pairs", "--target", str(tmp_path / "in.png")], capsys)
    assert "brings its own clean targets" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- aleatoric
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_aleatoric_mean_and_std_come_from_the_head(prediction):
    """A head that predicts x₀ = cond with σ = 0.3 gives exactly that (v: σ_x₀ = sqrt(1−ᾱ) σ_v)."""
    config = small_config("emdiffuse-aleatoric").replace(image_size=16)
    diffusion = Diffusion("linear", 100, prediction)
    alpha_bar = diffusion.schedule.alpha_bar(99)
    a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = config
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, *, cond):
            assert torch.allclose(t, torch.full_like(t, alpha_bar))  # the highest noise level
            mean = cond if prediction == "x0" else (a * x - cond) / s  # v with x₀ = cond
            return torch.cat([mean, torch.full_like(cond, math.log(0.3**2))], dim=1)

    image = torch.rand(1, 1, 20, 28) * 2 - 1
    result = restore_aleatoric(
        Head(),
        diffusion,
        image,
        3,
        tile_size=16,
        overlap=4,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    torch.testing.assert_close(result.mean, image, atol=1e-5, rtol=0)
    expected = 0.3 if prediction == "x0" else 0.3 * s
    torch.testing.assert_close(result.std, torch.full_like(image, expected), atol=1e-5, rtol=0)


def test_aleatoric_mode_through_the_cli_path():
    loaded = identity_model("emdiffuse-aleatoric", 16, aleatoric_log_variance=math.log(0.04))
    pixels = np.random.default_rng(3).random((23, 30), dtype=np.float32)
    restored, std = restore_pixels(loaded, pixels, kind="aleatoric", samples=2, progress=False)
    np.testing.assert_allclose(restored, pixels, atol=1e-6)
    np.testing.assert_allclose(std, np.full_like(pixels, 0.2 / 2), atol=1e-6)  # [−1,1] → [0,1]


def test_a_restoration_with_nan_or_inf_is_refused_not_clamped():
    loaded = identity_model("emdiffuse", 16)

    def overflowing(x, t, *, cond):
        out = cond.clone()
        out[..., 0, 0] = float("nan")  # inf would be clipped with the predicted x0
        return out

    loaded.model.forward = overflowing
    pixels = np.random.default_rng(4).random((16, 16), dtype=np.float32)
    with pytest.raises(SamplingError, match=r"NaN or inf at \d+ pixel\(s\) \(ddim, 2 steps\)"):
        restore_pixels(loaded, pixels, samples=2, steps=2, sampler="ddim", progress=False)


# ---------------------------------------------------------------------- one-line errors
def run_error(args, capsys) -> str:
    assert main(["restore", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("diffunet restore: error:")
    return err


def test_bad_inputs_are_one_line_errors(tmp_path, identity, capsys):
    identity("emdiffuse", 16)
    out = ["--out", str(tmp_path / "o")]
    assert "missing.png does not exist" in run_error(
        ["--from", "x", "--input", str(tmp_path / "missing.png"), *out], capsys
    )
    (tmp_path / "junk.png").write_bytes(b"not a png")
    assert "cannot read image" in run_error(
        ["--from", "x", "--input", str(tmp_path / "junk.png"), *out], capsys
    )
    np.save(tmp_path / "vol.npy", np.zeros((4, 8, 8), dtype=np.float32))
    err = run_error(["--from", "x", "--input", str(tmp_path / "vol.npy"), *out], capsys)
    assert "3D volume" in err and "dims=3 model" in err
    np.save(tmp_path / "text.npy", np.array([["a", "b"], ["c", "d"]]))
    err = run_error(["--from", "x", "--input", str(tmp_path / "text.npy"), *out], capsys)
    assert "text.npy holds <U1 values" in err
    image = np.zeros((8, 8), np.float32)
    image[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", image)
    err = run_error(["--from", "x", "--input", str(tmp_path / "nan.npy"), *out], capsys)
    assert "nan.npy holds 1 non-finite value(s)" in err
    write_png(tmp_path / "rgb.png", np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8))
    assert "colour image" in run_error(
        ["--from", "x", "--input", str(tmp_path / "rgb.png"), *out], capsys
    )
    write_png(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    assert "multiple of 8" in run_error(
        ["--from", "x", "--input", str(tmp_path / "ok.png"), "--tile", "12", *out], capsys
    )
    assert "needs a model with an aleatoric head" in run_error(
        ["--from", "x", "--input", str(tmp_path / "ok.png"), "--uncertainty", "aleatoric", *out],
        capsys,
    )
    assert not (tmp_path / "o").exists()  # nothing written for a bad input

    identity("emdiffuse-3d", 8)
    err = run_error(["--from", "x", "--input", str(tmp_path / "ok.png"), *out], capsys)
    assert "2D image" in err and "dims=2 model" in err


def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
    image = write_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    out = ["--input", str(image), "--out", str(tmp_path / "o")]
    assert "does not exist" in run_error(["--from", str(tmp_path / "nope"), *out], capsys)
    save_pretrained(UNet(small_config("ddpm-cifar10")), tmp_path / "uncond")
    assert "not a restoration model" in run_error(
        ["--from", str(tmp_path / "uncond"), *out], capsys
    )
    save_pretrained(UNet(small_config("emdiffuse-aleatoric")), tmp_path / "eps")
    assert "predict x0 or v" in run_error(
        ["--from", str(tmp_path / "eps"), "--uncertainty", "aleatoric", *out], capsys
    )


# ---------------------------------------------------------------------- a real tiny model
def tiny_checkpoint(folder: Path, preset: str, image_size: int, prediction: str) -> Path:
    torch.manual_seed(0)
    model = UNet(small_config(preset).replace(image_size=image_size))
    with torch.no_grad():  # the zero-initialised heads would make every sample identical
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_pretrained(model, folder)
    meta = {
        "diffusion": {"schedule": "cosine", "timesteps": 100, "prediction": prediction},
        "sample": {"sampler": "ddim", "steps": 2, "eta": 0.0},
    }
    (folder / "run.json").write_text(json.dumps(meta))
    return folder


def test_cli_end_to_end_with_tiny_real_models(tmp_path, capsys):
    rng = np.random.default_rng(4)
    write_png(tmp_path / "img.png", rng.integers(0, 256, (20, 27), dtype=np.uint8))
    np.save(tmp_path / "vol.npy", rng.random((9, 10, 11), dtype=np.float32))
    cases = [
        ("emdiffuse", 16, "img.png", "img_restored.png", "samples"),
        ("emdiffuse-aleatoric", 16, "img.png", "img_restored.png", "aleatoric"),
        ("emdiffuse-3d", 8, "vol.npy", "vol_restored.npy", "samples"),
    ]
    for preset, size, name, restored_name, kind in cases:
        checkpoint = tiny_checkpoint(tmp_path / preset, preset, size, "x0")
        out = tmp_path / f"out-{preset}"
        assert (
            main(
                [
                    "restore",
                    "--from",
                    str(checkpoint),
                    "--input",
                    str(tmp_path / name),
                    "--out",
                    str(out),
                    "--samples",
                    "2",
                    "--seed",
                    "1",
                ]
            )
            == 0
        )
        captured = capsys.readouterr()
        assert (
            f"uncertainty: {'aleatoric' if kind == 'aleatoric' else 'spread of 2'}" in captured.err
        )
        assert f"→ {restored_name}" in captured.out
        source = read_input(tmp_path / name, 3 if preset.endswith("3d") else 2)
        restored = read_input(out / restored_name, source.pixels.ndim)
        assert restored.pixels.shape == source.pixels.shape and restored.dtype == source.dtype
        std_name = restored_name.replace("restored", "uncertainty").replace(".png", ".tif")
        std = (
            np.load(out / std_name)
            if std_name.endswith(".npy")
            else tifffile.imread(out / std_name)
        )
        assert std.dtype == np.float32 and std.shape == source.pixels.shape
        assert np.isfinite(std).all() and std.max() > 0


def test_train_on_embedded_pairs_then_restore(tmp_path, capsys):
    """The user's workflow: write the embedded pairs as a paired folder, `diffunet train` on it
    for two steps, `diffunet restore --from RUN` a held-out picture."""
    from diffunet.data.em_pairs import EMPairs

    pairs = EMPairs(crop=16, train=("text",))
    pairs.write_pair_folder(tmp_path / "pairs", count=8)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path / "pairs"),
                "--image-size",
                "16",
                "--preset",
                "emdiffuse",
                "model_channels=16",
                "num_res_blocks=1",
                "norm_groups=8",
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--sample-steps",
                "2",
                "--threads",
                "1",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    held_out = pairs.evaluation_pairs()[0]
    crop = np.rint(held_out.noisy[:20, :30] * 255).astype(np.uint8)
    write_png(tmp_path / "held_out.png", crop)
    capsys.readouterr()
    assert (
        main(
            [
                "restore",
                "--from",
                str(run),
                "--input",
                str(tmp_path / "held_out.png"),
                "--out",
                str(tmp_path / "o"),
                "--samples",
                "2",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    restored = np.array(Image.open(tmp_path / "o" / "held_out_restored.png"))
    assert restored.shape == crop.shape and restored.dtype == np.uint8


# ---------------------------------------------------------------------- diffunet train --task
#: A two-step run of a tiny EMDiffuse-shaped model (seconds on a CPU).
TINY_RUN = [
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--sample-steps",
    "2",
    "--threads",
    "1",
    "--precision",
    "fp32",
]
TINY_RESTORE = [
    *TINY_RUN,
    "model_channels=8",
    "channel_mult=[1,2]",
    "num_res_blocks=1",
    "norm_groups=8",
    "num_head_channels=8",
]


def _run_files(run: Path) -> tuple[dict, dict]:
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    return config, json.loads((run / "checkpoint" / "run.json").read_text())["data"]


def _pair_folder(folder: Path, size: tuple[int, int] = (40, 36)) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        target = rng.integers(0, 200, size, dtype=np.uint8)
        for side, array in (("target", target), ("input", target + 30)):
            (folder / side).mkdir(parents=True, exist_ok=True)
            write_png(folder / side / f"{name}.png", array)
    return folder


def test_train_task_restore_on_a_paired_folder(tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--task",
                "restore",
                "--data",
                str(_pair_folder(tmp_path / "pairs")),
                "--image-size",
                "16",
                "--out",
                str(run),
                *TINY_RESTORE,
            ]
        )
        == 0
    )
    config, data = _run_files(run)
    assert config["preset"] == "emdiffuse" and config["model"]["cond_channels"] == 1
    assert config["data"] == {
        "source": str(tmp_path / "pairs"),
        "image_size": 16,
        "task": "restore",
    }
    assert data["pairs"] == 2 and data["crops"] == data["samples"] >= 4096
    assert data["spatial_size"] == [16, 16]


def test_train_task_restore_without_data_uses_the_embedded_em_pairs(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--task", "restore", "--out", str(run), *TINY_RESTORE]) == 0
    config, data = _run_files(run)
    assert config["preset"] == "emdiffuse" and config["model"]["cond_channels"] == 1
    assert config["data"] == {"source": "em-pairs", "image_size": 64, "task": "restore"}
    assert data["source"] == "em-pairs" and data["held_out_images"] == ["coins", "page"]


def test_task_restore_defaults_to_the_measured_training_settings():
    from diffunet.training.run_config import from_dict

    restore = from_dict({"data": {"task": "restore"}})
    assert (restore.train.steps, restore.train.batch_size, restore.train.lr) == (2500, 32, 1e-3)
    chosen = from_dict({"data": {"task": "restore"}, "train": {"batch_size": 8}})
    assert (chosen.train.steps, chosen.train.batch_size) == (2500, 8)  # given values win
    digits = from_dict({})
    assert (digits.train.steps, digits.train.batch_size, digits.train.lr) == (1500, 64, 2e-3)
    # EMDiffuse's discrete process, as measured; digits default to flow matching
    assert (restore.diffusion.process, digits.diffusion.process) == ("ddpm", "flow")
    flow = from_dict({"data": {"task": "restore"}, "diffusion": {"process": "flow"}})
    assert flow.diffusion.process == "flow"


def test_train_task_restore_on_unpaired_data_is_a_one_line_error(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    write_png(folder / "a.png", np.zeros((16, 16), np.uint8))
    run = tmp_path / "run"
    capsys.readouterr()
    assert (
        main(
            ["train", "--task", "restore", "--data", str(folder), "--out", str(run), *TINY_RESTORE]
        )
        != 0
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "--task restore needs paired data" in err and str(folder) in err
    assert not run.exists()


def test_train_task_generate_on_pairs_learns_the_targets(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--task",
                "generate",
                "--data",
                str(_pair_folder(tmp_path / "pairs")),
                "--image-size",
                "16",
                "--out",
                str(run),
                *TINY_RUN,
            ]
        )
        == 0
    )
    config, data = _run_files(run)
    assert config["preset"] == "ddpm-cifar10" and config["model"]["cond_channels"] == 0
    assert config["data"]["task"] == "generate" and "targets only" in data["inputs"]
    capsys.readouterr()  # a resumed run keeps its task
    assert main(["train", "--resume", "--out", str(run), "--task", "restore"]) != 0
    assert "data.task='restore' differs" in capsys.readouterr().err
