"""The fused GroupNorm → scale-shift → SiLU op: its eager fallback is the exact reference, and
its Triton kernels match it (under Triton's CPU interpreter here, on the GPU when present)."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.compile_fx import compile_fx

from diffunet import UNet
from diffunet.accel import fused_norm as fused
from diffunet.model.introspect import example_inputs, small_config

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_fallback_is_exactly_the_unfused_computation():
    x = torch.randn(2, 8, 5, 7)
    w, b = torch.randn(8), torch.randn(8)
    scale, shift = torch.randn(2, 8), torch.randn(2, 8)
    got = fused.group_norm_act(x, 4, w, b, 1e-5, scale, shift, act=True)
    expected = F.silu(
        F.group_norm(x, 4, w, b, 1e-5) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    )
    assert torch.equal(got, expected)
    assert torch.equal(
        fused.group_norm_act(x, 4, w, b, 1e-5, act=False), F.group_norm(x, 4, w, b, 1e-5)
    )


def test_cpu_tensors_take_the_fallback():
    assert (
        not fused.fused_available(torch.randn(1, 4, 4)) or os.environ.get("TRITON_INTERPRET") == "1"
    )


INTERPRETER_CHECK = textwrap.dedent("""
    # argv[1]: "eager" runs the kernels through autograd, "compiled" through the custom op
    # in graphs compiled with aot_eager or Inductor (and checks when graphs call it),
    # "one-pass" through autograd with every forward and backward in one kernel, whose loops
    # run over several tiles, "one-tile" the same with every call's positions in one tile.
    import dataclasses
    import sys
    import torch
    from diffunet.accel import fused_norm as fused
    from diffunet.accel.fused_norm import group_norm_act
    compiled = sys.argv[1] == "compiled"
    one_kernel = sys.argv[1] in ("one-pass", "one-tile")
    if one_kernel:
        tile = 64 if sys.argv[1] == "one-pass" else 1 << 16
        fused.LAUNCH = fused.LaunchConfig(tile, 4, 4, 2, one_pass_elements=1 << 30)
    else:  # three kernels each way, as the shipped plan runs calls too large for one
        fused.LAUNCH = dataclasses.replace(fused.LaunchPlan().small, one_pass_elements=0)
    fused.set_compiled_min_elements(0)
    torch.manual_seed(0)

    def routed(fn, *args):
        ops = []
        def backend(gm, inputs):
            ops.extend(str(n.target) for n in gm.graph.nodes)
            return gm
        torch._dynamo.reset()
        torch.compile(fn, backend=backend)(*args)
        return "diffunet.group_norm_act.default" in ops

    worst = 0.0
    cases = [((2, 8, 5, 7), 4, True, "aot_eager"), ((3, 12, 4, 4, 3), 3, True, "inductor"),
             ((2, 6, 33), 2, False, "aot_eager"), ((2, 20, 3, 5), 5, False, "aot_eager"),
             ((2, 72, 5, 3), 24, True, "aot_eager")]
    for shape, groups, channels_last, backend in cases:
        one = fused._one_pass_shape(torch.empty(shape).flatten(2), groups)
        assert (one is not None) == one_kernel
        assert not one_kernel or one.single_tile == (sys.argv[1] == "one-tile")
        for film, act, add in [(False, True, False), (True, True, False),
                               (False, False, False), (False, True, True)]:
            x = torch.randn(*shape) * 2 + 3
            if channels_last:
                fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
                x = x.contiguous(memory_format=fmt)
            assert fused.fused_available(x)
            B, C = shape[:2]
            params = [p.requires_grad_(True) for p in [x, torch.randn(C), torch.randn(C)]]
            if film:  # as in the model: two non-contiguous halves of one projection
                params += list(torch.randn(B, 2 * C, requires_grad=True).chunk(2, dim=1))
            if add:  # an embedding that moves each channel's mean far off x's
                params.append((torch.randn(B, C) * 4).requires_grad_(True))

            def norm(x, w, b, *extra):
                scale, shift = extra[:2] if film else (None, None)
                offset = extra[-1] if add else None
                return group_norm_act(x, groups, w, b, 1e-5, scale, shift, act=act, add=offset)

            reference = norm  # float64 below: never fused, never compiled
            if compiled:
                assert routed(norm, *params)
                with torch.no_grad():  # compiled inference calls it too
                    assert routed(norm, *params)
                torch._dynamo.reset()
                norm = torch.compile(norm, backend=backend)
            y = norm(*params)
            ref_params = [p.detach().double().requires_grad_(True) for p in params]
            y_ref = reference(*ref_params)
            gy = torch.randn_like(y)
            grads = torch.autograd.grad(y, params, gy)
            ref_grads = torch.autograd.grad(y_ref, ref_params, gy.double())
            assert len(grads) == 3 + 2 * film + add
            worst = max(worst, ((y.double() - y_ref).abs().max() / y_ref.abs().max()).item())
            for g, r in zip(grads, ref_grads):
                worst = max(worst, ((g.double() - r).abs().max() / r.abs().max()).item())
    if compiled:
        small = torch.randn(2, 4, 3, 3, requires_grad=True), torch.ones(4), torch.zeros(4)
        fused.set_compiled_min_elements(2 * 4 * 3 * 3 + 1)
        assert not routed(lambda x, w, b: group_norm_act(x, 2, w, b, 1e-5), *small)
        fused.set_compiled_min_elements(None)
        assert not routed(lambda x, w, b: group_norm_act(x, 2, w, b, 1e-5), *params[:3])
    print(f"worst relative error {worst:.3e}")
    assert worst < 1e-5, worst
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CPU-only torch)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests below check the real kernels")
@pytest.mark.parametrize("path", ["eager", "compiled", "one-pass", "one-tile"])
def test_triton_kernels_match_reference_under_the_interpreter(path):
    """`compiled`: graphs call the kernels as a custom op, forward and all five gradients;
    `one-pass`: the forward and the backward in one kernel each (tiles of 64 elements, so that
    their loops run several times), `one-tile`: the same in a single tile kept in registers;
    both with slices of whole groups that leave the last one partly empty where the groups do
    not divide evenly (3 groups of 4 channels: slices of 2 groups; 24 of 3: slices of 16)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETER_CHECK, path],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("reduce-overhead", fused.CUDA_GRAPHS_MIN_ELEMENTS),
        ("max-autotune", fused.CUDA_GRAPHS_MIN_ELEMENTS),
        ("default", None),
        ("max-autotune-no-cudagraphs", None),
        (None, None),
    ],
)
def test_the_compile_mode_decides_whether_compiled_graphs_call_the_kernels(mode, expected):
    fused.set_compiled_min_elements(123)
    fused.configure_for_compile_mode(mode)
    assert expected == fused._COMPILED_MIN_ELEMENTS
    inference = None if expected is None else fused.CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE
    assert inference == fused._COMPILED_MIN_ELEMENTS_INFERENCE


def test_graphs_traced_without_gradients_use_the_inference_threshold(monkeypatch):
    """The decision as Dynamo's trace of `group_norm_act` makes it, with kernels that would
    take the tensor (a GPU's), under each grad mode."""
    monkeypatch.setattr(torch.compiler, "is_dynamo_compiling", lambda: True)
    monkeypatch.setattr(fused, "_kernels_take", lambda x: True)
    x = torch.empty(2, 4, 8, 8)  # 512 elements
    fused.set_compiled_min_elements(100, inference=1000)
    assert fused.compiled_fused_wanted(x)
    with torch.no_grad():
        assert not fused.compiled_fused_wanted(x)
    fused.set_compiled_min_elements(1000, inference=100)
    assert not fused.compiled_fused_wanted(x)
    with torch.no_grad():
        assert fused.compiled_fused_wanted(x)
    fused.set_compiled_min_elements(100)  # the inference threshold follows by default
    with torch.no_grad():
        assert fused.compiled_fused_wanted(x)
    fused.set_compiled_min_elements(None, inference=100)  # None: the reference everywhere
    with torch.no_grad():
        assert not fused.compiled_fused_wanted(x)


@pytest.mark.parametrize(
    ("value", "expected", "warns"),
    [
        (None, 1 << 20, False),
        ("4194304", 4194304, False),
        ("0", 0, False),
        ("4M", 1 << 20, True),
        ("-1", 1 << 20, True),
    ],
)
def test_the_environment_sets_the_compiled_threshold_at_import(value, expected, warns):
    """`DIFFUNET_FUSED_GRAPHS_MIN_ELEMENTS`, for an A/B of the threshold in separate processes
    (`benchmarks/ab.py --change-env`); the CUDA-graph modes then use it."""
    names = fused.CUDA_GRAPHS_MIN_ELEMENTS_ENV, fused.CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE_ENV
    env = {k: v for k, v in os.environ.items() if k not in names}
    if value is not None:
        env[fused.CUDA_GRAPHS_MIN_ELEMENTS_ENV] = value
    done = _thresholds_at_import(env)
    assert done.stdout.split() == [str(expected)] * 4  # inference follows training by default
    assert ("is not a number of elements" in done.stderr) == warns


@pytest.mark.parametrize(
    ("value", "expected", "warns"),
    [("4194304", 4194304, False), ("0", 0, False), ("4M", 1 << 20, True)],
)
def test_the_environment_sets_the_inference_threshold_at_import(value, expected, warns):
    """`DIFFUNET_FUSED_GRAPHS_MIN_ELEMENTS_INFER`, for an A/B of inference alone: training's
    threshold stays; a bad value keeps training's."""
    env = {k: v for k, v in os.environ.items() if k != fused.CUDA_GRAPHS_MIN_ELEMENTS_ENV}
    env[fused.CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE_ENV] = value
    done = _thresholds_at_import(env)
    assert done.stdout.split() == [str(1 << 20)] * 2 + [str(expected)] * 2
    assert ("is not a number of elements" in done.stderr) == warns


def _thresholds_at_import(env: dict[str, str]) -> subprocess.CompletedProcess:
    """A process that imports the op under `env` and prints the training and inference
    thresholds, as set and as a CUDA-graph compile mode applies them."""
    code = (
        "from diffunet.model.layers import fused; fused.configure_for_compile_mode('reduce-overhead');"
        " print(fused.CUDA_GRAPHS_MIN_ELEMENTS, fused._COMPILED_MIN_ELEMENTS,"
        " fused.CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE, fused._COMPILED_MIN_ELEMENTS_INFERENCE)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done


SHIPPED = fused.LaunchPlan()


@pytest.mark.parametrize(
    ("name", "field", "value", "expected", "warning"),
    [
        (fused.LOOP_STAGES_ENV, "loop_stages", "2", 2, None),
        (fused.LOOP_STAGES_ENV, "loop_stages", "1", 1, None),
        (
            fused.LOOP_STAGES_ENV,
            "loop_stages",
            "0",
            SHIPPED.large.loop_stages,
            "is not a loop depth",
        ),
        (fused.ONE_PASS_ENV, "one_pass_elements", "16384", 16384, None),
        (
            fused.ONE_PASS_ENV,
            "one_pass_elements",
            "-1",
            SHIPPED.small.one_pass_elements,
            "is not a number of elements",
        ),
    ],
)
def test_the_environment_sets_a_launch_field_at_import(name, field, value, expected, warning):
    """`DIFFUNET_NORM_LOOP_STAGES` and `DIFFUNET_NORM_ONE_PASS_ELEMENTS`, for an A/B of
    pipelined loops or the one-kernel calls in separate processes: both configurations of
    the plan take the value, and nothing else changes."""
    env = {**os.environ, name: value}
    code = (
        "import dataclasses; from diffunet.model.layers import fused; plan = fused.LAUNCH;"
        " print(dataclasses.astuple(plan.large), dataclasses.astuple(plan.small), sep=';')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    expected_plan = [
        dataclasses.astuple(dataclasses.replace(config, **{field: expected}))
        for config in (SHIPPED.large, SHIPPED.small)
    ]
    assert done.stdout.strip().split(";") == [str(t) for t in expected_plan]
    if warning is None:
        assert "keeping" not in done.stderr
    else:
        assert warning in done.stderr


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="Triton's interpreter runs the kernels on the CPU",
)
def test_on_the_cpu_compiled_graphs_trace_the_reference():
    fused.set_compiled_min_elements(0)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    assert not fused.compiled_fused_wanted(x)  # not while Dynamo is not tracing
    ops = []

    def backend(gm, inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    torch.compile(
        lambda t: fused.group_norm_act(t, 2, torch.ones(4), torch.zeros(4), 1e-5), backend=backend
    )(x)
    assert "diffunet.group_norm_act.default" not in ops and ops


AWKWARD = [
    ((3, 96, 17, 9), 32),
    ((2, 448, 15, 15), 32),
    ((5, 40, 7, 6, 5), 8),
    ((4, 24, 1000), 8),
    ((1, 1536, 4, 4), 32),
]


@pytest.fixture
def fused_everywhere():
    """Use the fused kernels whatever the tensor size, then restore the defaults."""
    saved = fused._FUSED_ENABLED, fused._MIN_ELEMENTS
    fused.set_fused_enabled(True, min_elements=0)
    yield
    fused.set_fused_enabled(saved[0], min_elements=saved[1])


def test_the_launch_plan_picks_its_configuration_by_size():
    plan = fused.LaunchPlan()
    assert plan.for_elements(plan.large_from) is plan.large
    assert plan.for_elements(plan.large_from - 1) is plan.small
    assert plan.large.programs_per_sm > plan.small.programs_per_sm  # what the sweep found
    one = fused.LaunchConfig(2048, 8, 4)
    assert one.for_elements(1) is one.for_elements(1 << 30) is one
    assert plan.large.loop_stages == plan.small.loop_stages == 3  # session 17's sweep


def test_a_launch_shape_covers_the_view_with_the_configured_loop(monkeypatch):
    monkeypatch.setattr(fused, "LAUNCH", fused.LaunchConfig(2048, 2, 8, loop_stages=3))
    launch = fused._launch_shape(torch.empty(4, 96, 1000))
    assert (launch.block_c, launch.block_n, launch.num_warps, launch.loop_stages) == (128, 16, 8, 3)
    assert launch.rows % launch.block_n == 0 and launch.chunks * launch.rows >= 1000
    assert (launch.chunks - 1) * launch.rows < 1000  # no chunk starts past the end
    assert launch.kernel_options() == {"BLOCK_C": 128, "BLOCK_N": 16, "STAGES": 3, "num_warps": 8}


@pytest.mark.parametrize(
    ("shape", "groups", "expected"),
    [
        ((128, 256, 64), 32, (8, 64, 4, 64, 64, True)),  # 8² × 256 in cifar: slices of 64 channels
        ((16, 512, 256), 32, (4, 64, 8, 64, 64, False)),
        ((2, 96, 100), 32, (32, 96, 1, 128, 32, False)),  # 3 channels a group: all 32 to reach 64
        ((2, 12, 100), 3, (2, 8, 2, 8, 128, True)),  # 3 groups: the last slice holds one
        ((2, 1536, 16), 32, (2, 96, 16, 128, 16, True)),  # 48 channels a group: two
    ],
)
def test_a_one_pass_shape_covers_whole_groups(shape, groups, expected, monkeypatch):
    monkeypatch.setattr(
        fused, "LAUNCH", fused.LaunchConfig(4096, 4, 4, 3, one_pass_elements=1 << 14)
    )
    one = fused._one_pass_shape(torch.empty(shape), groups)
    assert (
        one.groups,
        one.channels,
        one.slices,
        one.block_c,
        one.block_n,
        one.single_tile,
    ) == expected
    assert one.slices * one.groups >= groups > (one.slices - 1) * one.groups
    assert one.kernel_options()["BLOCK_G"] >= one.groups
    too_large = fused.LaunchConfig(4096, 4, 4, 3, one_pass_elements=one.channels * shape[2] - 1)
    monkeypatch.setattr(fused, "LAUNCH", too_large)
    assert fused._one_pass_shape(torch.empty(shape), groups) is None  # back to three kernels


@pytest.mark.gpu
def test_eager_mode_takes_the_kernels_from_2_to_the_24_elements():
    """`ddpm-cifar10`'s level-0 norms (128 × 128 × 32², exactly 2^24 elements) run fused in eager
    mode, keeping 4 bytes per element for backward instead of the float32 reference's 10."""
    x = torch.empty(128, 128, 32, 32, device="cuda", dtype=torch.bfloat16)
    assert fused.fused_available(x)
    assert not fused.fused_available(x[:, :, :31])  # one row of 32 positions fewer


@pytest.mark.gpu
@pytest.mark.usefixtures("fused_everywhere")
@pytest.mark.parametrize(("shape", "groups"), AWKWARD)
@pytest.mark.parametrize(
    ("film", "act", "add"),
    [(False, True, False), (True, True, False), (False, False, False), (False, True, True)],
)
@pytest.mark.parametrize("launch", ["large", "small", "pipelined", "one-pass"])
def test_fused_matches_eager_on_gpu_bf16(shape, groups, film, act, add, launch, monkeypatch):
    """Under each configuration of the launch plan as shipped (which runs the smaller of
    these shapes in one kernel each way), with three kernels each way and pipelined loops,
    and with every forward and backward in one kernel each, whatever the size."""
    config = {
        "pipelined": fused.LaunchConfig(2048, 4, 4, loop_stages=3),
        "one-pass": fused.LaunchConfig(2048, 4, 4, 3, one_pass_elements=1 << 30),
    }.get(launch) or getattr(fused.LaunchPlan(), launch)
    monkeypatch.setattr(fused, "LAUNCH", config)
    device = torch.device("cuda")
    x = torch.randn(*shape, device=device, dtype=torch.bfloat16) * 2 + 1
    if x.ndim in (4, 5):
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    B, C = shape[:2]
    params = [x, torch.randn(C, device=device), torch.randn(C, device=device)]
    params = [p.detach().requires_grad_(True) for p in params]
    if film:  # non-contiguous halves of one projection, as in the model
        projection = torch.randn(B, 2 * C, device=device, dtype=torch.bfloat16) * 0.5
        params += list(projection.requires_grad_(True).chunk(2, dim=1))
    if add:  # float32, as the model's bf16 embedding plus a float32 convolution bias is
        params.append((torch.randn(B, C, device=device) * 3).requires_grad_(True))

    def norm(norm_fn, x, w, b, *extra):
        scale, shift = extra[:2] if film else (None, None)
        return norm_fn(x, groups, w, b, 1e-5, scale, shift, act, extra[-1] if add else None)

    assert fused.fused_available(x)
    y = norm(fused.group_norm_act, *params)
    ref = [p.detach().float().contiguous().requires_grad_(True) for p in params]
    y_ref = norm(fused.group_norm_act_reference, *ref)
    gy = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, params, gy.to(y.dtype))
    ref_grads = torch.autograd.grad(y_ref, ref, gy)
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        scale = r.abs().max().item()
        assert (g.float() - r).abs().max().item() <= 3e-2 * scale + 1e-3


@pytest.mark.gpu
@pytest.mark.usefixtures("fused_everywhere")
@pytest.mark.parametrize("name", ["ddpm-cifar10", "emdiffuse-aleatoric", "efficient-unet"])
def test_model_with_fused_kernels_matches_eager_model_on_gpu(name):
    torch.backends.cudnn.allow_tf32 = False  # compare float32 convolutions exactly
    torch.backends.cuda.matmul.allow_tf32 = False
    config = small_config(name).replace(dropout=0.0)
    model = UNet(config).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    x, kwargs = example_inputs(config, batch=3, device="cuda")
    outputs, grads = [], []
    for enabled in (True, False):
        fused.set_fused_enabled(enabled)
        model.zero_grad()
        out = model(x, **kwargs)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.usefixtures("fused_everywhere")
@pytest.mark.parametrize("name", ["ddpm-cifar10", "emdiffuse-aleatoric"])
def test_compiled_training_with_the_custom_op_matches_compiled_without_on_gpu(name):
    config = small_config(name).replace(dropout=0.0)
    torch.manual_seed(0)
    model = UNet(config).cuda().to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    x, kwargs = example_inputs(config, batch=3, device="cuda")
    x = x.contiguous(memory_format=torch.channels_last)
    outputs, grads, routed = [], [], []
    for compiled_min_elements in (0, None):
        fused.set_compiled_min_elements(compiled_min_elements)
        torch._dynamo.reset()
        ops = []

        def backend(gm, inputs, ops=ops):
            ops.extend(str(n.target) for n in gm.graph.nodes)
            return compile_fx(gm, inputs)

        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = torch.compile(model, backend=backend)(x, **kwargs)
        out.float().square().mean().backward()
        routed.append("diffunet.group_norm_act.default" in ops)
        outputs.append(out.detach().float())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert routed == [True, False]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=3e-2, atol=3e-2)
    scale = grads[1].abs().max().item()
    assert (grads[0] - grads[1]).abs().max().item() <= 3e-2 * scale
