"""diffusers `UNet2DModel` import: the same outputs on every expressible configuration (random
weights, perturbed so that no layer is zero), `ddpm-cifar10` as google/ddpm-cifar10-32, and a
clear error naming each option diffunet cannot express."""

import json

import pytest
import torch

from diffunet import preset
from diffunet.cli import main
from diffunet.interop import ConversionError, config_from_diffusers, from_diffusers
from diffunet.model import load_pretrained

diffusers = pytest.importorskip("diffusers")
UNet2DModel = diffusers.UNet2DModel

# google/ddpm-cifar10-32's published config.json (diffusers 0.0.4; dropout as in Ho et al.'s
# CIFAR-10 training, which the config file does not record).
DDPM_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_eps=1e-6,
    norm_num_groups=32,
    flip_sin_to_cos=False,
    freq_shift=1,
    dropout=0.1,
    attention_head_dim=None,
    downsample_padding=0,
    mid_block_scale_factor=1,
    act_fn="silu",
    time_embedding_type="positional",
    center_input_sample=False,
)

CASES = {
    "plain+attention": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        layers_per_block=1,
        attention_head_dim=None,
    ),
    "resnet-updown+scale-shift+classes+heads": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        downsample_type="resnet",
        upsample_type="resnet",
        norm_num_groups=8,
        layers_per_block=2,
        attention_head_dim=16,
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=8,
        num_class_embeds=5,
    ),
    "no-mid-attention+ddpm-embedding+odd-channels": dict(
        block_out_channels=(16, 32),
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
        attention_head_dim=8,
        add_attention=False,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        time_embedding_dim=48,
        in_channels=2,
        out_channels=5,
        dropout=0.1,
    ),
    "no-attention-at-all+asymmetric-padding": dict(
        block_out_channels=(16, 32, 48),
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        norm_num_groups=8,
        add_attention=False,
        downsample_padding=0,
    ),
}


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Add noise to every parameter, so no layer keeps a zero (or identity) initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).abs().max() / reference.abs().max())


def compare(
    reference: torch.nn.Module, ours: torch.nn.Module, size: int = 16, classes: int | None = None
) -> float:
    x = torch.randn(2, reference.config.in_channels, size, size)
    t = torch.tensor([3, 917])
    labels = torch.tensor([1, classes - 1]) if classes else None
    with torch.no_grad():
        expected = reference(x, t, class_labels=labels).sample
        got = ours(x, t, **({"labels": labels} if classes else {}))
    assert got.shape == expected.shape
    return relative_error(got, expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_match_diffusers(name):
    reference = perturbed(UNet2DModel(sample_size=16, **CASES[name]))
    ours = from_diffusers(reference)
    assert ours.num_parameters() == sum(p.numel() for p in reference.parameters()) + (
        ours.config.resolved_time_embed_dim() if ours.config.num_classes else 0
    )  # null label
    assert compare(reference, ours, classes=reference.config.num_class_embeds) <= 1e-5


def test_imported_label_table_has_a_zero_null_row():
    reference = perturbed(
        UNet2DModel(sample_size=16, **CASES["resnet-updown+scale-shift+classes+heads"])
    )
    table = from_diffusers(reference).label_embed.weight
    assert torch.equal(table[:5], reference.class_embedding.weight)
    assert torch.count_nonzero(table[5]) == 0


def test_ddpm_cifar10_config_is_the_preset():
    assert config_from_diffusers(DDPM_CIFAR10) == preset("ddpm-cifar10")
    assert config_from_diffusers({**DDPM_CIFAR10, "downsample_padding": 1}) == preset(
        "ddpm-cifar10", downsample_padding="symmetric"
    )


def test_ddpm_cifar10_imports_exactly():
    """google/ddpm-cifar10-32's architecture: 35.7M parameters, downsample_padding=0."""
    reference = perturbed(UNet2DModel(**DDPM_CIFAR10))
    ours = from_diffusers(reference)
    assert ours.config == preset("ddpm-cifar10")
    assert ours.num_parameters() == 35_746_307
    assert compare(reference, ours, size=32) <= 1e-5


def test_saved_folder_with_legacy_attention_names_converts(tmp_path):
    """A folder as diffusers writes it; old checkpoints name attention query/key/value/proj_attn."""
    from safetensors.torch import load_file, save_file

    reference = perturbed(UNet2DModel(sample_size=16, **CASES["plain+attention"]))
    reference.save_pretrained(tmp_path / "pipe" / "unet")
    weights = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    legacy = {
        k.replace("to_q.", "query.")
        .replace("to_k.", "key.")
        .replace("to_v.", "value.")
        .replace("to_out.0.", "proj_attn."): v
        for k, v in load_file(str(weights)).items()
    }
    save_file(legacy, str(weights))
    assert compare(reference, from_diffusers(tmp_path / "pipe")) <= 1e-5


def test_convert_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    reference = perturbed(UNet2DModel(sample_size=16, **CASES["plain+attention"]))
    reference.save_pretrained(tmp_path / "src")
    assert (
        main(
            [
                "convert",
                "--from",
                "diffusers",
                str(tmp_path / "src"),
                "--out",
                str(tmp_path / "dst"),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"] == sum(p.numel() for p in reference.parameters())
    assert compare(reference, load_pretrained(tmp_path / "dst")) <= 1e-5
    assert (
        main(
            [
                "convert",
                "--from",
                "diffusers",
                str(tmp_path / "src"),
                "--out",
                str(tmp_path / "dst"),
            ]
        )
        == 1
    )  # refuses to overwrite
    assert "not empty" in capsys.readouterr().err


UNSUPPORTED = [
    (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")), "down_block_types"),
    (dict(down_block_types=("AttnDownBlock2D", "DownBlock2D")), "attention on one side only"),
    (
        dict(down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D")),
        "mixes convolutions and ResBlocks",
    ),
    (dict(time_embedding_type="fourier"), "time_embedding_type='fourier'"),
    (dict(center_input_sample=True), "center_input_sample=True"),
    (dict(class_embed_type="timestep"), "class_embed_type='timestep'"),
    (dict(mid_block_type=None), "mid_block_type=None"),
    (dict(act_fn="gelu"), "act_fn='gelu'"),
    (dict(block_out_channels=(32, 48)), "block_out_channels"),
    (dict(attention_head_dim=24), "attention_head_dim=24"),
    (dict(attn_norm_num_groups=4), "attn_norm_num_groups=4"),
    (dict(norm_num_groups=None), "norm_num_groups=None"),
    (dict(downsample_padding=2), "downsample_padding=2"),
    (dict(flavour="new"), "unknown UNet2DModel option"),
]


@pytest.mark.parametrize(("change", "message"), UNSUPPORTED)
def test_unsupported_options_are_named(change, message):
    config = dict(CASES["plain+attention"], sample_size=16)
    config.update(change)
    with pytest.raises(ConversionError, match=message):
        config_from_diffusers(config)


def test_other_model_classes_are_refused():
    # UNet2DConditionModel imports (tests/interop/test_interop_stable_diffusion.py).
    with pytest.raises(ConversionError, match="UNet3DConditionModel.*UNet2DConditionModel"):
        config_from_diffusers({"_class_name": "UNet3DConditionModel"})
