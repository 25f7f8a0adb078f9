"""Checkpoints in the Hugging Face layout: a folder with `config.json` + `model.safetensors`.

Weights never go through pickle. Loading checks the weights against the config and names
every missing, unexpected, mis-shaped or mis-typed tensor; a missing, truncated or corrupt
file, bad JSON or an invalid config each raise a :class:`CheckpointError` that names the file.
safetensors has no checksum of its own, so `save_pretrained` records a SHA-256 of the tensors
(:func:`weights_digest`) in the file's header and loading verifies it: a changed byte in the
weights is refused instead of loading silently.

`PretrainedMixin` gives a model class built from a `UNetConfig` (`UNet`) its
`save_pretrained` / `from_pretrained` / `push_to_hub`. This module knows no model class, so
`unet.py` can import it; `diffunet.model.load_pretrained` (in `model/__init__.py`) is the
function form, defaulting to `UNet`. Hugging Face Hub ids (`owner/name`) are resolved through
`huggingface_hub` when it is installed and a network is available.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from diffunet.errors import InvalidTypeError, InvalidValueError, StorageError
from diffunet.model.config import ConfigError, UNetConfig

if TYPE_CHECKING:  # for annotations only: importing unet here would be a cycle
    from diffunet.model.unet import UNet

_Model = TypeVar("_Model", bound="PretrainedMixin")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "diffunet"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: The safetensors header metadata key holding :func:`weights_digest` of the file's tensors.
#: Not "sha256": it is a digest of the tensors, not of the file's bytes (`sha256sum` differs).
DIGEST_KEY = "weights_sha256"


class CheckpointError(InvalidValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------- helpers
def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (`module.` from DDP, `_orig_mod.` from torch.compile)."""
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key.replace("._orig_mod.", ".")] = value
    return cleaned


def unwrap_model(model: torch.nn.Module) -> UNet:
    """The `UNet` inside DDP / FSDP / torch.compile / AveragedModel wrappers."""
    seen = 0
    while not isinstance(model, PretrainedMixin):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or seen > 8:
            raise InvalidTypeError(
                f"expected a diffunet UNet (possibly wrapped), got {type(model).__name__}"
            )
        model, seen = inner, seen + 1
    return cast("UNet", model)


TEMP_SUFFIX = ".tmp"
_UMASK = os.umask(0)  # read once: the only way to read it is to set it
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, write: Callable[[str], Any]) -> None:
    """Call `write(tmp_path)` then fsync and rename onto `path`, so readers never see a partial file.

    The temporary file (`.<name>.<random>.tmp` beside `path`) is removed whatever happens. A
    failed write raises :class:`StorageError` saying whether the disk is full or which path
    failed; the previous `path`, if any, is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise StorageError(f"cannot write {path}: {err.strerror or err}") from err
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # as `open` would have made it (mkstemp makes 0o600)
        os.replace(tmp, path)
    except Exception as err:
        storage = _storage_problem(err, path)
        if storage is None:
            raise
        raise StorageError(storage) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _storage_problem(err: BaseException, path: Path) -> str | None:
    """A one-line account of a failed write that is the storage's doing, None for anything else.

    Writers report a full disk differently: an `OSError` with `ENOSPC` (Python), "os error 28"
    (safetensors) or a bare "unexpected pos" (`torch.save`); so the free space is checked too.
    """
    errnos = {getattr(e, "errno", None) for e in (err, err.__cause__, err.__context__)}
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = bool(errnos & {errno.ENOSPC, errno.EDQUOT}) or "os error 28" in str(err)
    if full or (free is not None and free < LOW_DISK_BYTES):
        left = "" if free is None else f" ({free / 2**20:.1f} MiB free)"
        return (
            f"the disk is full: writing {path} failed{left}; free some space or write "
            f"elsewhere (the previous {path.name}, if any, is unchanged)"
        )
    if isinstance(err, OSError):
        return (
            f"writing {path} failed: {err.strerror or err} (the previous {path.name}, if "
            "any, is unchanged)"
        )
    return None


#: Below this much free space, a failed write is reported as a full disk.
LOW_DISK_BYTES = 1 << 20


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write_bytes` left in `folder` when its
    process was killed mid-write; returns them. Call it only while no other process writes
    there (the trainer holds the run folder's lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for stale_file in stale:
        stale_file.unlink(missing_ok=True)
    return stale


def _version() -> str:
    """The installed diffunet's version (read from its package metadata, so this module needs
    nothing above `diffunet.model`)."""
    try:
        return importlib.metadata.version("diffunet")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


# ---------------------------------------------------------------------------- integrity
def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """The SHA-256 (hex) of a state dict's contents, independent of any file layout.

    Tensors are hashed in sorted-name order, each as one JSON line `[name, dtype, shape,
    nbytes]` followed by its raw bytes (read in place for contiguous CPU tensors), so equal
    names, dtypes, shapes and bits give equal digests and any changed byte changes it.
    """
    hasher = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        header = [name, dtype, list(tensor.shape), tensor.numel() * tensor.element_size()]
        hasher.update(json.dumps(header).encode() + b"\n")
        # A flat uint8 view (0-d tensors too) exposes the bytes of any dtype, bf16 included.
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return hasher.hexdigest()


def verify_weights(
    state: dict[str, torch.Tensor], metadata: dict[str, str], path: str | Path
) -> bool:
    """Check `state` against the digest that `save_pretrained` stored in `metadata`.

    Returns True when it matches and False when the file records no digest (other libraries,
    older diffunet); a mismatch raises :class:`CheckpointError` naming `path`.
    """
    recorded = metadata.get(DIGEST_KEY)
    if recorded is None:
        return False
    if weights_digest(state) != recorded:
        raise CheckpointError(
            f"{path} fails its SHA-256 check: the weights changed since they were saved (a "
            "corrupted disk or copy, or an edit); restore the file, or pass verify=False "
            "(CLI: --no-verify) to load it anyway"
        )
    return True


# ---------------------------------------------------------------------------- saving
def save_pretrained(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` for `model` into `directory` (atomically).

    Tensors are stored in the model's own dtype, so `load_pretrained` gives back a
    bit-identical model. The header records their :func:`weights_digest`, written in the
    same atomic write as the tensors, which loading verifies.
    """
    unet = unwrap_model(model)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(
            f"cannot save a checkpoint to {directory}: it is a file, not a folder"
        )
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().contiguous().cpu() for k, v in clean_state_dict(unet.state_dict()).items()
    }
    metadata = {
        "format": "pt",
        "library": FORMAT_TAG,
        "diffunet_version": _version(),
        DIGEST_KEY: weights_digest(state),
    }
    atomic_write_bytes(
        directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata=metadata)
    )
    config_text = unet.config.to_json()
    atomic_write_bytes(
        directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text + "\n")
    )
    return directory


