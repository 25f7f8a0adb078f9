"""Invalid configs and forward arguments raise ValueError/TypeError saying what was given,
what was expected and how to fix it."""

import copy

import pytest
import torch

from diffunet import ConfigError, UNet, UNetConfig
from diffunet.model.introspect import small_config

BAD_CONFIGS = [
    ({"dims": 4}, r"dims=4.*1, 2 or 3"),
    ({"channel_mult": ()}, r"channel_mult=\(\).*non-empty"),
    ({"model_channels": 20, "norm_groups": 8}, r"norm_groups=8.*\[20, 60\].*lower norm_groups"),
    ({"num_heads": 3, "attention_resolutions": (2,)}, r"num_heads=3.*divisor.*width 32"),
    ({"attention_resolutions": (16,)}, r"attention_resolutions=\(16,\).*\[1, 2, 4, 8\]"),
    ({"dropout": -0.1}, r"dropout=-0.1.*\[0, 1\)"),
    ({"num_res_blocks": 0}, r"num_res_blocks=0.*positive integer"),
    ({"attention_type": "sparse"}, r"attention_type='sparse'.*full"),
    ({"resample_axes": ((0,), (1,))}, r"resample_axes.*3 entries"),
    ({"image_size": 30}, r"image_size=30.*divisible by \(8, 8\).*\(24, 24\).*\(32, 32\)"),
    ({"use_timestep": False, "use_scale_shift_norm": True}, r"use_scale_shift_norm.*no time"),
]


@pytest.mark.parametrize(("changes", "pattern"), BAD_CONFIGS)
def test_invalid_config_is_rejected_with_a_useful_message(changes, pattern):
    base = dict(model_channels=16, channel_mult=(1, 2, 2, 2), norm_groups=8)
    with pytest.raises(ConfigError, match=pattern):
        UNetConfig(**{**base, **changes})


def test_unknown_field_lists_valid_ones():
    with pytest.raises(
        ConfigError, match=r"unknown UNetConfig field\(s\) \['base_channels'\].*model_channels"
    ):
        UNetConfig.from_dict({"base_channels": 64})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.fixture(scope="module")
def model():
    return UNet(small_config("ddpm-cifar10"))


@pytest.fixture(scope="module")
def conditional():
    config = small_config("text-unet").replace(
        cond_channels=1,
        num_classes=4,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
    )
    return UNet(config).eval()


def test_wrong_channel_count(model):
    with pytest.raises(ValueError, match="x has 4 channels but the model expects in_channels=3"):
        model(torch.randn(1, 4, 16, 16), 1)


def test_wrong_number_of_dimensions(model):
    with pytest.raises(ValueError, match=r"dims=2 model expecting \(B, C, H, W\).*dims=3"):
        model(torch.randn(1, 3, 8, 16, 16), 1)


def test_indivisible_size_names_nearest_valid_sizes(model):
    with pytest.raises(
        ValueError, match=r"\(20, 16\).*\(8, 8\).*\(16, 16\) or \(24, 16\).*pad_to_multiple"
    ):
        model(torch.randn(1, 3, 20, 16), 1)


def test_integer_input_is_a_type_error(model):
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.long), 1)


def test_timestep_batch_mismatch(model):
    with pytest.raises(ValueError, match=r"t has shape \(3,\) but x has batch 2"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(3))


def test_missing_timestep(model):
    with pytest.raises(ValueError, match="t is required"):
        model(torch.randn(2, 3, 16, 16))


def test_conditioning_given_to_an_unconditional_model(model):
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="cond_channels=0"):
        model(x, 1, cond=torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="context_dim=None"):
        model(x, 1, context=torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="num_classes=None"):
        model(x, 1, labels=torch.tensor([0]))


