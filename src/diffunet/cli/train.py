"""Train a diffusion U-Net. With no options: a small model on the embedded handwritten digits.

Settings come from defaults ← `--config FILE.yaml` ← command-line options; model fields can be
overridden as KEY=VALUE after the options (`diffunet train --preset ldm model_channels=64`).
Everything is checked before the run folder is created, so a bad option or file never leaves a
half-written run. `--resume` continues the run in `--out` exactly where its last checkpoint
left it. Under `torchrun --nproc_per_node=N` the same command trains data-parallel.

One process owns a run folder (a lock, `train.lock`, released by the system when the process
ends). SIGTERM or Ctrl-C saves the current step and exits 143 / 130 with the resume command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from diffunet.accel.layout import enable_cudnn_autotuning
from diffunet.apps.generate import CHECKPOINT_DIR
from diffunet.data import TASKS, open_dataset
from diffunet.diffusion.processes import PROCESSES
from diffunet.errors import TrainingError
from diffunet.model.checkpoint import atomic_write_bytes, remove_temp_files
from diffunet.training import distributed
from diffunet.training.run_config import (
    COMPILE_MODES,
    DEVICES,
    GRAD_SYNC_MODES,
    PARALLEL_MODES,
    PRECISIONS,
    SAMPLERS,
    RunConfig,
    RunConfigError,
    from_dict,
    load_yaml,
    merge,
    parse_override,
    plain,
    recorded,
)
from diffunet.training.run_lock import LOCK_NAME, RunLock
from diffunet.training.state import STATE_NAME, load_training_state
from diffunet.training.trainer import CONFIG_YAML, SAMPLES_DIR, Trainer, resolve_precision

#: (option dest, section, key): the command-line options that map onto config settings.
OPTION_MAP = (
    ("data", "data", "source"),
    ("task", "data", "task"),
    ("image_size", "data", "image_size"),
    ("steps", "train", "steps"),
    ("batch_size", "train", "batch_size"),
    ("lr", "train", "lr"),
    ("seed", "train", "seed"),
    ("precision", "train", "precision"),
    ("device", "train", "device"),
    ("ema_decay", "train", "ema_decay"),
    ("grad_clip", "train", "grad_clip"),
    ("warmup", "train", "warmup"),
    ("checkpoint_every", "train", "checkpoint_every"),
    ("sample_every", "train", "sample_every"),
    ("log_every", "train", "log_every"),
    ("threads", "train", "threads"),
    ("parallel", "train", "parallel"),
    ("compile_mode", "train", "compile_mode"),
    ("cuda_graph", "train", "cuda_graph"),
    ("grad_sync", "train", "grad_sync"),
    ("process", "diffusion", "process"),
    ("sampler", "sample", "sampler"),
    ("sample_steps", "sample", "steps"),
    ("guidance", "sample", "guidance"),
)
#: Settings that define a run; `--resume` refuses to change them.
IDENTITY = {
    ("diffusion", "process"),
    ("data", "source"),
    ("data", "image_size"),
    ("data", "task"),
    ("train", "batch_size"),
    ("train", "seed"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffunet train`."""
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="model config overrides, e.g. model_channels=64 channel_mult=[1,2,2]",
    )
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="run config (sections preset, model, "
        "data, diffusion, train, sample); options below override it",
    )
    parser.add_argument(
        "--preset",
        metavar="NAME",
        help="model preset (default: a 1.1M-parameter "
        "ddpm-cifar10-style U-Net for the digits); see `diffunet info`",
    )
    parser.add_argument(
        "--data",
        metavar="digits|em-pairs|PATH",
        help="'digits' (default), 'em-pairs' (embedded noisy → clean pairs; the "
        "default for --task restore), an image folder, a paired folder with "
        "input/ and target/, or .npy/.npz arrays",
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        help="restore: learn input → target from paired data (default preset "
        "emdiffuse); generate: learn to draw samples (pairs: the targets only); "
        "default: restore for paired data, else generate",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="training size (image folders are resized and centre-cropped, pairs "
        "randomly cropped at native resolution; default 16 for the digits, 32 "
        "for image folders, 64 for paired images and em-pairs)",
    )
    parser.add_argument("--steps", type=int, metavar="N", help="optimizer steps (default 1500)")
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="global batch size, split over processes (default 64)",
    )
    parser.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (default 2e-3)")
    parser.add_argument("--seed", type=int, metavar="N", help="random seed (default 0)")
    parser.add_argument(
        "--out", metavar="DIR", help="run folder (default: a new folder under runs/)"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="N",
        help="write a checkpoint every N steps (default 500; one is always written at the end)",
    )
    parser.add_argument(
        "--sample-every",
        type=int,
        metavar="N",
        help="write a sample grid every N steps (default 500; 0 = only at the end)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="autocast dtype with float32 master weights (default auto: bf16 "
        "where the device supports it, else fp32)",
    )
    parser.add_argument("--device", choices=DEVICES, help="default auto: CUDA when available")
    parser.add_argument(
        "--ema-decay",
        type=float,
        metavar="D",
        help="EMA decay (default 0.995, warmed up as min(D, (1+n)/(10+n)))",
    )
    parser.add_argument(
        "--grad-clip",
        type=float,
        metavar="NORM",
        help="clip the gradient norm (default 1.0; 0 = off)",
    )
    parser.add_argument(
        "--warmup", type=int, metavar="N", help="linear LR warm-up steps (default 100)"
    )
    parser.add_argument(
        "--process",
        choices=PROCESSES,
        help="flow: flow matching (rectified flow, SD3; default); ddpm: discrete diffusion; "
        "edm: Karras et al.'s EDM (docs/processes.md)",
    )
    parser.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help="sampler for grids and, later, `diffunet sample` (default: heun; dpm++ for ddpm)",
    )
    parser.add_argument(
        "--sample-steps",
        type=int,
        metavar="N",
        help="sampling steps (default: 10 for heun, which evaluates the model twice a step, "
        "else 20)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        metavar="S",
        help="classifier-free guidance for grids of class-conditional models",
    )
    parser.add_argument("--log-every", type=int, metavar="N", help="log every N steps (default 50)")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads per process (default: the cores / processes per node)",
    )
    parser.add_argument(
        "--no-eval", action="store_true", help="skip the digits evaluation at the end"
    )
    parser.add_argument(
        "--parallel",
        choices=PARALLEL_MODES,
        help="under torchrun: ddp replicates the model on every process (default); "
        "fsdp shards parameters, gradients, optimizer state and EMA across them, "
        "for models whose training state does not fit one device",
    )
    parser.add_argument(
        "--grad-sync",
        choices=GRAD_SYNC_MODES,
        help="under torchrun with --parallel ddp: ddp all-reduces gradients during the "
        "backward (DDP's hooks), after-backward all at once when it is done, which lets "
        "the step replay as CUDA graphs; default: auto, after-backward exactly when the step "
        "is replayed as CUDA graphs",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model for training (pays off on GPUs for runs "
        "longer than the minute or two it takes to compile)",
    )
    parser.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_const",
        const="off",
        help="launch the uncompiled step kernel by kernel; by default a GPU run records its "
        "forward and backward as CUDA graphs and replays them",
    )
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        help="implies --compile; reduce-overhead also records the step's forward "
        "and backward as CUDA graphs (on a GPU, not with --parallel fsdp or --grad-sync "
        "ddp under torchrun); default: auto, which records them where they can be and "
        "compiles in the default mode elsewhere (the CPU, FSDP, DDP's hooks)",
    )


def cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, as a partial config mapping."""
    settings: dict[str, Any] = {}
    for dest, section, key in OPTION_MAP:
        value = getattr(args, dest, None)
        if value is not None:
            settings.setdefault(section, {})[key] = value
    if getattr(args, "no_eval", False):
        settings.setdefault("train", {})["eval"] = False
    if getattr(args, "compile", False) or getattr(args, "compile_mode", None):
        settings.setdefault("train", {})["compile"] = True
    if args.preset:
        settings["preset"] = args.preset
    if args.overrides:
        settings["model"] = dict(parse_override(text) for text in args.overrides)
    return settings


def resume_config(run_dir: Path, args: argparse.Namespace, settings: dict[str, Any]) -> RunConfig:
    """The stored config of `run_dir` with the allowed command-line changes applied."""
    if args.config:
        raise RunConfigError("--resume takes the config from the run folder; drop --config")
    path = run_dir / CONFIG_YAML
    if path.is_file():
        stored = load_yaml(path, record=True)
    elif (run_dir / STATE_NAME).is_file() and "run_config" in (
        saved := load_training_state(run_dir / STATE_NAME)
    ):
        print(
            f"diffunet train: {run_dir} has no {CONFIG_YAML}; resuming with the config saved "
            f"in {STATE_NAME}",
            file=sys.stderr,
        )
        path = run_dir / STATE_NAME
        stored = from_dict(saved["run_config"], source=str(path), record=True)
    else:
        raise RunConfigError(
            f"nothing to resume in {run_dir}: it has no {CONFIG_YAML}; start a new "
            "run without --resume"
        )
    stored_dict = stored.to_dict()
    for section, values in settings.items():
        if section == "preset":
            if values != stored.preset:
                raise RunConfigError(
                    f"--preset {values} differs from the run's preset "
                    f"{stored.preset}; a resumed run keeps its model"
                )
            continue
        if section == "model":
            for key, value in values.items():
                if stored.model.get(key) != value:
                    raise RunConfigError(
                        f"model override {key}={value!r} differs from the run's "
                        f"{key}={stored.model.get(key)!r}; a resumed run keeps its model"
                    )
            continue
        for key, value in values.items():
            if (section, key) in IDENTITY and stored_dict[section][key] not in (None, value):
                raise RunConfigError(
                    f"{section}.{key}={value!r} differs from the resumed run's "
                    f"{stored_dict[section][key]!r}; resume with the same value "
                    "or start a new run"
                )
    changes = {k: v for k, v in settings.items() if k not in ("preset", "model")}
    return from_dict(merge(stored_dict, changes), source=str(path))


def new_config(args: argparse.Namespace, settings: dict[str, Any]) -> RunConfig:
    """Defaults ← `--config` YAML ← command line."""
    base: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        load_yaml(path)  # validates keys, with a one-line error for bad YAML
        base = yaml.safe_load(path.read_text()) or {}
    return from_dict(merge(base, settings), source=args.config or "command line")


def default_run_dir(source: str) -> Path:
    """A fresh folder under `runs/`: `runs/<date>-<time>-<data name>`."""
    name = "digits" if source == "digits" else Path(source).stem or "data"
    base = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def check_new_run_dir(run_dir: Path) -> None:
    """A new run may use a missing or empty folder, or one that never got past its config."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunConfigError(f"--out {run_dir} exists and is not a folder")
    if (run_dir / STATE_NAME).exists():
        raise RunConfigError(
            f"--out {run_dir} already holds a run; pass --resume to continue it or "
            "choose another --out"
        )
    if any(p.name != LOCK_NAME for p in run_dir.iterdir()) and not (run_dir / CONFIG_YAML).exists():
        raise RunConfigError(
            f"--out {run_dir} is a non-empty folder that is not a diffunet run; "
            "choose a new or empty folder"
        )


