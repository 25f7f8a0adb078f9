"""The training loop, readable top to bottom: `Trainer(run, data, run_dir).train()`.

What one step does (every random draw of step `s` is a function of the seed and `s` only, so a
run killed at any moment and resumed from its last checkpoint replays the same steps, and N
data-parallel processes see exactly the draws a single process would):

1. take the `s`-th batch of the epoch's permutation (the global batch; each rank its slice);
2. draw timesteps, noise and the classifier-free-guidance label dropout for the global batch;
3. loss under autocast (bf16 where supported, float32 master weights), backward (DDP averages
   the gradients, or one all-reduce per dtype after the backward where the step replays as CUDA
   graphs; with `--parallel fsdp` they are reduce-scattered to sharded parameters, see
   :mod:`diffunet.training.parallel`), clip, optimizer and LR-schedule step, EMA update in float32;
4. every `log_every` steps a log line / CSV row, every `checkpoint_every` steps the EMA
   checkpoint folder + training-state file, every `sample_every` steps a PNG grid.

At the end: a final checkpoint, a grid, and for the digits the evaluation numbers.

What can go wrong is caught without slowing a step down: a NaN or inf loss or gradient norm is
noted on the device and read at the next log line or checkpoint, which then stops the run with
the last good checkpoint named (:mod:`diffunet.training.divergence`); nothing non-finite is ever
written. SIGTERM and SIGINT stop the loop after the current step with a checkpoint for exactly
that step (:mod:`diffunet.training.interrupts`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffunet.accel import accelerate, cache_compiled_functions, settings
from diffunet.accel.training_graph import CUDAGraphTraining
from diffunet.apps.evaluation import EVAL_NAME, describe, evaluate_model
from diffunet.apps.generate import (  # the run folder its readers expect
    CHECKPOINT_DIR,
    RUN_META,
    LoadedModel,
)
from diffunet.apps.grids import save_grid, to_image_tiles
from diffunet.data import TensorDataset
from diffunet.data.dataset import move
from diffunet.diffusion import Diffusion, drop_conditioning
from diffunet.diffusion.processes import DEFAULT_SAMPLERS, default_steps, make_process
from diffunet.errors import InvalidValueError, TrainingError
from diffunet.model.checkpoint import atomic_write_bytes, save_pretrained
from diffunet.model.config import UNetConfig
from diffunet.model.unet import UNet
from diffunet.training.distributed import DistInfo, barrier, broadcast_flag, mean_over_ranks
from diffunet.training.divergence import NonFiniteWatch, nonfinite_tensors
from diffunet.training.interrupts import StopSignals
from diffunet.training.parallel import Replicated, Sharded
from diffunet.training.run_config import RunConfig, RunConfigError, TrainSection
from diffunet.training.run_log import RunLog
from diffunet.training.state import (
    STATE_NAME,
    capture_rng_state,
    restore_rng_state,
    save_training_state,
)

CONFIG_YAML = "config.yaml"
SAMPLES_DIR = "samples"
CPU_VOLUME_GRID = 8  # 3D samples per grid on a CPU
DEFAULT_COND_DROP = 0.1  # classifier-free guidance dropout for class-conditional models


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for the random draws of `step` (streams separate independent uses)."""
    mixed = seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB
    return mixed % (2**63 - 1)


def seed_global_generators(seed: int, device: torch.device) -> None:
    """Seed the global generators that a step on `device` draws from (dropout): the CPU's and,
    on a GPU, that GPU's. `torch.manual_seed` seeds every backend's, and the lazy seeding of
    backends not in use costs the host a stack trace per call."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        torch.cuda.default_generators[index].manual_seed(seed)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` → bf16 where the device has fast bf16 (Ampere+ GPUs, AVX512-BF16/AMX CPUs), else fp32."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
    else:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if name == "auto":
        return "bf16" if bf16 else "fp32"
    if name == "bf16" and not bf16:
        raise RunConfigError(
            f"--precision bf16 is not supported on this {device.type} device; use --precision fp32"
        )
    return name


def graphs_fit_communication(train: TrainSection, dist: DistInfo) -> bool:
    """Whether the run's gradient communication leaves the step free to replay as CUDA
    graphs: none in one process; under torchrun, replicated models whose gradients are
    all-reduced after the backward (`--grad-sync` auto or after-backward), not DDP's hooks
    or FSDP's collectives, which run inside the backward."""
    return not dist.enabled or (train.parallel == "ddp" and train.grad_sync != "ddp")


