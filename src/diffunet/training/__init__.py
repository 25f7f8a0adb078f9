"""Training: `Trainer(run, data, run_dir).train()` and what it stands on: the run config
(`run_config`: YAML, presets and command-line overrides), the resumable training state
(`state`), the run log (`run_log`), the EMA (`ema`), the model's layout across processes
(`parallel`: DDP or FSDP via `sharding`) and process setup (`distributed`).
"""

from diffunet.training.run_config import RunConfig, RunConfigError, load_yaml
from diffunet.training.run_log import RunLog
from diffunet.training.state import load_training_state, save_training_state
from diffunet.training.trainer import Trainer, TrainResult

__all__ = [
    "RunConfig",
    "RunConfigError",
    "RunLog",
    "TrainResult",
    "Trainer",
    "load_training_state",
    "load_yaml",
    "save_training_state",
]
