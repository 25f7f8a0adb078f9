"""`benchmarks/memory_estimate.py`: the fake-tensor estimate against the same step on real tensors."""

import pytest

from diffunet.presets import preset


@pytest.fixture
def estimate(benchmark_script):
    return benchmark_script("memory_estimate")


def tiny(**overrides):
    return preset("ddpm-cifar10", model_channels=16, norm_groups=8, image_size=16,
                  zero_init=False, **overrides)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_fake_tensors_estimate_what_real_tensors_take(estimate, checkpoint):
    config = tiny(use_checkpoint=checkpoint)
    fake, params = estimate.peak_training_bytes(config, 8)
    real, real_params = estimate.peak_training_bytes(config, 8, fake=False)
    assert params == real_params == 565_315
    assert fake["PARAM"] == real["PARAM"] == 4 * params
    assert fake["Total"] == pytest.approx(real["Total"], rel=0.01)


def test_checkpointing_trades_activations_for_recomputation(estimate):
    plain, params = estimate.peak_training_bytes(tiny(), 32)
    checkpointed, _ = estimate.peak_training_bytes(tiny(use_checkpoint=True), 32)
    assert checkpointed["ACT"] < plain["ACT"] / 10
    assert checkpointed["Total"] < plain["Total"]
    assert plain["OPT"] >= 8 * params  # AdamW's two float32 moments


def test_the_command_line_prints_the_estimate(estimate, capsys):
    assert estimate.main(["--preset", "ddpm-cifar10", "--image-size", "16", "--batch-size", "4",
                          "model_channels=16", "norm_groups=8", "--ema"]) == 0
    out = capsys.readouterr().out
    assert "(0.6M parameters), 16^2, batch 4, EMA: estimated peak" in out
    assert "ACT" in out and "EMA 0.00 GiB" in out


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "ldm", "bogus_key=3"], "unknown UNetConfig field(s) ['bogus_key']"),
    (["--preset", "efficient-unet"], "has no image size; pass --image-size"),
    (["--preset", "text-unet"], "cross-attention (context_dim) are not estimated"),
])
def test_what_it_cannot_estimate_is_said_in_one_line(estimate, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        estimate.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
