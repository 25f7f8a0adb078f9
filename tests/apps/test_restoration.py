"""Restoration with uncertainty and tiled inference with overlap blending (1D, 2D, 3D)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from diffunet import UNet
from diffunet.apps.restoration import Restoration, restore
from diffunet.apps.tiling import blend_window, ramp_window, resolve_tiling, tile_starts, tiled_map
from diffunet.diffusion import Diffusion
from diffunet.model.introspect import small_config


def returns_cond(x, t, *, cond):
    """An x₀-predicting "model" that returns its conditioning image."""
    return cond


X0 = Diffusion("cosine", 50, prediction="x0")


# ---------------------------------------------------------------------- tiling geometry
def test_tile_starts_cover_the_axis_with_full_tiles():
    for size, tile, overlap in [(45, 16, 5), (16, 16, 4), (10, 16, 4), (17, 16, 0), (100, 7, 3)]:
        starts = tile_starts(size, tile, overlap)
        covered = torch.zeros(size, dtype=torch.bool)
        for s in starts:
            covered[s : s + min(tile, size)] = True
            assert s >= 0 and s + min(tile, size) <= size
        assert covered.all()
        assert all(b - a <= tile - overlap for a, b in itertools.pairwise(starts))


def test_window_ramps_only_towards_neighbours_and_never_vanishes():
    w = ramp_window(10, 4, rise=True, fall=False)
    assert (w > 0).all() and (w[4:] == 1).all() and (w[:4].diff() > 0).all()
    assert (ramp_window(10, 4, rise=False, fall=False) == 1).all()
    window = blend_window((8, 6), (3, 2), start=(0, 4), spatial=(20, 10))
    assert window.shape == (8, 6)
    assert (window[:, -1] == window[:, -2]).all()  # the tile touches the right border: no fall
    assert window[0, 2] == 1 and window[0, 0] < 1  # rises on the left (neighbour), not on top


def test_bad_tiling_arguments():
    with pytest.raises(
        ValueError, match=r"overlap=16 is invalid for tile_size=16.*0 <= overlap < tile"
    ):
        resolve_tiling((40, 40), 16, 16)
    with pytest.raises(ValueError, match=r"tile_size=\(8, 8, 8\) is invalid.*tuple of 2 ints"):
        resolve_tiling((40, 40), (8, 8, 8), None)
    with pytest.raises(ValueError, match=r"tile function returned shape"):
        tiled_map(lambda tile: tile[..., :-1], torch.zeros(1, 1, 20), 8, 2)


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [
        ((2, 1, 53), 16, 5),
        ((1, 2, 37, 45), 16, 5),
        ((1, 2, 37, 45), (16, 9), (4, 3)),
        ((1, 1, 13, 21, 17), 8, 3),
        ((1, 1, 5, 21, 17), (8, 8, 8), 2),  # an axis smaller than the tile
    ],
)
def test_identity_model_reproduces_the_input_through_tiles(shape, tile, overlap):
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = restore(
        returns_cond,
        X0,
        image,
        num_samples=4,
        tile_size=tile,
        overlap=overlap,
        steps=3,
        progress=False,
    )
    assert isinstance(result, Restoration)
    assert torch.equal(result.mean, image)
    assert torch.equal(result.std, torch.zeros_like(image))


def test_constant_image_gives_a_constant_result():
    image = torch.full((1, 1, 40, 33), 0.37)
    result = restore(
        returns_cond, X0, image, num_samples=2, tile_size=12, overlap=4, steps=2, progress=False
    )
    assert torch.equal(result.mean, image)


def test_no_seams_from_a_model_with_border_effects():
    """A zero-padded blur darkens tile borders; blending hides the seams that hard tiles show."""
    kernel = torch.full((1, 1, 5, 5), 1 / 25)

    def blurs_cond(x, t, *, cond):
        return F.conv2d(cond, kernel, padding=2)

    image = torch.full((1, 1, 64, 64), 0.8)

    def largest_jump(result):
        inner = result.mean[..., 4:-4, 4:-4]  # the image border itself is darkened either way
        return max(inner.diff(dim=-1).abs().max().item(), inner.diff(dim=-2).abs().max().item())

    hard = restore(
        blurs_cond, X0, image, num_samples=1, tile_size=16, overlap=0, steps=1, progress=False
    )
    blended = restore(
        blurs_cond, X0, image, num_samples=1, tile_size=16, overlap=8, steps=1, progress=False
    )
    assert largest_jump(hard) > 0.15  # a visible seam: 0.8 · 5/25 from one pixel to the next
    assert largest_jump(blended) < 0.02  # the border effect is spread over the 8-pixel overlap
    # Tile-edge pixels still contribute with small weights: 0.51 darkening at hard seams, < 0.05 here.
    assert (hard.mean[..., 4:-4, 4:-4] - 0.8).abs().max() > 0.5
    assert (blended.mean[..., 4:-4, 4:-4] - 0.8).abs().max() < 0.05


# ---------------------------------------------------------------------- with a real model
@pytest.fixture(scope="module")
def emdiffuse():
    torch.manual_seed(0)
    return UNet(small_config("emdiffuse-aleatoric")).eval()


def test_single_tile_equals_untiled(emdiffuse):
    diffusion = Diffusion("linear", 100)
    image = torch.rand(2, 1, 16, 24) * 2 - 1
    kwargs = dict(num_samples=3, steps=3, eta=1.0, progress=False)
    untiled = restore(
        emdiffuse, diffusion, image, generator=torch.Generator().manual_seed(0), **kwargs
    )
    tiled = restore(
        emdiffuse,
        diffusion,
        image,
        tile_size=(32, 32),
        overlap=4,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    assert torch.equal(tiled.mean, untiled.mean) and torch.equal(tiled.std, untiled.std)
    assert untiled.std.max() > 0.05  # the samples differ (some pixels clip to ±1 in all of them)


def test_mean_and_std_are_those_of_the_samples(emdiffuse):
    diffusion = Diffusion("linear", 100)
    image = torch.rand(2, 1, 8, 16) * 2 - 1
    result = restore(
        emdiffuse,
        diffusion,
        image,
        num_samples=5,
        steps=4,
        eta=1.0,
        generator=torch.Generator().manual_seed(3),
        progress=False,
    )
    samples = diffusion.sample(
        emdiffuse,
        (10, 1, 8, 16),
        cond=image.repeat_interleave(5, 0),
        steps=4,
        eta=1.0,
        generator=torch.Generator().manual_seed(3),
        progress=False,
    ).reshape(2, 5, 1, 8, 16)
    torch.testing.assert_close(result.mean, samples.mean(1))
    torch.testing.assert_close(result.std, samples.std(1, correction=0))
    chunked = restore(
        emdiffuse,
        diffusion,
        image,
        num_samples=5,
        steps=4,
        eta=1.0,
        batch_size=3,
        generator=torch.Generator().manual_seed(3),
        progress=False,
    )
    assert chunked.mean.shape == (2, 1, 8, 16) and chunked.std.max() > 0.05


def test_tiled_restoration_with_2d_and_3d_unets(emdiffuse):
    diffusion = Diffusion("linear", 100)
    result = restore(
        emdiffuse,
        diffusion,
        torch.rand(1, 1, 20, 28),
        num_samples=2,
        tile_size=16,
        overlap=4,
        steps=2,
        progress=False,
    )
    assert result.mean.shape == result.std.shape == (1, 1, 20, 28)
    assert torch.isfinite(result.mean).all() and (result.std >= 0).all()

    torch.manual_seed(0)
    volume_model = UNet(small_config("emdiffuse-3d")).eval()
    volume = torch.rand(1, 1, 10, 12, 9)
    result = restore(
        volume_model,
        diffusion,
        volume,
        num_samples=2,
        tile_size=8,
        overlap=2,
        steps=2,
        progress=False,
    )
    assert result.mean.shape == (1, 1, 10, 12, 9) and torch.isfinite(result.std).all()


def test_inputs_larger_than_the_training_size_are_tiled_automatically():
    torch.manual_seed(0)
    model = UNet(small_config("emdiffuse").replace(image_size=16)).eval()
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[2:])))
    restore(
        model,
        Diffusion("linear", 100),
        torch.rand(1, 1, 24, 40),
        num_samples=1,
        steps=1,
        progress=False,
    )
    assert set(sizes) == {(16, 16)} and len(sizes) == 2 * 3  # default overlap 4: 2 × 3 tiles


def test_bad_restoration_arguments(emdiffuse):
    diffusion = Diffusion("linear", 100)
    with pytest.raises(ValueError, match=r"image-conditioned model.*cond_channels=0"):
        restore(UNet(small_config("ddpm-cifar10")), diffusion, torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"image must be a floating-point tensor.*image\[None\]"):
        restore(emdiffuse, diffusion, torch.rand(16, 16))
    with pytest.raises(ValueError, match=r"num_samples=0 is invalid"):
        restore(emdiffuse, diffusion, torch.rand(1, 1, 8, 8), num_samples=0)