#: The settings a run keeps for its whole life (those compared with the copy in the state file).
STABLE_SECTIONS = ("preset", "model", "data", "diffusion")


def check_config_against_state(run_dir: Path, config: RunConfig, state: dict[str, Any]) -> None:
    """Refuse a `config.yaml` whose lasting settings differ from the copy saved with the
    training state (a truncated or edited file would otherwise change the run)."""
    saved = state.get("run_config")
    if saved is None:  # a state written before the copy was kept
        return
    saved = recorded(saved)
    here = config.to_dict()
    keys = [(name, None) for name in STABLE_SECTIONS] + sorted(IDENTITY)
    differences = []
    for section, key in keys:
        if key is None and isinstance(here[section], dict):
            names = sorted(set(here[section]) | set(saved.get(section) or {}))
            pairs = [
                (f"{section}.{k}", here[section].get(k), (saved.get(section) or {}).get(k))
                for k in names
            ]
        elif key is None:
            pairs = [(section, here[section], saved.get(section))]
        else:
            pairs = [(f"{section}.{key}", here[section][key], (saved.get(section) or {}).get(key))]
        differences += [
            f"{name} {a!r} there, {b!r} saved" for name, a, b in pairs if plain(a) != plain(b)
        ]
    if differences:
        shown = "; ".join(differences[:4]) + (
            f"; {len(differences) - 4} more" if len(differences) > 4 else ""
        )
        raise RunConfigError(
            f"{run_dir / CONFIG_YAML} does not match the run's config saved in {STATE_NAME} "
            f"({shown}): it was truncated or edited. Restore it, or delete it to resume with "
            "the saved copy (change settings with command-line options, not by editing it)"
        )


def claim_run_dir(run_dir: Path, lock: RunLock, info: distributed.DistInfo, new: bool) -> None:
    """Rank 0 takes the run folder's lock, checks again under it that a `new` run may use the
    folder, and removes the temporary files that killed writes left; every rank learns whether
    it got the folder (and raises the same one-line error if not)."""
    message = None
    if info.is_main:
        try:
            lock.acquire()
            if new:
                check_new_run_dir(run_dir)
        except (TrainingError, RunConfigError) as err:
            message = str(err)
        else:
            stale = [
                path
                for folder in (run_dir, run_dir / CHECKPOINT_DIR, run_dir / SAMPLES_DIR)
                for path in remove_temp_files(folder)
            ]
            if stale:
                print(
                    f"diffunet train: removed {len(stale)} temporary file(s) that an "
                    "interrupted write left behind",
                    file=sys.stderr,
                )
    if info.enabled:
        holder = [message]
        torch.distributed.broadcast_object_list(holder, src=0)
        message = holder[0]
    if message is not None:
        raise TrainingError(message)