def resolve_compile_mode(train: TrainSection, dist: DistInfo) -> str:
    """The `torch.compile` mode of a compiled run.

    `auto` records CUDA graphs (`reduce-overhead`) on a GPU, where compiled steps are otherwise
    bound by kernel launches (docs/performance.md), and compiles in the default mode on the
    CPU (no graphs there) and where the gradient communication runs inside the backward
    (:func:`graphs_fit_communication`).
    """
    if train.compile_mode in settings.CUDA_GRAPH_MODES and not graphs_fit_communication(
        train, dist
    ):
        communication, fix = (
            ("--parallel fsdp", "--parallel ddp")
            if train.parallel == "fsdp"
            else ("--grad-sync ddp", "--grad-sync auto (gradients all-reduced after the backward)")
        )
        raise RunConfigError(
            f"--compile-mode {train.compile_mode} replays the step as CUDA graphs, but under "
            f"torchrun {communication} communicates inside the backward, which graphs cannot "
            f"hold; use {fix} or --compile-mode default"
        )
    if train.compile_mode != "auto":
        return train.compile_mode
    graphs = dist.device.type == "cuda" and graphs_fit_communication(train, dist)
    return "reduce-overhead" if graphs else "default"


def uses_training_graph(train: TrainSection, dist: DistInfo, config: UNetConfig) -> bool:
    """Whether the step's forward and backward are replayed as CUDA graphs
    (:class:`~diffunet.accel.training_graph.CUDAGraphTraining`).

    `train.cuda_graph: auto` does so in uncompiled CUDA runs of models without gradient
    checkpointing whose communication allows it (:func:`graphs_fit_communication`): a
    compiled run records its own graphs (`--compile-mode`), and checkpointing's recomputation
    cannot be recorded.
    """
    return (
        train.cuda_graph == "auto"
        and not train.compile
        and dist.device.type == "cuda"
        and graphs_fit_communication(train, dist)
        and not config.use_checkpoint
    )


def resolve_grad_sync(train: TrainSection, graphed: bool) -> str:
    """How a replicated run averages gradients: `auto` → after the backward exactly when the
    step replays as CUDA graphs (DDP's hooks cannot fire inside them), else DDP."""
    if train.grad_sync != "auto":
        return train.grad_sync
    return "after-backward" if graphed else "ddp"


def same_model_config(saved: Any, config: UNetConfig) -> bool:
    """Whether the model config a training state saved (a dict) is `config`; fields added to
    `UNetConfig` since the state was written take their defaults."""
    if not isinstance(saved, dict):
        return False
    try:
        return UNetConfig.from_dict(saved) == config
    except InvalidValueError:
        return False


def data_fields(data: TensorDataset) -> dict[str, Any]:
    """The model-config fields that the data decides."""
    size = data.spatial_size
    return {
        "dims": data.dims,
        "in_channels": data.channels,
        "out_channels": data.channels,
        "cond_channels": data.cond_channels,
        "image_size": size[0] if len(set(size)) == 1 else list(size),
        "num_classes": data.num_classes,
    }


