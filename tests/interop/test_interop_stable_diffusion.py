"""Stable Diffusion U-Nets: diffusers `UNet2DConditionModel` import (SD 1.x-, 2.x- and XL-style
tiny configs, live and saved), original single-file checkpoints checked against diffusers'
own converter, the sd15 / sd21 / sdxl presets against diffusers' networks, refusals, and
`UNet2DModel`'s scale-shift middle attention without a GroupNorm. Random weights throughout,
perturbed so that no layer keeps a zero initialisation."""

import json

import pytest
import torch

from diffunet import CheckpointError, Diffusion, UNet, from_stable_diffusion, preset
from diffunet.cli import main
from diffunet.interop import ConversionError, config_from_diffusers, from_diffusers
from diffunet.interop.export import export_inputs, export_program
from diffunet.interop.stable_diffusion import infer_config, unet_tensors
from diffunet.model import load_pretrained
from diffunet.model.introspect import small_config

diffusers = pytest.importorskip("diffusers")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
UNet2DConditionModel = diffusers.UNet2DConditionModel

from test_interop_diffusers import perturbed  # noqa: E402 (after the skip: it needs diffusers)

# The published unet/config.json of the three models (their defaults left out).
SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD21 = dict(
    SD15,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=True,
)
SDXL = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
ORIGINAL_COUNTS = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}
FULL = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}

POOLED, IDS, ID_WIDTH = 12, 6, 8  # the tiny XL's pooled width, size / crop ids, id features
SD1_LIKE = "sd1-like: conv projections, 4 heads"
SD2_LIKE = "sd2-like: linear projections, per-level heads, depth 2, upcast"
XL_LIKE = "xl-like: added conditioning, depths (-, 1, 3), no attention at level 0"
TINY = {
    SD1_LIKE: dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=24,
        attention_head_dim=4,
    ),
    SD2_LIKE: dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=24,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        transformer_layers_per_block=2,
        upcast_attention=True,
    ),
    XL_LIKE: dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=24,
        attention_head_dim=(1, 4, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1, 3),
        addition_embed_type="text_time",
        addition_time_embed_dim=ID_WIDTH,
        projection_class_embeddings_input_dim=POOLED + IDS * ID_WIDTH,
    ),
    "scale-shift resnets, asymmetric padding, classes": dict(
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=24,
        attention_head_dim=2,
        resnet_time_scale_shift="scale_shift",
        downsample_padding=0,
        num_class_embeds=3,
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
}


def tiny_reference(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturbed(
        UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, **TINY[name])
    )


