"""Checkpoints: bit-exact save/load round trips and a clear CheckpointError for every corrupt
or mismatched folder (missing/unexpected keys, wrong shapes and dtypes, truncated or garbage
weights, weights that fail their SHA-256, missing config, bad JSON, invalid config, another
library's config, pickles)."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffunet import UNet, UNetConfig
from diffunet.model import load_pretrained
from diffunet.model.checkpoint import (
    CONFIG_NAME,
    DIGEST_KEY,
    WEIGHTS_NAME,
    CheckpointError,
    PretrainedMixin,
    load_state_dict,
    read_metadata,
    save_pretrained,
    weights_digest,
)
from diffunet.model.introspect import example_inputs, small_config


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


@pytest.fixture
def model():
    return randomize(UNet(small_config("text-unet")))


@pytest.fixture
def checkpoint(model, tmp_path):
    return save_pretrained(model, tmp_path / "ckpt")


def assert_bit_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key].view(torch.uint8), sb[key].view(torch.uint8)), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_round_trip_is_bit_exact_in_the_saved_dtype(model, tmp_path, dtype):
    model = model.to(dtype)
    save_pretrained(model, tmp_path / "c")
    loaded = load_pretrained(tmp_path / "c")
    assert loaded.config == model.config
    assert_bit_identical(loaded, model)
    x, kwargs = example_inputs(model.config, batch=2, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x, **kwargs), model.eval()(x, **kwargs))
    # The recorded digest is the documented hash of the saved tensors, and of the loaded ones.
    recorded = read_metadata(tmp_path / "c" / WEIGHTS_NAME)[DIGEST_KEY]
    assert recorded == reference_digest(model.state_dict()) == weights_digest(loaded.state_dict())


def reference_digest(state: dict[str, torch.Tensor]) -> str:
    """The digest as docs/interop.md defines it, written out independently of diffunet's."""
    hasher = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        data = t.flatten().view(torch.uint8).numpy().tobytes()
        header = [name, str(t.dtype).split(".")[-1], list(t.shape), len(data)]
        hasher.update(json.dumps(header).encode() + b"\n" + data)
    return hasher.hexdigest()


def test_digest_depends_on_every_name_dtype_shape_and_byte_but_not_on_order():
    a = torch.arange(6, dtype=torch.float32)
    state = {"a": a, "b": torch.ones(())}
    digest = weights_digest(state)
    assert weights_digest(dict(reversed(state.items()))) == digest
    for changed in (
        {"a2": a, "b": torch.ones(())},  # renamed
        {"a": a.view(torch.int32), "b": torch.ones(())},  # same bytes, another dtype
        {"a": a.reshape(2, 3), "b": torch.ones(())},  # same bytes, another shape
        {"a": torch.tensor([0.0, 1, 2, 3, 4, 5.000001]), "b": torch.ones(())},  # one bit
        {"a": a},  # a tensor fewer
    ):
        assert weights_digest(changed) != digest


