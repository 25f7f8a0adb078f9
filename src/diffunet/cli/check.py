"""Self-test: build a small version of every preset in each dimensionality it supports, run a
forward and a backward pass, and print a table. Exits non-zero if any case fails."""

from __future__ import annotations

import argparse

from diffunet.errors import InvalidValueError
from diffunet.model.introspect import self_check
from diffunet.model.presets import list_presets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffunet check`."""
    parser.add_argument("presets", nargs="*", help=f"subset of: {', '.join(list_presets())}")


def run(args: argparse.Namespace) -> int:
    """Run the self-test and print one row per case."""
    unknown = sorted(set(args.presets) - set(list_presets()))
    if unknown:
        raise InvalidValueError(
            f"unknown preset(s) {unknown}; available: {', '.join(list_presets())}"
        )
    results = self_check(args.presets or None)
    print(f"{'preset':<22} {'dims':>4} {'params':>11} {'output':<20} {'time':>7}  result")
    for r in results:
        shape = "×".join(map(str, r.output_shape)) or "-"
        status = "ok" if r.ok else f"FAIL {r.error}"
        print(
            f"{r.name:<22} {r.dims:>4} {r.parameters:>11,} {shape:<20} {r.seconds:>6.2f}s  {status}"
        )
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0
