"""The fused GroupNorm → scale-shift → SiLU op (`diffunet.accel.norm`): its eager path is
the exact reference, and its Triton kernels match it in values and gradients, through Triton's
CPU interpreter here (the `interpreted_*` functions) and on a GPU under `-m gpu`."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from diffunet import UNet
from diffunet.accel import accelerate, settings, triton_runtime
from diffunet.accel import norm as fused
from diffunet.accel.blocks import AcceleratedResBlock
from diffunet.accel.layout import memory_format_for
from diffunet.model.introspect import example_inputs, small_config
from diffunet.model.layers.resblock import ResBlock
from test_conv import traced_nodes


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
    assert fused.fused_available(torch.randn(1, 4, 4)) == triton_runtime.interpreting()


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("graphs_inline", [False, True])
@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("reduce-overhead", "graphs"),
        ("max-autotune", "graphs"),
        ("default", None),
        ("max-autotune-no-cudagraphs", None),
        (None, None),
    ],
)
def test_the_compile_mode_decides_whether_compiled_graphs_call_the_kernels(
    mode, expected, graphs_inline, monkeypatch
):
    monkeypatch.setattr(settings, "CUDA_GRAPHS_INLINE_NORM_KERNELS", graphs_inline)
    monkeypatch.setattr(settings, "PLAIN_COMPILE_MIN_ELEMENTS", 1 << 22)
    monkeypatch.setattr(settings, "PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE", None)
    monkeypatch.setattr(settings, "INLINE_NORM_KERNELS", True)
    monkeypatch.setattr(settings, "INLINE_NORM_KERNELS_INFERENCE", True)
    monkeypatch.setattr(settings, "PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV", False)
    settings.set_compiled_min_elements(123)
    # Each mode sets them back.
    settings.COMPILED_INLINE_NORM_KERNELS = expected is not None
    settings.COMPILED_INLINE_NORM_KERNELS_INFERENCE = expected is not None
    settings.COMPILED_BIAS_GRADIENT_IN_CONV = expected is None
    settings.configure_for_compile_mode(mode)
    if expected is None:
        assert settings.COMPILED_MIN_ELEMENTS == settings.PLAIN_COMPILE_MIN_ELEMENTS
        inference = settings.COMPILED_MIN_ELEMENTS_INFERENCE
        assert inference == settings.PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE
        assert settings.COMPILED_INLINE_NORM_KERNELS is True
        assert settings.COMPILED_INLINE_NORM_KERNELS_INFERENCE is True
        assert settings.COMPILED_BIAS_GRADIENT_IN_CONV is False
    else:
        assert settings.COMPILED_MIN_ELEMENTS == settings.CUDA_GRAPHS_MIN_ELEMENTS
        inference = settings.COMPILED_MIN_ELEMENTS_INFERENCE
        assert inference == settings.CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE
        # CUDA graphs replay the opaque operator's launches without host cost; training graphs
        # take the inline operators only where switched on.
        assert settings.COMPILED_INLINE_NORM_KERNELS is graphs_inline
        assert settings.COMPILED_INLINE_NORM_KERNELS_INFERENCE is False
        # The GEMV reads the gradient faster where launches cost no host time.
        assert settings.COMPILED_BIAS_GRADIENT_IN_CONV is True


def test_graphs_traced_without_gradients_use_the_inference_threshold(monkeypatch):
    """The decision as Dynamo's trace of `group_norm_act` makes it, with kernels that would
    take the tensor (a GPU's), under each grad mode."""
    monkeypatch.setattr(torch.compiler, "is_dynamo_compiling", lambda: True)
    monkeypatch.setattr(fused.functional, "kernels_take", lambda x: True)
    x = torch.empty(2, 4, 8, 8)  # 512 elements
    settings.set_compiled_min_elements(100, inference=1000)
    assert fused.compiled_fused_wanted(x)
    with torch.no_grad():
        assert not fused.compiled_fused_wanted(x)
    settings.set_compiled_min_elements(1000, inference=100)
    assert not fused.compiled_fused_wanted(x)
    with torch.no_grad():
        assert fused.compiled_fused_wanted(x)
    settings.set_compiled_min_elements(100)  # the inference threshold follows by default
    with torch.no_grad():
        assert fused.compiled_fused_wanted(x)
    settings.set_compiled_min_elements(None, inference=100)  # None: the reference everywhere
    with torch.no_grad():
        assert not fused.compiled_fused_wanted(x)


def test_graphs_that_launch_the_kernels_themselves_take_them_from_the_inline_threshold(
    monkeypatch,
):
    """`settings.INLINE_MIN_ELEMENTS` where the traced graph launches the kernels itself (on a
    GPU, with static sizes), the compiled threshold where it calls the opaque operator."""
    monkeypatch.setattr(torch.compiler, "is_dynamo_compiling", lambda: True)
    monkeypatch.setattr(fused.functional, "kernels_take", lambda x: True)
    x = torch.empty(2, 4, 8, 8)  # 512 elements
    settings.set_compiled_min_elements(1000)
    settings.INLINE_MIN_ELEMENTS = 500
    assert not fused.compiled_fused_wanted(x)  # a CPU tensor: the opaque operator's 1000
    monkeypatch.setattr(fused.functional, "inline_wanted", lambda x: True)
    assert fused.compiled_fused_wanted(x)
    settings.INLINE_MIN_ELEMENTS = 600
    assert not fused.compiled_fused_wanted(x)
    settings.set_compiled_min_elements(0)  # the lower of the two
    assert fused.compiled_fused_wanted(x)
    settings.set_compiled_min_elements(None)  # None: the reference everywhere
    assert not fused.compiled_fused_wanted(x)


def test_setters_and_override_change_what_the_kernels_read():
    settings.set_fused_enabled(False, min_elements=5)
    assert (settings.FUSED_NORM, settings.eager_min_elements()) == (False, 5)
    with settings.override(FUSED_NORM=True, FUSED_EAGER_MIN_ELEMENTS=0):
        assert settings.FUSED_NORM and settings.eager_min_elements() == 0
    assert (settings.FUSED_NORM, settings.eager_min_elements()) == (False, 5)
    with pytest.raises(AttributeError, match="FUSED_ENABLED"), settings.override(FUSED_ENABLED=1):
        pass
    assert set(settings.current()) == set(settings.NAMES)


def test_the_settings_table_lists_every_setting():
    """Each upper-case attribute of `settings` (but the environment variables' names) is a row
    of the module's table, and `override` knows it."""
    public = {n for n in vars(settings) if n.isupper() and not n.startswith("_")}
    names = {n for n in public if not n.endswith("_ENV")} - {"NAMES"}
    assert names == set(settings.NAMES)
    rows = [line for line in settings.__doc__.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(settings.NAMES)


@pytest.mark.parametrize(
    ("value", "expected", "warns"),
    [(None, 7, False), ("12", 12, False), ("3", 3, False), ("2", 7, True), ("4M", 7, True)],
)
def test_an_integer_setting_from_the_environment(value, expected, warns, monkeypatch, recwarn):
    """Unset: the default; an integer below the minimum or no integer warns and keeps it."""
    if value is None:
        monkeypatch.delenv("DIFFUNET_TEST_SETTING", raising=False)
    else:
        monkeypatch.setenv("DIFFUNET_TEST_SETTING", value)
    assert settings._int_from_env("DIFFUNET_TEST_SETTING", 7, 3, "a count") == expected
    messages = [str(w.message) for w in recwarn]
    assert messages == ([f"DIFFUNET_TEST_SETTING={value!r} is not a count; keeping 7"] * warns)


SETTINGS_AT_IMPORT = """
import dataclasses, json
from diffunet.accel import settings as s
print(json.dumps({
    "FUSED_NORM": s.FUSED_NORM,
    "CUDA_GRAPHS_MIN_ELEMENTS": s.CUDA_GRAPHS_MIN_ELEMENTS,
    "CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE": s.CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE,
    "CUDA_GRAPHS_INLINE_NORM_KERNELS": s.CUDA_GRAPHS_INLINE_NORM_KERNELS,
    "PLAIN_COMPILE_MIN_ELEMENTS": s.PLAIN_COMPILE_MIN_ELEMENTS,
    "PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE": s.PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE,
    "COMPILED_MIN_ELEMENTS": s.COMPILED_MIN_ELEMENTS,
    "COMPILED_MIN_ELEMENTS_INFERENCE": s.COMPILED_MIN_ELEMENTS_INFERENCE,
    "COMPILED_INLINE_NORM_KERNELS": s.COMPILED_INLINE_NORM_KERNELS,
    "COMPILED_INLINE_NORM_KERNELS_INFERENCE": s.COMPILED_INLINE_NORM_KERNELS_INFERENCE,
    "NORM_LAUNCH": dataclasses.astuple(s.NORM_LAUNCH),
    "THIN_CONV": s.THIN_CONV,
    "TAP_PRODUCT_FORWARD": s.TAP_PRODUCT_FORWARD,
    "FOLDED_DEVICES": sorted(s.FOLDED_DEVICES),
    "FOLDED_WEIGHT_GRADIENT_BY_PHASES": s.FOLDED_WEIGHT_GRADIENT_BY_PHASES,
    "INLINE_NORM_KERNELS": s.INLINE_NORM_KERNELS,
    "INLINE_NORM_KERNELS_INFERENCE": s.INLINE_NORM_KERNELS_INFERENCE,
    "INLINE_MIN_ELEMENTS": s.INLINE_MIN_ELEMENTS,
    "BATCHED_FILM": s.BATCHED_FILM,
    "BATCHED_FILM_INFERENCE": s.BATCHED_FILM_INFERENCE,
    "BATCHED_QKV": s.BATCHED_QKV,
    "ROUTED_DEVICES": sorted(s.ROUTED_DEVICES),
    "PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV": s.PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV,
    "COMPILED_BIAS_GRADIENT_IN_CONV": s.COMPILED_BIAS_GRADIENT_IN_CONV,
    "EXPLICIT_ATTENTION": s.EXPLICIT_ATTENTION,
}))
"""
DEFAULTS = {
    "FUSED_NORM": True,
    "CUDA_GRAPHS_MIN_ELEMENTS": 1 << 20,
    "CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE": 1 << 20,
    "CUDA_GRAPHS_INLINE_NORM_KERNELS": False,
    "PLAIN_COMPILE_MIN_ELEMENTS": 1 << 25,
    "PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE": 1 << 25,
    "COMPILED_MIN_ELEMENTS": 1 << 25,  # the plain-compile thresholds until configured
    "COMPILED_MIN_ELEMENTS_INFERENCE": 1 << 25,
    "COMPILED_INLINE_NORM_KERNELS": True,
    "COMPILED_INLINE_NORM_KERNELS_INFERENCE": False,
    "THIN_CONV": True,
    "TAP_PRODUCT_FORWARD": "auto",
    "FOLDED_DEVICES": ["cpu", "cuda"],
    "FOLDED_WEIGHT_GRADIENT_BY_PHASES": False,
    "INLINE_NORM_KERNELS": True,
    "INLINE_NORM_KERNELS_INFERENCE": False,
    "INLINE_MIN_ELEMENTS": 1 << 20,
    "BATCHED_FILM": True,
    "BATCHED_FILM_INFERENCE": True,
    "BATCHED_QKV": True,
    "ROUTED_DEVICES": ["cuda"],
    "PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV": False,
    "COMPILED_BIAS_GRADIENT_IN_CONV": False,
    "EXPLICIT_ATTENTION": True,
}


def _plan(**fields) -> list:
    """The shipped `LaunchPlan` with `fields` changed in both configurations, as JSON reads it."""
    shipped = settings.LaunchPlan()
    plan = dataclasses.replace(
        shipped,
        large=dataclasses.replace(shipped.large, **fields),
        small=dataclasses.replace(shipped.small, **fields),
    )
    return json.loads(json.dumps(dataclasses.astuple(plan)))


@pytest.mark.parametrize(
    ("environment", "changed", "warnings"),
    [
        (
            {
                "DIFFUNET_FUSED": "0",
                "DIFFUNET_FUSED_GRAPHS_MIN_ELEMENTS": "4194304",
                "DIFFUNET_GRAPHS_INLINE_NORM_KERNELS": "1",
                "DIFFUNET_FUSED_COMPILE_MIN_ELEMENTS": "8388608",
                "DIFFUNET_FUSED_COMPILE_MIN_ELEMENTS_INFER": "None",
                "DIFFUNET_NORM_LOOP_STAGES": "2",
                "DIFFUNET_NORM_ONE_PASS_ELEMENTS": "16384",
                "DIFFUNET_NORM_REDUCTION_WARPS": "8",
                "DIFFUNET_THIN_CONV": "0",
                "DIFFUNET_TAP_PRODUCT_FORWARD": "Always",
                "DIFFUNET_FOLDED_UPSAMPLE": "cpu",
                "DIFFUNET_FOLDED_WGRAD_PHASES": "1",
                "DIFFUNET_INLINE_NORM_KERNELS": "0",
                "DIFFUNET_INLINE_NORM_KERNELS_INFER": "1",
                "DIFFUNET_INLINE_MIN_ELEMENTS": "2097152",
                "DIFFUNET_BATCHED_FILM": "0",
                "DIFFUNET_BATCHED_FILM_INFER": "0",
                "DIFFUNET_BATCHED_QKV": "0",
                "DIFFUNET_ROUTED_CONV": "none",
                "DIFFUNET_PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV": "1",
                "DIFFUNET_EXPLICIT_ATTENTION": "0",
            },
            {
                "FUSED_NORM": False,
                "CUDA_GRAPHS_MIN_ELEMENTS": 1 << 22,
                "CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE": 1 << 22,  # follows training's
                "CUDA_GRAPHS_INLINE_NORM_KERNELS": True,
                "PLAIN_COMPILE_MIN_ELEMENTS": 1 << 23,
                "PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE": None,
                "COMPILED_MIN_ELEMENTS": 1 << 23,
                "COMPILED_MIN_ELEMENTS_INFERENCE": None,
                "NORM_LAUNCH": _plan(loop_stages=2, one_pass_elements=16384, reduction_warps=8),
                "THIN_CONV": False,
                "TAP_PRODUCT_FORWARD": "always",
                "FOLDED_DEVICES": ["cpu"],
                "FOLDED_WEIGHT_GRADIENT_BY_PHASES": True,
                "INLINE_NORM_KERNELS": False,
                "COMPILED_INLINE_NORM_KERNELS": False,
                "INLINE_NORM_KERNELS_INFERENCE": True,
                "COMPILED_INLINE_NORM_KERNELS_INFERENCE": True,
                "INLINE_MIN_ELEMENTS": 1 << 21,
                "BATCHED_FILM": False,
                "BATCHED_FILM_INFERENCE": False,
                "BATCHED_QKV": False,
                "ROUTED_DEVICES": [],
                "PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV": True,
                "COMPILED_BIAS_GRADIENT_IN_CONV": True,
                "EXPLICIT_ATTENTION": False,
            },
            [],
        ),
        (
            {
                "DIFFUNET_FUSED": "no",  # only "0" turns a switch off
                "DIFFUNET_FUSED_GRAPHS_MIN_ELEMENTS": "4M",
                "DIFFUNET_FUSED_GRAPHS_MIN_ELEMENTS_INFER": "0",
                "DIFFUNET_FUSED_COMPILE_MIN_ELEMENTS": "-5",
                "DIFFUNET_NORM_LOOP_STAGES": "0",
                "DIFFUNET_NORM_ONE_PASS_ELEMENTS": "-1",
                "DIFFUNET_NORM_REDUCTION_WARPS": "eight",
                "DIFFUNET_TAP_PRODUCT_FORWARD": "yes",
                "DIFFUNET_FOLDED_UPSAMPLE": "1",
                "DIFFUNET_ROUTED_CONV": "gpu",
                "DIFFUNET_INLINE_MIN_ELEMENTS": "-3",
            },
            {"CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE": 0},
            [
                "DIFFUNET_FUSED_GRAPHS_MIN_ELEMENTS='4M' is not a number of elements",
                "DIFFUNET_FUSED_COMPILE_MIN_ELEMENTS='-5' is not a number of elements",
                "DIFFUNET_NORM_LOOP_STAGES='0' is not a loop depth",
                "DIFFUNET_NORM_ONE_PASS_ELEMENTS='-1' is not a number of elements",
                "DIFFUNET_NORM_REDUCTION_WARPS='eight' is not a number of warps",
                "DIFFUNET_TAP_PRODUCT_FORWARD='yes' is not one of auto, always, never",
                "DIFFUNET_FOLDED_UPSAMPLE='1': '1' is not a device type",
                "DIFFUNET_ROUTED_CONV='gpu': 'gpu' is not a device type",
                "DIFFUNET_INLINE_MIN_ELEMENTS='-3' is not a number of elements",
            ],
        ),
    ],
    ids=["values", "bad-values"],
)
def test_the_environment_sets_the_settings_at_import(environment, changed, warnings):
    """For A/B runs in separate processes (`benchmarks/ab.py --change-env`): each variable
    reaches its setting, and one that does not parse warns and keeps the default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFUNET_")}
    done = subprocess.run(
        [sys.executable, "-c", SETTINGS_AT_IMPORT],
        env={**env, **environment},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {**DEFAULTS, "NORM_LAUNCH": _plan(), **changed}
    for message in warnings:
        assert message in done.stderr
    raised = {line.partition("UserWarning: ")[2] for line in done.stderr.splitlines()}
    assert len({text for text in raised if text.startswith("DIFFUNET_")}) == len(warnings)


# --- launch shapes ----------------------------------------------------------------------------


def test_the_launch_plan_picks_its_configuration_by_size():
    plan = settings.LaunchPlan()
    assert plan.for_elements(plan.large_from) is plan.large
    assert plan.for_elements(plan.large_from - 1) is plan.small
    assert plan.large.programs_per_sm > plan.small.programs_per_sm
    one = settings.LaunchConfig(2048, 8, 4)
    assert one.for_elements(1) is one.for_elements(1 << 30) is one


def test_a_launch_shape_covers_the_view_with_the_configured_loop():
    settings.NORM_LAUNCH = settings.LaunchConfig(2048, 2, 8, loop_stages=3)  # the fixture restores
    launch = fused.launch.launch_shape(torch.empty(4, 96, 1000))
    assert (launch.block_c, launch.block_n, launch.num_warps, launch.loop_stages) == (128, 16, 8, 3)
    assert launch.rows % launch.block_n == 0 and launch.chunks * launch.rows >= 1000
    assert (launch.chunks - 1) * launch.rows < 1000  # no chunk starts past the end
    assert launch.kernel_options() == {"BLOCK_C": 128, "BLOCK_N": 16, "STAGES": 3, "num_warps": 8}
    assert launch.kernel_options(reduction=True)["num_warps"] == 8  # 0: as num_warps
    settings.NORM_LAUNCH = settings.LaunchConfig(2048, 2, 4, loop_stages=3, reduction_warps=8)
    launch = fused.launch.launch_shape(torch.empty(4, 96, 1000))
    assert launch.kernel_options()["num_warps"] == 4
    assert launch.kernel_options(reduction=True) == {
        "BLOCK_C": 128,
        "BLOCK_N": 16,
        "STAGES": 3,
        "num_warps": 8,
    }


def _recorded_warps(launch, shape=(2, 96, 40), film=True, act=True):
    """Each streaming kernel's name → its `num_warps` over one forward and backward of the
    three-kernel path under `launch`, recorded by a stand-in for the launcher (nothing runs)."""
    settings.NORM_LAUNCH = launch
    warps = {}

    class Recording:
        def __init__(self, kernel):
            self.name = getattr(kernel, "__name__", None) or kernel.fn.__name__

        def __getitem__(self, grid):
            def launch(*args, **options):
                if "num_warps" in options:  # the combine kernels take Triton's default
                    warps[self.name] = options["num_warps"]

            return launch

    params = _norm_inputs(shape, False, film, False)
    x, weight, bias, scale, shift, offset = (
        a.detach() for a in _op_arguments(params, 4, film, act, False)[:6]
    )
    _, mean, rstd = fused.launchers.forward(
        x, weight, bias, scale, shift, offset, 4, EPS, film, act, Recording
    )
    grad = torch.randn_like(x)
    fused.launchers.backward(
        grad, x, weight, bias, scale, shift, offset, mean, rstd, 4, film, act, kernel=Recording
    )
    return warps


@pytest.mark.skipif(triton_runtime.triton is None, reason="needs Triton's kernel objects")
def test_only_the_backward_reduce_kernel_takes_the_reduction_warps():
    """Eight warps served the backward's reduce kernel and slowed the statistics kernel
    (docs/performance.md), so `reduction_warps` reaches the former alone."""
    warps = _recorded_warps(settings.LaunchConfig(2048, 2, 4, loop_stages=3, reduction_warps=8))
    assert warps == {
        "_stats_kernel": 4,
        "_normalize_kernel": 4,
        "_backward_reduce_kernel": 8,
        "_backward_dx_kernel": 4,
    }
    assert set(_recorded_warps(settings.LaunchConfig(2048, 2, 4, loop_stages=3)).values()) == {4}


@pytest.mark.parametrize(
    ("shape", "groups", "expected"),
    [
        ((128, 256, 64), 32, (8, 64, 4, 64, 64, True)),  # slices of 64 channels
        ((16, 512, 256), 32, (4, 64, 8, 64, 64, False)),
        ((2, 96, 100), 32, (32, 96, 1, 128, 32, False)),  # 3 channels a group: all 32 to reach 64
        ((2, 12, 100), 3, (2, 8, 2, 8, 128, True)),  # 3 groups: the last slice holds one
        ((2, 1536, 16), 32, (2, 96, 16, 128, 16, True)),  # 48 channels a group: two
    ],
)
def test_a_one_pass_shape_covers_whole_groups(shape, groups, expected):
    settings.NORM_LAUNCH = settings.LaunchConfig(4096, 4, 4, 3, one_pass_elements=1 << 14)
    one = fused.launch.one_pass_shape(torch.empty(shape), groups)
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
    too_large = settings.LaunchConfig(4096, 4, 4, 3, one_pass_elements=one.channels * shape[2] - 1)
    settings.NORM_LAUNCH = too_large
    assert fused.launch.one_pass_shape(torch.empty(shape), groups) is None  # back to three kernels


@pytest.mark.skipif(triton_runtime.interpreting(), reason="Triton's interpreter takes CPU tensors")
def test_on_the_cpu_compiled_graphs_trace_the_reference():
    settings.set_compiled_min_elements(0)
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


# --- the kernels' inputs and the reference they are held to -----------------------------------

EPS = 1e-5
#: (shape, groups, channels-last, FiLM, SiLU, add): each kernel variant in 1D, 2D and 3D, with
#: groups that leave a one-kernel program's last slice partly empty (3 groups of 4 channels:
#: slices of 2 groups; 12 groups of 3: slices of 8).
CASES = [
    ((2, 8, 5, 7), 4, True, True, True, False),
    ((2, 6, 33), 2, False, False, False, True),
    ((3, 12, 4, 4, 3), 3, True, True, True, True),
    ((2, 36, 3, 2), 12, True, False, True, False),
]
#: Launch plans: three kernels each way as for large calls; one kernel each way whose loops
#: run over several 64-element tiles; one kernel each way in a single tile kept in registers.
LAUNCHES = {
    "three-kernel": dataclasses.replace(settings.LaunchPlan().small, one_pass_elements=0),
    "one-pass": settings.LaunchConfig(64, 4, 4, 2, one_pass_elements=1 << 30),
    "one-tile": settings.LaunchConfig(1 << 16, 4, 4, 2, one_pass_elements=1 << 30),
}


def _norm_inputs(shape, channels_last, film, add):
    """x, weight, bias (and FiLM's scale and shift, and `add`, where used), requiring grad."""
    x = torch.randn(*shape) * 2 + 3
    if channels_last:
        x = x.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[x.ndim])
    batch, channels = shape[:2]
    params = [x, torch.randn(channels), torch.randn(channels)]
    params = [p.requires_grad_(True) for p in params]
    if film:  # as in the model: two non-contiguous halves of one projection
        params += list(torch.randn(batch, 2 * channels, requires_grad=True).chunk(2, dim=1))
    if add:  # an embedding that moves each channel's mean far off x's
        params.append((torch.randn(batch, channels) * 4).requires_grad_(True))
    return params


def _norm(groups, film, act, add):
    """`group_norm_act` as a function of `_norm_inputs`."""

    def norm(x, weight, bias, *extra):
        scale, shift = extra[:2] if film else (None, None)
        offset = extra[-1] if add else None
        return fused.group_norm_act(x, groups, weight, bias, EPS, scale, shift, act, offset)

    return norm


def _op_arguments(params, groups, film, act, add):
    """`_norm_inputs` as the custom op takes them."""
    x, weight, bias, *extra = params
    scale, shift = extra[:2] if film else (None, None)
    offset = extra[-1] if add else None
    scale, shift, offset = (fused.per_channel_operand(t, x) for t in (scale, shift, offset))
    return (x, weight, bias, scale, shift, offset, groups, EPS, film, act)


def _assert_matches_float64(norm, params, y):
    """`y = norm(*params)` and its gradients against the float64 reference path."""
    reference = [p.detach().double().requires_grad_(True) for p in params]
    y_ref = norm(*reference)  # float64: never fused
    gy = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, params, gy.float())
    ref_grads = torch.autograd.grad(y_ref, reference, gy)
    for got, want in zip([y, *grads], [y_ref, *ref_grads], strict=True):
        assert got.shape == want.shape
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


# --- the custom ops, with stand-ins for the kernels --------------------------------------------


def stand_in_forward(x, weight, bias, scale, shift, add, num_groups, eps, film, act, kernel=None):
    """The kernels' forward contract in PyTorch: the output in x's layout, and per (batch,
    channel) in float32 the centre (the group mean of x + add, minus add) and rstd."""
    batch, channels = x.shape[:2]
    offset = add if add.numel() else None
    shifted = (
        x.float() if offset is None else x.float() + offset.float()[(..., *[None] * (x.ndim - 2))]
    )
    groups = shifted.reshape(batch, num_groups, -1)
    per_group = channels // num_groups
    mean = groups.mean(-1).repeat_interleave(per_group, 1)
    rstd = (groups.var(-1, unbiased=False) + eps).rsqrt().repeat_interleave(per_group, 1)
    centre = mean if offset is None else mean - offset.float()
    film_args = (scale, shift) if film else (None, None)
    y = fused.group_norm_act_reference(x, num_groups, weight, bias, eps, *film_args, act, offset)
    return torch.empty_like(x).copy_(y), centre.detach(), rstd.detach()


def stand_in_backward(
    grad,
    x,
    weight,
    bias,
    scale,
    shift,
    add,
    mean,
    rstd,
    num_groups,
    film,
    act,
    out=None,
    kernel=None,
):
    """The kernels' backward contract, by the formulas they evaluate: (dx, dparams, dscale,
    dshift, dadd), dparams stacking dweight and dbias, None for operands not used, dx written
    to `out` where given.
    (Autograd is off inside a custom op, so the reference cannot be differentiated here.)"""
    batch, channels = x.shape[:2]
    spatial = tuple(range(2, x.ndim))

    def per_channel(t):  # (B, C) or (C,) broadcast over positions
        return t.float().reshape(-1 if t.ndim == 2 else 1, channels, *[1] * len(spatial))

    def group_mean(t):
        means = t.reshape(batch, num_groups, -1).mean(-1)
        return per_channel(means.repeat_interleave(channels // num_groups, 1))

    xhat = (x.float() - per_channel(mean)) * per_channel(rstd)
    z = xhat * per_channel(weight) + per_channel(bias)
    gain = 1 + per_channel(scale) if film else 1.0
    g = grad.float()
    if act:
        u = z * gain + (per_channel(shift) if film else 0.0)
        sigmoid = torch.sigmoid(u)
        g = g * sigmoid * (1 + u * (1 - sigmoid))
    gz = g * gain
    gxhat = gz * per_channel(weight)
    dx = per_channel(rstd) * (gxhat - group_mean(gxhat) - xhat * group_mean(gxhat * xhat))
    dx = (torch.empty_like(x) if out is None else out).copy_(dx)
    dparams = torch.stack([(gz * xhat).sum((0, *spatial)), gz.sum((0, *spatial))])
    dparams = dparams.to(torch.promote_types(weight.dtype, bias.dtype))
    dscale = (g * z).sum(spatial).to(scale.dtype) if film else None
    dshift = g.sum(spatial).to(shift.dtype) if film else None
    dadd = dx.float().sum(spatial).to(add.dtype) if add.numel() else None
    return dx, dparams, dscale, dshift, dadd


@pytest.fixture
def stand_in_kernels(monkeypatch):
    """The custom ops' kernels replaced by `stand_in_forward` and `stand_in_backward`, taking
    CPU tensors."""
    monkeypatch.setattr(fused.launchers, "forward", stand_in_forward)
    monkeypatch.setattr(fused.launchers, "backward", stand_in_backward)
    monkeypatch.setattr(fused.functional, "kernels_take", lambda x: x.dtype != torch.float64)


@pytest.mark.usefixtures("stand_in_kernels")
def test_compiled_graphs_call_the_ops_forward_and_backward():
    """Which tensors they take: `test_graphs_traced_without_gradients_use_the_inference_...`."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    def targets(graph):
        return {str(n.target) for n in graph.graph.nodes}

    settings.set_compiled_min_elements(0)
    params = _norm_inputs((2, 8, 5, 7), True, film=True, add=True)
    norm = _norm(4, film=True, act=True, add=True)
    backend = AotEagerAndRecordGraphs()
    y = torch.compile(norm, backend=backend)(*params)
    _assert_matches_float64(norm, params, y)
    assert "diffunet.group_norm_act.default" in targets(backend.fw_graphs[0])
    assert "diffunet.group_norm_act_backward.default" in targets(backend.bw_graphs[0])
    # A backward that asked a tensor for its strides would get its gradient copied to NCHW
    # first (Dynamo's rewrite), and back to channels-last for the kernels: no copy at all.
    assert "aten.clone.default" not in targets(backend.bw_graphs[0])
    torch._dynamo.reset()
    with torch.no_grad():
        backend = AotEagerAndRecordGraphs()
        torch.compile(norm, backend=backend)(*params)
    assert "diffunet.group_norm_act.default" in targets(backend.graphs[0])


@pytest.mark.usefixtures("stand_in_kernels")
@pytest.mark.parametrize("dims", [2, 3])
def test_dynamo_traces_the_accelerated_backwards_as_written(dims, monkeypatch):
    """A traced `autograd.Function` backward that asks a tensor for its strides is traced again
    behind a rewrite that copies every incoming gradient to NCHW first: a full pass per call,
    and back. A ResBlock's fused norms and routed convolutions (3×3 and the 1×1 skip, in the
    CUDA-graph modes' configuration, bias gradients in the convolutions) need none."""
    import torch._dynamo._trace_wrapped_higher_order_op as wrapped

    rewritten = []
    original = wrapped.autograd_function_backward_rewritten

    def record(backward):
        rewritten.append(getattr(backward, "__qualname__", backward))
        return original(backward)

    monkeypatch.setattr(wrapped, "autograd_function_backward_rewritten", record)
    settings.ROUTED_DEVICES = frozenset({"cpu", "cuda"})
    settings.configure_for_compile_mode("reduce-overhead")
    settings.set_compiled_min_elements(0)
    block = ResBlock(dims, 8, 16, 12, norm_groups=4)
    block.__class__ = AcceleratedResBlock
    block.to(memory_format=memory_format_for(dims))
    x = torch.randn(2, 8, *(6,) * dims).contiguous(memory_format=memory_format_for(dims))
    torch._dynamo.reset()
    torch.compile(block, backend="eager")(x, torch.randn(2, 12)).sum().backward()
    torch._dynamo.reset()
    assert block.in_conv.weight.grad is not None
    assert not rewritten


@pytest.mark.usefixtures("stand_in_kernels")
@pytest.mark.parametrize(("shape", "groups", "channels_last", "film", "act", "add"), CASES[:3])
def test_the_ops_pass_pytorchs_checks(shape, groups, channels_last, film, act, add):
    """Schema, fake versions (strides included: Inductor checks them) and autograd
    registration, as `torch.library.opcheck` tests custom ops."""
    args = _op_arguments(_norm_inputs(shape, channels_last, film, add), groups, film, act, add)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(fused.ops.group_norm_act_op, args)
    _, mean, rstd = fused.ops.group_norm_act_op(*args)
    x, weight, bias, scale, shift, offset, *_ = args
    backward_args = (torch.randn_like(x), x, weight, bias, scale, shift, offset, mean, rstd)
    torch.library.opcheck(fused.ops.group_norm_act_backward_op, (*backward_args, groups, film, act))


# --- the kernels under Triton's interpreter (run by `test_kernels_under_the_interpreter`) -------


def _assert_strides_as_promised(real, fake):
    """The op's outputs have the shapes, strides and dtypes its fake version promises
    (compiled graphs plan their buffers by the latter)."""
    for r, f in zip(real, fake, strict=True):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)


@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize(("shape", "groups", "channels_last", "film", "act", "add"), CASES)
def interpreted_kernels_match_the_reference(shape, groups, channels_last, film, act, add, launch):
    """Forward and every gradient (x, weight, bias, scale, shift, add)."""
    settings.NORM_LAUNCH = LAUNCHES[launch]
    one = fused.launch.one_pass_shape(torch.empty(shape).flatten(2), groups)
    assert (one is not None) == (launch != "three-kernel")
    assert one is None or one.single_tile == (launch == "one-tile")
    params = _norm_inputs(shape, channels_last, film, add)
    assert fused.fused_available(params[0])
    norm = _norm(groups, film, act, add)
    _assert_matches_float64(norm, params, norm(*params))


def interpreted_the_combine_kernels_sum_many_chunks_load_by_load(monkeypatch):
    """Three kernels each way over 12 chunks per sample, which the combine kernels sum four
    chunks per load (three loads per sample): values and every gradient."""
    settings.NORM_LAUNCH = settings.LaunchConfig(64, 4, 4, 2, one_pass_elements=0)
    monkeypatch.setattr(fused.launch, "COMBINE_TILE_ELEMENTS", 16)
    shape, groups, channels_last, film, act, add = CASES[2]
    chunks = fused.launch.launch_shape(torch.empty(shape).flatten(2)).chunks
    per_group = shape[1] // groups
    assert chunks == 12 and fused.launch.combine_options(chunks, per_group)["BLOCK_K"] == 4
    params = _norm_inputs(shape, channels_last, film, add)
    norm = _norm(groups, film, act, add)
    _assert_matches_float64(norm, params, norm(*params))


@pytest.mark.parametrize(
    ("shape", "groups", "channels_last", "film", "act", "add", "launch"),
    [(*CASES[0], "three-kernel"), (*CASES[2], "one-pass")],
)
def interpreted_the_ops_compute_the_reference(shape, groups, channels_last, film, act, add, launch):
    """The operators that compiled graphs call: values, gradients through the autograd.Function
    around them, and outputs laid out as their fake versions say."""
    settings.NORM_LAUNCH = LAUNCHES[launch]
    params = _norm_inputs(shape, channels_last, film, add)
    args = _op_arguments(params, groups, film, act, add)
    y, mean, rstd = fused.ops.group_norm_act_op(*args)
    _assert_strides_as_promised((y, mean, rstd), fused.ops.group_norm_act_fake(*args))
    y_function = fused.ops.GroupNormAct.apply(*args, False)  # the opaque operator's, not inline
    _assert_matches_float64(_norm(groups, film, act, add), params, y_function)
    x, weight, bias, scale, shift, offset, *_ = (
        a.detach() if isinstance(a, torch.Tensor) else a for a in args
    )
    backward_args = (torch.randn_like(x), x, weight, bias, scale, shift, offset, mean, rstd)
    backward_args = (*backward_args, groups, film, act)
    _assert_strides_as_promised(
        fused.ops.group_norm_act_backward_op(*backward_args),
        fused.ops.group_norm_act_backward_fake(*backward_args),
    )


@pytest.mark.parametrize(
    ("shape", "groups", "channels_last", "film", "act", "add", "launch"),
    [(*CASES[0], "three-kernel"), (*CASES[2], "one-pass"), (*CASES[1], "one-tile")],
)
def interpreted_the_inline_operators_compute_what_the_opaque_ones_do(
    shape, groups, channels_last, film, act, add, launch
):
    """`settings.INLINE_NORM_KERNELS`' operators run the same kernels on the same launch shapes
    (here eagerly: compiled graphs trace into them only on a GPU), forward and backward."""
    settings.NORM_LAUNCH = LAUNCHES[launch]
    params = _norm_inputs(shape, channels_last, film, add)
    args = tuple(
        a.detach() if isinstance(a, torch.Tensor) else a
        for a in _op_arguments(params, groups, film, act, add)
    )
    forward = fused.ops.group_norm_act_op(*args)
    for opaque, inline in zip(forward, fused.ops.group_norm_act_inline_op(*args), strict=True):
        assert torch.equal(opaque, inline) and opaque.stride() == inline.stride()
    x, weight, bias, scale, shift, offset, *_ = args
    backward_args = (torch.randn_like(x), x, weight, bias, scale, shift, offset, *forward[1:])
    backward_args = (*backward_args, groups, film, act)
    opaque = fused.ops.group_norm_act_backward_op(*backward_args)
    inline = fused.ops.group_norm_act_backward_inline_op(*backward_args)
    for a, b in zip(opaque, inline, strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride()


class _RecordedOps(TorchDispatchMode):
    """The ATen operators called under it, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _assert_low_precision_gradients_round_as_to(device, launch):
    """Scale, shift and `add` in bf16 get their gradients from the kernels in bf16, bit for bit
    what the same kernels' float32 gradients become under `Tensor.to` (round to nearest even),
    with no cast kernel after them (but for the three-kernel backward's sum of `add`'s parts)."""
    settings.NORM_LAUNCH = LAUNCHES[launch]
    shape, groups, channels_last, film, act, add = CASES[2]  # FiLM and `add`
    x, weight, bias, scale, shift, offset, *rest = (
        a.detach().to(device) if isinstance(a, torch.Tensor) else a
        for a in _op_arguments(
            _norm_inputs(shape, channels_last, film, add), groups, film, act, add
        )
    )
    low = [t.to(torch.bfloat16) for t in (scale, shift, offset)]
    _, mean, rstd = fused.ops.group_norm_act_op(x, weight, bias, *low, *rest)
    grad = torch.randn_like(x)
    grads = {}
    for dtype in (torch.bfloat16, torch.float32):
        operands = [t.to(dtype) for t in low]  # the same values either way
        with _RecordedOps() as recorded:
            args = (grad, x, weight, bias, *operands, mean, rstd, groups, film, act)
            grads[dtype] = fused.launchers.backward(*args)[2:]
        if dtype == torch.bfloat16:
            casts = recorded.names.count("aten._to_copy.default")
            assert casts == (1 if launch == "three-kernel" else 0), recorded.names
    for got, full in zip(grads[torch.bfloat16], grads[torch.float32], strict=True):
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, full.to(torch.bfloat16))


@pytest.mark.parametrize("launch", ["three-kernel", "one-pass"])
def interpreted_low_precision_gradients_round_as_to(launch):
    _assert_low_precision_gradients_round_as_to("cpu", launch)


@pytest.mark.parametrize("launch", ["three-kernel", "one-pass"])
def interpreted_one_reduction_sums_weight_and_bias_gradients_over_the_batch(launch):
    """The kernels write both per-sample sums into one buffer, so a single ATen reduction
    (one launch) gives the (2, C) gradients of weight and bias; both match float64."""
    settings.NORM_LAUNCH = LAUNCHES[launch]
    shape, groups, channels_last, film, act, add = CASES[0]  # FiLM, no `add`
    params = _norm_inputs(shape, channels_last, film, add)
    x, weight, bias, scale, shift, offset, *rest = (
        a.detach() if isinstance(a, torch.Tensor) else a
        for a in _op_arguments(params, groups, film, act, add)
    )
    _, mean, rstd = fused.ops.group_norm_act_op(x, weight, bias, scale, shift, offset, *rest)
    grad = torch.randn_like(x)
    with _RecordedOps() as recorded:
        _, dparams, *_ = fused.launchers.backward(
            grad, x, weight, bias, scale, shift, offset, mean, rstd, groups, film, act
        )
    assert recorded.names.count("aten.sum.dim_IntList") == 1, recorded.names
    expected = stand_in_backward(
        grad.double(),
        x.double(),
        weight.double(),
        bias.double(),
        scale.double(),
        shift.double(),
        offset,
        mean.double(),
        rstd.double(),
        groups,
        film,
        act,
    )[1]
    assert dparams.shape == (2, weight.numel()) and dparams.dtype == weight.dtype
    torch.testing.assert_close(dparams.double(), expected, rtol=1e-5, atol=1e-5)


def interpreted_compiled_graphs_run_the_kernels_through_the_operators():
    """The kernels themselves (not stand-ins) through the operators and their
    `autograd.Function` in a compiled graph: values and every gradient."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    settings.set_compiled_min_elements(0)
    params = _norm_inputs((2, 8, 5, 7), True, film=True, add=True)
    norm = _norm(4, film=True, act=True, add=True)
    backend = AotEagerAndRecordGraphs()
    _assert_matches_float64(norm, params, torch.compile(norm, backend=backend)(*params))
    assert any(
        "diffunet.group_norm_act.default" in str(n.target)
        for n in traced_nodes(backend.fw_graphs[0])
    )
    assert any(
        "diffunet.group_norm_act_backward.default" in str(n.target)
        for n in traced_nodes(backend.bw_graphs[0])
    )
    # The inline operators need a GPU: on CPU tensors graphs keep the opaque ones.
    settings.COMPILED_INLINE_NORM_KERNELS = True
    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    torch.compile(norm, backend=backend)(*params)
    assert any(
        "diffunet.group_norm_act.default" in str(n.target)
        for n in traced_nodes(backend.fw_graphs[0])
    )


# --- on a GPU ---------------------------------------------------------------------------------

AWKWARD = [
    ((3, 96, 17, 9), 32),
    ((2, 448, 15, 15), 32),
    ((5, 40, 7, 6, 5), 8),
    ((4, 24, 1000), 8),
    ((1, 1536, 4, 4), 32),
]


@pytest.fixture
def fused_everywhere():
    """Use the fused kernels whatever the tensor size (the autouse fixture restores it)."""
    settings.set_fused_enabled(True, min_elements=0)


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
@pytest.mark.parametrize("launch", ["large", "small", "pipelined", "reduction-warps", "one-pass"])
def test_fused_matches_eager_on_gpu_bf16(shape, groups, film, act, add, launch):
    """Under each configuration of the launch plan as shipped (which runs the smaller of
    these shapes in one kernel each way), with three kernels each way and pipelined loops
    (their sums also in more warps than the other kernels), and with every forward and
    backward in one kernel each, whatever the size."""
    config = {
        "pipelined": settings.LaunchConfig(2048, 4, 4, loop_stages=3),
        "reduction-warps": settings.LaunchConfig(2048, 4, 4, loop_stages=3, reduction_warps=8),
        "one-pass": settings.LaunchConfig(2048, 4, 4, 3, one_pass_elements=1 << 30),
    }.get(launch) or getattr(settings.LaunchPlan(), launch)
    settings.NORM_LAUNCH = config
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
@pytest.mark.parametrize("launch", ["three-kernel", "one-pass"])
def test_low_precision_gradients_round_as_to_on_gpu(launch):
    _assert_low_precision_gradients_round_as_to("cuda", launch)


@pytest.mark.gpu
@pytest.mark.usefixtures("fused_everywhere")
@pytest.mark.parametrize("name", ["ddpm-cifar10", "emdiffuse-aleatoric", "efficient-unet"])
def test_model_with_fused_kernels_matches_eager_model_on_gpu(name):
    torch.backends.cudnn.allow_tf32 = False  # compare float32 convolutions exactly
    torch.backends.cuda.matmul.allow_tf32 = False
    config = small_config(name).replace(dropout=0.0)
    model = accelerate(UNet(config).cuda())
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    x, kwargs = example_inputs(config, batch=3, device="cuda")
    outputs, grads = [], []
    for enabled in (True, False):
        settings.set_fused_enabled(enabled)
        model.zero_grad()
        out = model(x, **kwargs)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)


def _random_channels_last_model(name):
    """An accelerated small `name` model on the GPU in channels-last memory, with random (not
    zero-initialised) weights and no dropout, and example inputs for it."""
    config = small_config(name).replace(dropout=0.0)
    torch.manual_seed(0)
    model = accelerate(UNet(config).cuda().to(memory_format=torch.channels_last))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    x, kwargs = example_inputs(config, batch=3, device="cuda")
    return model, x.contiguous(memory_format=torch.channels_last), kwargs


@pytest.mark.gpu
@pytest.mark.usefixtures("fused_everywhere")
@pytest.mark.parametrize("name", ["ddpm-cifar10", "emdiffuse-aleatoric"])
def test_compiled_training_with_the_custom_op_matches_compiled_without_on_gpu(name):
    from torch._inductor.compile_fx import compile_fx

    settings.COMPILED_INLINE_NORM_KERNELS = False  # the opaque operator (the CUDA-graph modes')
    model, x, kwargs = _random_channels_last_model(name)
    outputs, grads, routed = [], [], []
    for compiled_min_elements in (0, None):
        settings.set_compiled_min_elements(compiled_min_elements)
        torch._dynamo.reset()
        ops = []

        def backend(gm, inputs, ops=ops):
            ops.extend(str(n.target) for n in traced_nodes(gm))
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


def _compiled_step_and_code(model, x, kwargs, inline, dynamic=False):
    """One compiled training step of `model` under bf16 autocast with
    `COMPILED_INLINE_NORM_KERNELS` set to `inline`: the output, the parameters' gradients and
    Inductor's generated code."""
    from torch._inductor.utils import run_and_get_code

    settings.COMPILED_INLINE_NORM_KERNELS = inline
    torch._dynamo.reset()
    model.zero_grad()

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = torch.compile(model, dynamic=dynamic)(x, **kwargs)
        out.float().square().mean().backward()
        return out.detach().float()

    out, code = run_and_get_code(run)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return out, grads, "\n".join(code)


# One model, two compilations: each cold compilation of a training step takes about a minute
# on a lent GPU, so these tests cover the kernels' code paths once.
@pytest.mark.gpu
@pytest.mark.usefixtures("fused_everywhere")
def test_compiled_graphs_launch_the_norm_kernels_themselves_on_gpu():
    """`settings.COMPILED_INLINE_NORM_KERNELS`: Inductor's code launches the norm kernels (no call into
    the operators), with the values and gradients of graphs that call the opaque operators."""
    model, x, kwargs = _random_channels_last_model("ddpm-cifar10")
    settings.set_compiled_min_elements(0)
    opaque_out, opaque_grads, opaque_code = _compiled_step_and_code(model, x, kwargs, False)
    inline_out, inline_grads, inline_code = _compiled_step_and_code(model, x, kwargs, True)
    assert "diffunet.group_norm_act" in opaque_code
    assert "diffunet.group_norm_act" not in inline_code
    assert "_normalize_kernel" in inline_code or "_one_pass_kernel" in inline_code
    torch.testing.assert_close(inline_out, opaque_out, rtol=1e-2, atol=1e-2)
    scale = opaque_grads.abs().max().item()
    assert (inline_grads - opaque_grads).abs().max().item() <= 1e-2 * scale


@pytest.mark.gpu
@pytest.mark.parametrize("launch", ["three-kernel", "one-pass"])
def test_replayed_graphs_with_the_inline_operators_match_the_opaque_ones_on_gpu(launch):
    """`settings.CUDA_GRAPHS_INLINE_NORM_KERNELS`: a norm compiled with
    `mode="reduce-overhead"` whose graphs launch the kernels themselves gives, warmed up,
    recorded and replayed, the values and gradients of graphs that call the opaque operators.
    One norm: quick to compile."""
    from torch._inductor.utils import run_and_get_code

    settings.NORM_LAUNCH = LAUNCHES[launch]
    settings.CUDA_GRAPHS_MIN_ELEMENTS = settings.CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE = 0
    shape, groups = (2, 64, 8, 8), 32
    params = _norm_inputs(shape, True, film=True, add=True)
    params = [p.detach().cuda().requires_grad_(True) for p in params]
    norm = _norm(groups, film=True, act=True, add=True)
    gy = torch.randn(shape, device="cuda")
    results = {}
    for inline in (False, True):
        settings.CUDA_GRAPHS_INLINE_NORM_KERNELS = inline
        settings.configure_for_compile_mode("reduce-overhead")  # as the trainer and bench.py do
        torch._dynamo.reset()
        compiled = torch.compile(norm, mode="reduce-overhead")

        def step(compiled=compiled):
            y = compiled(*params)
            grads = torch.autograd.grad(y, params, gy)
            return [t.detach().clone() for t in (y, *grads)]

        code = "\n".join(run_and_get_code(step)[1])
        assert ("diffunet.group_norm_act" in code) is not inline
        for _ in range(3):  # recorded, then replayed
            results[inline] = step()
    for inline, opaque in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(inline, opaque, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_graphs_the_inline_operators_do_not_serve_keep_the_opaque_ones_on_gpu():
    """A training graph with static sizes launches the kernels itself; one traced with dynamic
    sizes (the inline operators need static launch shapes) and an inference graph (its own
    switch, off by default) call the opaque operators. One norm per graph: quick to compile."""
    from torch._inductor.utils import run_and_get_code

    settings.set_compiled_min_elements(0)
    settings.COMPILED_INLINE_NORM_KERNELS = True
    shape, groups = (2, 64, 8, 8), 32
    params = _norm_inputs(shape, True, film=True, add=True)
    params = [p.detach().cuda().requires_grad_(True) for p in params]
    norm = _norm(groups, film=True, act=True, add=True)

    def generated_code(dynamic: bool, grad: bool, inline_inference: bool = False) -> str:
        settings.COMPILED_INLINE_NORM_KERNELS_INFERENCE = inline_inference
        torch._dynamo.reset()
        compiled = torch.compile(norm, dynamic=dynamic)

        def run():
            with torch.set_grad_enabled(grad):
                y = compiled(*params)
            if grad:
                y.float().square().sum().backward()

        return "\n".join(run_and_get_code(run)[1])

    assert "diffunet.group_norm_act" not in generated_code(dynamic=False, grad=True)
    assert "diffunet.group_norm_act" in generated_code(dynamic=True, grad=True)
    assert "diffunet.group_norm_act" in generated_code(dynamic=False, grad=False)
    assert "diffunet.group_norm_act" not in generated_code(
        dynamic=False, grad=False, inline_inference=True
    )
