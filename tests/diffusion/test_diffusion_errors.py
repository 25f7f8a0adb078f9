"""Bad arguments to the diffusion layer raise ValueErrors saying what was given, what was expected
and how to fix it."""

from types import SimpleNamespace

import pytest
import torch

from diffunet import UNet
from diffunet.diffusion import Diffusion
from diffunet.errors import InvalidTypeError, InvalidValueError
from diffunet.model.introspect import small_config


def identity(x, t, **kwargs):
    return x


class Labelled:
    """A class-conditional callable with a null label."""

    null_label = 3

    def __call__(self, x, t, labels=None, context=None):
        return x


@pytest.fixture(scope="module")
def diffusion():
    return Diffusion("cosine", 100)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"sampler": "euler"},
            r"unknown sampler 'euler'.*'ddpm', 'ddim', 'dpm\+\+'.*diffusers scheduler protocol.*sampler='ddim'",
        ),
        ({"sampler": object()}, r"unknown sampler .*lacks \['set_timesteps'.*"),
        ({"steps": 0}, r"steps=0 is invalid: expected an integer in \[1, 100\].*more timesteps"),
        ({"steps": -5}, r"steps=-5 is invalid"),
        (
            {"steps": 101},
            r"steps=101 is invalid: expected an integer in \[1, 100\] \(this schedule has 100",
        ),
        ({"steps": 2.5}, r"steps=2.5 is invalid"),
        ({"eta": 1.5}, r"eta=1.5 is invalid: expected a number in \[0, 1\]"),
        (
            {"guidance": 3.0},
            r"guidance=3.0 needs a conditional model.*neither labels nor context.*guidance=1.0",
        ),
        ({"guidance": float("nan")}, r"guidance=nan is invalid: expected a finite number"),
    ],
)
def test_bad_sampling_arguments(diffusion, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        diffusion.sample(identity, (2, 3, 4), progress=False, **kwargs)


def test_guidance_needs_a_null_label(diffusion):
    with pytest.raises(ValueError, match=r"no null label.*num_classes"):
        diffusion.sample(
            lambda x, t, labels: x,
            (2, 3),
            labels=torch.tensor([0, 1]),
            guidance=2.0,
            progress=False,
        )
    diffusion.sample(
        Labelled(), (2, 3), labels=torch.tensor([0, 1]), guidance=2.0, steps=2, progress=False
    )


@pytest.mark.parametrize(
    ("shape", "kwargs", "pattern"),
    [
        (
            (2, 3, 4),
            {"cond": torch.zeros(3, 1, 4)},
            r"cond has shape \(3, 1, 4\).*batch 2.*expected \(2, C_cond, 4\)",
        ),
        (
            (2, 3, 4),
            {"cond": torch.zeros(2, 1, 5)},
            r"cond has shape \(2, 1, 5\).*spatial size \(4,\)",
        ),
        ((2, 3), {"labels": torch.tensor([0, 1, 2])}, r"labels has shape \(3,\), expected \(2,\)"),
        (
            (2, 3),
            {"context": torch.zeros(2, 4)},
            r"context has shape \(2, 4\), expected \(2, N, context_dim\)",
        ),
        ((0, 3), {}, r"shape=\(0, 3\) is invalid: expected a tuple of positive ints"),
        ((5,), {}, r"shape=\(5,\) is invalid"),
        ("big", {}, r"shape='big' is invalid"),
    ],
)
def test_shape_mismatches(diffusion, shape, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        diffusion.sample(Labelled(), shape, progress=False, **kwargs)


def test_shape_against_a_unet(diffusion):
    model = UNet(small_config("ddpm-cifar10"))
    with pytest.raises(
        ValueError, match=r"shape=\(2, 4, 8, 8\) has 4 channels.*in_channels=3.*\(B, 3, \*spatial\)"
    ):
        diffusion.sample(model, (2, 4, 8, 8), progress=False)
    with pytest.raises(ValueError, match=r"3 spatial axes but the model has dims=2"):
        diffusion.sample(model, (2, 3, 8, 8, 8), progress=False)


def test_model_output_shape_is_checked(diffusion):
    with pytest.raises(
        ValueError,
        match=r"returned \(2, 6, 4\) for an input x of shape \(2, 3, 4\); expected \(2, 3, 4\)",
    ):
        diffusion.sample(lambda x, t: torch.cat([x, x], 1), (2, 3, 4), steps=2, progress=False)
    with pytest.raises(ValueError, match=r"returned \(2, 6, 4\).*expected \(2, 3, 4\)"):
        diffusion.loss(lambda x, t: torch.cat([x, x], 1), torch.zeros(2, 3, 4))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"schedule": "quadratic"}, r"unknown noise schedule 'quadratic'"),
        ({"schedule": 3}, r"schedule must be a name"),
        (
            {"prediction": "score"},
            r"unknown prediction 'score'; expected one of \('eps', 'x0', 'v'\)",
        ),
        (
            {"prediction": "eps", "zero_terminal_snr": True},
            r"prediction='eps' cannot be used with a zero-terminal-SNR.*prediction='v'",
        ),
        ({"min_snr_gamma": -1}, r"min_snr_gamma=-1 is invalid.*positive number"),
        ({"cond_drop_prob": 1.5}, r"cond_drop_prob=1.5 is invalid.*\[0, 1\]"),
        ({"timestep_spacing": "even"}, r"timestep_spacing='even' is invalid.*'trailing'"),
        ({"timesteps": 0}, r"timesteps=0 is invalid.*integer >= 2"),
    ],
)
def test_bad_constructor_arguments(kwargs, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        Diffusion(**kwargs)


@pytest.mark.parametrize(
    ("x0", "kwargs", "pattern"),
    [
        (
            torch.zeros(2, 3, dtype=torch.long),
            {},
            r"x0 must be a floating-point tensor.*torch.int64",
        ),
        (torch.zeros(3), {}, r"x0 must be a floating-point tensor \(B, C, \*spatial\)"),
        (
            torch.zeros(2, 3),
            {"timesteps": torch.tensor([0, 100])},
            r"timesteps must be .*values in \[0, 99\]",
        ),
        (
            torch.zeros(2, 3),
            {"timesteps": torch.tensor([0.5, 1.0])},
            r"timesteps must be an integer tensor",
        ),
        (torch.zeros(2, 3), {"timesteps": torch.tensor([1, 2, 3])}, r"shape \(2,\)"),
        (
            torch.zeros(2, 3),
            {"noise": torch.zeros(2, 4)},
            r"noise has shape \(2, 4\), expected x0's shape \(2, 3\)",
        ),
        (torch.zeros(2, 3, 4), {"cond": torch.zeros(1, 1, 4)}, r"cond has shape \(1, 1, 4\)"),
    ],
)
def test_bad_loss_arguments(diffusion, x0, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        diffusion.loss(identity, x0, **kwargs)


def test_conditioning_dropout_needs_a_null_label():
    with pytest.raises(ValueError, match=r"no null label"):
        Diffusion("cosine", 100, cond_drop_prob=0.1).loss(
            lambda x, t, labels: x, torch.zeros(2, 3), labels=torch.tensor([0, 1])
        )


def test_scheduler_with_wrong_number_of_training_steps():
    from diffusers import DDIMScheduler

    with pytest.raises(
        ValueError,
        match=r"scheduler has 1000 training timesteps but this Diffusion has 100.*num_train_timesteps=100",
    ):
        Diffusion("cosine", 100).sample(
            identity, (2, 3), sampler=DDIMScheduler(), steps=5, progress=False
        )


class Configured(Labelled):
    """A class-conditional callable whose config states its classes, as a UNet's does."""

    config = SimpleNamespace(num_classes=3)


@pytest.mark.parametrize(("labels", "bad"), [([0, 4], "4"), ([-1, 3], "-1")])
def test_labels_out_of_the_models_range(diffusion, labels, bad):
    pattern = rf"labels has value\(s\) {bad} outside the valid range \[0, 3\].*null label"
    with pytest.raises(InvalidValueError, match=pattern):
        diffusion.sample(Configured(), (2, 3), labels=torch.tensor(labels), progress=False)
    with pytest.raises(InvalidValueError, match=pattern):
        diffusion.loss(Configured(), torch.zeros(2, 3), labels=torch.tensor(labels))
    with pytest.raises(InvalidTypeError, match=r"labels must be an integer tensor.*float32"):
        diffusion.loss(Configured(), torch.zeros(2, 3), labels=torch.tensor([0.0, 1.0]))
    # the null label (3) is in range; a model without a stated num_classes is not range-checked
    diffusion.sample(Configured(), (2, 3), labels=torch.tensor([3, 0]), steps=1, progress=False)
    diffusion.loss(Labelled(), torch.zeros(2, 3), labels=torch.tensor(labels))
