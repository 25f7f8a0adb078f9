"""The `diffunet` command line: one module per command, the parser and entry point in `app`."""

from diffunet.cli.app import CliError, main

__all__ = ["CliError", "main"]
