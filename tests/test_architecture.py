"""The import rules of ARCHITECTURE.md, enforced: which package may import which, and no cycles.

Every module under `src/diffunet` is parsed with `ast` (nothing is imported), so an import at
any depth counts: module level, inside a function, `import diffunet.x`, `from diffunet.x import
y`, relative imports and `importlib.import_module("diffunet.x")`. The table of allowed imports is
read from ARCHITECTURE.md itself, so the document and the check cannot drift apart.

Imports under `if TYPE_CHECKING:` never run: they must obey the table but are no cycle edges.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "diffunet"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
ANYTHING = "anything"


@dataclass(frozen=True)
class Import:
    """One import of a diffunet module by another, with where it is written."""

    source: str  # the importing module, e.g. "diffunet.model.unet"
    target: str  # the imported module (a package's `__init__` is the package's name)
    file: str  # as written in messages: `src/diffunet/model/unet.py`
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`

    def where(self) -> str:
        """`src/diffunet/x.py:12`."""
        return f"{self.file}:{self.line}"


# ---------------------------------------------------------------------------- the table
def read_table(text: str) -> dict[str, set[str] | str]:
    """The "may import" table of ARCHITECTURE.md: package → the packages it may import.

    Rows look like ``| `training` | what lives there | `model`, `apps` |``: the first cell names
    the package, the last lists what it may import (`—` for nothing, `anything`).
    """
    table: dict[str, set[str] | str] = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) < 2:
            continue
        name = re.fullmatch(r"`([\w.]+)`(?:\s.*)?", cells[0])
        if name is None:
            continue  # the header and the |---| row
        allowed = cells[-1]
        table[name.group(1)] = (
            ANYTHING if allowed == ANYTHING else set(re.findall(r"`([\w.]+)`", allowed))
        )
    return table


# ---------------------------------------------------------------------------- the imports
def module_name(path: Path, src: Path) -> str:
    """`src/diffunet/model/__init__.py` → `diffunet.model`; `.../model/unet.py` → its dotted name."""
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The table row a module belongs to: `diffunet.model.layers.ops` → `model`; the top-level
    `diffunet` (its `__init__`) and `diffunet.__main__` → `diffunet`."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return PACKAGE
    return parts[1]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
    """Every node of `tree`, with whether it sits in the body of an `if TYPE_CHECKING:`."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, type_only = stack.pop()
        yield node, type_only
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend((child, True) for child in node.body)
            stack.extend((child, type_only) for child in node.orelse)
        else:
            stack.extend((child, type_only) for child in ast.iter_child_nodes(node))


