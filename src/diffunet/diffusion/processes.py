"""The processes by name, as a run config and the command line choose them (`--process`).

`ddpm` is :class:`Diffusion` (discrete variance-preserving), `flow` is :class:`FlowMatching`
and `edm` is :class:`EDM`. Each has its own samplers; :data:`DEFAULT_SAMPLERS` names the one a
run uses when none is given, and :func:`default_steps` its steps: about 20 network evaluations
per sample. `flow` with Heun is the default process: on the digits main job it gave the
lowest Fréchet distance at every budget from 6 to 50 evaluations (docs/processes.md).
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
DEFAULT_PROCESS = "flow"
#: The process of a run recorded before processes had names (no `process` key): the discrete one.
LEGACY_PROCESS = "ddpm"
DEFAULT_SAMPLERS = {"ddpm": "dpm++", "flow": "heun", "edm": "heun"}
#: Network evaluations per sample when no number of steps is given.
DEFAULT_EVALUATIONS = 20
#: Every sampler of every process, for command-line choices.
ALL_SAMPLERS = tuple(dict.fromkeys(s for names in PROCESS_SAMPLERS.values() for s in names))


def check_sampler(process: str, sampler: str, option: str = "sampler") -> None:
    """Raise :class:`InvalidValueError` unless `process` has `sampler`."""
    if sampler not in PROCESS_SAMPLERS[process]:
        raise InvalidValueError(
            f"{option} {sampler!r} is not a sampler of the {process} process; it has "
            f"{', '.join(PROCESS_SAMPLERS[process])} (default {DEFAULT_SAMPLERS[process]})"
        )


def default_steps(sampler: str) -> int:
    """Steps for about :data:`DEFAULT_EVALUATIONS` network evaluations with `sampler`: Heun
    evaluates twice a step (10 steps), every other sampler once (20)."""
    return DEFAULT_EVALUATIONS // 2 if sampler == "heun" else DEFAULT_EVALUATIONS


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
