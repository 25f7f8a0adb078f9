"""Every switch and threshold of the accelerator, in one place.

The accelerator's modules read these attributes when they run, so a change applies from the
next call on (graphs that `torch.compile` already traced keep what they saw). Change them with
the setters below, for a block with `override(NAME=value)`, or by assigning the attribute.
The environment variables set their values once, when this module is first imported (for
A/B runs in separate processes: `benchmarks/ab.py --change-env NAME=VALUE`); a value that
does not parse warns and keeps the default.

| Setting | Environment variable | Default | What it controls |
|---|---|---|---|
| `FUSED_NORM` | `DIFFUNET_FUSED` (`0`: off) | on | GroupNorm + FiLM + SiLU by the fused Triton kernels |
| `INLINE_NORM_KERNELS` | `DIFFUNET_INLINE_NORM_KERNELS` (`0`: off) | on | plain-compile training graphs launch the norm kernels themselves |
| `INLINE_NORM_KERNELS_INFERENCE` | `DIFFUNET_INLINE_NORM_KERNELS_INFER` (`1`: on) | off | the same for plain-compile graphs without gradients |
| `INLINE_MIN_ELEMENTS` | `DIFFUNET_INLINE_MIN_ELEMENTS` | 2²⁰ | graphs that launch the kernels themselves take them from this size (or the compiled threshold, if lower) |
| `FUSED_EAGER_MIN_ELEMENTS` | | 2²⁴ | eager mode: the smallest activation (elements) they take |
| `CUDA_GRAPHS_MIN_ELEMENTS` | `DIFFUNET_FUSED_GRAPHS_MIN_ELEMENTS` | 2²⁰ | what `configure_for_compile_mode` sets in CUDA-graph modes |
| `CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE` | `DIFFUNET_FUSED_GRAPHS_MIN_ELEMENTS_INFER` | as training | the same, for graphs without gradients |
| `CUDA_GRAPHS_INLINE_NORM_KERNELS` | `DIFFUNET_GRAPHS_INLINE_NORM_KERNELS` (`1`: on) | off | what `configure_for_compile_mode` sets `COMPILED_INLINE_NORM_KERNELS` to in CUDA-graph modes |
| `PLAIN_COMPILE_MIN_ELEMENTS` | `DIFFUNET_FUSED_COMPILE_MIN_ELEMENTS` (`none`: never) | 2²⁵ | what the other compile modes (a plain `torch.compile`) use for the opaque operator |
| `PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE` | `DIFFUNET_FUSED_COMPILE_MIN_ELEMENTS_INFER` | as training | the same, for graphs without gradients |
| `COMPILED_MIN_ELEMENTS` | | the plain-compile one | graphs traced from now on call the kernels from this size (None: never) |
| `COMPILED_MIN_ELEMENTS_INFERENCE` | | the plain-compile one | the same, for graphs without gradients |
| `COMPILED_INLINE_NORM_KERNELS` | | `INLINE_NORM_KERNELS` | whether training graphs traced from now on launch the norm kernels themselves |
| `COMPILED_INLINE_NORM_KERNELS_INFERENCE` | | `INLINE_NORM_KERNELS_INFERENCE` | the same, for graphs without gradients |
| `CUDA_GRAPH_MODES` | | `reduce-overhead`, `max-autotune` | the compile modes that replay CUDA graphs |
| `NORM_LAUNCH` | `DIFFUNET_NORM_LOOP_STAGES`, `DIFFUNET_NORM_ONE_PASS_ELEMENTS`, `DIFFUNET_NORM_REDUCTION_WARPS` | `LaunchPlan()` | tiles, programs, warps, pipelining and one-kernel bound of the norm kernels |
| `ONE_PASS_MIN_CHANNELS` | | 64 | the fewest channels a one-kernel norm program covers |
| `THIN_CONV` | `DIFFUNET_THIN_CONV` (`0`: off) | on | thin 3×3×3 convolutions by the Triton kernels |
| `THIN_CHANNELS` | | 8 | the most channels of a thin side |
| `THIN_MAX_CHANNELS` | | 128 | the most channels of the other side |
| `TAP_PRODUCT_FORWARD` | `DIFFUNET_TAP_PRODUCT_FORWARD` (`auto`, `always`, `never`, `1`, `0`) | `auto` | which thin heads' forwards run by tap products rather than cuDNN |
| `TAP_PRODUCTS_BYTES` | | 64 MiB | the tap products a head's forward holds at once |
| `THIN_CONV_LAUNCH` | | `ThinConvLaunch()` | block sizes and warps of the thin kernels |
| `CHANNEL_MULTIPLE` | | 8 | 3D convolutions' output channels are zero-padded to a multiple of it… |
| `PADDED_DEVICES` | | `cuda` | …on these device types |
| `ROUTED_DEVICES` | `DIFFUNET_ROUTED_CONV` (`cuda`, `none`, …) | `cuda` | device types whose compiled convolutions take `conv`'s layout-stable route |
| `PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV` | `DIFFUNET_PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV` (`1`: on) | off | plain-compile training graphs take a routed convolution's bias gradient from its backward (a product with ones) |
| `COMPILED_BIAS_GRADIENT_IN_CONV` | | the plain-compile one | the same for graphs traced from now on (on in CUDA-graph modes) |
| `FOLDED_DEVICES` | `DIFFUNET_FOLDED_UPSAMPLE` (`cpu,cuda`, `none`, …) | `cpu`, `cuda` | device types that fold nearest upsampling into the next convolution |
| `FOLDED_WEIGHT_GRADIENT_BY_PHASES` | `DIFFUNET_FOLDED_WGRAD_PHASES` (`1`: on) | off | routed (compiled) folded upsamplings compute their weight gradient one output phase at a time |
| `BATCHED_FILM` | `DIFFUNET_BATCHED_FILM` (`0`: off) | on | compiled graphs compute every ResBlock's embedding projection in one GEMM |
| `BATCHED_FILM_INFERENCE` | `DIFFUNET_BATCHED_FILM_INFER` (`0`: off) | on | the same for compiled graphs without gradients, one GEMM per decoder level (and one for the encoder and middle) |
| `BATCHED_QKV` | `DIFFUNET_BATCHED_QKV` (`0`: off) | on | compiled graphs project a transformer attention's queries, keys and values in one GEMM |
| `EXPLICIT_ATTENTION` | `DIFFUNET_EXPLICIT_ATTENTION` (`0`: off) | on | differentiated spatial attention with heads wider than flash attention takes as GEMMs around a float32 softmax… |
| `EXPLICIT_ATTENTION_WIDER_THAN` | | 256 | …for heads of more channels than this… |
| `EXPLICIT_ATTENTION_MAX_SCORES` | | 2²⁴ | …whose scores (batch × heads × queries × keys) are at most this many… |
| `EXPLICIT_ATTENTION_DEVICES` | | `cuda` | …on these device types |

Each attribute's comment below says why. Triton's own `TRITON_INTERPRET=1` runs the kernels on
CPU tensors through its interpreter (tests). The measurements behind the defaults are in
docs/performance.md.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from diffunet.errors import InvalidValueError

_Default = TypeVar("_Default", int, None)


def _int_from_env(
    name: str, default: _Default, minimum: int, what: str, keeping: str | None = None
) -> int | _Default:
    """The integer (at least `minimum`) the environment variable `name` gives, else `default`;
    a value that is no such integer warns that it is not `what` and keeps `default` (which the
    warning calls `keeping` where given)."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        kept = default if keeping is None else keeping
        warnings.warn(f"{name}={text!r} is not {what}; keeping {kept}", stacklevel=2)
        return default
    return value


