"""Shared test settings: deterministic, single-threaded-friendly torch on the CPU."""

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from diffunet.accel import fused_norm as fused

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def benchmark_script() -> Callable[[str], ModuleType]:
    """Import a script of `benchmarks/` by name (`"ddp_scaling"`); they are not a package."""

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
def fused_compiled_threshold() -> Iterator[None]:
    """Restore the size from which compiled graphs call the fused kernels: the trainer and the
    benchmark set it for their compile mode, and it would otherwise carry into later tests."""
    saved = fused._COMPILED_MIN_ELEMENTS, fused._COMPILED_MIN_ELEMENTS_INFERENCE
    yield
    fused.set_compiled_min_elements(saved[0], inference=saved[1])


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when CUDA is unavailable."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