class DataOrder:
    """Which samples step `s` trains on: epoch `s // steps_per_epoch` of seeded permutations.

    The global batch of a step is the same whatever the number of processes; rank `r` of `W`
    takes its `r`-th contiguous slice. The last incomplete batch of each epoch is dropped.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        if batch_size > num_samples:
            raise RunConfigError(
                f"--batch-size {batch_size} is larger than the {num_samples} "
                "training samples; use a batch size of at most "
                f"{num_samples}"
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.steps_per_epoch = num_samples // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of `step`."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int) -> torch.Tensor:
        """Indices of the global batch of `step`."""
        epoch, index = self.position(step)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(step_seed(self.seed, epoch, stream=7))
            self._epoch, self._perm = epoch, torch.randperm(self.num_samples, generator=generator)
        return self._perm[index * self.batch_size : (index + 1) * self.batch_size]


#: The largest data set a run keeps on its GPU, as a share of the GPU's memory.
RESIDENT_DATA_SHARE = 0.05


def resident_on(data: TensorDataset, device: torch.device) -> bool:
    """Whether a run on `device` keeps `data` there: on a GPU, when the data set takes at most
    `RESIDENT_DATA_SHARE` of its memory. Each batch is then picked and scaled on the GPU, and a
    step does no per-sample work on the host, where under `torchrun` each process computes with
    one thread (`OMP_NUM_THREADS=1`) and that work would bound the step (docs/performance.md,
    "Multi-GPU scaling")."""
    if device.type != "cuda":
        return False
    return (
        data.nbytes <= RESIDENT_DATA_SHARE * torch.cuda.get_device_properties(device).total_memory
    )


def lr_factor(step: int, warmup: int, total: int, decay: bool) -> float:
    """Linear warm-up over `warmup` steps, then constant or cosine decay to 10%."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if not decay:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    steps: int
    seconds: float
    checkpoint: Path
    grid: Path | None
    scores: dict[str, Any] | None
    interrupted: int = 0  # the signal (SIGTERM, SIGINT) that stopped the run early, if any


