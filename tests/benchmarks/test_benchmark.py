"""The benchmark harness (`benchmarks/bench.py`, `diffunet bench`) runs its quick path on the
CPU: tiny versions of every case, ours against diffusers (and MONAI when it is installed),
with parameter counts asserted equal; the kernel classifier and the profile mode work."""

import argparse
import importlib.util
import json

import pytest
import torch

from diffunet import UNet, preset
from diffunet.benchmark import (
    KERNEL_CLASSES,
    UNET_3D,
    Settings,
    add_arguments,
    build_reference,
    classify_kernel,
    ddim_timesteps,
    diffusers_kwargs,
    format_profile,
    kernel_breakdown,
    monai_kwargs,
    num_parameters,
    run_from_args,
    run_profile,
)

HAS_MONAI = importlib.util.find_spec("monai") is not None


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        ["--quick", "--device", "cpu", "--iters", "1", "--repeats", "1", "--warmup", "1", *argv]
    )


@pytest.mark.parametrize(("name", "count"), [("ddpm-cifar10", 35_746_307), ("ldm", 75_376_643)])
def test_full_size_parameter_counts_match_diffusers(name, count):
    pytest.importorskip("diffusers")
    config = preset(name)
    with torch.device("meta"):
        ours = UNet(config)
        ref = build_reference(config, "diffusers")
    assert num_parameters(ours) == num_parameters(ref) == count


def test_3d_config_is_the_issue_monai_architecture():
    with torch.device("meta"):
        assert num_parameters(UNet(UNET_3D)) == 68_585_025
    kwargs = monai_kwargs(UNET_3D)
    assert kwargs["channels"] == (64, 128, 256, 256)
    assert kwargs["attention_levels"] == (False, False, False, True)
    assert kwargs["in_channels"] == 2 and kwargs["out_channels"] == 1
    assert kwargs["num_head_channels"] == 32 and kwargs["num_res_blocks"] == 2
    if HAS_MONAI:
        with torch.device("meta"):
            assert num_parameters(build_reference(UNET_3D, "monai")) == 68_585_025


def test_reference_mapping_rejects_what_it_cannot_express():
    with pytest.raises(ValueError, match="use_scale_shift_norm"):
        diffusers_kwargs(preset("emdiffuse"))
    with pytest.raises(ValueError, match="dims"):
        diffusers_kwargs(UNET_3D)


def test_quick_benchmark_on_cpu_against_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "bench.json"
    data = run_from_args(_args("--cases", "ddpm-cifar10", "--modes", "eager", "--out", str(out)))
    assert data["errors"] == []
    entry = data["cases"]["ddpm-cifar10"]
    assert entry["params"]["match"] is True
    assert (
        entry["flops_per_sample"]["ours"]["train"]
        > entry["flops_per_sample"]["ours"]["forward"]
        > 0
    )
    got = {(r["model"], r["kind"]) for r in data["records"]}
    assert got == {
        ("ours", "train"),
        ("ours", "infer"),
        ("ref", "train"),
        ("ref", "infer"),
        ("ours+ckpt", "train"),
    }
    for r in data["records"]:
        assert r["throughput"] > 0 and r["mfu"] > 0 and r["seconds_per_iter"] > 0
    assert "train_speedup_eager" in data["ratios"]["ddpm-cifar10"]
    saved = json.loads(out.read_text())
    assert saved["meta"]["quick"] is True and len(saved["records"]) == 5


def test_3d_case_without_monai_skips_the_reference_cleanly(tmp_path):
    data = run_from_args(
        _args(
            "--cases",
            "3d",
            "--modes",
            "eager",
            "--kinds",
            "infer",
            "--models",
            "ref",
            "--out",
            str(tmp_path / "b.json"),
        )
    )
    entry = data["cases"]["3d"]
    if HAS_MONAI:
        assert entry["params"]["match"] is True
        assert all(r.get("throughput") for r in data["records"])
    else:
        assert "MONAI is not importable" in entry["reference_skipped"]
        assert entry["params"]["match"] is None
        assert [r["skipped"] for r in data["records"]] == [entry["reference_skipped"]]
        assert data["errors"] == []


