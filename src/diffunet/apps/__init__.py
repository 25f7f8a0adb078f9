"""Uses of a trained model: restoring large inputs tile by tile (`restoration`, `tiling`, with
file handling in `restore_io`), loading a run or checkpoint and sampling from it (`generate`,
which also names the run-folder layout the trainer writes), sample grids (`grids`) and the
digits metrics (`metrics`).
"""

from diffunet.apps.generate import LoadedModel, load_model
from diffunet.apps.grids import save_array, save_grid
from diffunet.apps.metrics import evaluate_digits
from diffunet.apps.restoration import Restoration, restore
from diffunet.apps.tiling import tiled_map

__all__ = [
    "LoadedModel",
    "Restoration",
    "evaluate_digits",
    "load_model",
    "restore",
    "save_array",
    "save_grid",
    "tiled_map",
]