def _switch_from_env(name: str, default: bool = True) -> bool:
    """`default` unless the environment variable `name` is "0" (off) or "1" (on)."""
    return {"0": False, "1": True}.get(os.environ.get(name, ""), default)


# --- fused GroupNorm + FiLM + SiLU (`norm`) --------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """How the norm kernels split a (B, C, N) activation.

    Each program of the four streaming kernels (statistics, normalize, backward reduce, input
    gradient) owns one sample's run of positions and loops over it in tiles of all channels ×
    `tile_elements // BLOCK_C` positions, `programs_per_sm` programs per SM in all.
    `loop_stages` is that loop's software-pipelining depth (`tl.range(num_stages=...)`): 1
    loads each tile when the loop reaches it; from 2 on, each program copies the next tiles
    into shared memory ahead of use, so that more loads are in flight.

    `one_pass_elements`: a call whose programs would each own at most this many elements when
    each covers one sample's whole groups runs its forward as one kernel (statistics, their
    reduction per group, normalize; x read the second time mostly from L2) and its backward as
    one more; larger calls take three kernels each way. 0 never takes them.

    `reduction_warps`: the warps of the backward's reduce kernel, which accumulates two
    tile-sized float32 sums and so holds more registers per thread than the other kernels;
    0 takes `num_warps`.
    `benchmarks/norm_kernels.py` sweeps these fields on a GPU.
    """

    tile_elements: int = 4096
    programs_per_sm: int = 4
    num_warps: int = 4
    loop_stages: int = 1
    one_pass_elements: int = 0
    reduction_warps: int = 0

    def for_elements(self, numel: int) -> LaunchConfig:
        """This configuration, at every size."""
        return self


@dataclass(frozen=True)
class LaunchPlan:
    """One launch configuration for activations of at least `large_from` elements, another
    below.

    The defaults are the best of the sweeps in docs/performance.md: loops pipelined three
    tiles deep with four warps, fewer programs per SM for smaller activations, eight warps in
    the backward's reduce kernel for large ones, and one kernel each way for calls whose
    programs own at most 32,768 elements.
    """

    large: LaunchConfig = LaunchConfig(4096, 4, 4, 3, one_pass_elements=32768, reduction_warps=8)
    small: LaunchConfig = LaunchConfig(4096, 2, 4, 3, one_pass_elements=32768)
    large_from: int = 1 << 25

    def for_elements(self, numel: int) -> LaunchConfig:
        """The configuration for an activation of `numel` elements."""
        return self.large if numel >= self.large_from else self.small


#: The environment variable that turns the fused norm kernels off ("0").
FUSED_ENV = "DIFFUNET_FUSED"
#: The environment variable that turns `INLINE_NORM_KERNELS` off ("0").
INLINE_NORM_KERNELS_ENV = "DIFFUNET_INLINE_NORM_KERNELS"
#: The environment variable that turns `INLINE_NORM_KERNELS_INFERENCE` on ("1").
INLINE_NORM_KERNELS_INFERENCE_ENV = "DIFFUNET_INLINE_NORM_KERNELS_INFER"
#: The environment variable that sets `INLINE_MIN_ELEMENTS`.
INLINE_MIN_ELEMENTS_ENV = "DIFFUNET_INLINE_MIN_ELEMENTS"
#: The environment variable that turns `CUDA_GRAPHS_INLINE_NORM_KERNELS` on ("1").
CUDA_GRAPHS_INLINE_NORM_KERNELS_ENV = "DIFFUNET_GRAPHS_INLINE_NORM_KERNELS"
#: The environment variable that sets `CUDA_GRAPHS_MIN_ELEMENTS`.
CUDA_GRAPHS_MIN_ELEMENTS_ENV = "DIFFUNET_FUSED_GRAPHS_MIN_ELEMENTS"
#: The environment variable that sets `CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE`.
CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE_ENV = "DIFFUNET_FUSED_GRAPHS_MIN_ELEMENTS_INFER"
#: The environment variable that sets `PLAIN_COMPILE_MIN_ELEMENTS` ("none": never).
PLAIN_COMPILE_MIN_ELEMENTS_ENV = "DIFFUNET_FUSED_COMPILE_MIN_ELEMENTS"
#: The environment variable that sets `PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE` ("none": never).
PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE_ENV = "DIFFUNET_FUSED_COMPILE_MIN_ELEMENTS_INFER"
#: The environment variable that sets `loop_stages` in both configurations of `NORM_LAUNCH`.
LOOP_STAGES_ENV = "DIFFUNET_NORM_LOOP_STAGES"
#: The environment variable that sets `one_pass_elements` in both configurations of
#: `NORM_LAUNCH` (0: never one kernel).
ONE_PASS_ENV = "DIFFUNET_NORM_ONE_PASS_ELEMENTS"
#: The environment variable that sets `reduction_warps` in both configurations of
#: `NORM_LAUNCH` (0: as `num_warps`; unset: the plan's own).
REDUCTION_WARPS_ENV = "DIFFUNET_NORM_REDUCTION_WARPS"


def _optional_int_from_env(name: str, default: int | None, what: str) -> int | None:
    """Like `_int_from_env` with a minimum of 0, where "none" stands for None."""
    if os.environ.get(name, "").strip().lower() == "none":
        return None
    return _int_from_env(name, default, 0, what)


def _norm_launch_from_env() -> LaunchPlan:
    """`LaunchPlan()` with the loop depth, one-kernel bound and backward reduce kernel's warps
    the environment asks for, each in both configurations."""
    plan = LaunchPlan()
    plans = "the launch plan's"
    asked = {
        "loop_stages": _int_from_env(
            LOOP_STAGES_ENV, None, 1, "a loop depth (an integer, at least 1, e.g. 2)", plans
        ),
        "one_pass_elements": _int_from_env(
            ONE_PASS_ENV,
            None,
            0,
            "a number of elements (an integer, at least 0, e.g. 16384)",
            plans,
        ),
        "reduction_warps": _int_from_env(
            REDUCTION_WARPS_ENV,
            None,
            0,
            "a number of warps (an integer, at least 0, e.g. 8; 0: as num_warps)",
            plans,
        ),
    }
    fields = {name: value for name, value in asked.items() if value is not None}
    return replace(plan, large=replace(plan.large, **fields), small=replace(plan.small, **fields))


#: Whether the fused norm kernels run at all.
FUSED_NORM: bool = _switch_from_env(FUSED_ENV)
#: Whether training graphs of the compile modes without CUDA graphs, traced on a GPU with static
#: sizes, call the norm kernels as operators that `torch.compile` traces into
#: (`torch.library.triton_op`), so the compiled code launches the Triton kernels itself instead
#: of calling an opaque operator whose Python runs on every step.
INLINE_NORM_KERNELS: bool = _switch_from_env(INLINE_NORM_KERNELS_ENV)
#: The same for graphs traced without gradients; off: their peak memory grew with the inline
#: operators (docs/performance.md).
INLINE_NORM_KERNELS_INFERENCE: bool = _switch_from_env(
    INLINE_NORM_KERNELS_INFERENCE_ENV, default=False
)
#: Graphs that launch the kernels themselves take them from this size, or from the compiled
#: threshold where that is lower: such a call costs no Python per step, so activations far
#: below the opaque operator's threshold gain (docs/performance.md).
INLINE_MIN_ELEMENTS: int = _int_from_env(
    INLINE_MIN_ELEMENTS_ENV,
    1 << 20,
    0,
    f"a number of elements (an integer, at least 0, e.g. {1 << 22})",
)
#: In eager mode, the smallest activation (elements) the fused kernels take. A fused call costs
#: six Triton launches of host time (forward and backward); below this size the eager kernels
#: finish sooner (docs/performance.md).
FUSED_EAGER_MIN_ELEMENTS: int = 1 << 24
#: The threshold that CUDA-graph compile modes apply (`configure_for_compile_mode`): graphs
#: replayed as CUDA graphs pay no per-launch host cost, and Inductor's channels-last GroupNorm
#: reductions are slow at large sizes.
CUDA_GRAPHS_MIN_ELEMENTS: int = _int_from_env(
    CUDA_GRAPHS_MIN_ELEMENTS_ENV,
    1 << 20,
    0,
    f"a number of elements (an integer, at least 0, e.g. {1 << 22})",
)
#: The same for graphs traced without gradients (inference, sampling), whose crossover against
#: Inductor's GroupNorm may differ without a backward.
CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE: int = _int_from_env(
    CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE_ENV,
    CUDA_GRAPHS_MIN_ELEMENTS,
    0,
    f"a number of elements (an integer, at least 0, e.g. {1 << 22})",
)
#: Whether training graphs of the CUDA-graph modes launch the norm kernels themselves (the
#: inline operators, as plain-compile training graphs do), so that Inductor sees and fuses the
#: small tensor operations between the kernels; off: the opaque operator, until an A/B says
#: otherwise (docs/performance.md, open items).
CUDA_GRAPHS_INLINE_NORM_KERNELS: bool = _switch_from_env(
    CUDA_GRAPHS_INLINE_NORM_KERNELS_ENV, default=False
)
#: The threshold of the compile modes without CUDA graphs (the default mode, a plain
#: `torch.compile(model)`) for the opaque operator: each call adds its Python launches to the
#: step's host time, so only activations large enough for the kernels to save more GPU time
#: than that take them (docs/performance.md). Graphs that launch the kernels themselves
#: (`INLINE_NORM_KERNELS`) also take them from `INLINE_MIN_ELEMENTS`. None traces the
#: reference everywhere.
PLAIN_COMPILE_MIN_ELEMENTS: int | None = _optional_int_from_env(
    PLAIN_COMPILE_MIN_ELEMENTS_ENV,
    1 << 25,
    f'a number of elements (an integer, at least 0, e.g. {1 << 22}) or "none"',
)
#: The same for graphs traced without gradients.
PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE: int | None = _optional_int_from_env(
    PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE_ENV,
    PLAIN_COMPILE_MIN_ELEMENTS,
    f'a number of elements (an integer, at least 0, e.g. {1 << 22}) or "none"',
)
#: Graphs traced from now on call the fused kernels (as the operator `diffunet::group_norm_act`)
#: on activations of at least this many elements; None traces the reference everywhere. Until
#: `configure_for_compile_mode` says otherwise, the plain-compile threshold.
COMPILED_MIN_ELEMENTS: int | None = PLAIN_COMPILE_MIN_ELEMENTS
#: The same for graphs traced without gradients.
COMPILED_MIN_ELEMENTS_INFERENCE: int | None = PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE
#: Whether training graphs traced from now on launch the norm kernels themselves; until
#: `configure_for_compile_mode` says otherwise, `INLINE_NORM_KERNELS` (CUDA-graph modes replay
#: the launches without host cost and were measured with the opaque operator).
COMPILED_INLINE_NORM_KERNELS: bool = INLINE_NORM_KERNELS
#: The same for graphs traced without gradients.
COMPILED_INLINE_NORM_KERNELS_INFERENCE: bool = INLINE_NORM_KERNELS_INFERENCE
#: The `torch.compile` modes that replay the compiled graphs as CUDA graphs.
CUDA_GRAPH_MODES: tuple[str, ...] = ("reduce-overhead", "max-autotune")
#: The norm kernels' launch plan: a `LaunchPlan`, or one `LaunchConfig` for every size.
NORM_LAUNCH: LaunchPlan | LaunchConfig = _norm_launch_from_env()
#: A one-kernel call's program covers whole groups of at least this many channels where the
#: tensor has them: 128 contiguous bytes of bf16 per position in channels-last memory.
ONE_PASS_MIN_CHANNELS: int = 64


def set_fused_enabled(enabled: bool, *, min_elements: int | None = None) -> None:
    """Turn the fused norm kernels on or off and optionally set `FUSED_EAGER_MIN_ELEMENTS`."""
    global FUSED_NORM, FUSED_EAGER_MIN_ELEMENTS
    FUSED_NORM = bool(enabled)
    if min_elements is not None:
        FUSED_EAGER_MIN_ELEMENTS = int(min_elements)


def eager_min_elements() -> int:
    """The size (elements per call) from which eager mode runs the fused kernels."""
    return FUSED_EAGER_MIN_ELEMENTS


def set_compiled_min_elements(min_elements: int | None, *, inference: int | None = None) -> None:
    """Let graphs traced from now on call the fused kernels on tensors of at least
    `min_elements`, or of at least `inference` (default: `min_elements`) in graphs traced
    without gradients; None traces the reference everywhere."""
    global COMPILED_MIN_ELEMENTS, COMPILED_MIN_ELEMENTS_INFERENCE
    COMPILED_MIN_ELEMENTS = None if min_elements is None else int(min_elements)
    COMPILED_MIN_ELEMENTS_INFERENCE = (
        None if min_elements is None else int(min_elements if inference is None else inference)
    )


def configure_for_compile_mode(mode: str | None) -> None:
    """Set the compiled thresholds for `torch.compile(mode=mode)`: `CUDA_GRAPHS_MIN_ELEMENTS`
    (`CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE` without gradients) and the opaque operator (in
    training graphs the inline ones where `CUDA_GRAPHS_INLINE_NORM_KERNELS`) where the mode
    replays CUDA graphs, `PLAIN_COMPILE_MIN_ELEMENTS` (`..._INFERENCE`) and
    `INLINE_NORM_KERNELS` (`..._INFERENCE`) otherwise; and where routed convolutions' bias
    gradients come from (`COMPILED_BIAS_GRADIENT_IN_CONV`)."""
    global COMPILED_MIN_ELEMENTS, COMPILED_MIN_ELEMENTS_INFERENCE
    global COMPILED_INLINE_NORM_KERNELS, COMPILED_INLINE_NORM_KERNELS_INFERENCE
    global COMPILED_BIAS_GRADIENT_IN_CONV
    if mode in CUDA_GRAPH_MODES:
        set_compiled_min_elements(
            CUDA_GRAPHS_MIN_ELEMENTS, inference=CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE
        )
        COMPILED_INLINE_NORM_KERNELS = CUDA_GRAPHS_INLINE_NORM_KERNELS
        COMPILED_INLINE_NORM_KERNELS_INFERENCE = False
        COMPILED_BIAS_GRADIENT_IN_CONV = True
    else:
        COMPILED_MIN_ELEMENTS = PLAIN_COMPILE_MIN_ELEMENTS
        COMPILED_MIN_ELEMENTS_INFERENCE = PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE
        COMPILED_INLINE_NORM_KERNELS = INLINE_NORM_KERNELS
        COMPILED_INLINE_NORM_KERNELS_INFERENCE = INLINE_NORM_KERNELS_INFERENCE
        COMPILED_BIAS_GRADIENT_IN_CONV = PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV


# --- thin 3D convolutions (`thin_conv`) ------------------------------------------------------


@dataclass(frozen=True)
class ThinConvLaunch:
    """Block sizes (positions per program) and warps of the thin-convolution kernels;
    `benchmarks/conv_channels.py` times them."""

    #: The gather kernel (a stem's forward, a head's input gradient); halved for a wide side of
    #: more than 64 channels, whose accumulator is larger.
    gather_block_n: int = 128
    #: The weight-gradient kernel's tile, and its programs per SM.
    weight_grad_block_n: int = 128
    weight_grad_programs_per_sm: int = 2
    #: A head's forward by tap products: the products pass and the sums pass.
    tap_products_block_n: int = 64
    tap_sum_block_n: int = 256
    num_warps: int = 4


#: The environment variable that turns the thin-convolution kernels off ("0").
THIN_CONV_ENV = "DIFFUNET_THIN_CONV"
#: The environment variable that sets `TAP_PRODUCT_FORWARD`.
TAP_PRODUCT_FORWARD_ENV = "DIFFUNET_TAP_PRODUCT_FORWARD"
_TAP_PRODUCT_SETTINGS = {
    "auto": "auto",
    "always": "always",
    "never": "never",
    "1": "always",
    "0": "never",
}


def tap_product_setting(name: str = TAP_PRODUCT_FORWARD_ENV) -> str:
    """The `TAP_PRODUCT_FORWARD` value the environment variable `name` gives ("auto" when
    unset); a value that is none of them warns and keeps "auto"."""
    text = os.environ.get(name, "auto")
    if text.lower() not in _TAP_PRODUCT_SETTINGS:
        warnings.warn(
            f"{name}={text!r} is not one of auto, always, never, 1, 0; keeping auto", stacklevel=2
        )
        return "auto"
    return _TAP_PRODUCT_SETTINGS[text.lower()]


#: Whether the thin-convolution kernels run at all.
THIN_CONV: bool = _switch_from_env(THIN_CONV_ENV)
#: A 3D convolution is thin when its narrower side has at most this many channels.
THIN_CHANNELS: int = 8
#: The wider side's limit: one program holds a (positions × channels) float32 accumulator.
THIN_MAX_CHANNELS: int = 128
#: Which thin heads' forwards run by tap products instead of cuDNN: "auto" those whose tap
#: products (27 × COUT per position) are no wider than their input (CIN), so that the two
#: passes move less than cuDNN's 27 reads of each input tile; "always"; "never". Wider heads
#: are unmeasured, so "auto" leaves them to cuDNN.
TAP_PRODUCT_FORWARD: str = tap_product_setting()
#: Bytes of tap products a head's forward holds at once: it runs the batch in groups of samples
#: whose products fit.
TAP_PRODUCTS_BYTES: int = 64 << 20
#: Block sizes and warps of the thin-convolution kernels.
THIN_CONV_LAUNCH: ThinConvLaunch = ThinConvLaunch()


def set_thin_conv_enabled(enabled: bool) -> None:
    """Turn the thin-convolution kernels on or off (`THIN_CONV`)."""
    global THIN_CONV
    THIN_CONV = bool(enabled)


# --- convolutions (`conv`) -------------------------------------------------------------------

#: Output channel counts that 3D convolutions on `PADDED_DEVICES` are zero-padded to a multiple
#: of: the extra outputs come from zero weight rows and are sliced off, and cuDNN picks a
#: faster kernel for the padded shape.
CHANNEL_MULTIPLE: int = 8
#: Devices on which `conv.convolve` pads (cuDNN's). Tests add "cpu" to check the arithmetic.
PADDED_DEVICES: frozenset[str] = frozenset({"cuda"})
#: Devices whose compiled convolutions take `conv`'s layout-stable route: the layout copies
#: it removes are cuDNN's. On the CPU, Inductor's C++ code for the bias gradients they leave
#: to it does not compile for some bf16 3D U-Nets (torch 2.13: a duplicate variable
#: declaration), so the CPU keeps Inductor's own convolution. Tests add "cpu".
ROUTED_DEVICES: frozenset[str] = frozenset({"cuda"})


# --- folded upsampling -----------------------------------------------------------------------

#: The environment variable naming the devices that fold (see `FOLDED_DEVICES`).
FOLDED_DEVICES_ENV = "DIFFUNET_FOLDED_UPSAMPLE"


def parse_devices(text: str, source: str = FOLDED_DEVICES_ENV) -> frozenset[str]:
    """Device types from a comma-separated list ("cpu,cuda"; "none" or nothing for none)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return frozenset()
    for name in names:
        try:
            known = torch.device(name).type == name
        except RuntimeError:
            known = False
        if not known:
            raise InvalidValueError(
                f"{source}={text!r}: {name!r} is not a device type; expected a "
                "comma-separated list such as 'cpu' or 'cpu,cuda', or 'none'"
            )
    return frozenset(names)


