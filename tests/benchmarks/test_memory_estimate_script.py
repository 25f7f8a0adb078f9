"""`benchmarks/memory_estimate.py`: the fake-tensor estimate against the same step on real tensors."""

import pytest
import torch

from diffunet import UNet
from diffunet.model.presets import preset


@pytest.fixture
def estimate(benchmark_script):
    return benchmark_script("memory_estimate")


def tiny(**overrides):
    """A one-level model: every kind of layer, few of them (fake tensors cost per operation)."""
    return preset(
        "ddpm-cifar10",
        model_channels=16,
        norm_groups=8,
        image_size=8,
        channel_mult=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
        zero_init=False,
        **overrides,
    )


#: (checkpoint, fake, norm_from) → the estimate for `tiny()` at batch 8, computed once.
_PEAKS: dict[tuple, tuple[dict[str, int], int]] = {}


def peak(estimate, checkpoint=False, fake=True, norm_from=None):
    key = (checkpoint, fake, norm_from)
    if key not in _PEAKS:
        config = tiny(use_checkpoint=checkpoint)
        _PEAKS[key] = estimate.peak_training_bytes(config, 8, fake=fake, norm_from=norm_from)
    return _PEAKS[key]


@pytest.mark.parametrize("checkpoint", [False, True])
def test_fake_tensors_estimate_what_real_tensors_take(estimate, checkpoint):
    fake, params = peak(estimate, checkpoint)
    real, real_params = peak(estimate, checkpoint, fake=False)
    with torch.device("meta"):
        assert params == real_params == sum(p.numel() for p in UNet(tiny()).parameters())
    assert fake["PARAM"] == real["PARAM"] == 4 * params
    assert fake["Total"] == pytest.approx(real["Total"], rel=0.01)


def test_checkpointing_trades_activations_for_recomputation(estimate):
    plain, params = peak(estimate)
    checkpointed, _ = peak(estimate, checkpoint=True)
    # at its peak a checkpointed step holds the block inputs and one block's recomputation
    assert checkpointed["ACT"] < plain["ACT"] / 2
    assert checkpointed["Total"] < plain["Total"]
    assert plain["OPT"] == checkpointed["OPT"] >= 8 * params  # AdamW's two float32 moments


def _saved_bytes(estimate, norm_from: int) -> dict[tuple, int]:
    """Bytes that one training-mode norm (bf16 input under autocast, SiLU) keeps for backward,
    by (shape, dtype), its parameters left out."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffunet.accel.norm import norm_act

    saved: dict[tuple, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t.numel():
            key = (tuple(t.shape), t.dtype)
            saved[key] = saved.get(key, 0) + t.numel() * t.element_size()
        return t

    with estimate.gpu_norms(norm_from), FakeTensorMode():
        norm = torch.nn.GroupNorm(8, 64)
        x = torch.randn(2, 64, 16, 16, dtype=torch.bfloat16, requires_grad=True)
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16),
        ):
            norm_act(norm, x)
    return saved


def test_a_routed_norm_keeps_what_the_fused_op_keeps(estimate):
    """The GPU kernels keep the bf16 input and a float32 centre and rstd per sample and
    channel; the reference path under autocast keeps float32 copies of the whole tensor."""
    n = 2 * 64 * 16 * 16
    assert _saved_bytes(estimate, 0) == {
        ((2, 64, 16, 16), torch.bfloat16): 2 * n,
        ((2, 64), torch.float32): 2 * 4 * 2 * 64,
    }
    reference = _saved_bytes(estimate, n + 1)  # one element too large to be routed
    assert reference.get(((2, 64, 16, 16), torch.float32), 0) >= 2 * 4 * n


def test_the_norm_threshold_moves_the_estimate(estimate):
    """Norms of the tiny model are far below the GPU's eager threshold (2^24 elements): the
    default estimate is the reference path's; routed from 0, each keeps less."""
    reference, _ = peak(estimate)
    fused, _ = peak(estimate, norm_from=0)
    assert fused["ACT"] < reference["ACT"] and fused["Total"] < reference["Total"]
    assert fused["PARAM"] == reference["PARAM"] and fused["OPT"] == reference["OPT"]


def test_the_command_line_prints_the_estimate(estimate, capsys):
    assert (
        estimate.main(
            [
                "--preset",
                "ddpm-cifar10",
                "--image-size",
                "8",
                "--batch-size",
                "4",
                "model_channels=16",
                "norm_groups=8",
                "channel_mult=[1]",
                "num_res_blocks=1",
                "attention_resolutions=[]",
                "--ema",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "(0.0M parameters), 8^2, batch 4, EMA: estimated peak" in out
    assert "ACT" in out and "EMA 0.00 GiB" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--preset", "ldm", "bogus_key=3"], "unknown UNetConfig field(s) ['bogus_key']"),
        (["--preset", "efficient-unet"], "has no image size; pass --image-size"),
        (["--preset", "text-unet"], "cross-attention (context_dim) are not estimated"),
        (["--preset", "ldm", "--norm-from", "-1"], "--norm-from must be at least 0, got -1"),
    ],
)
def test_what_it_cannot_estimate_is_said_in_one_line(estimate, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        estimate.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
