"""`RunConfig`: everything a training run needs, from defaults ← YAML ← command line.

A run is described by five sections, which are also the sections of the YAML file that
`--config` reads and the `config.yaml` that every run folder gets (resolved, with the full
model config):

```yaml
preset: ddpm-cifar10        # the model preset; `model:` holds overrides of it
model: {model_channels: 32, channel_mult: [1, 2, 2]}
data: {source: digits, image_size: 16, task: generate}
diffusion: {schedule: cosine, timesteps: 1000, prediction: v}
train: {steps: 2000, batch_size: 64, lr: 0.002, ...}
sample: {sampler: dpm++, steps: 20, guidance: 1.0, num: 100}
```

The model's data-dependent fields (`dims`, `in_channels`, `out_channels`, `cond_channels`,
`image_size`, `num_classes`) are filled in from the data; set them in `model:` only to check.
`data: {task: restore}` without a `source` trains on the embedded EM-like pairs (`em-pairs`),
and without a `preset` uses `emdiffuse`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from diffunet.data import TASKS
from diffunet.diffusion.parameterization import PREDICTIONS
from diffunet.diffusion.processes import (
    ALL_SAMPLERS,
    DEFAULT_PROCESS,
    LEGACY_PROCESS,
    PROCESSES,
    check_sampler,
)
from diffunet.diffusion.schedule import SCHEDULES
from diffunet.errors import InvalidValueError
from diffunet.model.config import UNetConfig
from diffunet.model.presets import preset

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL_MODES = ("ddp", "fsdp")
COMPILE_MODES = ("auto", "default", "reduce-overhead")
CUDA_GRAPH_CHOICES = ("auto", "off")
#: How replicated runs average gradients: DDP's hooks during the backward, or one all-reduce
#: per dtype after it (what steps replayed as CUDA graphs need); `auto` picks by the step.
GRAD_SYNC_MODES = ("auto", "ddp", "after-backward")

#: The default model: the DDPM CIFAR-10 topology, shrunk for 16×16 digits on a CPU.
DEFAULT_PRESET = "ddpm-cifar10"
DEFAULT_MODEL_OVERRIDES: dict[str, Any] = {
    "model_channels": 32,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [2],
    "dropout": 0.0,
}
#: What `--task restore` uses when neither the command line nor `--config` names them.
RESTORE_DEFAULTS = {"source": "em-pairs", "preset": "emdiffuse"}
#: Training settings of `--task restore` that differ from the digits defaults: the run measured
#: in docs/restoration.md (the full `emdiffuse`, on the discrete process as EMDiffuse).
RESTORE_TRAIN_DEFAULTS = {"steps": 2500, "batch_size": 32, "lr": 1e-3}
RESTORE_DIFFUSION_DEFAULTS = {"process": "ddpm"}
#: Fields of the model config that the data decides.
DATA_FIELDS = ("dims", "in_channels", "out_channels", "cond_channels", "image_size", "num_classes")


#: Every sampler of every process (each process checks its own).
SAMPLERS = ALL_SAMPLERS


class RunConfigError(InvalidValueError):
    """An invalid run setting; the message names the option, the value and what would work."""


def _bad(option: str, value: Any, expected: str) -> RunConfigError:
    return RunConfigError(f"{option}={value!r} is invalid: expected {expected}")


def _check_int(option: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _bad(option, value, f"an integer >= {minimum}")


def _check_float(
    option: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = (
        ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    )
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise _bad(option, value, f"a number in {left}{lo:g}, {hi:g}{right}")


def _check_choice(option: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _bad(option, value, f"one of {', '.join(choices)}")


@dataclass
class DataSection:
    """Where the training samples come from, their size, and what the model learns from them.

    `task`: `restore` (input → target pairs; the input is the model's `cond`), `generate`
    (samples from noise; a pair's input is dropped), or None to infer it from the data (pairs →
    restore). The run's `config.yaml` records the resolved task.
    """

    source: str = "digits"
    image_size: int | None = None
    task: str | None = None

    def validate(self) -> None:
        """Raise :class:`RunConfigError` for an unusable setting."""
        if not isinstance(self.source, str) or not self.source:
            raise _bad("data.source (--data)", self.source, "'digits' or a path")
        if self.image_size is not None:
            _check_int("data.image_size (--image-size)", self.image_size, 1)
        if self.task is not None:
            _check_choice("data.task (--task)", self.task, TASKS)


@dataclass
class DiffusionSection:
    """The process (`flow`: :class:`diffunet.diffusion.FlowMatching`, the default; `ddpm`:
    `Diffusion`; `edm`: `EDM`) and the discrete process's arguments (which `flow` and `edm`
    ignore). A run folder's config without `process` predates the choice and means `ddpm`."""

    process: str = DEFAULT_PROCESS
    schedule: str = "cosine"
    timesteps: int = 1000
    prediction: str = "v"  # well conditioned at every noise level (ε-prediction left speckles)
    min_snr_gamma: float | None = None
    zero_terminal_snr: bool = False
    cond_drop_prob: float | None = None  # None: 0.1 for class-conditional models, else 0

    def validate(self) -> None:
        """Raise :class:`RunConfigError` for an unusable setting."""
        _check_choice("diffusion.process (--process)", self.process, PROCESSES)
        _check_choice("diffusion.schedule", self.schedule, SCHEDULES)
        _check_int("diffusion.timesteps", self.timesteps, 2)
        _check_choice("diffusion.prediction", self.prediction, PREDICTIONS)
        if self.min_snr_gamma is not None:
            _check_float("diffusion.min_snr_gamma", self.min_snr_gamma, 0, 1e6, lo_open=True)
        if not isinstance(self.zero_terminal_snr, bool):
            raise _bad("diffusion.zero_terminal_snr", self.zero_terminal_snr, "true or false")
        if self.cond_drop_prob is not None:
            _check_float("diffusion.cond_drop_prob", self.cond_drop_prob, 0, 1, hi_open=True)