#: Devices on which nearest upsampling followed by a 3×3 convolution runs as one transposed
#: convolution of the smaller input: oneDNN's and cuDNN's transposed convolutions are faster
#: than the upsampling and convolution they replace.
FOLDED_DEVICES: frozenset[str] = frozenset({"cpu", "cuda"})

if FOLDED_DEVICES_ENV in os.environ:
    try:
        FOLDED_DEVICES = parse_devices(os.environ[FOLDED_DEVICES_ENV])
    except ValueError as err:  # a process-wide knob: say so, and keep the default
        warnings.warn(f"{err}; folding on {sorted(FOLDED_DEVICES)}", stacklevel=1)

#: The environment variable that turns `FOLDED_WEIGHT_GRADIENT_BY_PHASES` on ("1").
FOLDED_WEIGHT_GRADIENT_BY_PHASES_ENV = "DIFFUNET_FOLDED_WGRAD_PHASES"
#: Whether a folded upsampling on the layout-stable route (compiled, with autograd) computes its
#: weight gradient as one stride-1 weight gradient per output phase (`phase_gradient`) rather
#: than ATen's strided one: the same sums by other cuDNN kernels, for an A/B on a GPU.
FOLDED_WEIGHT_GRADIENT_BY_PHASES: bool = _switch_from_env(
    FOLDED_WEIGHT_GRADIENT_BY_PHASES_ENV, default=False
)


