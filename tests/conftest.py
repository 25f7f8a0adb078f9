"""Shared test settings: deterministic, single-threaded-friendly torch on the CPU."""

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from diffunet.accel import settings

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def benchmark_script(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """Import a script of `benchmarks/` by name (`"ddp_scaling"`), afresh; they are not a
    package. `benchmarks/` is on `sys.path` for the test, as for a script run from there, so
    the scripts (and the test) import the shared `harness` package."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run every test with torch on one thread, then restore the thread count.

    The tests' tensors are tiny: a second thread does not pay, and one thread is immune to
    OpenMP barrier stalls on a loaded 2-core machine. (Measured on the whole suite: 1-6%
    less wall time and 6-13% less CPU time than one thread for only the tests that asked.)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def accel_settings() -> Iterator[None]:
    """Restore every accelerator setting after each test: the trainer and the benchmark set the
    compiled thresholds for their compile mode, tests switch kernels on and off, and none of it
    may carry into later tests."""
    with settings.override(**settings.current()):
        yield


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when CUDA is unavailable."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