@dataclass
class TrainSection:
    """Optimisation, precision, checkpointing and logging."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    warmup: int = 100
    weight_decay: float = 0.0
    lr_decay: bool = True  # cosine decay to 10% of lr after warm-up
    checkpoint_every: int = 500
    sample_every: int = 500
    log_every: int = 50
    threads: int | None = None
    eval: bool = True  # report the digits metrics at the end (digits data only)
    compile: bool = False  # torch.compile the training forward and backward
    # "reduce-overhead" also replays the step as CUDA graphs; "auto" does so in one-process
    # CUDA runs and compiles in the default mode elsewhere (torchrun, the CPU).
    compile_mode: str = "auto"
    parallel: str = "ddp"  # across torchrun processes: "ddp" (replicated) or "fsdp" (sharded)
    # "auto": an uncompiled one-process CUDA run replays its forward and backward as CUDA
    # graphs (diffunet.accel.training_graph); "off" launches them kernel by kernel.
    cuda_graph: str = "auto"
    # Under torchrun with --parallel ddp: "ddp" all-reduces gradients from DDP's hooks during
    # the backward; "after-backward" all at once when it is done (diffunet.training.
    # gradient_sync), which lets the step replay as CUDA graphs; "auto" takes the latter
    # exactly when the step is replayed as CUDA graphs.
    grad_sync: str = "auto"

    def validate(self) -> None:
        """Raise :class:`RunConfigError` for an unusable setting."""
        _check_int("train.steps (--steps)", self.steps, 1)
        _check_int("train.batch_size (--batch-size)", self.batch_size, 1)
        _check_float("train.lr (--lr)", self.lr, 0, 10, lo_open=True)
        _check_int("train.seed (--seed)", self.seed, 0)
        _check_choice("train.precision (--precision)", self.precision, PRECISIONS)
        _check_choice("train.device (--device)", self.device, DEVICES)
        _check_float("train.ema_decay (--ema-decay)", self.ema_decay, 0, 1, hi_open=True)
        _check_float("train.grad_clip (--grad-clip)", self.grad_clip, 0, math.inf, hi_open=True)
        _check_int("train.warmup (--warmup)", self.warmup, 0)
        _check_float("train.weight_decay", self.weight_decay, 0, 1)
        _check_int("train.checkpoint_every (--checkpoint-every)", self.checkpoint_every, 0)
        _check_int("train.sample_every (--sample-every)", self.sample_every, 0)
        _check_int("train.log_every", self.log_every, 1)
        if self.threads is not None:
            _check_int("train.threads (--threads)", self.threads, 1)
        _check_choice("train.parallel (--parallel)", self.parallel, PARALLEL_MODES)
        _check_choice("train.compile_mode (--compile-mode)", self.compile_mode, COMPILE_MODES)
        _check_choice("train.cuda_graph (--no-cuda-graph)", self.cuda_graph, CUDA_GRAPH_CHOICES)
        _check_choice("train.grad_sync (--grad-sync)", self.grad_sync, GRAD_SYNC_MODES)
        if self.parallel == "fsdp" and self.grad_sync != "auto":
            raise RunConfigError(
                f"--grad-sync {self.grad_sync} chooses how replicated models average their "
                "gradients, but --parallel fsdp reduce-scatters them to shards; drop "
                "--grad-sync or use --parallel ddp"
            )
        if self.parallel == "fsdp" and self.precision == "fp16":
            raise RunConfigError(
                "--parallel fsdp trains in bf16 or fp32: fp16's loss scaling is "
                "not wired for sharded gradients; use --precision bf16"
            )
        for name in ("lr_decay", "eval", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(f"train.{name}", getattr(self, name), "true or false")
        if self.compile_mode != "auto" and not self.compile:
            raise RunConfigError(
                f"train.compile_mode is {self.compile_mode!r} but train.compile "
                "is false, so nothing would be compiled; set train.compile: "
                "true (the option --compile-mode does)"
            )


@dataclass
class SampleSection:
    """How grids (during training) and `diffunet sample` draw samples by default."""

    sampler: str | None = None  # None: the process's default (heun, dpm++ for ddpm)
    steps: int | None = None  # None: the process's default (10 Heun steps, 20 for ddpm)
    eta: float = 0.0
    guidance: float = 1.0
    num: int = 100

    def validate(self) -> None:
        """Raise :class:`RunConfigError` for an unusable setting."""
        if self.sampler is not None:
            _check_choice("sample.sampler (--sampler)", self.sampler, SAMPLERS)
        if self.steps is not None:
            _check_int("sample.steps (--sample-steps)", self.steps, 1)
        _check_float("sample.eta", self.eta, 0, 1)
        _check_float("sample.guidance", self.guidance, 0, 100)
        _check_int("sample.num", self.num, 1)


SECTIONS = {
    "data": DataSection,
    "diffusion": DiffusionSection,
    "train": TrainSection,
    "sample": SampleSection,
}


@dataclass
class RunConfig:
    """A whole run: the model preset + overrides and the four settings sections."""

    preset: str = DEFAULT_PRESET
    model: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_MODEL_OVERRIDES))
    data: DataSection = field(default_factory=DataSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)

    def validate(self) -> None:
        """Validate every section (the model is validated when it is built)."""
        for name in SECTIONS:
            getattr(self, name).validate()
        if self.sample.sampler is not None:
            try:
                check_sampler(self.diffusion.process, self.sample.sampler, "--sampler")
            except InvalidValueError as err:
                raise RunConfigError(str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-ready dict."""
        return asdict(self)

    def to_yaml(self) -> str:
        """The YAML text of this config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def model_config(self, data_fields: dict[str, Any] | None = None) -> UNetConfig:
        """The validated `UNetConfig`: preset ← `model` overrides ← the data's fields.

        A data field that the user set explicitly in `model` must agree with the data.
        """
        overrides = dict(self.model)
        for key, value in (data_fields or {}).items():
            if key in overrides and key != "num_classes" and plain(overrides[key]) != plain(value):
                raise RunConfigError(
                    f"model.{key}={overrides[key]!r} does not fit the data, which needs {value!r}; "
                    f"remove it (it is set from the data) or change --data/--image-size"
                )
            if key == "num_classes" and key in overrides:
                continue  # the user's choice: None trains unconditionally on labelled data
            overrides[key] = value
        if overrides.get("resample_axes") is not None and "dims" in overrides:
            base = preset(self.preset)
            if base.dims != overrides["dims"] and "resample_axes" not in self.model:
                overrides["resample_axes"] = None
        return preset(self.preset, **overrides)


def plain(value: Any) -> Any:
    """`value` with tuples as lists (in dicts too), so YAML, state-file and config copies of a
    setting compare equal."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def recorded(data: dict[str, Any]) -> dict[str, Any]:
    """A run folder's recorded config with what older runs left implicit made explicit: no
    `diffusion.process` means the discrete process, the only one there was."""
    diffusion = data.get("diffusion")
    if isinstance(diffusion, dict) and "process" not in diffusion:
        return {**data, "diffusion": {**diffusion, "process": LEGACY_PROCESS}}
    return data


