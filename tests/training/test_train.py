"""Pieces of the trainer: data order, schedules, EMA, state file, run config, grids."""

import random

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.optim.swa_utils import AveragedModel

from diffunet.apps.grids import make_grid, save_array, save_grid
from diffunet.diffusion import default_steps
from diffunet.model.checkpoint import CheckpointError
from diffunet.training.ema import update_ema
from diffunet.training.run_config import RunConfigError, from_dict, load_yaml, parse_override
from diffunet.training.state import (
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
)
from diffunet.training.trainer import DataOrder, lr_factor, resolve_precision, step_seed


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = DataOrder(10, 3, seed=1)
    assert order.steps_per_epoch == 3
    epoch0 = torch.cat([order.indices(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9  # no repeats within an epoch; the rest is dropped
    assert torch.equal(order.indices(4), DataOrder(10, 3, seed=1).indices(4))  # stateless
    assert not torch.equal(torch.cat([order.indices(s) for s in range(3, 6)]), epoch0)
    assert order.position(7) == (2, 1)
    with pytest.raises(RunConfigError, match="larger than"):
        DataOrder(5, 6, seed=0)


def test_step_seeds_differ_by_step_stream_and_seed():
    seeds = {step_seed(s, t, k) for s in range(3) for t in range(50) for k in range(3)}
    assert len(seeds) == 3 * 50 * 3


def test_lr_warmup_and_cosine_decay():
    assert lr_factor(0, 10, 100, True) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, True) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, True) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, True) == pytest.approx(0.1)
    assert lr_factor(50, 10, 100, False) == 1.0


def test_ema_copies_then_warms_up_then_decays():
    model = torch.nn.Linear(3, 1, bias=False)
    ema = AveragedModel(model)
    with torch.no_grad():
        model.weight.fill_(2.0)
    update_ema(ema, model, 0.9)  # the first update copies
    assert torch.equal(ema.module.weight, torch.full((1, 3), 2.0)) and int(ema.n_averaged) == 1
    with torch.no_grad():
        model.weight.fill_(0.0)
    update_ema(ema, model, 0.9)  # warm-up: decay (1+1)/(10+1) = 2/11
    assert torch.allclose(ema.module.weight, torch.full((1, 3), 2.0 * 2 / 11))
    ema.n_averaged.fill_(1000)
    before = ema.module.weight.clone()
    update_ema(ema, model, 0.9)  # capped at 0.9
    assert torch.allclose(ema.module.weight, 0.9 * before)


def test_training_state_roundtrip_weights_only_and_rng(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    rng = capture_rng_state()
    expected = (torch.rand(2), np.random.rand(), random.random())
    path = tmp_path / "state.pt"
    save_training_state(path, {"step": 3, "model": {"w": torch.ones(2)}, "rng": rng})
    assert not [p for p in tmp_path.iterdir() if p.name != "state.pt"]  # no temp file left
    torch.load(path, weights_only=True)  # loadable without unpickling arbitrary objects
    state = load_training_state(path)
    restore_rng_state(state["rng"])
    assert torch.equal(torch.rand(2), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_training_state(path)


def test_run_config_sections_and_errors(tmp_path):
    run = from_dict({"train": {"steps": 7}, "model": {"model_channels": 64}})
    assert run.train.steps == 7 and run.model["model_channels"] == 64
    assert run.model["channel_mult"] == [1, 2, 2]  # the default overrides stay
    assert from_dict({"preset": "ldm"}).model == {}  # a named preset starts clean
    with pytest.raises(RunConfigError, match="unknown train setting"):
        from_dict({"train": {"stepz": 1}})
    with pytest.raises(RunConfigError, match="unknown top-level"):
        from_dict({"optimizer": {}})
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 5\nsample: {sampler: ddim}\n")
    assert load_yaml(path).sample.sampler == "ddim"
    assert parse_override("channel_mult=[1, 2]") == ("channel_mult", [1, 2])
    assert parse_override("num_classes=null") == ("num_classes", None)
    for bad in (
        from_dict({"sample": {"sampler": "ddim"}}),  # the default process is flow
        from_dict({"diffusion": {"process": "ddpm"}, "sample": {"sampler": "euler"}}),
    ):
        with pytest.raises(RunConfigError, match="sampler"):
            bad.validate()


def test_the_default_process_is_flow_but_a_recorded_config_without_one_is_ddpm(tmp_path):
    assert from_dict({}).diffusion.process == "flow"
    old = {"diffusion": {"schedule": "cosine", "prediction": "v"}, "sample": {"sampler": "dpm++"}}
    assert from_dict(old).diffusion.process == "flow"  # a new run's partial config
    assert from_dict(old, record=True).diffusion.process == "ddpm"  # a run folder's record
    assert from_dict({"diffusion": {"process": "edm"}}, record=True).diffusion.process == "edm"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    assert load_yaml(path).diffusion.process == "flow"
    assert load_yaml(path, record=True).diffusion.process == "ddpm"
    assert default_steps("heun") == 10 and default_steps("dpm++") == default_steps("euler") == 20


def test_model_config_takes_data_fields_and_checks_explicit_ones():
    run = from_dict({})
    config = run.model_config(
        {
            "dims": 2,
            "in_channels": 1,
            "out_channels": 1,
            "cond_channels": 0,
            "image_size": 16,
            "num_classes": 10,
        }
    )
    assert (config.in_channels, config.image_size, config.num_classes) == (1, 16, 10)
    run.model["in_channels"] = 3
    with pytest.raises(RunConfigError, match="does not fit the data"):
        run.model_config({"in_channels": 1})


def test_precision_resolution():
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")


def test_grids_for_images_signals_and_volumes(tmp_path):
    images = torch.rand(5, 3, 6, 6)
    assert make_grid(images, nrow=5).shape == (2 + 8 * 1, 2 + 8 * 5, 3)
    assert make_grid(torch.rand(4, 1, 20)).ndim == 2  # 1D: line plots
    assert make_grid(torch.rand(2, 1, 4, 6, 6)).shape == (10, 18)  # 3D: middle slices
    save_grid(images, tmp_path / "g.png", scale=2)
    assert Image.open(tmp_path / "g.png").size == (3 * 14 + 2, 2 * 14 + 2)
    white = torch.ones(6, 1, 16, 16)  # input | sample | target, twice: a titled strip on top
    save_grid(white, tmp_path / "t.png", nrow=6, column_titles=["input", "sample", "target"])
    titled = np.asarray(Image.open(tmp_path / "t.png"))
    assert titled.shape == (14 + 2 + 18, 2 + 6 * 18)
    assert titled[:14].min() < 128 and titled[14:].min() == 0  # dark text; the grid padding
    assert titled[16:32, 2:18].min() == 255  # the tiles themselves are untouched
    save_array(images * 3 - 1, tmp_path / "a.npy")
    array = np.load(tmp_path / "a.npy")
    assert array.dtype == np.float32 and array.min() >= 0 and array.max() <= 1


def test_default_threads_leave_out_the_cores_other_programs_keep_busy():
    from diffunet.training.distributed import DistInfo, default_threads, even_threads

    one, two = DistInfo(), DistInfo(rank=0, world_size=2, local_world_size=2)
    cores = even_threads(one)
    assert default_threads(one, load=0.0) == cores
    assert default_threads(one, load=cores + 3.0) == 1  # a saturated machine: one thread
    assert default_threads(one, load=1.0) == max(1, cores - 1)
    assert default_threads(two, load=0.0) == even_threads(two) == max(1, cores // 2)
