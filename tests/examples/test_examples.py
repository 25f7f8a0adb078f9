"""Each script of `examples/` runs to the end on the CPU with its default arguments."""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = sorted(path.name for path in EXAMPLES.glob("*.py"))


def test_every_example_is_listed_in_the_readme():
    readme = (EXAMPLES / "README.md").read_text()
    assert SCRIPTS and all(f"`{name}`" in readme for name in SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs(name, monkeypatch, capsys):
    if name == "diffusers_import.py" and importlib.util.find_spec("diffusers") is None:
        pytest.skip("diffusers is not installed")
    monkeypatch.setattr(sys, "argv", [name])
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    except SystemExit as exit_:  # a script that exits early must say it succeeded
        assert exit_.code in (None, 0), f"{name} exited with {exit_.code!r}"
    printed = capsys.readouterr().out
    assert "parameters" in printed, printed  # each script reports the model it built