def test_quick_ddim_sampling(tmp_path):
    pytest.importorskip("diffusers")
    data = run_from_args(
        _args(
            "--cases",
            "sample",
            "--sample-modes",
            "eager",
            "--sample-steps",
            "2",
            "--out",
            str(tmp_path / "b.json"),
        )
    )
    assert data["errors"] == []
    assert {r["model"] for r in data["records"]} == {"ours", "ref"}
    assert all(r["seconds_per_batch"] > 0 for r in data["records"])
    assert data["ratios"]["sample"]["speedup_diffunet_eager_vs_eager"] > 0


def test_ddim_timesteps_run_from_noisiest_to_clean():
    ts = ddim_timesteps(50)
    assert len(ts) == 50 and ts[0] == 980 and ts[-1] == 0


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
        ("_stats_kernel", "norm/reductions"),  # diffunet's fused GroupNorm (nn/fused.py)
        ("_backward_dx_kernel", "norm/reductions"),
        ("_normalize_kernel", "norm/reductions"),
        ("_gather_weight_grad_kernel", "convolution"),  # diffunet's thin convs (nn/thin_conv.py)
        ("_tap_sum_kernel", "convolution"),
        ("void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", "attention+GEMM"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention+GEMM"),
        ("some_unknown_kernel", "other"),
    ],
)
def test_classify_kernel(name, expected):
    assert classify_kernel(name) == expected


def test_profile_mode_on_cpu():
    settings = Settings(device=torch.device("cpu"), warmup=1, precision="fp32", quick=True)
    result = run_profile(
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
    table = format_profile(result)
    assert "steps of train/infer" in table and " infer " in table


def test_kernel_breakdown_counts_kernels_not_gpu_ranges():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

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


def test_bench_command_is_registered():
    from diffunet.cli.app import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--cases", "ldm,sample"])
    assert args.cases == ("ldm", "sample")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--cases", "nope"])


@pytest.mark.parametrize("from_start", [False, True])
def test_peak_memory_is_reset_after_the_warm_up_unless_cuda_graphs_are_recorded(
    monkeypatch, from_start
):
    from diffunet import benchmark

    events = []
    monkeypatch.setattr(benchmark, "_reset_peak", lambda device: events.append("reset"))
    settings = benchmark.Settings(
        device=torch.device("cpu"),
        warmup=2,
        iters=1,
        repeats=1,
        compile_mode="reduce-overhead" if from_start else "default",
    )
    assert settings.records_cuda_graphs == from_start
    benchmark.measure(lambda i: events.append(f"call {i}"), settings, peak_from_start=from_start)
    warm_up = ["call 0", "call 1"]
    expected = ["reset", *warm_up] if from_start else [*warm_up, "reset"]
    assert events[:3] == expected


def test_launch_chain_names_the_op_behind_a_kernel_outermost_first():
    from types import SimpleNamespace

    from diffunet.benchmark import _launch_chain

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
    assert _launch_chain(event, depth=4) == " > ".join(names[1:])
    assert _launch_chain(event, depth=10) == " > ".join(names)


def test_compiling_ahead_runs_the_same_compiled_measurement_for_one_model():
    from diffunet.benchmark import _fill_cache_argv, settings_from_args

    args = _args(
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
    settings = settings_from_args(args)
    child = _args(*_fill_cache_argv(args, settings, "3d", "ref"))
    child_settings = settings_from_args(child)
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


@pytest.mark.parametrize(
    "argv",
    [
        ("--compile-ahead", "0"),
        ("--modes", "eager", "--compile-ahead", "2"),
        ("--cases", "sample", "--compile-ahead", "2"),
    ],
)
def test_nothing_is_compiled_ahead_without_a_compiled_model_case(argv):
    from diffunet.benchmark import compile_ahead, settings_from_args

    args = _args(*argv)
    assert compile_ahead(args, settings_from_args(args)) == {}
