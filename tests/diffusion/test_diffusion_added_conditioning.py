"""SDXL's added conditioning (`added_cond`, `time_ids`) and explicit unconditional inputs
(`null_context`, `null_added_cond`) in the diffusion layer: `Diffusion`, `FlowMatching` and
`EDM` train and sample a tiny SDXL-like U-Net; one guided step equals classifier-free guidance
written out from two float64 model calls; dropout removes `added_cond` with the context and
labels; bad arguments are named."""

import copy
import functools
import math

import pytest
import torch

from diffunet import UNet, UNetConfig
from diffunet.diffusion import EDM, Diffusion, FlowMatching, GuidedModel, draw_noise
from diffunet.errors import InvalidTypeError, InvalidValueError

BATCH, CHANNELS, SIZE = 2, 2, 8
TOKENS, CONTEXT_DIM, POOLED_DIM, IDS = 4, 6, 5, 2
SCALE = 3.0

PROCESSES = {
    "ddpm": lambda **kw: Diffusion("cosine", 20, prediction="x0", clip_denoised=False, **kw),
    "flow": lambda **kw: FlowMatching(**kw),
    "edm": lambda **kw: EDM(sigma_max=3.0, **kw),
}
ONE_STEP = {"ddpm": "ddim", "flow": "euler", "edm": "euler"}


