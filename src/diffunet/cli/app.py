"""The `diffunet` command line: `diffunet train | sample | eval | restore | info | check | bench
| export | convert`.

Each command lives in `diffunet.cli.<name>` and provides `HELP`, `add_arguments(parser)`
and `run(args) -> int`. Errors a user can fix (bad options, files, configs) end the program
with one readable line and a non-zero exit code; set `DIFFUNET_DEBUG=1` for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

COMMANDS = ("train", "sample", "eval", "restore", "info", "check", "bench", "export", "convert")


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line that points at `--help`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser with every available command registered."""
    parser = _Parser(prog="diffunet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        module_name = f"diffunet.cli.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def _version() -> str:
    from diffunet import __version__

    return f"diffunet {__version__}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `diffunet` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"diffunet {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, TypeError, OSError, RuntimeError) as err:
        if os.environ.get("DIFFUNET_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"diffunet {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
