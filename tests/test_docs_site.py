"""The documentation site builds in strict mode, and covers the public API, presets and fields.

`mkdocs build --strict` fails on any warning: a broken link or anchor between pages (README.md,
ARCHITECTURE.md and docs/*.md), a page left out of the nav, a `:::` reference that does not
resolve, or a docstring whose parameters do not match its signature.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import diffunet
from diffunet.model.config import UNetConfig
from diffunet.model.presets import list_presets

pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') builds the site")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parents[1]


def _build(out: Path) -> None:
    """`mkdocs build --strict` into `out`; fails with mkdocs' output on any warning."""
    env = {
        **os.environ,
        "NO_MKDOCS_2_WARNING": "1",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{output[-8000:]}"
    assert "WARNING" not in output, output[-8000:]


def _text(page: Path) -> str:
    """The visible text of a built page (tags removed)."""
    return re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8"))


def test_site_builds_strict(tmp_path: Path) -> None:
    """The strict build passes; the README is the home page, its GitHub links point at site
    pages, and the generated pages list every `UNetConfig` field and every preset with its
    counted size. (One test: the build is most of its cost.)"""
    _build(tmp_path)
    for page in ("index.html", "training/index.html", "model/index.html", "api/model/index.html"):
        assert (tmp_path / page).is_file(), page
    home = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "One dimension-agnostic U-Net" in home
    assert 'href="training/' in home and 'href="architecture/' in home  # docs/..., ARCHITECTURE.md
    assert not re.search(r'href="[^"#:]*\.md[#"]', home)

    fields = _text(tmp_path / "model" / "index.html")
    for field in dataclasses.fields(UNetConfig):
        assert re.search(rf"\b{field.name}\b", fields), field.name
    presets = _text(tmp_path / "presets" / "index.html")
    for name in list_presets():
        assert name in presets, name
    assert "35,746,307" in presets  # ddpm-cifar10, counted (the number its notes state)


def test_api_reference_covers_the_public_api() -> None:
    """Every name of `diffunet.__all__` is rendered in docs/api/: by a `::: diffunet.NAME`
    directive, or by one for the whole module that defines it (`::: diffunet.errors`)."""
    directives = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        directives |= set(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), re.M))
    missing = [
        name
        for name in sorted(set(diffunet.__all__) - {"__version__"})
        if not {f"diffunet.{name}", diffunet._EXPORTS[name]} & directives
    ]
    assert not missing, f"add `::: diffunet.NAME` to a page of docs/api/ for: {missing}"