# ---------------------------------------------------------------------------- loading
def resolve_checkpoint(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local folder of a checkpoint: `name_or_path` itself, or a Hub id downloaded.

    Only `config.json` and `model.safetensors` are fetched from the Hub, never pickles.
    """
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is a file; a checkpoint is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
        return path
    if not _HUB_ID.match(str(name_or_path)):
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise CheckpointError(
            f"{name_or_path} is not a local folder; to fetch it from the Hugging Face Hub "
            "install huggingface_hub (pip install huggingface_hub)"
        ) from err
    try:
        folder = snapshot_download(
            str(name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
        )
    except Exception as err:  # network, auth and not-found errors all mean "cannot load"
        raise CheckpointError(
            f"{name_or_path} is not a local folder and could not be fetched from the Hugging "
            f"Face Hub ({type(err).__name__}: {err}); check the id, your network or token"
        ) from err
    return Path(folder)


def load_config(directory: str | Path) -> UNetConfig:
    """Read and validate the `config.json` of a checkpoint folder."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory} is not a folder; a checkpoint is a folder with "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    path = directory / CONFIG_NAME
    if not path.is_file():
        present = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise CheckpointError(
            f"{directory} has no {CONFIG_NAME} (it holds: {present}); a diffunet checkpoint is "
            f"written by save_pretrained and needs both {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err}); restore it or re-save the checkpoint"
        ) from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    class_name = data.get("_class_name")
    if class_name is not None and class_name != "UNet":
        raise CheckpointError(
            f"{path} describes a {class_name} (another library's checkpoint), not a diffunet "
            "UNet; convert it first, e.g. `diffunet convert --from diffusers SRC --out DST`"
        )
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    try:
        return UNetConfig.from_dict(data)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from err


def load_state_dict(path: str | Path, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never pickle), with a clear error for a missing or corrupt one.

    With `verify` (the default), a file that records a :func:`weights_digest` (every
    `save_pretrained` file) must match it, or a :class:`CheckpointError` is raised; files
    without one (other libraries, older diffunet) load unverified.
    """
    path = Path(path)
    if not path.is_file():
        hint = ""
        pickles = sorted(p.name for p in path.parent.glob("*") if p.suffix in _PICKLE_SUFFIXES)
        if path.parent.is_dir() and pickles:
            hint = (
                f"; the folder has pickled weights ({', '.join(pickles)}), which diffunet "
                "never unpickles: convert them with `diffunet convert`"
            )
        raise CheckpointError(f"weights file {path} does not exist{hint}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            # One open for metadata and tensors (a handle is not iterable: keys() is needed).
            state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} ({path.stat().st_size:,} bytes) is not a readable safetensors file "
            f"(truncated or corrupt?): {err}"
        ) from err
    if verify:
        verify_weights(state, metadata, path)
    return state


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header (format, library, version)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err


def _listing(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
    return f"{label}: {shown}"


def check_state_dict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Raise :class:`CheckpointError` naming missing/unexpected/mis-shaped/mis-typed tensors.

    A tensor has the wrong dtype when it is not floating point where the model has a float
    parameter, or when its floating dtype differs from the rest of the file's.
    """
    expected = model.state_dict()
    common = sorted(set(state) & set(expected))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in common
        if state[k].shape != expected[k].shape
    ]
    dtypes = [
        f"{k} is {state[k].dtype}"
        for k in common
        if expected[k].is_floating_point() and not state[k].is_floating_point()
    ]
    float_dtypes = [state[k].dtype for k in common if state[k].is_floating_point()]
    if float_dtypes:
        majority = max(set(float_dtypes), key=float_dtypes.count)
        dtypes += [
            f"{k} is {state[k].dtype} (the rest is {majority})"
            for k in common
            if state[k].is_floating_point() and state[k].dtype != majority
        ]
    problems = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape (file vs config)", shapes),
        ("wrong dtype", dtypes),
    ):
        if items:
            problems.append(_listing(label, items))
    if problems:
        raise CheckpointError(
            f"{source} does not match its config: "
            + "; ".join(problems)
            + ". Was it saved from a different config, or edited? Re-save it with "
            "save_pretrained from the model it belongs to."
        )