#: The environment variable naming the devices whose compiled convolutions take `conv`'s
#: layout-stable route (`ROUTED_DEVICES`; "none" for none: plain convolutions everywhere, for
#: an A/B of what the route gains).
ROUTED_DEVICES_ENV = "DIFFUNET_ROUTED_CONV"

if ROUTED_DEVICES_ENV in os.environ:
    try:
        ROUTED_DEVICES = parse_devices(os.environ[ROUTED_DEVICES_ENV], ROUTED_DEVICES_ENV)
    except ValueError as err:
        warnings.warn(f"{err}; routing on {sorted(ROUTED_DEVICES)}", stacklevel=1)


#: The environment variable that turns `PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV` on ("1") or off.
PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV_ENV = "DIFFUNET_PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV"
#: Whether training graphs of the compile modes without CUDA graphs take a routed convolution's
#: bias gradient from its backward (a GEMV over the gradient it already holds: two more
#: launches per convolution) rather than from Inductor, which sums it in
#: a reduction it fuses with others over the same gradient (no launch of its own). Off: steps
#: bound by their launches gained, larger ones ran as fast (docs/performance.md).
PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV: bool = _switch_from_env(
    PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV_ENV, default=False
)
#: Whether graphs traced from now on do so; until `configure_for_compile_mode` says otherwise,
#: the plain-compile setting. CUDA-graph modes replay the launches without host cost, and there
#: the GEMV reads the gradient faster than Inductor's fused sums (docs/performance.md).
COMPILED_BIAS_GRADIENT_IN_CONV: bool = PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV


def set_folded_upsample_devices(devices: str | Iterable[str]) -> None:
    """Fold on these device types from now on: an iterable, or a comma-separated string as
    `DIFFUNET_FOLDED_UPSAMPLE` takes ("none" for none)."""
    global FOLDED_DEVICES
    FOLDED_DEVICES = parse_devices(
        devices if isinstance(devices, str) else ",".join(devices), "devices"
    )


@contextlib.contextmanager
def folding_on(devices: str | Iterable[str]) -> Iterator[None]:
    """Within the block fold on these device types only (as `set_folded_upsample_devices`
    takes them); afterwards on those before it. `folding_on("none")` runs the architecture's
    own upsampling and convolution, e.g. to count its FLOPs."""
    global FOLDED_DEVICES
    before = FOLDED_DEVICES
    set_folded_upsample_devices(devices)
    try:
        yield
    finally:
        FOLDED_DEVICES = before


# --- projections of one input as one GEMM (`projections`) ------------------------------------

#: The environment variable that turns `BATCHED_FILM` off ("0").
BATCHED_FILM_ENV = "DIFFUNET_BATCHED_FILM"
#: Whether graphs that `torch.compile` traces from the accelerated UNet compute every
#: ResBlock's projection of the time embedding with one GEMM instead of one per block: fewer
#: kernel launches, which is what a compiled step not replayed as a CUDA graph is bound by.
BATCHED_FILM: bool = _switch_from_env(BATCHED_FILM_ENV)
#: The environment variable that turns `BATCHED_FILM_INFERENCE` off ("0").
BATCHED_FILM_INFERENCE_ENV = "DIFFUNET_BATCHED_FILM_INFER"
#: The same for graphs traced without gradients, by one GEMM for the encoder and middle and one
#: per decoder level: one GEMM's output for every block would live until the last block,
#: through the forward's peak, where each level's lives only for its level.
BATCHED_FILM_INFERENCE: bool = _switch_from_env(BATCHED_FILM_INFERENCE_ENV)
#: The environment variable that turns `BATCHED_QKV` off ("0").
BATCHED_QKV_ENV = "DIFFUNET_BATCHED_QKV"
#: Whether graphs that `torch.compile` traces compute a transformer block attention's queries,
#: keys and values (self-attention), or keys and values (cross-attention), with one GEMM:
#: one read of the tokens instead of three.
BATCHED_QKV: bool = _switch_from_env(BATCHED_QKV_ENV)


