"""`benchmarks/bench.py` and its harness (`benchmarks/harness/`), and `diffunet bench`: the
quick benchmark on the CPU against diffusers (and MONAI when it is installed), the reference
architectures and the reference DDIM loop checked against the library, the kernel classes of
the profile mode, and the command line in and outside a source checkout."""

import argparse
import importlib.util
import json
import sys
import threading
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffunet import UNet, preset

HAS_MONAI = importlib.util.find_spec("monai") is not None


@pytest.fixture
def bench(benchmark_script):
    return benchmark_script("bench")


@pytest.fixture
def harness(bench):
    """The harness package, as `bench.py` imported it."""
    import harness

    return harness


def _args(bench, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(
        ["--quick", "--device", "cpu", "--iters", "1", "--repeats", "1", "--warmup", "1", *argv]
    )


def test_quick_run_measures_both_sides(bench, tmp_path):
    """The smoke test: one quick CPU run of a model case and the sampling case."""
    pytest.importorskip("diffusers")
    out = tmp_path / "bench.json"
    argv = ("--cases", "ddpm-cifar10,sample", "--modes", "eager", "--sample-modes", "eager")
    data = bench.run_from_args(_args(bench, *argv, "--sample-steps", "2", "--out", str(out)))
    assert data["errors"] == []
    assert json.loads(out.read_text()) == json.loads(json.dumps(data, default=str))

    case = data["cases"]["ddpm-cifar10"]
    assert case["params"] == {"ours": 565_315, "ref": 565_315, "match": True}
    # The same architecture: the plain model's counted FLOPs equal the reference's.
    flops = case["flops_per_sample"]
    assert flops["ours"] == flops["ref"] and flops["ours"]["train"] > flops["ours"]["forward"] > 0
    records = {(r["model"], r["kind"]): r for r in data["records"] if r["kind"] != "sample"}
    assert set(records) == {
        ("ours", "train"),
        ("ours", "infer"),
        ("ref", "train"),
        ("ref", "infer"),
        ("ours+ckpt", "train"),
    }
    for (model, kind), r in records.items():
        assert r["impl"] == ("diffusers" if model == "ref" else "diffunet")
        assert r["throughput"] == pytest.approx(r["batch"] / r["seconds_per_iter"])
        assert r["flops_per_sample"] == flops["ours"]["train" if kind == "train" else "forward"]
        assert r["mfu"] == pytest.approx(r["flops_per_sample"] * r["throughput"] / 780e12)
    ratios = data["ratios"]["ddpm-cifar10"]
    for kind in ("train", "infer"):
        ours, ref = records[("ours", kind)], records[("ref", kind)]
        assert ratios[f"{kind}_speedup_eager"] == pytest.approx(
            ours["throughput"] / ref["throughput"]
        )

    samples = {r["model"]: r for r in data["records"] if r["kind"] == "sample"}
    assert set(samples) == {"ours", "ref"} and samples["ours"]["impl"] == "diffunet"
    for r in samples.values():
        assert r["steps"] == 2
        assert r["ms_per_step"] == pytest.approx(1e3 * r["seconds_per_batch"] / 2)
    assert data["ratios"]["sample"]["speedup_diffunet_eager_vs_eager"] == pytest.approx(
        samples["ref"]["seconds_per_batch"] / samples["ours"]["seconds_per_batch"]
    )
    assert "FOLDED_DEVICES" in data["meta"]["accel_settings"]


def test_quick_sd15_case_passes_the_context_tokens_to_both_sides(bench, tmp_path):
    """The `sd15` case on the CPU: ours against diffusers' `UNet2DConditionModel`, both called
    with the same random context tokens (ours as `context`, diffusers as
    `encoder_hidden_states`), equal parameter counts and counted FLOPs."""
    pytest.importorskip("diffusers")
    argv = ("--cases", "sd15", "--modes", "eager", "--checkpoint-modes", "none")
    data = bench.run_from_args(_args(bench, *argv, "--out", str(tmp_path / "b.json")))
    assert data["errors"] == []
    case = data["cases"]["sd15"]
    assert case["params"]["match"] is True and case["params"]["ours"] > 0
    assert case["context_tokens"] == 8 and case["ours_config"]["context_dim"] == 32
    assert case["reference_kwargs"]["cross_attention_dim"] == 32
    flops = case["flops_per_sample"]
    assert flops["ours"] == flops["ref"] and case["mfu_flops_from"] == "ref"
    records = {(r["model"], r["impl"], r["kind"]): r for r in data["records"]}
    for (model, _, kind), r in records.items():
        key = "train" if kind == "train" else "forward"
        assert r["flops_per_sample"] == flops["ref"][key]
        assert r["own_flops_per_sample"] == flops[model][key]
    assert set(records) == {
        ("ours", "diffunet", "train"),
        ("ours", "diffunet", "infer"),
        ("ref", "diffusers", "train"),
        ("ref", "diffusers", "infer"),
    }
    assert all(r["throughput"] > 0 for r in records.values())
    (row,) = data["table"]["rows"]
    assert row["label"] == "`sd15` 16², B2, 8 tokens vs diffusers"
    cell = row["cells"]["infer_eager"]
    ours, ref = records[("ours", "diffunet", "infer")], records[("ref", "diffusers", "infer")]
    assert cell["speedup"] == pytest.approx(ours["throughput"] / ref["throughput"])


def test_counted_flops_include_the_context_tokens(harness):
    """FLOPs are counted with the case's context: more tokens, more cross-attention work, the
    same count on both sides."""
    pytest.importorskip("diffusers")
    import dataclasses

    from harness.models import build_case, build_model
    from harness.timing import Settings, count_flops, make_batches

    settings = Settings(device=torch.device("cpu"), precision="fp32")
    base = build_case("sd15", quick=True)
    counts = {}
    for tokens in (4, 16):
        case = dataclasses.replace(base, context_tokens=tokens, batch=1)
        (batch,) = make_batches(case, 1, torch.device("cpu"), count=1)
        assert batch.context.shape == (1, tokens, 32) and set(batch.inputs) == {"context"}
        counts[tokens] = {
            which: count_flops(build_model(which, case, "cpu"), batch, settings)
            for which in ("ours", "ref")
        }
        assert counts[tokens]["ours"] == counts[tokens]["ref"]
    assert counts[16]["ours"]["forward"] > counts[4]["ours"]["forward"]
    assert counts[16]["ours"]["train"] > counts[4]["ours"]["train"]


def test_graphs_mode_is_skipped_on_the_cpu_with_a_note(bench, tmp_path, capsys):
    """`--modes eager,compile,graphs` is one run of the six-column table; off a GPU the
    CUDA-graph columns are skipped with their reason, nothing fails."""
    pytest.importorskip("diffusers")
    argv = ("--cases", "ddpm-cifar10", "--modes", "eager,graphs", "--kinds", "infer")
    data = bench.run_from_args(
        _args(bench, *argv, "--checkpoint-modes", "none", "--out", str(tmp_path / "b.json"))
    )
    assert data["errors"] == []
    reason = "CUDA graphs need a CUDA device (this run: cpu)"
    assert data["meta"]["skipped_modes"] == {"graphs": reason}
    graphs = [r for r in data["records"] if r["mode"] == "graphs"]
    assert len(graphs) == 2 and all(r["skipped"] == reason for r in graphs)
    assert {r["compile_mode"] for r in graphs} == {"reduce-overhead"}
    (row,) = data["table"]["rows"]
    assert row["cells"]["infer_graphs"]["status"] == "skipped"
    assert row["cells"]["infer_eager"]["speedup"] > 0
    assert row["cells"]["train_eager"]["status"] == "–"  # not asked for
    out = capsys.readouterr().out
    assert f"note: mode graphs is skipped: {reason}" in out
    assert f"infer CUDA graphs: skipped, {reason}" in out
    assert data["table"]["markdown"] in out

    settings = bench.Settings(device=torch.device("cpu"), warmup=1, precision="fp32", quick=True)
    profile = bench.run_profile("ddpm-cifar10", settings, ("graphs",), ("ours",), steps=1)
    assert profile["runs"] == [] and profile["skipped"][0]["reason"] == reason


def test_diffunet_bench_skips_a_missing_reference_cleanly(bench, tmp_path):
    """`diffunet bench` in this checkout runs `bench.py`: the 3D case without MONAI records
    why its reference is skipped, and nothing fails."""
    from diffunet.cli.app import main

    out = tmp_path / "b.json"
    argv = ["bench", "--quick", "--device", "cpu", "--cases", "3d", "--modes", "eager"]
    argv += ["--kinds", "infer", "--models", "ref", "--iters", "1", "--repeats", "1"]
    assert main([*argv, "--warmup", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    case = data["cases"]["3d"]
    from harness.models import build_case, num_parameters

    with torch.device("meta"):
        assert case["params"]["ours"] == num_parameters(UNet(build_case("3d", quick=True).config))
    if HAS_MONAI:
        assert case["params"]["match"] is True
        assert all(r.get("throughput") for r in data["records"])
    else:
        assert "MONAI is not importable" in case["reference_skipped"]
        assert case["params"]["match"] is None
        assert [r["skipped"] for r in data["records"]] == [case["reference_skipped"]]
        assert data["errors"] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--table-from", "missing.json"], "missing.json: not readable as a bench.py JSON"),
        (["--quick", "--iters", "0"], "--iters must be at least 1"),
        (["--quick", "--min-repeat-s", "-1"], "--min-repeat-s must be a number of seconds >= 0"),
        (["--quick", "--resume"], "--resume continues the run in --out: give --out"),
    ],
)
def test_diffunet_bench_says_what_is_wrong_with_its_options_in_one_line(
    bench, argv, message, capsys, monkeypatch
):
    from diffunet.cli.app import main

    monkeypatch.delenv("OUT", raising=False)  # no default --out

    assert main(["bench", *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("diffunet bench: error:") and message in err


def test_a_short_step_is_timed_over_at_least_min_repeat_s(harness):
    """Each timed repeat of a 2 ms step runs about `min_repeat_s` (0.05 s: 25 iterations, not
    `iters`); a slow step keeps `iters`; without `min_repeat_s`, `iters` exactly."""
    from harness.timing import Settings, iters_per_repeat, measure

    calls = []

    def step(i: int) -> None:
        calls.append(i)
        time.sleep(0.002)

    settings = Settings(device=torch.device("cpu"), warmup=1, iters=3, repeats=2, min_repeat_s=0.05)
    timing = measure(step, settings)
    # The sleep sets a floor; a loaded host can only stretch it, so at most 25 iterations.
    assert 10 <= timing["iters"] <= 25
    assert len(calls) == 1 + 3 + 2 * timing["iters"]  # warm-up, the sizing repeat, the timed
    assert all(t >= 0.002 for t in timing["seconds_per_iter_repeats"])
    assert timing["host_probe_ms"] > 0  # the host's speed, beside each measurement
    assert iters_per_repeat(0.5, settings) == 3  # already longer than min_repeat_s
    assert iters_per_repeat(0.001, settings) == 50

    calls.clear()
    timing = measure(step, Settings(device=torch.device("cpu"), warmup=1, iters=3, repeats=2))
    assert timing["iters"] == 3 and len(calls) == 1 + 2 * 3


def test_profile_mode_groups_the_time_of_a_step(bench):
    from harness.profiling import KERNEL_CLASSES

    settings = bench.Settings(device=torch.device("cpu"), warmup=1, precision="fp32", quick=True)
    result = bench.run_profile(
        "ddpm-cifar10", settings, ("eager",), ("ours",), steps=1, kinds=("train", "infer")
    )
    assert result["errors"] == []
    train, infer = result["runs"]
    assert (train["kind"], infer["kind"]) == ("train", "infer")
    for run in (train, infer):
        shares = [run["classes"][c]["share"] for c in KERNEL_CLASSES]
        assert sum(shares) == pytest.approx(1.0)
        assert run["classes"]["convolution"]["share"] > 0
    # A forward pass has no optimizer step and no backward convolutions.
    assert train["classes"]["optimizer"]["ms_per_step"] > 0
    assert infer["classes"]["optimizer"]["ms_per_step"] == 0
    assert (
        infer["classes"]["convolution"]["ms_per_step"]
        < train["classes"]["convolution"]["ms_per_step"]
    )
    # The host's side: CPU self time by op, the convolutions among the top ones on the CPU.
    for run in (train, infer):
        host = run["host"]
        top = {e["name"]: e for e in host["top_host_ops"]}
        assert host["self_cpu_ms_per_step"] >= sum(e["ms_per_step"] for e in top.values()) * 0.999
        assert host["launches_per_step"] == 0  # no CUDA here
    assert train["host"]["self_cpu_ms_per_step"] > infer["host"]["self_cpu_ms_per_step"]
    assert "aten::convolution_backward" in {e["name"] for e in train["host"]["top_host_ops"]}
    table = bench.format_profile(result)
    assert "steps of train/infer" in table and " infer " in table
    assert "ms of CPU self time and 0 kernel launches per step" in table
    # Unprofiled steps with their Python stacks sampled: the model's forward is on them.
    for run in (train, infer):
        samples = run["host_samples"]
        assert samples["steps"] == 10 and samples["wall_ms_per_step"] > 0
        assert samples["samples"] > 0
        assert all(0 < e["share"] <= 1 for e in samples["self"] + samples["total"])
        forwards = [f["function"] for f in samples["total"] if f["function"].endswith("forward")]
        assert any(f.startswith("accel/blocks.py:") for f in forwards)  # AcceleratedUNet's
    assert "samples of the Python stack" in table


def test_the_stack_sampler_finds_where_the_python_time_goes(harness):
    from harness.host_sampler import sample_steps

    def spin(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    def step(i):
        spin(0.03)  # three quarters of each step
        time.sleep(0.01)

    result = sample_steps(step, 5, lambda: None)
    assert result["samples"] >= 50
    assert result["wall_ms_per_step"] >= 40 and result["wall_ms_per_step_sampled"] >= 40
    shares = {e["function"]: e["share"] for e in result["self"]}
    spinning = next(v for f, v in shares.items() if f.endswith("spin"))
    assert 0.5 < spinning < 0.95
    # Only the frames below the sampled block count: the test's callers are not on the list.
    assert not any("_pytest" in e["function"] for e in result["total"])


def test_the_stack_sampler_counts_work_on_other_threads_but_not_their_waiting(harness):
    """A backward pass on a GPU runs on autograd's own thread while the caller waits: the
    sampler counts that thread's frames too, marked `[other]`; a thread waiting on a lock (the
    idle one here) is not counted, nor one asleep in C called from its own module (as a compile
    worker pool's timer and reader threads are), whose CPU time does not advance."""
    from harness.host_sampler import sample_steps, thread_cpu_ns

    def spin(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    idle = threading.Event()
    waiter = threading.Thread(target=idle.wait, daemon=True)
    waiter.start()

    def doze():
        while not idle.is_set():
            time.sleep(0.002)  # innermost Python frame: this function, not the standard library

    dozer = threading.Thread(target=doze, daemon=True)
    dozer.start()

    def step(i):
        worker = threading.Thread(target=spin, args=(0.03,))
        worker.start()
        worker.join()

    try:
        result = sample_steps(step, 5, lambda: None)
    finally:
        idle.set()
    shares = {e["function"]: e["share"] for e in result["self"]}
    other_spin = next(v for f, v in shares.items() if f.startswith("[other]") and "spin" in f)
    assert other_spin > 0.5
    # The waiter, blocked in threading.py all along, would show in nearly every sample; a
    # worker sampled just as it leaves `spin` is in threading.py too, rarely and rightly.
    waiting = sum(v for f, v in shares.items() if f.startswith("[other]") and "threading" in f)
    assert waiting < 0.1
    if thread_cpu_ns(threading.get_native_id()) is not None:  # Linux: CPU clocks per thread
        dozing = sum(v for f, v in shares.items() if f.startswith("[other]") and "doze" in f)
        assert dozing < 0.1  # its CPU clock, read as sampling began, hardly moves


def test_the_stack_sampler_keeps_no_frame_alive_between_samples(harness):
    """A frame the sampler still held after its function returned would keep the function's
    locals alive: under CUDA graphs (cudagraph trees) a replay then finds a tensor alive that
    was dead when the graph was recorded, and fails. Between samples the sampler holds none."""
    from harness.host_sampler import StackSampler

    class Payload:
        pass

    def hold(seconds):
        payload = Payload()
        time.sleep(seconds)  # sampled here, with `payload` among the frame's locals
        return weakref.ref(payload)

    with StackSampler(interval=0.2) as sampler:
        time.sleep(0.05)
        ref = hold(0.6)  # every sample falls in here
        alive_after_return = ref() is not None  # the next sample is up to 0.2 s away
    assert sampler.samples >= 1
    assert not alive_after_return


# ------------------------------------------------------------------------ the reference models
def test_full_size_parameter_counts_match_diffusers(harness):
    pytest.importorskip("diffusers")
    from harness.models import build_reference, num_parameters

    for name, count in (("ddpm-cifar10", 35_746_307), ("ldm", 75_376_643)):
        config = preset(name)
        with torch.device("meta"):
            ours = UNet(config)
        ref = build_reference(config, "diffusers", "meta")
        assert num_parameters(ours) == num_parameters(ref) == count, name


def test_sd15_reference_is_diffusers_unet2dconditionmodel_of_the_preset(harness):
    """The `sd15` case's reference: `UNet2DConditionModel` built from kwargs that diffunet's
    own importer reads back as the preset, with SD 1.5's parameter count on both sides."""
    pytest.importorskip("diffusers")
    from diffunet.interop.diffusers_condition import config_from_diffusers_condition
    from harness.models import build_case, build_reference, num_parameters, reference_kwargs

    case = build_case("sd15")
    assert (case.batch, case.size, case.context_tokens) == (8, (64, 64), 77)
    assert case.config == preset("sd15")
    kwargs = reference_kwargs(case.config, "diffusers")
    assert kwargs["cross_attention_dim"] == 768 and kwargs["attention_head_dim"] == 8
    assert config_from_diffusers_condition(kwargs) == case.config
    with torch.device("meta"):
        ours = UNet(case.config)
    ref = build_reference(case.config, "diffusers", "meta")
    assert type(ref.model).__name__ == "UNet2DConditionModel"
    assert num_parameters(ours) == num_parameters(ref) == 859_520_964
    # SD 2.x's 64-channel heads and linear projections map as diffusers writes them.
    sd21 = reference_kwargs(preset("sd21"), "diffusers")
    assert sd21["attention_head_dim"] == (5, 10, 20, 20) and sd21["use_linear_projection"]
    assert config_from_diffusers_condition(sd21) == preset("sd21")
    with pytest.raises(ValueError, match="added_cond_dim"):
        reference_kwargs(preset("sdxl"), "diffusers")


def test_3d_config_is_monais_architecture(harness):
    from harness.models import UNET_3D, build_reference, monai_kwargs, num_parameters

    with torch.device("meta"):
        assert num_parameters(UNet(UNET_3D)) == 68_585_025
    kwargs = monai_kwargs(UNET_3D)
    assert kwargs["channels"] == (64, 128, 256, 256)
    assert kwargs["attention_levels"] == (False, False, False, True)
    assert kwargs["in_channels"] == 2 and kwargs["out_channels"] == 1
    assert kwargs["num_head_channels"] == 32 and kwargs["num_res_blocks"] == 2
    if HAS_MONAI:
        assert num_parameters(build_reference(UNET_3D, "monai", "meta")) == 68_585_025


def test_reference_mapping_rejects_what_it_cannot_express(harness):
    from harness.models import UNET_3D, diffusers_kwargs

    with pytest.raises(ValueError, match="use_scale_shift_norm"):
        diffusers_kwargs(preset("emdiffuse"))
    with pytest.raises(ValueError, match="dims"):
        diffusers_kwargs(UNET_3D)


def test_our_model_is_the_accelerated_unet(harness):
    from diffunet.accel import is_accelerated
    from harness.models import build_case, build_model, implementation

    model = build_model("ours", build_case("ddpm-cifar10", quick=True), "cpu")
    assert isinstance(model, UNet) and is_accelerated(model)
    assert implementation(model) == "diffunet"
    assert all(p.any() for p in model.parameters() if p.ndim >= 2)  # no zero-initialised layer


def test_reference_ddim_loop_draws_what_the_library_draws(bench):
    """The sampling case times the library's `Diffusion.sample` against a plain loop over the
    reference model: both must be the same DDIM on the same schedule."""
    from diffunet.diffusion import draw_noise

    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)

    def eps(x, t):
        return net(x) + 1e-3 * t.view(-1, 1, 1, 1)

    settings = bench.Settings(device=torch.device("cpu"), precision="fp32")
    diffusion = bench.benchmark_diffusion()
    shape = (2, 3, 8, 8)
    generator = torch.Generator().manual_seed(3)
    x_init = draw_noise(shape, torch.Generator().manual_seed(3), "cpu")
    with torch.no_grad():
        ours = diffusion.sample(
            eps, shape, sampler="ddim", steps=5, generator=generator, progress=False
        )
        loop = bench.reference_ddim(eps, x_init, 5, diffusion, settings)
    assert diffusion.schedule.timesteps_for(5, diffusion.timestep_spacing) == [
        800,
        600,
        400,
        200,
        0,
    ]
    torch.testing.assert_close(loop, ours, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ timing
@pytest.mark.parametrize("from_start", [False, True])
def test_peak_memory_is_reset_after_the_warm_up_unless_cuda_graphs_are_recorded(
    harness, monkeypatch, from_start
):
    from harness import timing

    events = []
    monkeypatch.setattr(timing, "reset_peak", lambda device: events.append("reset"))
    settings = timing.Settings(
        device=torch.device("cpu"),
        warmup=2,
        iters=1,
        repeats=1,
        compile_mode="reduce-overhead" if from_start else "default",
    )
    assert settings.records_cuda_graphs == from_start
    timing.measure(lambda i: events.append(f"call {i}"), settings, peak_from_start=from_start)
    warm_up = ["call 0", "call 1"]
    expected = ["reset", *warm_up] if from_start else [*warm_up, "reset"]
    assert events[:3] == expected


def test_compiling_ahead_runs_the_same_compiled_measurement_for_one_model(bench):
    args = _args(
        bench,
        "--cases",
        "ldm,3d",
        "--kinds",
        "train",
        "--compile-mode",
        "reduce-overhead",
        "--precision",
        "bf16",
        "--compile-ahead",
        "4",
    )
    settings = bench.settings_from_args(args)
    child = _args(bench, *bench._fill_cache_argv(args, settings, "3d", "ref", "compile", "train"))
    child_settings = bench.settings_from_args(child)
    assert (child.cases, child.models, child.modes, child.kinds) == (
        ("3d",),
        ("ref",),
        ("compile",),
        ("train",),
    )
    # Whatever decides the compiled graph is the same as in the measuring process.
    for name in ("device", "precision", "compile_mode", "quick"):
        assert getattr(child_settings, name) == getattr(settings, name), name
    assert child.fill_caches_only and child.compile_ahead == 0 and not child.out
    assert child.checkpoint_modes == ("none",) and child_settings.warmup == 1
    # One process per kind, so training and inference graphs compile side by side.
    both = _args(bench, "--cases", "3d", "--kinds", "train,infer", "--compile-ahead", "4")
    per_kind = _args(
        bench, *bench._fill_cache_argv(both, settings, "3d", "ours", "compile", "infer")
    )
    assert per_kind.kinds == ("infer",)


def test_compiling_ahead_stops_at_the_deadline(bench):
    args = _args(
        bench, "--cases", "ddpm-cifar10", "--quick", "--modes", "compile", "--compile-ahead", "4"
    )
    settings = bench.settings_from_args(args)
    settings.deadline = 0.0  # already passed: each process gets the minimum, one second
    ahead = bench.compile_ahead(args, settings)
    jobs = {(p["model"], p["kind"]) for p in ahead["processes"]}
    assert jobs == {(m, k) for m in ("ours", "ref") for k in ("train", "infer")}
    assert all(p["error"] == "stopped at the deadline" for p in ahead["processes"])
    # a resumed run compiles only what it will measure: here inference, on both sides
    ahead = bench.compile_ahead(args, settings, frozenset({("ddpm-cifar10", "compile", "train")}))
    assert {(p["model"], p["kind"]) for p in ahead["processes"]} == {
        ("ours", "infer"),
        ("ref", "infer"),
    }
    everything = frozenset({("ddpm-cifar10", "compile", k) for k in ("train", "infer")})
    assert bench.compile_ahead(args, settings, everything) == {}
    assert ahead["seconds"] < 30


@pytest.mark.parametrize(
    "argv",
    [
        ("--compile-ahead", "0"),
        ("--modes", "eager", "--compile-ahead", "2"),
        ("--cases", "sample", "--compile-ahead", "2"),
    ],
)
def test_nothing_is_compiled_ahead_without_a_compiled_model_case(bench, argv):
    args = _args(bench, *argv)
    assert bench.compile_ahead(args, bench.settings_from_args(args)) == {}


def _table_record(case, model, mode, kind, throughput, peak, mfu, compile_mode=None):
    return {
        "case": case,
        "model": model,
        "mode": mode,
        "kind": kind,
        "compile_mode": compile_mode,
        "throughput": throughput,
        "peak_mem_bytes": peak,
        "mfu": mfu,
    }


def test_ratio_table_has_the_six_columns_of_ours_over_the_reference(bench):
    """The issue-33 table: train and infer in eager, `torch.compile()` and CUDA graphs; a run
    of `--modes compile --compile-mode reduce-overhead` fills the CUDA-graph columns."""
    meta = {"compile_mode": "reduce-overhead", "device_name": "x", "precision": "bf16"}
    meta["peak_flops"] = 780e12
    records = [
        _table_record("ldm", "ours", "eager", "train", 30.0, 12, 0.30),
        _table_record("ldm", "ref", "eager", "train", 10.0, 24, 0.10),
        _table_record("ldm", "ours", "compile", "infer", 60.0, 3, 0.5, "reduce-overhead"),
        _table_record("ldm", "ref", "compile", "infer", 40.0, 4, 0.4, "reduce-overhead"),
        _table_record("ldm", "ours", "compile", "train", 9.0, 1, 0.2, "max-autotune"),
    ]
    case = {"size": [256, 256], "batch": 16, "reference": "diffusers"}
    data = {"meta": meta, "cases": {"ldm": case}, "records": records}
    table = bench.ratio_table(data)
    assert list(table["columns"].values()) == [
        "train eager",
        "train `torch.compile()`",
        "train CUDA graphs",
        "infer eager",
        "infer `torch.compile()`",
        "infer CUDA graphs",
    ]
    (row,) = table["rows"]
    cells = row["cells"]
    assert cells["train_eager"]["speedup"] == pytest.approx(3.0)
    assert cells["train_eager"]["peak_mem_ratio"] == pytest.approx(0.5)
    assert cells["infer_graphs"]["speedup"] == pytest.approx(1.5)
    assert cells["infer_graphs"]["peak_mem_ratio"] == pytest.approx(0.75)
    assert (cells["infer_graphs"]["mfu_ours"], cells["infer_graphs"]["mfu_ref"]) == (0.5, 0.4)
    # max-autotune is not a column of the table; nothing else was measured.
    assert [k for k, c in cells.items() if c.get("status") == "–"] == [
        "train_compile",
        "train_graphs",
        "infer_eager",
        "infer_compile",
    ]
    lines = table["markdown"].splitlines()
    speed_row = next(line for line in lines if line.startswith("| `ldm` 256², B16 vs diffusers"))
    assert speed_row.split(" | ")[1:] == ["3.00×", "–", "–", "–", "–", "1.50× |"]
    assert "| `ldm` 256², B16 vs diffusers | 30.0 % / 10.0 % |" in table["markdown"]


def test_the_table_merges_runs_each_cell_from_the_last_run_that_measured_it(
    bench, tmp_path, capsys
):
    """`--table-from`: the table over several device calls, each cell (both sides) from the
    last run that measured it, so one case's training and inference can come from two calls;
    a later run that only skipped a cell does not replace what an earlier run measured."""
    case = {"size": [32, 32], "batch": 128, "reference": "diffusers"}

    def run(device, records, cases):
        meta = {"device_name": device, "precision": "bf16", "compile_mode": "default"}
        return {"meta": meta, "cases": {c: case for c in cases}, "records": records}

    first = run(
        "GPU A",
        [
            _table_record("ldm", "ours", "eager", "train", 30.0, 12, 0.3),
            _table_record("ldm", "ref", "eager", "train", 10.0, 24, 0.1),
            _table_record("ddpm-cifar10", "ours", "eager", "train", 1.0, 1, 0.1),
            _table_record("ddpm-cifar10", "ref", "eager", "train", 1.0, 1, 0.1),
        ],
        ["ldm", "ddpm-cifar10"],
    )
    second = run(
        "GPU B",
        [
            # no compile_mode on the records: the run's (default) places them
            {
                **_table_record("ddpm-cifar10", "ours", "compile", "infer", 8.0, 2, 0.4),
                "compile_mode": None,
            },
            {
                **_table_record("ddpm-cifar10", "ref", "compile", "infer", 4.0, 4, 0.2),
                "compile_mode": None,
            },
            {
                "case": "ldm",
                "model": "ours",
                "mode": "eager",
                "kind": "train",
                "skipped": "deadline reached",
            },
        ],
        ["ddpm-cifar10", "ldm"],
    )
    paths = []
    for name, report in (("first.json", first), ("second.json", second)):
        paths.append(str(tmp_path / name))
        (tmp_path / name).write_text(json.dumps(report))
    out = tmp_path / "merged.json"
    data = bench.run_from_args(_args(bench, "--table-from", *paths, "--out", str(out)))
    rows = {row["case"]: row["cells"] for row in data["table"]["rows"]}
    assert rows["ldm"]["train_eager"]["speedup"] == pytest.approx(3.0)  # from the first run
    assert rows["ddpm-cifar10"]["infer_compile"]["speedup"] == pytest.approx(2.0)
    assert rows["ddpm-cifar10"]["train_eager"]["speedup"] == pytest.approx(1.0)  # the first's
    assert rows["ddpm-cifar10"]["train_compile"]["status"] == "–"  # measured by neither
    assert data["meta"]["merged_from"] == {
        "ldm": paths[0],
        "ddpm-cifar10": {"train_eager": paths[0], "infer_compile": paths[1]},
    }
    printed = capsys.readouterr().out
    assert f"`ldm`: {paths[0]} (GPU A); `ddpm-cifar10` train eager: {paths[0]} (GPU A); " in printed
    assert f"`ddpm-cifar10` infer `torch.compile()`: {paths[1]} (GPU B)." in printed
    assert json.loads(out.read_text())["table"]["markdown"] == data["table"]["markdown"]
    skipped_only = tmp_path / "skipped.json"
    skipped_only.write_text(json.dumps({**second, "records": second["records"][2:]}))
    with pytest.raises(ValueError, match="no measured model case"):
        bench.run_from_args(_args(bench, "--table-from", str(skipped_only)))
    with pytest.raises(ValueError, match="missing.json: not readable as a bench.py JSON"):
        bench.run_from_args(_args(bench, "--table-from", str(tmp_path / "missing.json")))


RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
AB_RUN = RESULTS / "h100-plain-compile-bias-by-inductor-inline-infer-ab-cifar.json"


@pytest.mark.parametrize("tree", ["base", "change"])
def test_the_table_reads_either_tree_of_an_ab_run_as_its_summary_does(bench, tree, tmp_path):
    """`--table-from AB.json:TREE`: the cells of one side of an `ab.py` run (two rounds, H100),
    each the median of its rounds against the reference's, as `ab.py`'s own summary says."""
    data = bench.run_from_args(_args(bench, "--table-from", f"{AB_RUN}:{tree}"))
    summary = json.loads(AB_RUN.read_text())["summary"]
    (row,) = data["table"]["rows"]
    assert row["case"] == "ddpm-cifar10"
    for line in summary:
        cell = row["cells"][f"{line['kind']}_compile"]
        assert cell["speedup"] == pytest.approx(line[f"{tree}_vs_ref"], rel=1e-9)
        assert cell["peak_mem_ratio"] == pytest.approx(
            line["peak_gib"][tree] / line["peak_gib"]["ref"], rel=1e-6
        )
    assert data["meta"]["merged_from"] == {"ddpm-cifar10": f"{AB_RUN}:{tree}"}
    with pytest.raises(ValueError, match="an ab.py JSON holds two trees; name the one"):
        bench.run_from_args(_args(bench, "--table-from", str(AB_RUN)))
    plain = tmp_path / "run.json"
    plain.write_text(json.dumps(bench.report_from_ab(json.loads(AB_RUN.read_text()), tree)))
    with pytest.raises(ValueError, match=":base' names a tree of an ab.py JSON, but"):
        bench.run_from_args(_args(bench, "--table-from", f"{plain}:base"))
    with pytest.raises(ValueError, match="a kind is chosen only from one tree of an ab.py"):
        bench.run_from_args(_args(bench, "--table-from", f"{AB_RUN}:train"))


def test_one_kind_of_each_tree_of_an_ab_run_makes_one_row(bench):
    """`AB.json:change:train AB.json:base:infer`: a row whose training cell is the change's and
    whose inference cell is the base's, where each side is the default of its kind."""
    summary = {line["kind"]: line for line in json.loads(AB_RUN.read_text())["summary"]}
    paths = [f"{AB_RUN}:change:train", f"{AB_RUN}:base:infer"]
    data = bench.run_from_args(_args(bench, "--table-from", *paths))
    (row,) = data["table"]["rows"]
    speedup = {key: row["cells"][f"{key}_compile"]["speedup"] for key in ("train", "infer")}
    assert speedup["train"] == pytest.approx(summary["train"]["change_vs_ref"], rel=1e-9)
    assert speedup["infer"] == pytest.approx(summary["infer"]["base_vs_ref"], rel=1e-9)
    assert data["meta"]["merged_from"] == {
        "ddpm-cifar10": {"train_compile": paths[0], "infer_compile": paths[1]}
    }


def test_mfu_is_stated_from_the_reference_count_for_both_sides(bench):
    settings = bench.Settings(device=torch.device("cpu"), iters=1, repeats=1, peak_flops=1e3)
    record = {"kind": "train", "batch": 2}
    timing = {"seconds_per_iter": 0.5}
    ref_count, own = {"train": 100, "forward": 40}, {"train": 80, "forward": 30}
    bench._finish(record, timing, ref_count, settings, own)
    assert record["throughput"] == 4.0
    assert (record["flops_per_sample"], record["own_flops_per_sample"]) == (100, 80)
    assert record["mfu"] == pytest.approx(100 * 4.0 / 1e3)


def test_measurement_modes_and_their_compile_modes(bench):
    settings = bench.Settings(device=torch.device("cpu"), compile_mode="max-autotune")
    assert [settings.compile_mode_for(m) for m in bench.MODES] == [
        None,
        "max-autotune",
        "reduce-overhead",
    ]
    assert settings.records_cuda_graphs_in("graphs") and not settings.records_cuda_graphs_in(
        "eager"
    )
    assert settings.skip_reason("graphs") and settings.skip_reason("compile") is None
    with pytest.raises(ValueError, match="measure CUDA graphs twice"):
        bench.run_from_args(
            _args(bench, "--modes", "compile,graphs", "--compile-mode", "reduce-overhead")
        )
    # Compiling ahead: one process per compiled mode; none for graphs off a GPU.
    args = _args(bench, "--cases", "ldm", "--modes", "eager,graphs", "--compile-ahead", "2")
    assert bench.compile_ahead(args, bench.settings_from_args(args)) == {}
    child = _args(bench, *bench._fill_cache_argv(args, settings, "ldm", "ours", "graphs", "train"))
    assert child.modes == ("graphs",) and child.fill_caches_only


# ------------------------------------------------------------------------ kernel classes
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64",
            "convolution",
        ),
        ("sm90_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32", "convolution"),
        ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>", "elementwise/copies"),
        (
            "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast>",
            "elementwise/copies",
        ),
        (
            "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>",
            "norm/reductions",
        ),
        ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "norm/reductions"),
        ("triton_red_fused_native_group_norm_silu_0", "norm/reductions"),
        ("triton_per_fused_native_group_norm_backward_3", "norm/reductions"),
        ("triton_poi_fused__to_copy_convolution_add_7", "elementwise/copies"),
        ("triton_tem_fused_convolution_2", "convolution"),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention+GEMM"),
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention+GEMM"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "attention+GEMM"),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
            "optimizer",
        ),
        ("aten::mkldnn_convolution", "convolution"),
        ("aten::native_group_norm", "norm/reductions"),
        ("Memcpy DtoD (Device -> Device)", "elementwise/copies"),
        ("_stats_kernel", "norm/reductions"),  # diffunet's fused GroupNorm (accel/norm/kernels.py)
        ("_backward_dx_kernel", "norm/reductions"),
        ("_normalize_kernel", "norm/reductions"),
        (
            "_gather_weight_grad_kernel",
            "convolution",
        ),  # diffunet's thin convs (accel/thin_conv/kernels.py)
        ("_tap_sum_kernel", "convolution"),
        ("void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", "attention+GEMM"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention+GEMM"),
        ("some_unknown_kernel", "other"),
    ],
)
def test_classify_kernel(harness, name, expected):
    from harness.profiling import classify_kernel

    assert classify_kernel(name) == expected


def test_kernel_breakdown_counts_kernels_not_gpu_ranges(harness):
    from torch.autograd import DeviceType

    from harness.profiling import kernel_breakdown

    def event(name, us, annotation=False):
        return SimpleNamespace(
            name=name,
            device_type=DeviceType.CUDA,
            device_time_total=us,
            is_user_annotation=annotation,
        )

    events = [
        event("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 300.0),
        event("nccl:all_reduce", 300.0, annotation=True),
        event("DistributedDataParallel.forward", 900.0, annotation=True),
        event("sm90_xmma_fprop_implicit_gemm_bf16", 100.0),
    ]
    result = kernel_breakdown(SimpleNamespace(events=lambda: events), 1, torch.device("cuda"))
    assert result["ms_per_step"] == pytest.approx(0.4)
    assert result["classes"]["other"]["ms_per_step"] == 0
    assert [k["name"] for k in result["top_kernels"]] == [
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL",
        "sm90_xmma_fprop_implicit_gemm_bf16",
    ]


def test_launch_chain_names_the_op_behind_a_kernel_outermost_first(harness):
    from harness.profiling import launch_chain

    names = [
        "CompiledFunctionBackward",
        "aten::convolution_backward",
        "aten::contiguous",
        "aten::clone",
        "aten::copy_",
    ]
    event = None
    for name in names:
        event = SimpleNamespace(name=name, cpu_parent=event)
    assert launch_chain(event, depth=4) == " > ".join(names[1:])
    assert launch_chain(event, depth=10) == " > ".join(names)


# ------------------------------------------------------------------------ diffunet bench
def test_bench_command_takes_the_scripts_options_in_a_checkout():
    from diffunet.cli import bench as command
    from diffunet.cli.app import build_parser

    assert command.benchmarks_folder() is not None  # the tests run from a checkout
    args = build_parser().parse_args(["bench", "--quick", "--cases", "ldm,sample"])
    assert args.cases == ("ldm", "sample") and args.quick
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--cases", "nope"])


def test_bench_command_outside_a_checkout_says_where_the_benchmarks_are(monkeypatch, capsys):
    from diffunet.cli import bench as command
    from diffunet.cli.app import main

    monkeypatch.delitem(sys.modules, command._MODULE, raising=False)
    monkeypatch.setattr(command, "benchmarks_folder", lambda: None)
    assert main(["bench", "--quick", "--cases", "ldm"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("diffunet bench: error:") and "benchmarks/ folder" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "live in the repository's `benchmarks/`" in " ".join(capsys.readouterr().out.split())


def test_a_resumed_run_keeps_finished_cells_and_measures_the_rest_on_both_sides(
    bench, tmp_path, capsys
):
    """`--resume`: the table as one command run until it is complete. A cell whose reference
    the earlier run did not reach is measured again on both sides; finished cells keep their
    records; a complete run measures nothing more; a run of other settings is refused."""
    pytest.importorskip("diffusers")
    out = tmp_path / "table.json"
    argv = ("--cases", "ddpm-cifar10", "--modes", "eager", "--checkpoint-modes", "none")
    first = bench.run_from_args(_args(bench, *argv, "--out", str(out)))
    assert first["errors"] == []
    train = [r for r in first["records"] if r["kind"] == "train"]
    # as if the earlier run had reached its deadline before the reference's inference
    earlier = json.loads(out.read_text())
    for r in earlier["records"]:
        if (r["model"], r["kind"]) == ("ref", "infer"):
            for key in ("throughput", "seconds_per_iter", "seconds_per_iter_repeats"):
                r.pop(key)
            r["skipped"] = "deadline reached"
    out.write_text(json.dumps(earlier))
    capsys.readouterr()

    resumed = bench.run_from_args(_args(bench, *argv, "--resume", "--out", str(out)))
    assert "resuming" in capsys.readouterr().out
    assert resumed["errors"] == [] and json.loads(out.read_text())["records"] == resumed["records"]
    assert resumed["meta"]["resumed"]["kept_records"] == 2
    by_cell = {(r["model"], r["kind"]): r for r in resumed["records"]}
    assert sorted(by_cell) == [
        ("ours", "infer"),
        ("ours", "train"),
        ("ref", "infer"),
        ("ref", "train"),
    ]
    assert [by_cell["ours", "train"], by_cell["ref", "train"]] == train  # kept as they were
    ours_infer = next(r for r in first["records"] if (r["model"], r["kind"]) == ("ours", "infer"))
    assert (
        by_cell["ours", "infer"]["seconds_per_iter_repeats"]
        != ours_infer["seconds_per_iter_repeats"]
    )  # measured again beside the reference
    assert all(by_cell[m, "infer"]["throughput"] > 0 for m in ("ours", "ref"))
    assert resumed["table"]["rows"][0]["cells"]["infer_eager"]["speedup"] > 0

    again = bench.run_from_args(_args(bench, *argv, "--resume", "--out", str(out)))
    assert "kept from the run resumed" in capsys.readouterr().out
    assert again["records"] == resumed["records"]
    assert len(again["meta"]["resumed"]["runs"]) == 2

    with pytest.raises(bench.InvalidValueError, match='precision "fp32", this run has "bf16"'):
        bench.run_from_args(
            _args(bench, *argv, "--precision", "bf16", "--resume", "--out", str(out))
        )


def test_finished_cells_need_every_side_and_a_result(harness):
    from harness.resume import finished_cells

    def record(model, mode, kind, **result):
        return {"case": "ldm", "model": model, "mode": mode, "kind": kind, **result}

    records = [
        record("ours", "eager", "train", throughput=2.0),
        record("ref", "eager", "train", throughput=1.0),
        record("ours", "eager", "infer", throughput=2.0),
        record("ref", "eager", "infer", error="OOM"),
        record("ours", "graphs", "train", throughput=2.0),
        record("ref", "graphs", "train", skipped="deadline reached"),
        record("ours", "graphs", "infer", throughput=2.0),
        record("ref", "graphs", "infer", skipped="MONAI is not importable"),
        record("ours+ckpt", "eager", "train", throughput=1.5),
    ]
    assert finished_cells(records, ("ours", "ref")) == {
        ("ldm", "eager", "train"),
        ("ldm", "graphs", "infer"),
        ("ldm", "eager+ckpt", "train"),
    }
    assert ("ldm", "eager", "infer") in finished_cells(records, ("ours",))
