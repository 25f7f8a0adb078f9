"""Continuing a `bench.py` run that stopped short (`--resume`): which of its measurements are
kept, and whether it measured what this run would.

A table too large for one device call is then one command, run again until it is complete:
each run keeps the cells its predecessor finished and measures the rest. A cell is one case,
mode and kind; it is finished when every model the run asks for has a throughput there (or was
skipped for good, such as a reference library that is not installed). An unfinished cell is
measured again for every model, so that ours and the reference of a cell always come from one
process, as in a run that was never interrupted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: The run settings that change what a measurement means: a run resumes only one that had the
#: same ones.
SAME_SETTINGS = ("device_name", "precision", "compile_mode", "quick", "torch", "accel_settings")

#: Why a record may stay skipped: the run reached its deadline before measuring it.
DEADLINE = "deadline reached"

Cell = tuple[str, str, str]
"""(case, mode, kind) of a measurement; `kind` is "sample" for the sampling case."""


class ResumeError(ValueError):
    """The earlier run cannot be continued by this one (the message says why and what to do)."""


def load_run(path: str | Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The earlier run's JSON at `path`, checked against this run's `meta`; None when there is
    no such file yet (the run then starts afresh)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ResumeError(f"--resume: {path} is not readable as a bench.py JSON ({err})") from err
    if not isinstance(data, dict) or not {"meta", "cases", "records"} <= set(data):
        raise ResumeError(f"--resume: {path} has no meta, cases and records: not a bench.py run")
    if "runs" in data:
        raise ResumeError(f"--resume: {path} holds a profile or an A/B, not a measurement run")
    for key in SAME_SETTINGS:
        before, now = data["meta"].get(key), _as_saved(meta.get(key))
        if before != now:
            raise ResumeError(
                f"--resume: {path} was measured with {_difference(key, before, now)}; write "
                "to another --out and merge the two with --table-from"
            )
    return data


def _as_saved(value: Any) -> Any:
    """`value` as the JSON file holds it (tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(value, default=str))


def _difference(key: str, before: Any, now: Any) -> str:
    """`key`'s value in the earlier run against this one's (for a table of settings, the
    entries that differ)."""
    if isinstance(before, dict) and isinstance(now, dict):
        names = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        before = {k: before.get(k) for k in names}
        now = {k: now.get(k) for k in names}
    return f"{key} {json.dumps(before)}, this run has {json.dumps(now)}"


def _done(record: dict[str, Any]) -> bool:
    """Whether a record needs no new measurement: it has a result, or was skipped for good."""
    if record.get("error"):
        return False
    if record.get("skipped"):
        return record["skipped"] != DEADLINE
    return record.get("throughput") is not None or record.get("seconds_per_batch") is not None


def measurement_cell(case: str, model: str, mode: str, kind: str) -> Cell:
    """The cell of a measurement of `model`; ours with checkpointing has cells of its own
    (mode "MODE+ckpt")."""
    return (case, mode + ("+ckpt" if model.endswith("+ckpt") else ""), kind)


def cell_of(record: dict[str, Any]) -> Cell:
    """The cell a record belongs to."""
    return measurement_cell(record["case"], record["model"], record["mode"], record["kind"])


def finished_cells(records: Iterable[dict[str, Any]], models: Iterable[str]) -> set[Cell]:
    """The cells where each of `models` (or, in a checkpointed cell, ours with checkpointing)
    has a finished record."""
    wanted = set(models)
    done: dict[Cell, dict[str, bool]] = {}
    for record in records:  # ours samples twice in a cell (with and without a CUDA graph)
        by_model = done.setdefault(cell_of(record), {})
        by_model[record["model"]] = by_model.get(record["model"], True) and _done(record)
    return {
        cell
        for cell, by_model in done.items()
        if all(
            by_model.get(model, False)
            for model in ({"ours+ckpt"} if cell[1].endswith("+ckpt") else wanted)
        )
    }


def kept(data: dict[str, Any], models: Iterable[str]) -> tuple[list[dict[str, Any]], set[Cell]]:
    """The records of the earlier run that this one keeps (those of its finished cells), and
    those cells."""
    finished = finished_cells(data["records"], models)
    return [r for r in data["records"] if cell_of(r) in finished], finished
