"""The examples of README.md and docs/*.md work as pasted.

Every ```python block runs, each in a fresh namespace and a fresh temporary working folder
(one child process per page, so nothing leaks into the test process or the repository). A block
preceded by `<!-- not-tested: reason -->` is not run, only compiled, and its imports executed,
so a renamed module or function still fails here. Every `diffunet ...` command line in the
other blocks is parsed by the CLI's own parser, so a renamed command or option fails too; the
commands themselves train or read runs, which is not a test's budget.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Pages whose examples are not run (only compiled, imports executed), and why.
NOT_RUN_PAGES = {
    "docs/interop.md": "fragments that need a live diffusers model, a Hub id or a .pth file",
}

_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_NOT_TESTED = re.compile(r"<!--\s*not-tested:\s*(.+?)\s*-->\s*$", re.S)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str  # relative to the repository root
    line: int  # of the opening fence
    language: str
    code: str
    not_tested: str | None  # the reason, when marked

    @property
    def label(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every fenced block of `page`, with its `not-tested` reason if the line above has one."""
    text = page.read_text(encoding="utf-8")
    name = page.relative_to(ROOT).as_posix()
    found = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        last_line = before.rsplit("\n", 1)[-1]
        marker = _NOT_TESTED.search(last_line)
        found.append(
            Block(
                name,
                text.count("\n", 0, match.start()) + 1,
                match.group(1).lower(),
                match.group(2),
                marker.group(1) if marker else None,
            )
        )
    return found


def python_blocks(page: Path) -> list[Block]:
    """The Python examples of `page`."""
    return [b for b in blocks(page) if b.language in ("python", "py")]


# The child process: runs each block in a fresh namespace and a fresh temporary folder (or only
# its imports, for a block that is not run), timing each; prints every failure's traceback.
_RUNNER = r"""
import ast, json, os, sys, tempfile, time, traceback
failed = 0
for item in json.load(sys.stdin):
    code = item["code"]
    if not item["run"]:
        tree = ast.parse(code, item["label"])
        tree.body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        code = tree
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            exec(compile(code, item["label"], "exec"), {"__name__": "__main__"})
        except BaseException:
            failed += 1
            print(f"--- {item['label']} failed:", file=sys.stderr)
            traceback.print_exc()
        finally:
            os.chdir(os.path.dirname(folder))
    kind = "ran" if item["run"] else "imports"
    print(f"{item['label']}: {kind}, {time.perf_counter() - start:.1f} s", flush=True)
sys.exit(1 if failed else 0)
"""


def _run(items: list[dict]) -> None:
    """Run `items` in one child process; fail with its output if any block failed."""
    env = {key: value for key, value in os.environ.items() if key != "DIFFUNET_CHECK_VALUES"}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # one thread, as every test
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-8000:]}"


def test_examples_run_as_pasted() -> None:
    """Each Python example runs on its own, in a fresh folder; a `not-tested` one compiles and
    its imports work. One child process for all of them: starting Python and torch is most of
    the cost."""
    items = []
    for page in PAGES:
        for block in python_blocks(page):
            run = block.not_tested is None and block.page not in NOT_RUN_PAGES
            items.append({"label": block.label, "code": block.code, "run": run})
    assert sum(item["run"] for item in items) >= 8, items
    _run(items)


def test_not_tested_markers_are_few_and_say_why() -> None:
    """Each exemption gives a reason, and most examples run."""
    marked = [b for page in PAGES for b in python_blocks(page) if b.not_tested is not None]
    everything = [b for page in PAGES for b in python_blocks(page)]
    assert all(len(b.not_tested or "") >= 10 for b in marked), [b.label for b in marked]
    assert len(marked) <= len(everything) // 2, [b.label for b in marked]


# ------------------------------------------------------------------- diffunet command lines
_COMMAND = re.compile(r"^(?:\$\s+)?(?:diffunet|torchrun|python -m diffunet)\b")
_PROGRAM = re.compile(r"(?:^|[\s(])diffunet\)?(?=\s|$)")


def command_lines() -> list[tuple[str, list[str]]]:
    """`(label, argv)` of every concrete `diffunet` command in a non-Python block.

    Synopses (`onnx|pt2|aoti`, `[--int8]`) are left out; a trailing `...` (more options) is
    dropped; `torchrun ... -m diffunet` and `$(which diffunet)` give the arguments after it.
    """
    found = []
    for page in PAGES:
        for block in blocks(page):
            if block.language in ("python", "py"):
                continue
            text = block.code.replace("\\\n", " ")
            for offset, line in enumerate(text.splitlines(), start=1):
                line = line.strip()
                if not _COMMAND.match(line):
                    continue
                words = shlex.split(line, comments=True)
                program = _PROGRAM.search(" ".join(words))
                if program is None:
                    continue
                rest = " ".join(words)[program.end() :]
                if re.search(r"[|\[\]]", rest):
                    continue  # a synopsis, not a command
                argv = [w for w in shlex.split(rest) if w != "..."]
                found.append((f"{block.label}+{offset}", argv))
    return found


def test_command_lines_parse() -> None:
    """Every `diffunet` command shown in README.md and docs/ is accepted by the CLI's parser."""
    from diffunet.cli.app import build_parser

    parser = build_parser()
    commands = command_lines()
    assert len(commands) >= 10, commands
    bad = []
    for label, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as err:
            bad.append(f"{label}: diffunet {' '.join(argv)} (exit {err.code})")
    assert not bad, "\n".join(bad)
