"""guided-diffusion / Palette / EMDiffuse `UNetModel` import, checked against a reference
forward pass written here from first principles.

The reference below is an independent, functional re-statement of guided-diffusion's
`UNetModel` as published (openai/guided-diffusion `unet.py`, and EMDiffuse's copy in
`guided_diffusion_modules/unet.py`):

* state-dict names: `time_embed.{0,2}` (EMDiffuse: `cond_embed.{0,2}`), `label_emb`,
  `input_blocks.{k}.{j}`, `middle_block.{0,1,2}`, `output_blocks.{k}.{j}`, `out.{0,2}`
  (EMDiffuse's aleatoric head: `out_variance.{0,2}`);
* ResBlock: `in_layers = [GroupNorm, SiLU, conv3x3]`, `emb_layers = [SiLU, Linear]`,
  `out_layers = [GroupNorm, SiLU, Dropout, conv3x3]`, `skip_connection` (1×1 conv when the
  width changes); up/down ResBlocks resample both paths after `in_layers[:-1]` (nearest ×2 /
  2×2 average pooling); scale-shift: `norm(h) * (1 + scale) + shift` with `scale, shift =
  chunk(emb_out, 2)`;
* AttentionBlock: `qkv = Conv1d(C, 3C, 1)(norm(x))`; the legacy order reshapes `qkv` to
  `(B·heads, 3·ch, T)` and splits q, k, v per head, so the 3C rows are
  `[head 0: q, k, v | head 1: q, k, v | ...]`; the new order splits q, k, v first; weights
  `softmax((q·s)ᵀ(k·s))` with `s = ch^(-1/4)`; `proj_out = Conv1d(C, C, 1)`; residual;
* timestep features `cat([cos(t·f), sin(t·f)])`, `f_i = 10000^(-i/half)`, in float32;
* EMDiffuse feeds `cat([cond, x])` to the stem.

Random tensors with those names and shapes form a state dict "as the original saves it"; the
imported diffunet model must reproduce the reference forward in float64.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from diffunet import UNetConfig, preset
from diffunet.cli import main
from diffunet.interop import ConversionError, from_guided_diffusion
from diffunet.model import load_pretrained
from diffunet.model.introspect import small_config


def _architecture(c: UNetConfig):
    """The layers of guided-diffusion's UNetModel as (block, index, kind, in_ch, out_ch, ds)."""
    layers = [("input_blocks.0", 0, "stem", c.in_channels + c.cond_channels, c.model_channels, 1)]
    ch, ds, chans, k = c.model_channels, 1, [c.model_channels], 1
    for level, mult in enumerate(c.channel_mult):
        for _ in range(c.num_res_blocks):
            layers.append((f"input_blocks.{k}", 0, "res", ch, mult * c.model_channels, ds))
            ch = mult * c.model_channels
            if ds in c.attention_resolutions:
                layers.append((f"input_blocks.{k}", 1, "attn", ch, ch, ds))
            chans.append(ch)
            k += 1
        if level != len(c.channel_mult) - 1:
            kind = "res_down" if c.resblock_updown else "down"
            layers.append((f"input_blocks.{k}", 0, kind, ch, ch, ds))
            chans.append(ch)
            ds *= 2
            k += 1
    layers += [
        ("middle_block", 0, "res", ch, ch, ds),
        ("middle_block", 1, "attn", ch, ch, ds),
        ("middle_block", 2, "res", ch, ch, ds),
    ]
    k = 0
    for level, mult in reversed(list(enumerate(c.channel_mult))):
        for i in range(c.num_res_blocks + 1):
            out = mult * c.model_channels
            layers.append((f"output_blocks.{k}", 0, "res_skip", ch + chans.pop(), out, ds))
            ch, j = out, 1
            if ds in c.attention_resolutions:
                layers.append((f"output_blocks.{k}", 1, "attn", ch, ch, ds))
                j = 2
            if level and i == c.num_res_blocks:
                layers.append(
                    (f"output_blocks.{k}", j, "res_up" if c.resblock_updown else "up", ch, ch, ds)
                )
                ds //= 2
            k += 1
    return layers