# --- attention (`attention`) -------------------------------------------------------------------

#: The environment variable that turns `EXPLICIT_ATTENTION` off ("0").
EXPLICIT_ATTENTION_ENV = "DIFFUNET_EXPLICIT_ATTENTION"
#: Whether the accelerated spatial attention computes heads wider than
#: `EXPLICIT_ATTENTION_WIDER_THAN` over few tokens as softmax(q kᵀ) v by GEMMs where a gradient
#: will flow, rather than by `scaled_dot_product_attention`, which takes such heads only to its
#: memory-efficient kernel (`ldm`'s one 512-channel head over 16² positions), whose backward is
#: the slower; forward-only calls keep that kernel, whose forward is the faster.
EXPLICIT_ATTENTION: bool = _switch_from_env(EXPLICIT_ATTENTION_ENV)
#: Flash attention and cuDNN take heads of at most this many channels (PyTorch 2.11).
EXPLICIT_ATTENTION_WIDER_THAN: int = 256
#: The largest score matrix (batch × heads × queries × keys elements, float32) the explicit
#: attention makes; larger ones stay with the fused kernels, which never hold it.
EXPLICIT_ATTENTION_MAX_SCORES: int = 1 << 24
#: Devices whose attention goes explicit: on the CPU, SDPA's own kernel was the faster (1.1–2.4×
#: for such heads, forward and backward). Tests add "cpu".
EXPLICIT_ATTENTION_DEVICES: frozenset[str] = frozenset({"cuda"})