def flip_byte(path, offset: int) -> None:
    """XOR the lowest bit of the byte at `offset` (negative: from the end) of a file."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_changed_weight_byte_fails_the_sha256_check(tmp_path):
    model = randomize(UNet(UNetConfig(model_channels=8, norm_groups=4, channel_mult=(1,))))
    checkpoint = save_pretrained(model, tmp_path / "tiny")
    weights = checkpoint / WEIGHTS_NAME
    flip_byte(weights, -4)  # the data section ends the file: the last float's lowest bits
    message = rf"{WEIGHTS_NAME} fails its SHA-256 check.*verify=False \(CLI: --no-verify\)"
    for load in (load_pretrained, UNet.from_pretrained, load_state_dict):
        with pytest.raises(CheckpointError, match=message):
            load(weights if load is load_state_dict else checkpoint)
    loaded = load_pretrained(checkpoint, verify=False)  # the changed bit, loaded on request
    changed = [
        k for k, v in loaded.state_dict().items() if not torch.equal(v, model.state_dict()[k])
    ]
    assert len(changed) == 1
    # An edit that keeps the old header is refused too; one without the digest loads unverified.
    state, metadata = load_state_dict(weights, verify=False), read_metadata(weights)
    save_file(state, str(weights), metadata=metadata)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_pretrained(checkpoint)
    save_file(state, str(weights))
    assert DIGEST_KEY not in read_metadata(weights)
    assert_bit_identical(load_pretrained(checkpoint), loaded)


def test_load_casts_on_request_and_records_metadata(checkpoint):
    loaded = load_pretrained(checkpoint, dtype=torch.float16)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    assert not loaded.training
    meta = read_metadata(checkpoint / WEIGHTS_NAME)
    assert meta["library"] == "diffunet" and meta["format"] == "pt"


def test_config_json_is_the_plain_config(checkpoint, model):
    data = json.loads((checkpoint / CONFIG_NAME).read_text())
    assert data == model.config.to_dict()


def test_wrapped_models_save_their_inner_unet(model, tmp_path):
    class Wrapper(torch.nn.Module):  # what DDP / AveragedModel look like
        def __init__(self, module):
            super().__init__()
            self.module = module

    save_pretrained(Wrapper(model), tmp_path / "w")
    assert_bit_identical(load_pretrained(tmp_path / "w"), model)


def test_subclasses_load_as_themselves(model, tmp_path):
    class MyUNet(UNet):
        pass

    mine = MyUNet(model.config)
    mine.load_state_dict(model.state_dict())
    mine.save_pretrained(tmp_path / "m")
    for loaded in (
        MyUNet.from_pretrained(tmp_path / "m"),
        load_pretrained(tmp_path / "m", model_class=MyUNet),
    ):
        assert type(loaded) is MyUNet
        assert_bit_identical(loaded, model)


def test_unet_gets_its_checkpoint_methods_from_the_mixin():
    assert issubclass(UNet, PretrainedMixin)
    for name in ("save_pretrained", "from_pretrained", "push_to_hub"):
        assert name not in vars(UNet), f"UNet redefines {name}; PretrainedMixin has it"


def test_unet_methods(model, tmp_path):
    model.save_pretrained(tmp_path / "u")
    assert_bit_identical(UNet.from_pretrained(tmp_path / "u"), model)


# ------------------------------------------------------------------ corrupt / mismatched
def rewrite_weights(folder, edit):
    state = load_file(str(folder / WEIGHTS_NAME))
    edit(state)
    save_file(state, str(folder / WEIGHTS_NAME))


def test_missing_keys_are_named(checkpoint):
    rewrite_weights(
        checkpoint, lambda s: (s.pop("time_embed.linear_1.weight"), s.pop("out.2.weight"))
    )
    with pytest.raises(
        CheckpointError, match=r"missing: out\.2\.weight, time_embed\.linear_1\.weight"
    ):
        load_pretrained(checkpoint)


def test_unexpected_keys_are_named(checkpoint):
    rewrite_weights(checkpoint, lambda s: s.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected: extra\.weight"):
        load_pretrained(checkpoint)


def test_wrong_shapes_are_named_with_both_shapes(checkpoint):
    rewrite_weights(checkpoint, lambda s: s.update({"out.2.bias": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"wrong shape.*out\.2\.bias \(7,\) vs \(3,\)"):
        load_pretrained(checkpoint)


def test_config_with_other_widths_names_every_mismatch(checkpoint):
    data = json.loads((checkpoint / CONFIG_NAME).read_text())
    data["model_channels"] = 32
    (checkpoint / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"does not match its config: wrong shape.*in all"):
        load_pretrained(checkpoint)


def test_integer_tensor_is_a_wrong_dtype(checkpoint):
    rewrite_weights(
        checkpoint, lambda s: s.update({"out.2.bias": torch.zeros(3, dtype=torch.int32)})
    )
    with pytest.raises(CheckpointError, match=r"wrong dtype: out\.2\.bias is torch\.int32"):
        load_pretrained(checkpoint)


def test_mixed_float_dtypes_are_a_wrong_dtype(checkpoint):
    rewrite_weights(checkpoint, lambda s: s.update({"out.2.bias": s["out.2.bias"].half()}))
    with pytest.raises(
        CheckpointError, match=r"out\.2\.bias is torch\.float16 \(the rest is torch\.float32\)"
    ):
        load_pretrained(checkpoint)


def test_truncated_weights(checkpoint):
    path = checkpoint / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors .*truncated or corrupt"):
        load_pretrained(checkpoint)


@pytest.mark.parametrize(
    "content", [b"", b"not a safetensors file at all", struct.pack("<Q", 10**12)]
)
def test_garbage_weights(checkpoint, content):
    (checkpoint / WEIGHTS_NAME).write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(checkpoint)


def test_missing_weights_mentions_pickles_and_never_loads_them(checkpoint):
    (checkpoint / WEIGHTS_NAME).unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    with pytest.raises(CheckpointError, match=r"does not exist.*never unpickles.*diffunet convert"):
        load_pretrained(checkpoint)


def test_missing_config(checkpoint):
    (checkpoint / CONFIG_NAME).unlink()
    with pytest.raises(
        CheckpointError, match=r"has no config\.json \(it holds: model\.safetensors\)"
    ):
        load_pretrained(checkpoint)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"config\.json is not valid JSON"),
        ("[1, 2]", r"must hold a JSON object, got list"),
        ('{"dims": 4}', r"UNetConfig\.dims=4 is invalid"),
        ('{"model_channels": 64, "wings": 2}', r"unknown UNetConfig field\(s\) \['wings'\]"),
        (
            '{"_class_name": "UNet2DModel", "in_channels": 3}',
            r"describes a UNet2DModel.*diffunet convert --from diffusers",
        ),
    ],
)
def test_bad_config(checkpoint, text, message):
    (checkpoint / CONFIG_NAME).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(checkpoint)


def test_metadata_keys_in_config_are_ignored(checkpoint, model):
    data = json.loads((checkpoint / CONFIG_NAME).read_text())
    data.update({"_class_name": "UNet", "_diffunet_version": "0.1.0"})
    (checkpoint / CONFIG_NAME).write_text(json.dumps(data))
    assert_bit_identical(load_pretrained(checkpoint), model)


def test_missing_folder_file_path_and_offline_hub_id(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere" / "ckpt")
    with pytest.raises(CheckpointError, match="is a file"):
        load_pretrained(checkpoint / CONFIG_NAME)
    with pytest.raises(CheckpointError, match="could not be fetched from the Hugging Face Hub"):
        load_pretrained("someone/not-cached", local_files_only=True, cache_dir=tmp_path / "hub")


def test_save_refuses_a_file_path(model, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(CheckpointError, match="it is a file"):
        save_pretrained(model, target)


def test_save_is_atomic_and_leaves_no_temp_files(model, checkpoint):
    save_pretrained(model, checkpoint)  # overwrite in place
    assert sorted(p.name for p in checkpoint.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
