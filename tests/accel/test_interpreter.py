"""The Triton kernels on CPU tensors through Triton's interpreter: every `interpreted_*`
function of the accel tests (kernels against float64 or plain-PyTorch references, values and
gradients) and of `benchmarks/norm_kernels.py`'s test (a sweep end to end) in one child pytest
with TRITON_INTERPRET=1. Triton chooses between compiling and
interpreting a kernel when the kernel is defined, at import, hence the separate process."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FILES = [
    HERE / name
    for name in ("test_fused.py", "test_thin_conv.py", "test_decoder_entry.py", "test_blocks.py")
] + [HERE.parent / "benchmarks" / "test_norm_kernels_script.py"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    # One process: without plugin autoload the child has no xdist for the suite's `-n`.
    options = [
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "-o",
        "python_functions=interpreted_*",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *options, *map(str, FILES)],
        cwd=HERE.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    summary = done.stdout.strip().splitlines()[-1]  # e.g. "47 passed in 19.1s"
    assert " passed" in summary and "skipped" not in summary, summary