def test_missing_conditioning(conditional):
    x = torch.randn(1, 3, 16, 16)
    cond, context, labels = torch.randn(1, 1, 16, 16), torch.randn(1, 4, 12), torch.tensor([1])
    with pytest.raises(ValueError, match=r"pass cond=Tensor\(1, 1, 16, 16\)"):
        conditional(x, 1, context=context, labels=labels)
    with pytest.raises(ValueError, match=r"context of shape \(B=1, N, 12\)"):
        conditional(x, 1, cond=cond, labels=labels)
    with pytest.raises(ValueError, match="null_label=4"):
        conditional(x, 1, cond=cond, context=context)


def test_malformed_conditioning(conditional):
    x = torch.randn(1, 3, 16, 16)
    cond, context, labels = torch.randn(1, 1, 16, 16), torch.randn(1, 4, 12), torch.tensor([1])
    with pytest.raises(
        ValueError, match=r"cond has shape \(1, 1, 8, 8\), expected \(1, 1, 16, 16\)"
    ):
        conditional(x, 1, cond=torch.randn(1, 1, 8, 8), context=context, labels=labels)
    with pytest.raises(ValueError, match=r"context has shape \(1, 4, 7\), expected \(1, N, 12\)"):
        conditional(x, 1, cond=cond, context=torch.randn(1, 4, 7), labels=labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        conditional(x, 1, cond=cond, context=context, labels=torch.tensor([1.0]))


def test_concatenated_condition_hint(conditional):
    with pytest.raises(ValueError, match="pass the conditioning image as cond="):
        conditional(torch.randn(1, 4, 16, 16), 1)


def test_unet_rejects_a_dict():
    with pytest.raises(TypeError, match="UNet expects a UNetConfig"):
        UNet({"dims": 2})


BAD_FIELD_TYPES = [
    ({"num_heads": "4"}, r"num_heads must be an int; got str '4'; write the number 4"),
    ({"dropout": "0.1"}, r"dropout must be a number; got str '0.1'"),
    ({"channel_mult": 2}, r"channel_mult must be a list of ints, e\.g\. \[1, 2, 4\]; got int 2"),
    ({"attention_resolutions": 2}, r"attention_resolutions must be a list of ints.*got int 2"),
    ({"channel_mult": [1, "2"]}, r"channel_mult must be a list of ints.*got list \[1, '2'\]"),
    ({"use_checkpoint": 1}, r"use_checkpoint must be a bool; got int 1"),
    ({"dims": 2.0}, r"dims must be an int; got float 2\.0"),
    ({"num_classes": True}, r"num_classes must be None or an int; got bool True"),
    ({"attention_type": 3}, r"attention_type must be a string, one of \('full'.*got int 3"),
    ({"norm_eps": "1e-5"}, r"norm_eps must be a number.*YAML reads 1e-5 as a string"),
    ({"norm_eps": float("nan")}, r"norm_eps=nan is invalid: expected a finite number"),
    ({"norm_eps": float("inf")}, r"norm_eps=inf is invalid: expected a finite number"),
    ({"dropout": float("nan")}, r"dropout=nan is invalid: expected a finite number"),
]


@pytest.mark.parametrize(("changes", "pattern"), BAD_FIELD_TYPES)
def test_field_of_the_wrong_type_names_field_value_and_expected_type(changes, pattern):
    with pytest.raises(ConfigError, match=r"UNetConfig\." + pattern):
        UNetConfig(**changes)


def test_json_lists_and_integral_numbers_are_accepted():
    config = UNetConfig.from_json(
        '{"dims": 3, "model_channels": 16, "norm_groups": 8, "channel_mult": [1, 2], '
        '"resample_axes": [[1, 2]], "image_size": [4, 8, 8], "dropout": 0}'
    )
    assert config.channel_mult == (1, 2) and config.resample_axes == ((1, 2),)
    assert config.image_size == (4, 8, 8) and isinstance(config.dropout, float)
    assert UNetConfig.from_json(config.to_json()) == config


def conditional_inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=generator).to(dtype)
    cond = torch.randn(2, 1, 8, 8, generator=generator).to(dtype)
    context = torch.randn(2, 3, 12, generator=generator).to(dtype)
    return x, {"cond": cond, "context": context, "labels": torch.tensor([0, 4])}


