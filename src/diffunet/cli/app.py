"""The `diffunet` command line: `diffunet train | sample | eval | restore | info | check | bench
| export | convert`.

Each command lives in `diffunet.cli.<name>` and provides `add_arguments(parser)` and
`run(args) -> int`; `COMMANDS` names it with its one-line help. Errors a user can fix (a
`DiffunetError`: bad options, files, configs; an `OSError` naming a path; running out of GPU
memory) end the program with one readable line and exit code 1; set `DIFFUNET_DEBUG=1` for the
traceback. Any other exception is a bug: its traceback is printed with a line saying so. Ctrl-C
exits 130, SIGTERM 143.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Collection, Iterator

from diffunet.errors import DiffunetError

#: Each command and its one-line help. `diffunet --help` lists them from here, importing no
#: command module (they import torch, which takes seconds).
COMMANDS = {
    "train": "train a model (default: a small U-Net on the embedded digits, a few minutes on a CPU)",
    "sample": "draw samples from a run or checkpoint: a PNG grid or a .npy array",
    "eval": "digits Fréchet distance and recognisability of a model's samples (not FID)",
    "restore": "restore images or volumes with a restoration model: result + uncertainty map",
    "info": "describe a preset, config.json or checkpoint: parameters, FLOPs, per-level table",
    "check": "self-test every preset (small versions) in 1D/2D/3D: forward + backward",
    "bench": "GPU benchmark vs diffusers / MONAI (throughput, memory, MFU); in a source checkout",
    "export": "export a checkpoint to ONNX, a torch.export program or an AOTInductor package",
    "convert": (
        "import diffusers, Stable Diffusion single-file or guided-diffusion/EMDiffuse weights as a "
        "checkpoint"
    ),
}


class CliError(DiffunetError):
    """A user-facing error: printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line that points at `--help`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser with every command registered: the options of `commands` (all of them by
    default) from their modules, the others by name and help alone, importing nothing."""
    parser = _Parser(prog="diffunet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=_version())
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the warnings and log messages of the libraries diffunet uses",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, summary in COMMANDS.items():
        if commands is not None and name not in commands:
            sub.add_parser(name, help=summary, parents=[common])
            continue
        module = importlib.import_module(f"diffunet.cli.{name}")
        command = sub.add_parser(name, help=summary, description=module.__doc__, parents=[common])
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def _version() -> str:
    from diffunet import __version__

    return f"diffunet {__version__}"


class Terminated(BaseException):
    """SIGTERM outside the training loop (which saves a checkpoint first): exit 143."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def quiet_dependencies(quiet: bool = True) -> Iterator[None]:
    """Hide other libraries' warnings and log messages (below errors) while `quiet`: a user's
    terminal shows diffunet's own messages; `-v` shows everything."""
    if not quiet:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"diffunet(\.|$)")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def _user_message(err: BaseException) -> str | None:
    """The one-line message of an error the user can fix, None for a bug."""
    if isinstance(err, OSError) and not isinstance(err, DiffunetError) and err.filename:
        reason = err.strerror or type(err).__name__
        return f"{reason}: {err.filename}"
    if isinstance(err, (DiffunetError, OSError)):
        return " ".join(str(err).split()) or type(err).__name__
    if type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch
        first = str(err).split(". ")[0]
        return f"{first}; use a smaller --batch-size (or model, or image size)"
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `diffunet` console script."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words == ["--version"]:
        print(_version())  # without building the parser
        return 0
    command = "diffunet"
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        verbose = "-v" in words or "--verbose" in words
        with quiet_dependencies(not verbose):  # their import-time warnings too
            parser = build_parser(words[:1])  # the command comes first: only its module
        args = parser.parse_args(argv)
        command = f"diffunet {args.command}"
        with quiet_dependencies(not args.verbose):
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{command}: terminated", file=sys.stderr)
        return 143
    except Exception as err:
        message = _user_message(err)
        if message is None or os.environ.get("DIFFUNET_DEBUG"):
            traceback.print_exc()
            if message is None:
                print(
                    f"{command}: internal error ({type(err).__name__}); this is a bug in "
                    "diffunet: please report it with the traceback above",
                    file=sys.stderr,
                )
            return 1
        print(f"{command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
