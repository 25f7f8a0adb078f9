"""The training-state file: everything needed to continue a run exactly where it stopped.

One file, `train_state.pt`, written atomically (temp file, fsync, rename) so a kill during a
write leaves the previous state intact. It holds only tensors, numbers, strings, lists and
dicts, so it loads with `torch.load(weights_only=True)`: no arbitrary pickled objects.

Contents: model weights, EMA weights, optimizer, LR scheduler, grad scaler, the step, every
RNG state (torch CPU and CUDA, NumPy, Python) and the data-order position.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffunet.model.checkpoint import CheckpointError, atomic_write_bytes

STATE_NAME = "train_state.pt"
STATE_FORMAT = "diffunet-train-state"
STATE_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors and plain values."""
    np_state = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    key = state["numpy"]["key"].numpy().astype(np.uint32)
    np.random.set_state(
        (
            "MT19937",
            key,
            state["numpy"]["pos"],
            state["numpy"]["has_gauss"],
            state["numpy"]["cached_gaussian"],
        )
    )
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value


def _to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` (plus format tag and version) atomically to `path`."""
    payload = {"format": STATE_FORMAT, "version": STATE_VERSION, **state}
    atomic_write_bytes(path, lambda tmp: torch.save(payload, tmp))


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a state file with `weights_only=True`; a clear error if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, wrong file, foreign pickle ...
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointError(
            f"training state {path} cannot be read (corrupt or not a diffunet "
            f"state file: {reason}); delete it to restart the run from step 0, "
            "or start a new run"
        ) from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a diffunet training-state file")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{path} has state version {state.get('version')}, this diffunet "
            f"reads version {STATE_VERSION}"
        )
    return state
