"""The denoiser protocols: what the diffusion layer reads from a model, and from wrappers of it."""

from types import SimpleNamespace

import pytest
import torch

from diffunet import UNet
from diffunet.diffusion import (
    Denoiser,
    DenoiserTraits,
    DenoisingModel,
    Diffusion,
    call_model,
    traits_of,
)
from diffunet.diffusion.process import model_device
from diffunet.model.introspect import small_config


class Forwarding:
    """A wrapper that forwards unknown attributes (as torch.compile and the CUDA-graph model do)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


class Recorder:
    """A callable that records the time input it receives; `config` as given."""

    def __init__(self, config=None):
        if config is not None:
            self.config = config
        self.times = []

    def __call__(self, x, t=None, **kwargs):
        self.times.append(t)
        return torch.zeros_like(x)


def test_any_callable_is_a_denoising_model():
    assert isinstance(lambda x, t: x, DenoisingModel)
    assert isinstance(UNet(small_config("ddpm-cifar10")), DenoisingModel)
    assert not isinstance(3, DenoisingModel)


def test_traits_of_a_unet_come_from_its_config():
    config = small_config("emdiffuse-aleatoric")
    traits = traits_of(UNet(config))
    assert traits == DenoiserTraits(
        use_timestep=True,
        noise_level=True,
        aleatoric=True,
        in_channels=config.in_channels,
        dims=config.dims,
    )
    assert config.time_embed_type == "noise_level" and config.aleatoric


def test_plain_callable_and_partial_config_get_the_defaults():
    assert traits_of(lambda x, t: x) == DenoiserTraits()
    partial = traits_of(Recorder(SimpleNamespace(aleatoric=1, dims="2")))
    assert partial == DenoiserTraits(aleatoric=True)  # a non-int dims is not a dimensionality


def test_forwarded_config_still_sets_the_time_input():
    """A wrapper that forwards `config` through __getattr__ gets ᾱ, not the step index."""
    inner = Recorder(SimpleNamespace(time_embed_type="noise_level"))
    t = torch.tensor([3, 7])
    alpha_bar = torch.tensor([0.9, 0.25], dtype=torch.float64)
    call_model(Forwarding(inner), torch.zeros(2, 1, 4), t, alpha_bar)
    assert inner.times[-1].dtype == torch.float32
    torch.testing.assert_close(inner.times[-1], alpha_bar.float())
    plain = Recorder()  # no config: step indices
    call_model(plain, torch.zeros(2, 1, 4), t, alpha_bar)
    assert plain.times[-1].dtype == torch.long and plain.times[-1].tolist() == [3, 7]


def test_model_without_timestep_is_called_without_time():
    model = Recorder(SimpleNamespace(use_timestep=False))
    call_model(model, torch.zeros(2, 1, 4), torch.tensor([1, 2]), torch.tensor([0.5, 0.5]))
    assert model.times == [None]


def test_forwarded_null_label_guides():
    """Guidance reads `null_label` through a forwarding wrapper; a UNet without classes says so."""
    seen = []

    class Labelled:
        null_label = 5

        def __call__(self, x, t, labels=None):
            seen.append(labels.tolist())
            return torch.zeros_like(x)

    denoiser = Denoiser(Forwarding(Labelled()), "eps", labels=torch.tensor([1, 2]), guidance=2.0)
    assert denoiser.null_label == 5
    denoiser.output(torch.zeros(2, 1, 4), torch.tensor([1, 1]), torch.tensor([0.5, 0.5]))
    assert seen == [[1, 2, 5, 5]]  # conditional then unconditional, in one batch
    unlabelled = UNet(small_config("ddpm-cifar10"))
    with pytest.raises(ValueError, match="no null label"):
        Denoiser(unlabelled, "eps", labels=torch.tensor([1]), guidance=2.0)


def test_model_device_and_shape_checks_read_the_protocol():
    model = UNet(small_config("ddpm-cifar10"))
    assert model_device(model) == torch.device("cpu")
    assert model_device(lambda x, t: x, "meta") == torch.device("meta")
    channels = model.config.in_channels
    with pytest.raises(ValueError, match=f"denoises in_channels={channels}"):
        Diffusion("cosine", 10).sample(
            Forwarding(model), (1, channels + 1, 8, 8), steps=5, progress=False
        )