def inputs(reference) -> tuple[dict, dict]:
    """The same random inputs as diffusers' and as diffunet's keyword arguments."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    t = torch.tensor([3, 917])
    context = torch.randn(2, 7, 24, generator=generator)
    theirs = dict(sample=x, timestep=t, encoder_hidden_states=context)
    ours = dict(x=x, t=t, context=context)
    if reference.config.addition_embed_type == "text_time":
        pooled = torch.randn(2, POOLED, generator=generator)
        ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 32, 8, 4, 64, 64]])
        theirs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
        ours.update(added_cond=pooled, time_ids=ids)
    if reference.config.num_class_embeds:
        theirs["class_labels"] = ours["labels"] = torch.tensor([0, 2])
    return theirs, ours


def max_abs_difference(reference, ours) -> float:
    theirs_inputs, our_inputs = inputs(reference)
    with torch.no_grad():
        expected = reference(**theirs_inputs).sample
        got = ours(our_inputs.pop("x"), **our_inputs)
    assert got.shape == expected.shape
    assert expected.abs().max() > 0.1  # a real signal, not a zeroed network
    return float((got - expected).abs().max())


@pytest.mark.parametrize("name", sorted(TINY))
def test_unet2dconditionmodel_imports_exactly(name):
    reference = tiny_reference(name)
    ours = from_diffusers(reference)
    null_row = ours.config.resolved_time_embed_dim() if ours.config.num_classes else 0
    assert ours.num_parameters() == sum(p.numel() for p in reference.parameters()) + null_row
    assert max_abs_difference(reference, ours) <= 1e-5


def test_imported_config_reads_diffusers_head_counts_and_depths():
    sd2 = from_diffusers(tiny_reference(SD2_LIKE)).config
    assert (sd2.num_head_channels, sd2.transformer_depth, sd2.use_linear_projection) == (
        16,
        2,
        True,
    )
    assert sd2.upcast_attention
    xl = from_diffusers(tiny_reference(XL_LIKE)).config
    assert xl.transformer_depth == (0, 1, 3) and xl.mid_transformer_depth is None
    assert (xl.added_cond_dim, xl.added_time_embed_dim) == (POOLED + IDS * ID_WIDTH, ID_WIDTH)


def test_saved_folder_imports_exactly(tmp_path):
    reference = tiny_reference(XL_LIKE)
    reference.save_pretrained(tmp_path / "pipe" / "unet")
    assert max_abs_difference(reference, from_diffusers(tmp_path / "pipe")) <= 1e-5


@pytest.mark.parametrize("name", sorted(FULL))
def test_presets_are_the_published_configs_with_their_parameter_counts(name):
    assert config_from_diffusers({"_class_name": "UNet2DConditionModel", **FULL[name]}) == preset(
        name
    )
    with torch.device("meta"):
        theirs = sum(p.numel() for p in UNet2DConditionModel(**FULL[name]).parameters())
        ours = UNet(preset(name)).num_parameters()
    assert ours == theirs == ORIGINAL_COUNTS[name]


# ------------------------------------------------------------------ single-file checkpoints
def original_state_dict(reference) -> dict[str, torch.Tensor]:
    """The reference's weights under CompVis / SGM names (`model.diffusion_model.*`), written
    from the original `openaimodel.UNetModel` layout."""
    state, cfg = reference.state_dict(), reference.config
    levels, layers = len(cfg.block_out_channels), cfg.layers_per_block
    out: dict[str, torch.Tensor] = {}

    def move(theirs: str, ours: str) -> None:
        for key in [k for k in state if k.startswith(theirs + ".")]:
            out[ours + key[len(theirs) :]] = state[key]

    def resnet(theirs: str, ours: str) -> None:
        for diffusers_name, original in (
            ("norm1", "in_layers.0"),
            ("conv1", "in_layers.2"),
            ("time_emb_proj", "emb_layers.1"),
            ("norm2", "out_layers.0"),
            ("conv2", "out_layers.3"),
            ("conv_shortcut", "skip_connection"),
        ):
            move(f"{theirs}.{diffusers_name}", f"{ours}.{original}")

    move("time_embedding.linear_1", "time_embed.0")
    move("time_embedding.linear_2", "time_embed.2")
    move("add_embedding.linear_1", "label_emb.0.0")
    move("add_embedding.linear_2", "label_emb.0.2")
    move("class_embedding", "label_emb")
    move("conv_in", "input_blocks.0.0")
    k = 1
    for level in range(levels):
        for j in range(layers):
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{k}.0")
            move(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{k}.1")
            k += 1
        if level < levels - 1:
            move(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{k}.0.op")
            k += 1
    resnet("mid_block.resnets.0", "middle_block.0")
    move("mid_block.attentions.0", "middle_block.1")
    resnet("mid_block.resnets.1", "middle_block.2")
    k = 0
    for up in range(levels):
        for j in range(layers + 1):
            resnet(f"up_blocks.{up}.resnets.{j}", f"output_blocks.{k}.0")
            attention = f"up_blocks.{up}.attentions.{j}"
            has_attention = any(key.startswith(attention + ".") for key in state)
            move(attention, f"output_blocks.{k}.1")
            if j == layers and up < levels - 1:
                index = 2 if has_attention else 1
                move(f"up_blocks.{up}.upsamplers.0.conv", f"output_blocks.{k}.{index}.conv")
            k += 1
    move("conv_norm_out", "out.0")
    move("conv_out", "out.2")
    assert len(out) == len(state)
    return {"model.diffusion_model." + key: value for key, value in out.items()}


SINGLE_FILE = [SD1_LIKE, SD2_LIKE, XL_LIKE]  # the three Stable Diffusion generations


@pytest.mark.parametrize("name", SINGLE_FILE)
def test_single_file_checkpoint_imports_exactly(name):
    reference = tiny_reference(name)
    original = original_state_dict(reference)
    # diffusers' own single-file converter reads this state dict back as the reference's.
    converted = single_file.convert_ldm_unet_checkpoint(original, dict(reference.config))
    expected = reference.state_dict()
    assert converted.keys() == expected.keys()
    assert all(
        converted[k] is expected[k] or torch.equal(converted[k], expected[k]) for k in expected
    )
    config = from_diffusers(reference).config
    ours = from_stable_diffusion(original, config)
    assert max_abs_difference(reference, ours) <= 1e-5


def test_single_file_formats_ema_and_other_models_weights(tmp_path):
    from safetensors.torch import save_file

    reference = tiny_reference(SD1_LIKE)
    config = from_diffusers(reference).config
    original = original_state_dict(reference)
    # A whole-pipeline file: the VAE and text encoder are left unread, the EMA copy on request.
    others = {"first_stage_model.decoder.conv_in.weight": torch.ones(3, 3)}
    ema = {
        "model_ema." + "".join(k.split(".")[1:]): torch.full_like(v, 0.5)
        for k, v in original.items()
    }
    save_file({**original, **others}, str(tmp_path / "sd.safetensors"))
    assert (
        max_abs_difference(reference, from_stable_diffusion(tmp_path / "sd.safetensors", config))
        <= 1e-5
    )
    torch.save(
        {"state_dict": {**original, **others, **ema}, "global_step": 1}, tmp_path / "sd.ckpt"
    )
    assert (
        max_abs_difference(reference, from_stable_diffusion(tmp_path / "sd.ckpt", config)) <= 1e-5
    )
    averaged = from_stable_diffusion(tmp_path / "sd.ckpt", config, ema=True)
    assert all(torch.all(p == 0.5) for p in averaged.parameters())
    with pytest.raises(ConversionError, match="no model_ema"):
        from_stable_diffusion(original, config, ema=True)


class Payload:
    """An arbitrary object in a `.ckpt`: `weights_only=True` refuses to unpickle it."""


def test_a_pickled_object_in_a_ckpt_is_never_loaded(tmp_path):
    reference = tiny_reference(SD1_LIKE)
    torch.save(
        {"state_dict": original_state_dict(reference), "evil": Payload()}, tmp_path / "x.ckpt"
    )
    with pytest.raises(CheckpointError, match="weights_only=True"):
        from_stable_diffusion(tmp_path / "x.ckpt", from_diffusers(reference).config)


@pytest.mark.parametrize("name", sorted(FULL))
def test_the_three_originals_are_recognised_from_their_weights(name):
    with torch.device("meta"):
        reference = UNet2DConditionModel(**FULL[name])
    state = unet_tensors(original_state_dict(reference))
    assert infer_config(state) == preset(name)
    inpainting = dict(
        state, **{"input_blocks.0.0.weight": torch.empty(320, 9, 3, 3, device="meta")}
    )
    assert infer_config(inpainting) == preset(name, in_channels=9)


SINGLE_FILE_REFUSALS = [
    (lambda state: {}, None, "no model.diffusion_model"),
    (lambda state: state, None, r"cannot tell which Stable Diffusion U-Net.*\[24\].*config="),
    (lambda state: state, "use_linear_projection", r"projections are linear layers.*=False"),
    (lambda state: {k: v for k, v in state.items() if "middle_block.2" not in k}, "", "missing"),
]


@pytest.mark.parametrize(("edit", "config_change", "message"), SINGLE_FILE_REFUSALS)
def test_single_file_refusals_say_why(edit, config_change, message):
    reference = tiny_reference(SD2_LIKE)
    config = from_diffusers(reference).config
    if config_change == "use_linear_projection":
        config = config.replace(use_linear_projection=False)
    state = edit(original_state_dict(reference))
    with pytest.raises(ConversionError, match=message):
        from_stable_diffusion(state, None if config_change is None else config)


def test_convert_command_reads_a_single_file_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file

    reference = tiny_reference(XL_LIKE)
    from_diffusers(reference).config.to_json(tmp_path / "config.json")
    save_file(original_state_dict(reference), str(tmp_path / "sd.safetensors"))
    argv = ["convert", "--from", "stable-diffusion", str(tmp_path / "sd.safetensors")]
    argv += ["--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["from"] == "stable-diffusion"
    assert max_abs_difference(reference, load_pretrained(tmp_path / "out")) <= 1e-5


def test_guided_sampling_over_context_runs_with_an_imported_model():
    ours = from_diffusers(tiny_reference(SD1_LIKE))
    context = torch.randn(2, 7, 24)
    diffusion = Diffusion()
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(context=context, steps=3, progress=False)
    guided = diffusion.sample(ours, (2, 4, 16, 16), guidance=5.0, generator=generator, **kwargs)
    generator = torch.Generator().manual_seed(0)
    plain = diffusion.sample(ours, (2, 4, 16, 16), guidance=1.0, generator=generator, **kwargs)
    assert guided.shape == (2, 4, 16, 16) and torch.isfinite(guided).all()
    assert not torch.allclose(guided, plain)


# ------------------------------------------------------------------ refusals
CONDITION_REFUSALS = [
    (dict(only_cross_attention=True), "only_cross_attention=True"),
    (dict(dual_cross_attention=True), "dual_cross_attention=True"),
    (dict(addition_embed_type="text"), "addition_embed_type='text'"),
    (dict(class_embed_type="projection"), "class_embed_type='projection'"),
    (dict(mid_block_type=None), "mid_block_type=None.*two ResBlocks"),
    (dict(mid_block_type="UNetMidBlock2D"), "mid_block_type='UNetMidBlock2D'"),
    (dict(time_cond_proj_dim=8), "time_cond_proj_dim=8"),
    (dict(attention_head_dim=(4, 1)), r"attention_head_dim=\(4, 1\).*one head count"),
    (dict(attention_head_dim=3), r"attention_head_dim=3.*dividing each attention width"),
    (dict(transformer_layers_per_block=((1, 2), (1, 1))), "per-layer lists"),
    (dict(cross_attention_dim=(24, 32)), r"cross_attention_dim=\[24, 32\].*same value"),
    (dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")), "down_block_types"),
    (dict(up_block_types=("UpBlock2D", "UpBlock2D")), "cross-attends on one side only"),
    (dict(conv_in_kernel=5), "conv_in_kernel=5"),
    (dict(flavour="new"), "unknown UNet2DConditionModel option"),
]


@pytest.mark.parametrize(("change", "message"), CONDITION_REFUSALS)
def test_unsupported_unet2dconditionmodel_options_are_named(change, message):
    config = dict(TINY[SD1_LIKE], _class_name="UNet2DConditionModel")
    config["attention_head_dim"] = (4, 4)
    config["down_block_types"] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    config["up_block_types"] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    config.update(change)
    with pytest.raises(ConversionError, match=message):
        config_from_diffusers(config)


# ------------------------------------------------------------------ UNet2DModel
def test_unet2dmodel_scale_shift_middle_attention_without_groupnorm_imports_exactly():
    """diffusers gives UNet2DModel's middle attention no GroupNorm with scale-shift ResBlocks
    (and attn_norm_num_groups unset); diffunet's `mid_attention_norm=False` is that block."""
    torch.manual_seed(0)
    reference = perturbed(
        diffusers.UNet2DModel(
            sample_size=16,
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=8,
            resnet_time_scale_shift="scale_shift",
        )
    )
    assert reference.mid_block.attentions[0].group_norm is None
    assert reference.down_blocks[1].attentions[0].group_norm is not None
    ours = from_diffusers(reference)
    assert not ours.config.mid_attention_norm and ours.config.use_scale_shift_norm
    assert ours.num_parameters() == sum(p.numel() for p in reference.parameters())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 600])
    with torch.no_grad():
        assert float((ours(x, t) - reference(x, t).sample).abs().max()) <= 1e-5


def test_a_transformer_model_with_added_conditioning_exports():
    config = small_config("sdxl").replace(
        channel_mult=(1, 2), attention_resolutions=(2,), transformer_depth=(0, 1), num_res_blocks=1
    )
    model = UNet(config).eval()
    inputs = export_inputs(model.config, batch=2)
    assert list(inputs) == ["x", "t", "context", "added_cond", "time_ids"]
    program = export_program(model, inputs=inputs)
    x, kwargs = inputs["x"], {k: v for k, v in inputs.items() if k != "x"}
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, **kwargs), model(x, **kwargs))