def _build_with_weights(
    model_class: type, config: UNetConfig, state: dict[str, torch.Tensor], source: str
) -> torch.nn.Module:
    """Instantiate `model_class(config)` on the meta device and adopt `state` as its tensors."""
    with torch.device("meta"):
        model = model_class(config)
    check_state_dict(model, state, source=source)
    model.load_state_dict(state, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        # A non-persistent buffer is not in the file: build normally and copy instead.
        model = model_class(config)
        model.load_state_dict(state)
    return model


def push_to_hub(
    model: torch.nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload diffunet UNet",
    revision: str | None = None,
) -> str:
    """Save `model` with `save_pretrained` and upload the folder to the Hub; returns the commit URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError as err:
        raise CheckpointError(
            "push_to_hub needs huggingface_hub: pip install huggingface_hub"
        ) from err
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision
        )
    return str(info)


class PretrainedMixin:
    """`save_pretrained` / `from_pretrained` / `push_to_hub` for a model class built from a config.

    `UNet` is `class UNet(PretrainedMixin, nn.Module)`; `from_pretrained` builds `cls`, so
    subclasses load as themselves.
    """

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` + `model.safetensors` into `directory`."""
        return save_pretrained(self, directory)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(
        cls: type[_Model],
        name_or_path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        verify: bool = True,
    ) -> _Model:
        """Build the model described by `config.json` and load its safetensors weights.

        Args:
            name_or_path: a checkpoint folder, or a Hugging Face Hub id (`owner/name`).
            device: where the model is placed.
            dtype: cast the weights to this dtype; None keeps the dtype they were saved in.
            revision, cache_dir, local_files_only, token: passed to `huggingface_hub` for Hub ids.
            verify: check the weights against the SHA-256 recorded when they were saved
                (files without one load unverified); False loads a changed file anyway.
        """
        directory = resolve_checkpoint(
            name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        config = load_config(directory)
        weights = directory / WEIGHTS_NAME
        state = load_state_dict(weights, verify=verify)
        model = _build_with_weights(cls, config, state, str(weights))
        model.to(device=device, dtype=dtype)
        return cast("_Model", model.eval())

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload this model to the Hugging Face Hub as `config.json` + `model.safetensors`."""
        return push_to_hub(self, repo_id, **kwargs)  # type: ignore[arg-type]


__all__ = [
    "CONFIG_NAME",
    "DIGEST_KEY",
    "WEIGHTS_NAME",
    "CheckpointError",
    "PretrainedMixin",
    "atomic_write_bytes",
    "check_state_dict",
    "clean_state_dict",
    "load_config",
    "load_state_dict",
    "push_to_hub",
    "read_metadata",
    "remove_temp_files",
    "resolve_checkpoint",
    "save_pretrained",
    "unwrap_model",
    "verify_weights",
    "weights_digest",
]