def sdxl_like() -> UNet:
    """A two-level transformer-block U-Net with SDXL's added conditioning, random weights (the
    zero-initialised output layers included, so every input changes the output)."""
    config = UNetConfig(
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        norm_groups=4,
        attention_resolutions=(2,),
        num_head_channels=4,
        transformer_depth=1,
        context_dim=CONTEXT_DIM,
        added_cond_dim=POOLED_DIM + IDS * 4,
        added_time_embed_dim=4,
    )
    torch.manual_seed(0)
    model = UNet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def conditioning(batch: int = BATCH, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random context, pooled embedding and size ids for `batch` samples."""
    g = torch.Generator().manual_seed(seed)
    return {
        "context": torch.randn(batch, TOKENS, CONTEXT_DIM, generator=g),
        "added_cond": torch.randn(batch, POOLED_DIM, generator=g),
        "time_ids": torch.tensor([[8.0, 8.0], [16.0, 4.0]] * (batch // 2)),
    }


def nulls(seed: int = 2) -> dict[str, torch.Tensor]:
    """An explicit unconditional context (one, shared by the batch) and pooled embedding."""
    g = torch.Generator().manual_seed(seed)
    return {
        "null_context": torch.randn(1, TOKENS, CONTEXT_DIM, generator=g),
        "null_added_cond": torch.randn(1, POOLED_DIM, generator=g),
    }


class Recording:
    """A model without a config that records the conditioning of each call; outputs zeros."""

    null_label = 7

    def __init__(self) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, x, t, **kwargs):
        self.calls.append({k: v.clone() for k, v in kwargs.items()})
        return torch.zeros_like(x)


# ---------------------------------------------------------------------- training and sampling
@pytest.mark.parametrize("name", PROCESSES)
def test_each_process_trains_and_samples_an_sdxl_like_unet(name):
    model = sdxl_like().train()
    process = PROCESSES[name](cond_drop_prob=0.5)
    cond = conditioning()
    x0 = torch.rand(BATCH, CHANNELS, SIZE, SIZE) * 2 - 1
    loss = process.loss(model, x0, generator=torch.Generator().manual_seed(0), **cond)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))
    loss.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.added_embed.parameters()
    )

    model.eval()
    for extra in ({}, nulls()):
        x = process.sample(
            model,
            (BATCH, CHANNELS, SIZE, SIZE),
            steps=2,
            guidance=SCALE,
            generator=torch.Generator().manual_seed(0),
            progress=False,
            **cond,
            **extra,
        )
        assert x.shape == (BATCH, CHANNELS, SIZE, SIZE) and bool(torch.isfinite(x).all())


# ---------------------------------------------------------------------- guidance, exactly
def reference_step(name, process, model64, noise, cond, null_context, null_added_cond):
    """One guided step of `process` from `noise`, written out in float64 with separate
    conditional and unconditional model calls: `uncond + s (cond − uncond)` of the network output,
    then the process's single step to the data (x̂₀ for DDIM, x − v for Euler from t = 1, D(x; σ)
    for EDM's Euler step to σ = 0)."""
    batch = noise.shape[0]
    x = noise.double()
    if name == "ddpm":
        time = torch.full((batch,), process.num_timesteps - 1, dtype=torch.long)
    elif name == "flow":
        time = torch.full((batch,), process.time_scale, dtype=torch.float64)
    else:
        sigma = process.sigma_max
        var = sigma**2 + process.sigma_data**2
        c_skip, c_out, c_in = (
            process.sigma_data**2 / var,
            sigma * process.sigma_data / var**0.5,
            var**-0.5,
        )
        time = torch.full((batch,), math.log(sigma) / 4, dtype=torch.float64)
        x = sigma * x
    model_in = c_in * x if name == "edm" else x
    ids = cond["time_ids"].double()
    with torch.no_grad():
        out_c = model64(
            model_in,
            time,
            context=cond["context"].double(),
            added_cond=cond["added_cond"].double(),
            time_ids=ids,
        )
        out_u = model64(
            model_in,
            time,
            context=null_context.double().expand(batch, -1, -1),
            added_cond=null_added_cond.double().expand(batch, -1),
            time_ids=ids,
        )
    out = out_u + SCALE * (out_c - out_u)
    if name == "ddpm":
        return out  # x0 prediction; DDIM's one step lands on it
    if name == "flow":
        return x - out
    return c_skip * x + c_out * out


@pytest.mark.parametrize("explicit", [True, False], ids=["null_given", "null_default"])
@pytest.mark.parametrize("name", PROCESSES)
def test_one_guided_step_equals_cfg_of_two_float64_model_calls(name, explicit):
    model = sdxl_like()
    model64 = copy.deepcopy(model).double()
    process = PROCESSES[name]()
    cond = conditioning()
    shape = (BATCH, CHANNELS, SIZE, SIZE)
    given = nulls() if explicit else {}
    x = process.sample(
        model,
        shape,
        sampler=ONE_STEP[name],
        steps=1,
        guidance=SCALE,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        **cond,
        **given,
    )
    noise = draw_noise(shape, torch.Generator().manual_seed(0), "cpu")
    null_context = given.get("null_context", torch.zeros(1, TOKENS, CONTEXT_DIM))
    null_added_cond = given.get("null_added_cond", torch.zeros(1, POOLED_DIM))
    expected = reference_step(name, process, model64, noise, cond, null_context, null_added_cond)
    torch.testing.assert_close(x.double(), expected, rtol=1e-5, atol=2e-5)
    # the unconditional inputs matter: the other choice gives another result
    other_context = torch.zeros(1, TOKENS, CONTEXT_DIM) if explicit else nulls()["null_context"]
    other_added = torch.zeros(1, POOLED_DIM) if explicit else nulls()["null_added_cond"]
    other = reference_step(name, process, model64, noise, cond, other_context, other_added)
    assert (other - expected).abs().max() > 1e-2


def test_guided_model_sends_both_branches_in_one_batch_with_the_same_time_ids():
    model = Recording()
    cond = conditioning(batch=2)
    null = nulls()
    guided = GuidedModel(model, labels=torch.tensor([1, 2]), guidance=SCALE, **cond, **null)
    guided(torch.zeros(2, 1, 4), torch.tensor([5, 5]))
    (seen,) = model.calls
    assert torch.equal(seen["labels"], torch.tensor([1, 2, 7, 7]))
    assert torch.equal(seen["context"][:2], cond["context"])
    assert torch.equal(seen["context"][2:], null["null_context"].expand(2, -1, -1))
    assert torch.equal(seen["added_cond"][:2], cond["added_cond"])
    assert torch.equal(seen["added_cond"][2:], null["null_added_cond"].expand(2, -1))
    assert torch.equal(seen["time_ids"], torch.cat([cond["time_ids"]] * 2))

    model.calls.clear()
    GuidedModel(model, guidance=0.0, **cond)(torch.zeros(2, 1, 4), torch.tensor([5, 5]))
    (seen,) = model.calls  # the unconditional pass only: zeros, the same ids
    assert not seen["context"].any() and not seen["added_cond"].any()
    assert torch.equal(seen["time_ids"], cond["time_ids"])


def test_guidance_over_added_cond_alone_and_models_without_it():
    model = Recording()
    added = torch.randn(2, POOLED_DIM)
    GuidedModel(model, added_cond=added, guidance=2.0)(torch.zeros(2, 1, 4), torch.tensor([1, 1]))
    assert torch.equal(model.calls[0]["added_cond"], torch.cat([added, torch.zeros_like(added)]))

    def text_only(x, t, *, context):  # no added_cond / time_ids arguments
        return x * context.mean()

    context = torch.randn(2, TOKENS, CONTEXT_DIM)
    for make in PROCESSES.values():
        process = make(cond_drop_prob=0.5)
        process.sample(text_only, (2, 1, 4), steps=2, guidance=2.0, context=context, progress=False)
        process.loss(text_only, torch.zeros(2, 1, 4), context=context)


# ---------------------------------------------------------------------- dropout
def conditioning_seen_in_loss(name: str, x0: torch.Tensor, prob: float, **given) -> dict:
    """The conditioning that `name`'s loss hands the model, dropout drawn from seed 3."""
    model = Recording()
    PROCESSES[name](cond_drop_prob=prob).loss(
        model, x0, generator=torch.Generator().manual_seed(3), **given
    )
    return model.calls[0]


@pytest.mark.parametrize("name", PROCESSES)
def test_dropout_zeroes_added_cond_with_context_and_labels_and_keeps_time_ids(name):
    batch = 32
    cond = conditioning(batch=batch)
    labels = torch.arange(batch) % 7
    seen_in_loss = functools.partial(conditioning_seen_in_loss, name, torch.zeros(batch, 1, 4))
    seen = seen_in_loss(0.5, labels=labels, **cond)
    dropped = seen["labels"] == 7
    assert 0 < int(dropped.sum()) < batch
    assert torch.equal((seen["context"] == 0).all(dim=(1, 2)), dropped)
    assert torch.equal((seen["added_cond"] == 0).all(dim=1), dropped)
    kept = ~dropped
    assert torch.equal(seen["context"][kept], cond["context"][kept])
    assert torch.equal(seen["added_cond"][kept], cond["added_cond"][kept])
    assert torch.equal(seen["labels"][kept], labels[kept])
    assert torch.equal(seen["time_ids"], cond["time_ids"])

    # adding added_cond draws nothing more: the context alone is dropped on the same rows
    alone = seen_in_loss(0.5, labels=labels, context=cond["context"])
    assert torch.equal(alone["context"], seen["context"])
    # added_cond alone is dropped too; probabilities 0 and 1 drop nothing and everything
    only = seen_in_loss(0.5, added_cond=cond["added_cond"])
    assert 0 < int((only["added_cond"] == 0).all(dim=1).sum()) < batch
    assert torch.equal(seen_in_loss(0.0, **cond)["added_cond"], cond["added_cond"])
    assert not seen_in_loss(1.0, **cond)["added_cond"].any()


@pytest.mark.parametrize("name", PROCESSES)
def test_dropout_gives_dropped_rows_the_explicit_unconditional_inputs(name):
    """`loss(null_context=, null_added_cond=)` trains the unconditional model on the inputs
    that guidance's unconditional pass gets (SD's empty-prompt embedding), on the rows that
    dropout with zeros would drop."""
    batch = 32
    cond, null = conditioning(batch=batch), nulls()
    seen_in_loss = functools.partial(conditioning_seen_in_loss, name, torch.zeros(batch, 1, 4))
    zeros = seen_in_loss(0.5, **cond)
    seen = seen_in_loss(0.5, **cond, **null)
    dropped = (zeros["context"] == 0).all(dim=(1, 2))
    assert 0 < int(dropped.sum()) < batch
    for key in ("context", "added_cond"):
        assert torch.equal(seen[key][~dropped], cond[key][~dropped])
        expected = null[f"null_{key}"].expand(int(dropped.sum()), *cond[key].shape[1:])
        assert torch.equal(seen[key][dropped], expected)
    # a batch-sized null input, different per row; probability 1 replaces every row
    per_row = {"null_context": torch.randn(batch, TOKENS, CONTEXT_DIM)}
    everything = seen_in_loss(1.0, context=cond["context"], **per_row)
    assert torch.equal(everything["context"], per_row["null_context"])
    # probability 0 uses none of them, and they are still checked
    assert torch.equal(seen_in_loss(0.0, **cond, **null)["context"], cond["context"])
    with pytest.raises(InvalidValueError, match="null_context was given without context"):
        seen_in_loss(0.0, null_context=null["null_context"])
    with pytest.raises(InvalidValueError, match=r"null_added_cond has shape \(1, 4\)"):
        seen_in_loss(0.5, added_cond=cond["added_cond"], null_added_cond=torch.zeros(1, 4))


# ---------------------------------------------------------------------- errors
SAMPLE_ERRORS = [
    (
        {"added_cond": torch.randn(3, 5)},
        InvalidValueError,
        r"added_cond has shape \(3, 5\), expected \(2, D\)",
    ),
    (
        {"added_cond": torch.randn(5)},
        InvalidValueError,
        r"added_cond has shape \(5,\), expected \(2, D\)",
    ),
    (
        {"added_cond": torch.ones(2, 5, dtype=torch.long)},
        InvalidTypeError,
        r"added_cond must be a floating-point",
    ),
    (
        {"added_cond": [[0.0] * 5] * 2},
        InvalidTypeError,
        r"added_cond must be a torch.Tensor or None, got list",
    ),
    (
        {"time_ids": torch.ones(2)},
        InvalidValueError,
        r"time_ids has shape \(2,\), expected \(2, n\)",
    ),
    (
        {"time_ids": torch.ones(2, 6, dtype=torch.bool)},
        InvalidTypeError,
        r"time_ids must be real numbers",
    ),
    (
        {"null_context": torch.zeros(1, 4, 6)},
        InvalidValueError,
        r"null_context was given without context",
    ),
    (
        {"context": torch.zeros(2, 4, 6), "null_context": torch.zeros(1, 5, 6)},
        InvalidValueError,
        r"null_context has shape \(1, 5, 6\), which does not broadcast to context's shape \(2, 4, 6\)",
    ),
    (
        {"added_cond": torch.zeros(2, 5), "null_added_cond": torch.zeros(2, 5, dtype=torch.long)},
        InvalidTypeError,
        r"null_added_cond must be a floating-point tensor",
    ),
    (
        {"null_added_cond": "empty"},
        InvalidTypeError,
        r"null_added_cond must be a torch.Tensor or None, got str",
    ),
    (
        {"time_ids": torch.ones(2, 6), "guidance": 3.0},
        InvalidValueError,
        r"neither labels nor context nor added_cond.*time_ids are never dropped",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "pattern"), SAMPLE_ERRORS)
@pytest.mark.parametrize("name", PROCESSES)
def test_bad_added_conditioning_in_sample_is_named(name, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        PROCESSES[name]().sample(Recording(), (2, 1, 4), steps=2, progress=False, **kwargs)


@pytest.mark.parametrize("name", PROCESSES)
def test_bad_added_conditioning_in_loss_is_named(name):
    process = PROCESSES[name]()
    x0 = torch.zeros(2, 1, 4)
    with pytest.raises(
        InvalidValueError,
        match=r"added_cond has shape \(3, 5\), expected \(2, D\) to match the batch of x0",
    ):
        process.loss(Recording(), x0, added_cond=torch.zeros(3, 5))
    with pytest.raises(InvalidValueError, match=r"time_ids has shape \(1, 6\), expected \(2, n\)"):
        process.loss(Recording(), x0, time_ids=torch.zeros(1, 6))
    with pytest.raises(InvalidTypeError, match=r"added_cond must be a floating-point"):
        process.loss(Recording(), x0, added_cond=torch.zeros(2, 5, dtype=torch.int32))