def from_dict(data: dict[str, Any], source: str = "config", *, record: bool = False) -> RunConfig:
    """Build a :class:`RunConfig` from a (possibly partial) YAML mapping, checking every key.

    `record=True` reads a run folder's own record (`config.yaml`, the state's copy), where a
    missing `diffusion.process` means `ddpm` rather than today's default (:func:`recorded`).
    """
    if not isinstance(data, dict):
        raise RunConfigError(
            f"{source}: expected a mapping with sections "
            f"preset/model/{'/'.join(SECTIONS)}, got {type(data).__name__}"
        )
    if record:
        data = recorded(data)
    known = {"preset", "model", *SECTIONS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RunConfigError(
            f"{source}: unknown top-level key(s) {unknown}; valid: {sorted(known)}"
        )
    run = RunConfig()
    data_section = data.get("data")
    if isinstance(data_section, dict) and data_section.get("task") == "restore":
        # Restoration without named data or model: the embedded EM pairs and EMDiffuse.
        data = {
            "preset": RESTORE_DEFAULTS["preset"],
            **data,
            "data": {"source": RESTORE_DEFAULTS["source"], **data_section},
            "train": {**RESTORE_TRAIN_DEFAULTS, **(data.get("train") or {})},
            "diffusion": {**RESTORE_DIFFUSION_DEFAULTS, **(data.get("diffusion") or {})},
        }
    if "preset" in data:
        if not isinstance(data["preset"], str):
            raise RunConfigError(f"{source}: preset must be a name, got {data['preset']!r}")
        run.preset = data["preset"]
        run.model = {}
    if "model" in data:
        if not isinstance(data["model"] or {}, dict):
            raise RunConfigError(f"{source}: model must be a mapping of UNetConfig fields")
        run.model.update(data["model"] or {})
    for name, cls in SECTIONS.items():
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise RunConfigError(f"{source}: {name} must be a mapping, got {values!r}")
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(values) - valid)
        if bad:
            raise RunConfigError(
                f"{source}: unknown {name} setting(s) {bad}; valid: {sorted(valid)}"
            )
        section = getattr(run, name)
        for key, value in values.items():
            setattr(section, key, value)
    return run


def load_yaml(path: str | Path, *, record: bool = False) -> RunConfig:
    """Read a run config YAML file, with one-line errors for missing or malformed files;
    `record=True` for a run folder's `config.yaml` (see :func:`from_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise RunConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RunConfigError(f"config file {path} is not valid YAML{where}: {problem}") from err
    except UnicodeDecodeError as err:
        raise RunConfigError(f"config file {path} is not a text file: {err}") from err
    return from_dict(data or {}, source=str(path), record=record)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a `KEY=VALUE` model override; the value is read as YAML (`[1, 2, 2]`, `null`, `32`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RunConfigError(f"model override {text!r} is not KEY=VALUE (e.g. model_channels=64)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise RunConfigError(f"model override {text!r}: value is not valid YAML ({err})") from err
    return key.strip(), parsed


def merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """A deep-merged copy of `base` with `updates` (nested dicts merged, other values replaced)."""
    out = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