def test_other_float_dtypes_are_cast_to_the_models(conditional):
    from diffunet.accel import accelerate

    accelerated = accelerate(copy.deepcopy(conditional))
    # float16 inputs hold values that float32 and float64 represent exactly: one reference.
    x16, kwargs16 = conditional_inputs(torch.float16)
    with torch.no_grad():
        expected = conditional(
            x16.float(), 3, **{k: to_dtype(v, torch.float32) for k, v in kwargs16.items()}
        )
        for net in (conditional, accelerated):
            for dtype in (torch.float64, torch.float16):
                kwargs = {k: to_dtype(v, dtype) for k, v in kwargs16.items()}
                out = net(x16.to(dtype), 3, **kwargs)
                assert out.dtype == torch.float32
                torch.testing.assert_close(out, expected)


def to_dtype(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.to(dtype) if value.is_floating_point() else value


@pytest.mark.parametrize(
    ("argument", "value", "pattern"),
    [
        ("x", torch.zeros(2, 3, 8, 8, dtype=torch.bool), r"x must be a floating-point.*bool"),
        ("cond", torch.zeros(2, 1, 8, 8, dtype=torch.uint8), r"cond must be a floating.*uint8"),
        ("context", torch.zeros(2, 3, 12, dtype=torch.long), r"context must be floating.*token"),
        ("labels", torch.tensor([0.0, 1.0]), r"labels must be an integer tensor.*float32"),
        ("cond", [[0.0]], r"cond must be a torch.Tensor or None, got list"),
    ],
)
def test_wrong_input_dtype_is_a_type_error_naming_the_argument(
    conditional, argument, value, pattern
):
    from diffunet.errors import InvalidTypeError

    x, kwargs = conditional_inputs()
    if argument == "x":
        x = value
    else:
        kwargs[argument] = value
    with pytest.raises(InvalidTypeError, match=pattern):
        conditional(x, 1, **kwargs)


@pytest.mark.parametrize(("labels", "bad"), [([0, 5], "5"), ([-1, 2], "-1"), ([-3, 9], "-3, 9")])
def test_labels_out_of_range_name_the_values_and_the_range(conditional, labels, bad):
    from diffunet.errors import InvalidValueError

    x, kwargs = conditional_inputs()
    with pytest.raises(InvalidValueError, match=rf"labels has value\(s\) {bad} outside.*\[0, 4\]"):
        conditional(x, 1, **{**kwargs, "labels": torch.tensor(labels)})


def test_nan_inputs_are_refused_only_while_value_checks_are_on(conditional):
    from diffunet.errors import InvalidValueError
    from diffunet.model.validation import value_checks, value_checks_enabled

    x, kwargs = conditional_inputs()
    kwargs["context"][0, 0, 0] = float("nan")
    with torch.no_grad():
        conditional(x, 1, **kwargs)  # off by default: no pass over the data
        with value_checks():
            assert value_checks_enabled()
            with pytest.raises(InvalidValueError, match=r"context holds 1 NaN and 0 inf"):
                conditional(x, 1, **kwargs)
            x[1, 0, 0, 0] = float("inf")
            with pytest.raises(InvalidValueError, match=r"x holds 0 NaN and 1 inf"):
                conditional(x, 1, **kwargs)
    assert not value_checks_enabled()


def test_value_checks_switch_from_the_environment(monkeypatch):
    from diffunet.errors import InvalidTypeError
    from diffunet.model import validation

    for text, enabled in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv(validation.CHECK_VALUES_ENV, text)
        assert validation._enabled_from_env() is enabled
    monkeypatch.setenv(validation.CHECK_VALUES_ENV, "maybe")
    with pytest.warns(UserWarning, match=r"DIFFUNET_CHECK_VALUES='maybe' is not 1 or 0"):
        assert validation._enabled_from_env() is False
    with pytest.raises(InvalidTypeError, match=r"takes True or False, got str 'yes'"):
        validation.set_value_checks("yes")
