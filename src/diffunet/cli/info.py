"""Print a model's parameters, counted FLOPs per forward and a per-level table.

NAME is a preset (`diffunet info ldm`), a `config.json` file or a checkpoint folder; without
NAME, the presets are listed with the models they reproduce.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffunet.errors import InvalidValueError
from diffunet.model.config import UNetConfig
from diffunet.model.introspect import describe
from diffunet.model.presets import list_presets, preset, preset_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffunet info`."""
    parser.add_argument(
        "name",
        nargs="?",
        help="preset name, config.json file or checkpoint folder (none: list the presets)",
    )
    parser.add_argument("--dims", type=int, choices=(1, 2, 3), help="override the dimensionality")
    parser.add_argument("--image-size", type=int, help="size used for the FLOP count and table")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")


def resolve_config(name: str) -> UNetConfig:
    """A config from a preset name, a config.json path or a checkpoint folder."""
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise InvalidValueError(
                f"{name} is a folder without config.json; is it a diffunet checkpoint?"
            )
    if path.suffix == ".json":
        if not path.is_file():
            raise InvalidValueError(f"config file {path} does not exist")
        return UNetConfig.from_json(path)
    return preset(name)


def print_presets() -> None:
    """One line per preset: its name and the model it reproduces."""
    names = list_presets()
    width = max(len(name) for name in names)
    for name in names:
        print(f"{name:<{width}}  {preset_info(name).source}")


def run(args: argparse.Namespace) -> int:
    """Print the description, or the list of presets without a name."""
    if args.name is None:
        print_presets()
        return 0
    config = resolve_config(args.name)
    overrides = {}
    if args.dims:
        overrides["dims"] = args.dims
        if config.resample_axes is not None and args.dims != config.dims:
            overrides["resample_axes"] = None
    if args.image_size:
        overrides["image_size"] = args.image_size
    config = config.replace(**overrides) if overrides else config
    if not Path(args.name).exists():
        info = preset_info(args.name)
        print(f"{info.name}: {info.source}")
        print(info.notes)
        print()
    print(describe(config, flops=not args.no_flops))
    return 0