def guided_diffusion_state_dict(
    c: UNetConfig, *, emdiffuse: bool, aleatoric: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random float64 tensors named and shaped as guided-diffusion / EMDiffuse save them."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def put(name, *shape, scale=None):
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        std = scale if scale is not None else 1 / math.sqrt(fan_in)
        state[name] = torch.randn(*shape, generator=g, dtype=torch.float64) * std

    def norm(prefix, ch):
        put(f"{prefix}.weight", ch, scale=0.3)
        state[f"{prefix}.weight"] += 1
        put(f"{prefix}.bias", ch, scale=0.1)

    def conv(prefix, cin, cout, kernel=3):
        put(f"{prefix}.weight", cout, cin, *([kernel] * c.dims))
        put(f"{prefix}.bias", cout, scale=0.1)

    emb, mc = 4 * c.model_channels, c.model_channels
    time = "cond_embed" if emdiffuse else "time_embed"
    put(f"{time}.0.weight", emb, mc)
    put(f"{time}.0.bias", emb, scale=0.1)
    put(f"{time}.2.weight", emb, emb)
    put(f"{time}.2.bias", emb, scale=0.1)
    if c.num_classes:
        put("label_emb.weight", c.num_classes, emb, scale=1.0)
    for block, j, kind, cin, cout, _ in _architecture(c):
        p = f"{block}.{j}"
        if kind == "stem":
            conv(f"{p}", cin, cout)
        elif kind in ("down", "up"):
            conv(f"{p}.{'op' if kind == 'down' else 'conv'}", cin, cout)
        elif kind == "attn":
            norm(f"{p}.norm", cin)
            put(f"{p}.qkv.weight", 3 * cin, cin, 1)
            put(f"{p}.qkv.bias", 3 * cin, scale=0.1)
            put(f"{p}.proj_out.weight", cin, cin, 1)
            put(f"{p}.proj_out.bias", cin, scale=0.1)
        else:
            norm(f"{p}.in_layers.0", cin)
            conv(f"{p}.in_layers.2", cin, cout)
            put(f"{p}.emb_layers.1.weight", cout * (2 if c.use_scale_shift_norm else 1), emb)
            put(f"{p}.emb_layers.1.bias", cout * (2 if c.use_scale_shift_norm else 1), scale=0.1)
            norm(f"{p}.out_layers.0", cout)
            conv(f"{p}.out_layers.3", cout, cout)
            if cin != cout:
                conv(f"{p}.skip_connection", cin, cout, kernel=1)
    heads = [("out", c.out_channels)] + ([("out_variance", c.out_channels)] if aleatoric else [])
    for head, out in heads:
        norm(f"{head}.0", mc)
        conv(f"{head}.2", mc, out)
    return state


def reference_forward(
    state, c: UNetConfig, x_in, t, labels=None, *, legacy=True, emdiffuse=False, aleatoric=False
):
    """guided-diffusion's UNetModel.forward on `x_in` (EMDiffuse: already `cat([cond, x])`)."""
    G, conv = c.norm_groups, {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[c.dims]

    def gn(h, p):
        return F.group_norm(h, G, state[f"{p}.weight"], state[f"{p}.bias"], 1e-5)

    def lin(h, p):
        return h @ state[f"{p}.weight"].T + state[f"{p}.bias"]

    def cv(h, p, stride=1):
        w = state[f"{p}.weight"]
        return conv(h, w, state[f"{p}.bias"], stride=stride, padding=w.shape[-1] // 2)

    def resblock(h, emb, p, resample=None):
        x = h
        a = F.silu(gn(h, f"{p}.in_layers.0"))
        if resample == "down":
            a, x = (F.avg_pool2d(v, 2) for v in (a, x))
        elif resample == "up":
            a, x = (F.interpolate(v, scale_factor=2, mode="nearest") for v in (a, x))
        a = cv(a, f"{p}.in_layers.2")
        e = lin(F.silu(emb), f"{p}.emb_layers.1")[(...,) + (None,) * c.dims]
        if c.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            a = F.silu(gn(a, f"{p}.out_layers.0") * (1 + scale) + shift)
        else:
            a = F.silu(gn(a + e, f"{p}.out_layers.0"))
        a = cv(a, f"{p}.out_layers.3")
        skip = cv(x, f"{p}.skip_connection") if f"{p}.skip_connection.weight" in state else x
        return skip + a

    def attention(h, p):
        b, ch_all, *spatial = h.shape
        heads = c.heads_for(ch_all)
        x = h.reshape(b, ch_all, -1)
        qkv = F.conv1d(gn(x, f"{p}.norm"), state[f"{p}.qkv.weight"], state[f"{p}.qkv.bias"])
        length, ch = x.shape[-1], ch_all // heads
        if legacy:
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        else:
            q, k, v = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
        s = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)
        out = F.conv1d(a, state[f"{p}.proj_out.weight"], state[f"{p}.proj_out.bias"])
        return (x + out).reshape(b, ch_all, *spatial)

    half = c.model_channels // 2  # computed in float32, as the originals do
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()
    time = "cond_embed" if emdiffuse else "time_embed"
    emb = lin(F.silu(lin(features, f"{time}.0")), f"{time}.2")
    if labels is not None:
        emb = emb + state["label_emb.weight"][labels]

    h, skips, current = x_in, [], None
    for block, j, kind, *_ in _architecture(c):
        p = f"{block}.{j}"
        if block != current and current is not None and current.startswith("input_blocks"):
            skips.append(h)
        if block.startswith("output_blocks") and j == 0:
            h = torch.cat([h, skips.pop()], dim=1)
        current = block
        if kind == "stem":
            h = cv(h, p)
        elif kind == "down":
            h = cv(h, f"{p}.op", stride=2)
        elif kind == "up":
            h = cv(F.interpolate(h, scale_factor=2, mode="nearest"), f"{p}.conv")
        elif kind == "attn":
            h = attention(h, p)
        else:
            resample = {"res_down": "down", "res_up": "up"}.get(kind)
            h = resblock(h, emb, p, resample)
    outs = [
        cv(F.silu(gn(h, f"{head}.0")), f"{head}.2")
        for head in (["out", "out_variance"] if aleatoric else ["out"])
    ]
    return torch.cat(outs, dim=1)


def _run_ours(model, c: UNetConfig, x, cond, t, labels):
    kwargs = {"t": t}
    if c.cond_channels:
        kwargs["cond"] = cond
    if labels is not None:
        kwargs["labels"] = labels
    with torch.no_grad():
        return model.double()(x, **kwargs)


CASES = {
    # EMDiffuse-n with its aleatoric head: cond first, noise-level embedding, scale-shift,
    # ResBlock up/down, legacy attention (32-channel heads, here 8) in the middle only.
    "emdiffuse-aleatoric": (small_config("emdiffuse-aleatoric"), True, True, True),
    # guided-diffusion ImageNet-style: class labels, attention at ds 2 with 2 heads, conv
    # resampling, additive embedding; once with each head order.
    "guided-legacy": (
        UNetConfig(
            in_channels=3,
            out_channels=6,
            model_channels=16,
            channel_mult=(1, 2),
            num_res_blocks=1,
            norm_groups=8,
            attention_resolutions=(2,),
            num_heads=2,
            num_classes=4,
            zero_init=False,
        ),
        False,
        False,
        True,
    ),
    "guided-new-order": (
        UNetConfig(
            in_channels=3,
            out_channels=3,
            model_channels=16,
            channel_mult=(1, 2, 2),
            num_res_blocks=2,
            norm_groups=8,
            attention_resolutions=(2, 4),
            num_head_channels=8,
            use_scale_shift_norm=True,
            zero_init=False,
        ),
        False,
        False,
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_matches_the_reference_forward(name):
    c, emdiffuse, aleatoric, legacy = CASES[name]
    state = guided_diffusion_state_dict(c, emdiffuse=emdiffuse, aleatoric=aleatoric)
    if emdiffuse:  # Palette/EMDiffuse save the whole Network: U-Net under denoise_fn.
        state = {f"denoise_fn.{k}": v for k, v in state.items()}
        state["gammas"] = torch.linspace(0, 1, 10, dtype=torch.float64)
    model = from_guided_diffusion(state, c, attention_order="legacy" if legacy else "new")
    g = torch.Generator().manual_seed(1)
    size = (16, 16) if emdiffuse else (8, 8)  # float64 convolutions are slow on CPUs
    x = torch.randn(2, c.in_channels, *size, generator=g, dtype=torch.float64)
    cond = torch.randn(2, c.cond_channels, *size, generator=g, dtype=torch.float64)
    t = torch.rand(2, generator=g, dtype=torch.float64) if emdiffuse else torch.tensor([5.0, 800.0])
    labels = torch.tensor([0, 3]) if c.num_classes else None
    plain = {k.removeprefix("denoise_fn."): v for k, v in state.items()}
    x_in = torch.cat([cond, x], dim=1) if c.cond_channels else x
    expected = reference_forward(
        plain, c, x_in, t, labels, legacy=legacy, emdiffuse=emdiffuse, aleatoric=aleatoric
    )
    got = _run_ours(model, c, x, cond, t, labels)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_legacy_order_matters():
    """Reading legacy weights as the new order gives a different network (the test is live)."""
    c = CASES["guided-legacy"][0]
    state = guided_diffusion_state_dict(c, emdiffuse=False)
    right = from_guided_diffusion(state, c).double()
    wrong = from_guided_diffusion(state, c, attention_order="new").double()
    x, t, labels = (
        torch.randn(1, 3, 8, 8, dtype=torch.float64),
        torch.tensor([9.0]),
        torch.tensor([1]),
    )
    with torch.no_grad():
        assert not torch.allclose(right(x, t, labels=labels), wrong(x, t, labels=labels))


def test_emdiffuse_preset_imports_full_size_from_a_file(tmp_path):
    """A full-size EMDiffuse-n state dict, saved with torch.save, loads with weights_only."""
    c = preset("emdiffuse")
    state = {
        f"denoise_fn.{k}": v.float()
        for k, v in guided_diffusion_state_dict(c, emdiffuse=True).items()
    }
    torch.save(state, tmp_path / "100_Network.pth")
    model = from_guided_diffusion(tmp_path / "100_Network.pth", c)
    assert model.num_parameters() == 15_677_345


def test_convert_command(tmp_path, capsys):
    c = small_config("emdiffuse")
    from safetensors.torch import save_file

    state = {k: v.float() for k, v in guided_diffusion_state_dict(c, emdiffuse=True).items()}
    save_file(state, str(tmp_path / "net.safetensors"))
    (tmp_path / "config.json").write_text(c.to_json())
    assert (
        main(
            [
                "convert",
                "--from",
                "guided-diffusion",
                str(tmp_path / "net.safetensors"),
                "--config",
                str(tmp_path / "config.json"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    reference = from_guided_diffusion(tmp_path / "net.safetensors", c)
    loaded = load_pretrained(tmp_path / "out")
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert (
        main(
            [
                "convert",
                "--from",
                "guided-diffusion",
                str(tmp_path / "net.safetensors"),
                "--out",
                str(tmp_path / "o2"),
            ]
        )
        == 1
    )
    assert "needs --config" in capsys.readouterr().err


def test_mismatched_config_names_the_tensors():
    state = guided_diffusion_state_dict(small_config("emdiffuse"), emdiffuse=True)
    with pytest.raises(
        ConversionError,
        match=r"unexpected: input_blocks.*wrong shape \(file vs config\): middle_block",
    ):
        from_guided_diffusion(state, small_config("emdiffuse").replace(channel_mult=(1, 2, 4)))


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "module.pth")
    with pytest.raises(Exception, match=r"weights_only=True"):
        from_guided_diffusion(tmp_path / "module.pth", small_config("emdiffuse"))
