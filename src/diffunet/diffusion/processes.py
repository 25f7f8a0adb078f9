"""The processes by name, as a run config and the command line choose them (`--process`).

`ddpm` is :class:`Diffusion` (discrete variance-preserving), `flow` is :class:`FlowMatching`
and `edm` is :class:`EDM`. Each has its own samplers; :data:`DEFAULT_SAMPLERS` names the one a
run uses when none is given.
"""

from __future__ import annotations

from typing import Any

from diffunet.diffusion.edm import EDM
from diffunet.diffusion.flow import FlowMatching
from diffunet.diffusion.process import Diffusion
from diffunet.diffusion.samplers import SAMPLERS as DISCRETE_SAMPLERS
from diffunet.errors import InvalidValueError

Process = Diffusion | FlowMatching | EDM

PROCESSES = ("ddpm", "flow", "edm")
PROCESS_SAMPLERS: dict[str, tuple[str, ...]] = {
    "ddpm": tuple(DISCRETE_SAMPLERS),
    "flow": FlowMatching.SAMPLERS,
    "edm": EDM.SAMPLERS,
}
DEFAULT_SAMPLERS = {"ddpm": "dpm++", "flow": "euler", "edm": "heun"}
#: Every sampler of every process, for command-line choices.
ALL_SAMPLERS = tuple(dict.fromkeys(s for names in PROCESS_SAMPLERS.values() for s in names))


def check_sampler(process: str, sampler: str, option: str = "sampler") -> None:
    """Raise :class:`InvalidValueError` unless `process` has `sampler`."""
    if sampler not in PROCESS_SAMPLERS[process]:
        raise InvalidValueError(
            f"{option} {sampler!r} is not a sampler of the {process} process; it has "
            f"{', '.join(PROCESS_SAMPLERS[process])} (default {DEFAULT_SAMPLERS[process]})"
        )


def make_process(name: str, cond_drop_prob: float = 0.0, **discrete: Any) -> Process:
    """The process called `name`; `discrete` holds `Diffusion`'s arguments (schedule,
    timesteps, prediction, ...), which only `ddpm` uses."""
    if name == "ddpm":
        return Diffusion(cond_drop_prob=cond_drop_prob, **discrete)
    if name == "flow":
        return FlowMatching(cond_drop_prob=cond_drop_prob)
    if name == "edm":
        return EDM(cond_drop_prob=cond_drop_prob)
    raise InvalidValueError(f"process {name!r} is unknown; expected one of {PROCESSES}")


def process_name(process: object) -> str:
    """The name of a process object (`ddpm`, `flow` or `edm`)."""
    for name, kind in (("ddpm", Diffusion), ("flow", FlowMatching), ("edm", EDM)):
        if isinstance(process, kind):
            return name
    raise InvalidValueError(f"{type(process).__name__} is not a diffunet process")