# --- all settings ----------------------------------------------------------------------------

#: The names of the settings (the rows of the module's table).
NAMES: tuple[str, ...] = (
    "FUSED_NORM",
    "INLINE_NORM_KERNELS",
    "INLINE_NORM_KERNELS_INFERENCE",
    "INLINE_MIN_ELEMENTS",
    "FUSED_EAGER_MIN_ELEMENTS",
    "CUDA_GRAPHS_MIN_ELEMENTS",
    "CUDA_GRAPHS_MIN_ELEMENTS_INFERENCE",
    "CUDA_GRAPHS_INLINE_NORM_KERNELS",
    "PLAIN_COMPILE_MIN_ELEMENTS",
    "PLAIN_COMPILE_MIN_ELEMENTS_INFERENCE",
    "COMPILED_MIN_ELEMENTS",
    "COMPILED_MIN_ELEMENTS_INFERENCE",
    "COMPILED_INLINE_NORM_KERNELS",
    "COMPILED_INLINE_NORM_KERNELS_INFERENCE",
    "CUDA_GRAPH_MODES",
    "NORM_LAUNCH",
    "ONE_PASS_MIN_CHANNELS",
    "THIN_CONV",
    "THIN_CHANNELS",
    "THIN_MAX_CHANNELS",
    "TAP_PRODUCT_FORWARD",
    "TAP_PRODUCTS_BYTES",
    "THIN_CONV_LAUNCH",
    "CHANNEL_MULTIPLE",
    "PADDED_DEVICES",
    "ROUTED_DEVICES",
    "PLAIN_COMPILE_BIAS_GRADIENT_IN_CONV",
    "COMPILED_BIAS_GRADIENT_IN_CONV",
    "FOLDED_DEVICES",
    "FOLDED_WEIGHT_GRADIENT_BY_PHASES",
    "BATCHED_FILM",
    "BATCHED_FILM_INFERENCE",
    "BATCHED_QKV",
    "EXPLICIT_ATTENTION",
    "EXPLICIT_ATTENTION_WIDER_THAN",
    "EXPLICIT_ATTENTION_MAX_SCORES",
    "EXPLICIT_ATTENTION_DEVICES",
)


def current() -> dict[str, Any]:
    """Every setting's current value, by name (e.g. to record with a benchmark's results)."""
    return {name: globals()[name] for name in NAMES}


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """Within the block, these settings (`override(FUSED_EAGER_MIN_ELEMENTS=0)`); afterwards
    the values from before it. An unknown name raises `AttributeError`."""
    unknown = sorted(set(values) - set(NAMES))
    if unknown:
        raise AttributeError(f"no such accelerator setting: {', '.join(unknown)}")
    before = {name: globals()[name] for name in values}
    globals().update(values)
    try:
        yield
    finally:
        globals().update(before)