def _agree_on_run_dir(run_dir: Path, info: distributed.DistInfo) -> Path:
    """Rank 0's default run folder on every rank (timestamps may differ by a second)."""
    if not info.enabled:
        return run_dir
    holder = [str(run_dir)]
    torch.distributed.broadcast_object_list(holder, src=0)
    return Path(holder[0])


def run(args: argparse.Namespace) -> int:
    """Resolve the config, load the data, then train."""
    settings = cli_settings(args)
    if args.resume:
        if not args.out:
            raise RunConfigError("--resume needs --out RUN_DIR, the run to continue")
        run_dir = Path(args.out)
        config = resume_config(run_dir, args, settings)
    else:
        config = new_config(args, settings)
        run_dir = Path(args.out) if args.out else default_run_dir(config.data.source)
        check_new_run_dir(run_dir)
    config.validate()

    info = distributed.setup(config.train.device)
    run_dir = _agree_on_run_dir(run_dir, info)
    lock = RunLock(run_dir)  # rank 0 takes it in _train, as soon as the folder exists
    try:
        return _train(config, run_dir, info, args, lock)
    finally:
        lock.release()
        distributed.cleanup()


def _train(
    config: RunConfig,
    run_dir: Path,
    info: distributed.DistInfo,
    args: argparse.Namespace,
    lock: RunLock,
) -> int:
    if info.device.type == "cpu":
        torch.set_num_threads(config.train.threads or distributed.default_threads(info))
    # A resumed run, or a new one in an existing folder, is locked before anything is read.
    claimed = distributed.broadcast_flag(run_dir.is_dir(), info)
    if claimed:
        claim_run_dir(run_dir, lock, info, new=not args.resume)
    explicit_dims = config.model.get("dims")
    data = open_dataset(
        config.data.source,
        config.data.image_size,
        dims=explicit_dims,
        task=config.data.task,
        seed=config.train.seed,
    )
    config.data.task = config.data.task or ("restore" if data.cond is not None else "generate")
    enable_cudnn_autotuning(info.device, data.dims)
    if config.data.image_size is None and data.dims == 2 and len(set(data.spatial_size)) == 1:
        config.data.image_size = data.spatial_size[0]

    state = None
    if args.resume and (run_dir / STATE_NAME).exists():
        state = load_training_state(run_dir / STATE_NAME)
        check_config_against_state(run_dir, config, state)
    # Everything is validated here (model config, batch size vs data, precision) before any
    # file is written.
    config.train.precision = resolve_precision(config.train.precision, info.device)
    config.train.device = info.device.type
    trainer = Trainer(config, data, run_dir, info, resume_state=state)
    config.model = trainer.model_config.to_dict()
    config.diffusion.cond_drop_prob = trainer.cond_drop_prob

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if not claimed:
        claim_run_dir(run_dir, lock, info, new=not args.resume)
    if info.is_main:
        text = config.to_yaml()
        atomic_write_bytes(run_dir / CONFIG_YAML, lambda tmp: Path(tmp).write_text(text))
        if args.resume and state is None:
            print(
                f"diffunet train: {run_dir} has no checkpoint yet; starting from step 0",
                file=sys.stderr,
            )
    distributed.barrier(info)

    busy = info.device.type == "cpu" and not config.train.threads
    if busy and torch.get_num_threads() < distributed.even_threads(info) and info.is_main:
        print(
            f"diffunet train: other programs keep the CPU busy; training with "
            f"{torch.get_num_threads()} thread(s) per process instead of "
            f"{distributed.even_threads(info)} (choose with --threads N)",
            file=sys.stderr,
        )
    result = trainer.train()
    if result.interrupted:
        if info.is_main:
            print(
                f"interrupted at step {result.steps}; resume with: diffunet train --resume "
                f"--out {result.run_dir}",
                file=sys.stderr,
            )
        return 128 + result.interrupted
    if info.is_main:
        minutes, seconds = divmod(result.seconds, 60)
        print(f"trained {result.steps} steps in {int(minutes)}:{seconds:04.1f} → {result.run_dir}")
        print(f"checkpoint: {result.checkpoint}")
        if result.grid:
            print(f"samples: {result.grid}")
        if result.scores:
            acc = result.scores.get("accuracy")
            print(
                f"digits Fréchet distance: {result.scores['frechet_distance']:.2f}"
                + (f", recognisability: {acc:.1%}" if acc is not None else "")
            )
    return 0