class Trainer:
    """Trains a :class:`UNet` on a :class:`TensorDataset` as a :class:`RunConfig` describes.

    Only rank 0 writes files and logs; `resume_state` (from :func:`load_training_state`)
    continues a run exactly.
    """

    def __init__(
        self,
        run: RunConfig,
        data: TensorDataset,
        run_dir: Path,
        dist: DistInfo,
        *,
        resume_state: dict[str, Any] | None = None,
        stream=None,
    ) -> None:
        self.run, self.data, self.run_dir, self.dist = run, data, Path(run_dir), dist
        self.stream = stream
        t, device = run.train, dist.device
        self.precision = resolve_precision(t.precision, device)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if t.batch_size % dist.world_size:
            raise RunConfigError(
                f"--batch-size {t.batch_size} is the global batch and must be "
                f"divisible by the {dist.world_size} processes"
            )
        self.local_batch = t.batch_size // dist.world_size
        self.order = DataOrder(len(data), t.batch_size, t.seed)
        # Where batches are picked from: a copy on the GPU when the data set is small enough,
        # so a step does no per-sample work on the host (see `resident_on`).
        self.batch_source = data.to(device) if resident_on(data, device) else data

        # Model (float32 master weights), identical on every rank; EMA in float32.
        self.model_config = run.model_config(data_fields(data))
        torch.manual_seed(t.seed)
        self.model = accelerate(UNet(self.model_config).to(device))
        self.compile_mode = resolve_compile_mode(t, dist) if t.compile else None
        self.graphed = uses_training_graph(t, dist, self.model_config)
        replayed = self.graphed or (
            device.type == "cuda" and self.compile_mode in settings.CUDA_GRAPH_MODES
        )
        self.layout: Replicated | Sharded = (
            Sharded(self.model, dist)
            if t.parallel == "fsdp" and dist.enabled
            else Replicated(self.model, dist, grad_sync=resolve_grad_sync(t, replayed))
        )
        self.net = self.layout.net
        if self.graphed:
            self.net = CUDAGraphTraining(self.net)
        if self.compile_mode is not None:
            self.layout.prepare_compile()
            settings.configure_for_compile_mode(self.compile_mode)
            cache_compiled_functions()  # a resumed run loads its graphs
            self.net = torch.compile(
                self.net, mode=None if self.compile_mode == "default" else self.compile_mode
            )

        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=t.lr,
            weight_decay=t.weight_decay,
            fused=device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup, t.steps, t.lr_decay)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

        d = run.diffusion
        labelled = self.model_config.num_classes is not None and data.labels is not None
        self.cond_drop_prob = (
            (DEFAULT_COND_DROP if labelled else 0.0)
            if d.cond_drop_prob is None
            else d.cond_drop_prob
        )
        # Conditioning dropout is drawn here for the global batch (see _batch), not in the loss.
        self.diffusion = make_process(
            d.process,
            schedule=d.schedule,
            timesteps=d.timesteps,
            prediction=d.prediction,
            min_snr_gamma=d.min_snr_gamma,
            zero_terminal_snr=d.zero_terminal_snr,
        )
        if run.sample.sampler is None:  # the process's own default
            run.sample.sampler = DEFAULT_SAMPLERS[d.process]
        if run.sample.steps is None:  # about 20 network evaluations
            run.sample.steps = default_steps(run.sample.sampler)
        self.step = 0
        self.saved_step: int | None = None  # the step of the last checkpoint on disk
        self.watch = NonFiniteWatch(device, t.log_every, dist)  # checked at every log line
        self.show_progress = False  # a sampling bar: for the final grid on a terminal only
        if resume_state is not None:
            self._load_state(resume_state)
            self.saved_step = self.step

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Run from the current step to `train.steps`; return what was produced."""
        t, dist = self.run.train, self.dist
        log = RunLog(
            self.run_dir,
            start_step=self.step,
            total_steps=t.steps,
            enabled=dist.is_main,
            stream=self.stream,
        )
        log.message(self._banner())
        start = time.perf_counter()
        self.model.train()
        stops = StopSignals(dist)
        grid = scores = None
        try:
            with stops:
                self._loop(log, stops)
            if not stops.signum:  # the evaluation is not worth a preemption's grace period
                grid, scores = self.finish(log)
        finally:
            log.close()
        seconds = time.perf_counter() - start
        checkpoint = self.run_dir / CHECKPOINT_DIR
        return TrainResult(self.run_dir, self.step, seconds, checkpoint, grid, scores, stops.signum)

    def _loop(self, log: RunLog, stops: StopSignals) -> None:
        """The steps from the current one to the last, then the final checkpoint; a stop request
        (agreed by every rank) ends it early with a checkpoint of the step just finished."""
        t, dist = self.run.train, self.dist
        loss_sum, loss_count = torch.zeros((), device=dist.device), 0
        grad_norm: torch.Tensor | None = None
        cuda_graphs = self.compile_mode in settings.CUDA_GRAPH_MODES
        # With fp16 the grad scaler skips steps with inf gradients on purpose: watch the loss only.
        watch_gradients = not self.scaler.is_enabled()
        while self.step < t.steps:
            if cuda_graphs:  # this step's graph replays may overwrite the last step's
                torch.compiler.cudagraph_mark_step_begin()
            batch = self._batch(self.step)
            with torch.autocast(
                dist.device.type,
                dtype=self.autocast_dtype,
                enabled=self.autocast_dtype is not None,
                cache_enabled=not self.graphed,  # graphs record the casts themselves
            ):
                loss = self.diffusion.loss(
                    self.net,
                    batch["x"],
                    cond=batch.get("cond"),
                    labels=batch.get("labels"),
                    **{self._times_argument: batch["times"]},
                    noise=batch["noise"],
                    generator=batch["generator"],
                )
            self.scaler.scale(loss).backward()
            self.layout.sync_gradients()
            self.scaler.unscale_(self.optimizer)
            if t.grad_clip > 0:
                grad_norm = self.layout.clip_gradients(t.grad_clip)
            elif watch_gradients:
                grad_norm = self.layout.gradient_norm()
            self.watch.observe(self.step + 1, loss, grad_norm if watch_gradients else None)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.layout.update_ema(self.run.train.ema_decay)
            self.step += 1
            loss_sum += loss.detach()
            loss_count += 1
            log.tick(self.step)

            last = self.step == t.steps
            if self.step % t.log_every == 0 or last:
                self.check_finite()
                values = {
                    "loss": float(mean_over_ranks(loss_sum / loss_count, dist)),
                    "lr": self.scheduler.get_last_lr()[0],
                }
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                log.step(self.step, values, log_line=True)
                loss_sum.zero_()
                loss_count = 0
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and not last:
                self.save_checkpoint()
            if t.sample_every and self.step % t.sample_every == 0 and not last:
                path = self.save_samples(f"step_{self.step:07d}.png")
                if path is not None:
                    log.message(f"samples: {path}")
            if stops.stop_now():
                break
        stops.finish()
        if self.saved_step != self.step:
            self.save_checkpoint()
        if not dist.enabled and stops.received:  # a signal during the final checkpoint
            stops.signum = stops.received

    @property
    def _times_argument(self) -> str:
        """How the process's `loss` takes fixed times: discrete steps or continuous times."""
        return "timesteps" if isinstance(self.diffusion, Diffusion) else "times"

    def ema_model(self) -> UNet | None:
        """The EMA weights as a plain :class:`UNet` on this rank's device.

        With `--parallel fsdp` they are gathered from the shards: a collective that every rank
        calls, and only rank 0 gets the model (the others None).
        """
        return self.layout.ema_model()

    # ------------------------------------------------------------------ one batch
    def _batch(self, step: int) -> dict[str, Any]:
        """This rank's slice of the global batch of `step`, with its random draws.

        The draws are made for the whole global batch, so they do not depend on the number of
        processes. On a GPU the noise is drawn there (from its own seeded generator), so a step
        neither fills a large tensor on the host nor copies it over.
        """
        seed, device = self.run.train.seed, self.dist.device
        generator = torch.Generator().manual_seed(step_seed(seed, step))
        seed_global_generators(step_seed(seed, step, stream=1 + self.dist.rank), device)  # dropout
        indices = self.order.indices(step)
        size = len(indices)
        shard = slice(self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)
        shape = (size, *self.data.x.shape[1:])
        if isinstance(self.diffusion, Diffusion):
            times = torch.randint(0, self.diffusion.num_timesteps, (size,), generator=generator)
        else:
            times = self.diffusion.sample_training_times(size, generator)
        if device.type == "cuda":
            noise_generator = torch.Generator(device).manual_seed(step_seed(seed, step, stream=3))
            noise = torch.randn(shape, generator=noise_generator, device=device)[shard]
        else:
            noise = torch.randn(shape, generator=generator)[shard]
        out = self.batch_source.batch(indices[shard], device)
        out["times"] = move(times[shard], device)
        if "labels" in out and self.model_config.num_classes is None:
            del out["labels"]  # labelled data, unconditional model
        if "labels" in out and self.cond_drop_prob > 0:
            _, labels = drop_conditioning(
                None,
                self.data.labels[indices],
                self.cond_drop_prob,
                self.model.null_label,
                generator,
            )
            out["labels"] = move(labels[shard], device)
        out["noise"] = noise
        # Only continuous noise-level models draw from this one inside the loss.
        out["generator"] = torch.Generator().manual_seed(
            step_seed(seed, step, stream=100 + self.dist.rank)
        )
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The training state (see :mod:`diffunet.training.state`); with `--parallel fsdp` a
        collective that gathers full tensors to rank 0 (the others get no tensors)."""
        epoch, position = self.order.position(self.step)
        return {
            "step": self.step,
            "parallel": self.layout.parallel,
            **self.layout.states(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
            "data_order": {
                "epoch": epoch,
                "batch_in_epoch": position,
                "seed": self.order.seed,
                "batch_size": self.order.batch_size,
                "num_samples": self.order.num_samples,
            },
            "model_config": self.model_config.to_dict(),
            "run_config": self.run.to_dict(),  # what config.yaml says, to check it on resume
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        if not same_model_config(state.get("model_config"), self.model_config):
            raise RunConfigError(
                "the training state in the run folder was written for a different "
                "model config than config.yaml describes; do not edit config.yaml "
                "of a run, start a new run instead"
            )
        order = state["data_order"]
        if (order["batch_size"], order["num_samples"]) != (self.order.batch_size, len(self.data)):
            raise RunConfigError(
                f"the run was trained with batch size {order['batch_size']} on "
                f"{order['num_samples']} samples; now {self.order.batch_size} on {len(self.data)}. "
                "Resume with the same data and --batch-size"
            )
        written = state.get("parallel", "replicated")
        if written != self.layout.parallel:
            raise RunConfigError(
                f"the run was trained {'with' if written == 'fsdp' else 'without'} --parallel "
                f"fsdp across processes; resume it the same way (its optimizer state is "
                f"{'keyed by parameter name' if written == 'fsdp' else 'per process'})"
            )
        self.layout.load_states(state, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self._set_peak_lr(self.run.train.lr)  # --lr may change on --resume
        self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])

    def check_finite(self) -> None:
        """Raise :class:`TrainingError` if a step so far had a NaN/inf loss or gradient norm
        (one host sync; a collective under torchrun)."""
        bad_step = self.watch.first_bad_step()
        if bad_step is not None:
            raise self._diverged(f"the loss or gradient norm became NaN/inf at step {bad_step}")

    def _diverged(self, what: str) -> TrainingError:
        t = self.run.train
        if self.saved_step is None:
            kept = "no checkpoint had been written yet, so start a new run"
        else:
            kept = (
                f"nothing after step {self.saved_step} was saved, and its checkpoint and training "
                f"state are intact: `diffunet train --resume --out {self.run_dir}` continues "
                "from there (--lr may change on --resume)"
            )
        fixes = [f"a lower --lr (now {t.lr:g})"]
        if t.grad_clip <= 0:
            fixes.append("--grad-clip 1")
        if self.precision != "fp32":
            fixes.append("--precision fp32")
        tried = ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1]
        return TrainingError(f"{what}; {kept}; try {tried}")

    def _set_peak_lr(self, lr: float) -> None:
        """Make `lr` the schedule's peak rate from the current step on (the loaded scheduler
        and optimizer states carry the rate the run was started with)."""
        t = self.run.train
        self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
        factor = lr_factor(self.scheduler.last_epoch, t.warmup, t.steps, t.lr_decay)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = lr, lr * factor

    def save_checkpoint(self) -> None:
        """EMA weights as a checkpoint folder, then the training state (the commit point).

        Nothing is written if a step diverged or the state holds a NaN or inf: the last good
        checkpoint stays, and :class:`TrainingError` says so.
        """
        self.check_finite()
        if self.layout.gathers or self.dist.is_main:  # gathering shards takes every rank
            state = self.state_dict()
        bad: list[str] = []
        if self.dist.is_main:
            bad = nonfinite_tensors({k: state[k] for k in ("model", "ema", "optimizer")})
        if broadcast_flag(bool(bad), self.dist):
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise self._diverged(f"the training state holds NaN/inf at step {self.step} ({shown})")
        if self.dist.is_main:
            ema = self.layout.checkpoint_model(state)
            folder = self.run_dir / CHECKPOINT_DIR
            save_pretrained(ema, folder)
            meta = json.dumps(self.run_meta(), indent=2)
            atomic_write_bytes(folder / RUN_META, lambda tmp: Path(tmp).write_text(meta + "\n"))
            save_training_state(self.run_dir / STATE_NAME, state)
        barrier(self.dist)
        self.saved_step = self.step

    def run_meta(self) -> dict[str, Any]:
        """What `diffunet sample` needs besides the weights: diffusion and sampling settings."""
        d, s = self.run.diffusion, self.run.sample
        return {
            "step": self.step,
            "diffusion": {
                "process": d.process,
                "schedule": d.schedule,
                "timesteps": d.timesteps,
                "prediction": d.prediction,
                "zero_terminal_snr": d.zero_terminal_snr,
                "cond_drop_prob": self.cond_drop_prob,
            },
            "sample": {
                "sampler": s.sampler,
                "steps": s.steps,
                "eta": s.eta,
                "guidance": s.guidance,
            },
            "data": self.data.describe(),
        }

    # ------------------------------------------------------------------ samples and the end
    @torch.no_grad()
    def sample(
        self,
        num: int,
        seed: int,
        model: UNet | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`num` samples of `model` (default: the EMA model) in [0, 1] (labels cycle through
        the classes)."""
        s = self.run.sample
        model = self.ema_model() if model is None else model
        labels = cond = None
        if self.model_config.num_classes is not None:
            labels = torch.arange(num) % self.model_config.num_classes
        if self.data.cond is not None:
            cond = self.data.cond[torch.arange(num) % len(self.data)] * 2 - 1
        guidance = s.guidance if labels is not None else 1.0
        generator = torch.Generator().manual_seed(seed)
        shape = (num, self.model_config.in_channels, *self.data.spatial_size)
        x = self.diffusion.sample(
            model,
            shape,
            sampler=s.sampler,
            steps=s.steps,
            eta=s.eta,
            guidance=guidance,
            cond=cond,
            labels=labels,
            generator=generator,
            progress=self.show_progress,
            device=self.dist.device,
            cuda_graph=False,
        )  # a recording would hold memory all run
        return ((x.float().cpu() + 1) / 2).clamp(0, 1), labels

    def save_samples(self, name: str, samples: torch.Tensor | None = None) -> Path | None:
        """Write a PNG grid of samples (rank 0); conditional runs show input | sample | target."""
        ema = self.ema_model() if samples is None else None  # with fsdp every rank gathers
        if not self.dist.is_main:
            return None
        num = self.grid_size()
        if samples is None:
            samples, _ = self.sample(num, seed=self.run.train.seed + 12345, model=ema)
        samples = samples[:num]
        nrow, titles = self.model_config.num_classes or None, None
        if self.data.cond is not None:
            index = torch.arange(num) % len(self.data)
            triples = [
                to_image_tiles(self.data.cond[index]),
                to_image_tiles(samples),
                to_image_tiles(self.data.x[index]),
            ]
            channels = max(t.shape[1] for t in triples)
            samples = torch.stack([t.expand(-1, channels, -1, -1) for t in triples], 1).flatten(
                0, 1
            )
            nrow, titles = 6, ["input", "sample", "target"]
        scale = max(1, 64 // max(samples.shape[-1], 1)) if samples.ndim == 4 else 1
        return save_grid(
            samples,
            self.run_dir / SAMPLES_DIR / name,
            nrow=nrow,
            scale=min(scale, 4),
            column_titles=titles if samples.ndim == 4 else None,
        )

    def grid_size(self) -> int:
        """Samples per grid: `sample.num`, 8 pairs for conditional runs, and at most
        `CPU_VOLUME_GRID` volumes on a CPU (where each 3D sample costs seconds)."""
        if self.data.cond is not None:
            return 8
        if self.data.dims == 3 and self.dist.device.type == "cpu":
            return min(self.run.sample.num, CPU_VOLUME_GRID)
        return self.run.sample.num

    def finish(self, log: RunLog) -> tuple[Path | None, dict[str, Any] | None]:
        """The final grid and, for the digits, the evaluation numbers (rank 0), defined as
        `diffunet eval --from RUN` defines them (:mod:`diffunet.apps.evaluation`)."""
        grid = scores = None
        ema = self.ema_model()  # with --parallel fsdp, every rank takes part in gathering it
        if self.dist.is_main:
            started = time.perf_counter()
            if self.grid_size() < self.run.sample.num:
                log.message(
                    f"final grid: {self.grid_size()} of sample.num={self.run.sample.num} "
                    "volumes (3D samples are slow on a CPU)"
                )
            self.show_progress = sys.stderr.isatty()
            samples, _ = self.sample(self.grid_size(), seed=self.run.train.seed + 12345, model=ema)
            self.show_progress = False
            grid = self.save_samples("final.png", samples)
            log.message(f"samples: {grid} ({time.perf_counter() - started:.1f} s)")
            evaluate = (
                self.run.train.eval and self.data.source == "digits" and self.model_config.dims == 2
            )
            if evaluate and ema is not None:
                loaded = LoadedModel(
                    ema, self.diffusion, self.run_dir / CHECKPOINT_DIR, self.run_meta()["sample"]
                )
                scores, result, _ = evaluate_model(loaded)
                scores["step"] = self.step
                text = json.dumps(scores, indent=2)
                atomic_write_bytes(
                    self.run_dir / EVAL_NAME, lambda tmp: Path(tmp).write_text(text + "\n")
                )
                log.scalar("eval/digits_frechet_distance", result.frechet_distance, self.step)
                if result.accuracy is not None:
                    log.scalar("eval/recognisability", result.accuracy, self.step)
                log.message(f"eval: {result.summary()} ({describe(scores)})")
        barrier(self.dist)
        return grid, scores

    def _banner(self) -> str:
        c, t = self.model_config, self.run.train
        where = " (held on the GPU)" if self.batch_source is not self.data else ""
        return (
            f"diffunet train: {self.model.num_parameters():,} parameters ({self.run.preset}, "
            f"dims {c.dims}, {c.in_channels} ch, size {c.image_size}), {len(self.data)} samples "
            f"from {self.data.source}{where}, {t.steps} steps × batch {t.batch_size} on "
            f"{self.dist.world_size}× {self.dist.device.type}"
            f"{self.layout.describe()}, {self.precision}"
            f"{self._compiled()}, from step {self.step} → {self.run_dir}"
        )

    def _compiled(self) -> str:
        if self.graphed:
            return ", CUDA graphs"
        if self.compile_mode is None:
            return ""
        return ", compiled" + ("" if self.compile_mode == "default" else f" ({self.compile_mode})")