def _resolve(name: str, modules: Container[str]) -> str:
    """The module `name` loads: itself, or its longest prefix that is a module."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import node (or `importlib.import_module("...")` call) loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against the importing module's package
            anchor = module.split(".")
            anchor = anchor if is_package else anchor[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        # `from pkg import sub` loads the submodule `pkg.sub` when there is one, else `pkg`.
        return [f"{base}.{alias.name}" for alias in node.names]
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        arg = node.args[0]
        if name == "import_module" and isinstance(arg, ast.Constant):
            return [arg.value] if isinstance(arg.value, str) else []
    return []


def collect_imports(src: Path, package: str = PACKAGE) -> tuple[dict[str, str], list[Import]]:
    """Every module of `src/<package>` (name → file) and every import of one by another."""
    paths = {module_name(p, src): p for p in sorted((src / package).rglob("*.py"))}
    modules = {name: path.relative_to(src.parent).as_posix() for name, path in paths.items()}
    imports: set[Import] = set()
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        file = modules[module]
        for node, type_only in _walk(tree):
            for name in _imported_names(node, module, is_package):
                if name != package and not name.startswith(package + "."):
                    continue
                target = _resolve(name, modules)
                if target != module:
                    imports.add(Import(module, target, file, node.lineno, type_only))
    return modules, sorted(imports, key=lambda i: (i.file, i.line, i.target))


# ---------------------------------------------------------------------------- the checks
def layer_violations(
    modules: dict[str, str], imports: list[Import], table: dict[str, set[str] | str]
) -> list[str]:
    """One readable line per import that the table forbids, and per module in no table row."""
    problems = [
        f"{file}: {name} is in no package of ARCHITECTURE.md's import table "
        f"(no row `{package_of(name)}`)"
        for name, file in sorted(modules.items())
        if package_of(name) not in table
    ]
    for imp in imports:
        source, target = package_of(imp.source), package_of(imp.target)
        if source not in table:
            continue  # reported above, once
        allowed = table[source]
        if source == target or allowed == ANYTHING or target in allowed:
            continue
        may = ", ".join(sorted(allowed)) or "no other diffunet package"
        problems.append(
            f"{imp.where()}: {imp.source} imports {imp.target}, but `{source}` may import "
            f"only: {may}"
        )
    return problems


def find_cycles(imports: list[Import]) -> list[list[Import]]:
    """The import cycles, each as its chain of imports: a shortest one through each module of
    every strongly connected group (without repeats)."""
    graph: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if not imp.type_only:
            graph.setdefault(imp.source, {}).setdefault(imp.target, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles: dict[frozenset[Import], list[Import]] = {}
    for group in groups:
        for start in sorted(group):
            chain = _cycle_through(start, group, graph)
            cycles.setdefault(frozenset(chain), chain)
    return list(cycles.values())


def _cycle_through(
    start: str, group: set[str], graph: dict[str, dict[str, Import]]
) -> list[Import]:
    """A shortest cycle from `start` back to it within its group (breadth first)."""
    parents: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ, imp in sorted(graph.get(node, {}).items()):
                if succ not in group or succ in parents:
                    continue
                parents[succ] = imp
                if succ == start:
                    chain = [imp]
                    while chain[0].source != start:
                        chain.insert(0, parents[chain[0].source])
                    return chain
                following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group has one


def describe_cycle(chain: list[Import]) -> str:
    """`a → b → a`, then each import with its file and line."""
    names = " → ".join([chain[0].source, *(imp.target for imp in chain)])
    lines = "".join(f"\n    {imp.where()}: {imp.source} imports {imp.target}" for imp in chain)
    return names + lines


# ---------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def tree() -> tuple[dict[str, str], list[Import]]:
    return collect_imports(SRC)


def test_the_table_names_every_package() -> None:
    table = read_table(ARCHITECTURE.read_text(encoding="utf-8"))
    packages = {p.name for p in (SRC / PACKAGE).iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(table), f"packages missing from ARCHITECTURE.md: {packages - set(table)}"
    stale = {
        name
        for name, allowed in table.items()
        if name != PACKAGE and name not in packages and not (SRC / PACKAGE / f"{name}.py").exists()
    }
    assert not stale, f"ARCHITECTURE.md names packages that do not exist: {stale}"
    for name, allowed in table.items():
        if allowed != ANYTHING:
            assert allowed <= set(table), f"`{name}` may import unknown {allowed - set(table)}"


def test_imports_follow_the_table(tree: tuple[dict[str, str], list[Import]]) -> None:
    modules, imports = tree
    table = read_table(ARCHITECTURE.read_text(encoding="utf-8"))
    problems = layer_violations(modules, imports, table)
    if problems:
        pytest.fail("imports against ARCHITECTURE.md's table:\n  " + "\n  ".join(problems), False)


def test_no_import_cycles(tree: tuple[dict[str, str], list[Import]]) -> None:
    _, imports = tree
    cycles = find_cycles(imports)
    if cycles:
        pytest.fail("import cycles:\n  " + "\n  ".join(describe_cycle(c) for c in cycles), False)


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A planted tree: a forbidden function-local import, a relative import, a cycle."""
    pkg = tmp_path / "src" / "diffunet"
    for folder in ("model", "training"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("import diffunet.model.unet\n")
    (pkg / "model" / "unet.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from diffunet.training.loop import Loop\n"
        "def f():\n"
        "    from diffunet.training import loop\n"
    )
    (pkg / "model" / "ckpt.py").write_text("from . import unet\n")
    (pkg / "training" / "loop.py").write_text(
        "import importlib\n"
        "from diffunet.model import unet\n"
        "importlib.import_module('diffunet.training.other')\n"
    )
    (pkg / "training" / "other.py").write_text("from diffunet.training.loop import x\n")
    modules, imports = collect_imports(tmp_path / "src")
    edges = {(i.source, i.target, i.line, i.type_only) for i in imports}
    assert edges == {
        ("diffunet", "diffunet.model.unet", 1, False),
        ("diffunet.model.unet", "diffunet.training.loop", 3, True),
        ("diffunet.model.unet", "diffunet.training.loop", 5, False),
        ("diffunet.model.ckpt", "diffunet.model.unet", 1, False),
        ("diffunet.training.loop", "diffunet.model.unet", 2, False),
        ("diffunet.training.loop", "diffunet.training.other", 3, False),
        ("diffunet.training.other", "diffunet.training.loop", 1, False),
    }
    table = read_table(
        "| package | may import |\n|---|---|\n| `model` | — |\n"
        "| `training` | `model` |\n| `diffunet` (`__init__`) | anything |\n"
    )
    assert table == {"model": set(), "training": {"model"}, "diffunet": ANYTHING}
    problems = layer_violations(modules, imports, table)
    assert len(problems) == 2  # the type-only import and the function-local one
    assert all("model/unet.py" in p and "may import only: no other" in p for p in problems)
    unlisted = layer_violations(modules, [], {"model": set()})
    assert [p.split(":")[0] for p in unlisted] == [
        "src/diffunet/__init__.py",
        "src/diffunet/training/__init__.py",
        "src/diffunet/training/loop.py",
        "src/diffunet/training/other.py",
    ]
    cycles = sorted(sorted(imp.source for imp in c) for c in find_cycles(imports))
    assert cycles == [
        ["diffunet.model.unet", "diffunet.training.loop"],
        ["diffunet.training.loop", "diffunet.training.other"],
    ]
