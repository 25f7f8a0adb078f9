"""Benchmark diffunet against the reference models of identical architecture (diffusers
`UNet2DModel`, MONAI `DiffusionModelUNet`): training and inference throughput, peak memory,
counted FLOPs and MFU, eager and compiled, plus checkpointed memory and DDIM sampling; or, with
`--profile CASE`, where the GPU time of a step goes.

The benchmarks are not installed with diffunet: they live in the repository's `benchmarks/`
folder. In a source checkout (an editable install, `benchmarks/` next to `src/`) this command
runs `benchmarks/bench.py` with the same options; elsewhere it says where they are."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import diffunet
from diffunet.cli.app import CliError

NOT_HERE = (
    "the benchmarks are not installed with diffunet: they live in the repository's benchmarks/ "
    "folder; in a source checkout run `python benchmarks/bench.py --help`"
)

_MODULE = "diffunet_benchmarks_bench"


def benchmarks_folder() -> Path | None:
    """`benchmarks/` of the source checkout diffunet is imported from, or None when diffunet
    is installed without one."""
    root = Path(diffunet.__file__).resolve().parents[2]
    folder = root / "benchmarks"
    if (folder / "bench.py").is_file() and (root / "src" / "diffunet").is_dir():
        return folder
    return None


def load_bench() -> ModuleType | None:
    """`benchmarks/bench.py` as a module (loaded once), or None outside a checkout. Its folder
    is on `sys.path` only while it loads, for its `harness` imports."""
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    folder = benchmarks_folder()
    if folder is None:
        return None
    spec = importlib.util.spec_from_file_location(_MODULE, folder / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    sys.modules[_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_MODULE]
        raise
    finally:
        sys.path.remove(str(folder))
    return module


def _take_any_options(parser: argparse.ArgumentParser) -> None:
    """Outside a checkout: accept whatever options are given (they are `benchmarks/bench.py`'s),
    so that `run` can say where the benchmarks are; `--help` still prints the help."""
    parse_known_args = parser.parse_known_args

    def take(
        args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        args = list(sys.argv[1:] if args is None else args)
        if "-h" in args or "--help" in args:
            return parse_known_args(args, namespace)
        namespace, _ = parse_known_args([], namespace)  # the defaults (`run`, ...)
        namespace.options = args
        return namespace, []

    parser.parse_known_args = take  # type: ignore[method-assign]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `benchmarks/bench.py` (in a source checkout)."""
    try:
        bench = load_bench()
    except Exception:  # a broken checkout: `run` reports the error
        bench = None
    if bench is None:
        _take_any_options(parser)
    else:
        bench.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run `benchmarks/bench.py`; exit code 1 if any measurement failed."""
    try:
        bench = load_bench()
    except Exception as err:
        raise CliError(f"benchmarks/bench.py failed to load: {type(err).__name__}: {err}") from err
    if bench is None:
        raise CliError(NOT_HERE)
    data = bench.run_from_args(args)
    return 1 if data.get("errors") else 0
