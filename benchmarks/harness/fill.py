"""One cache-filling process of `bench.py --compile-ahead` and `ab.py`: a benchmark run that
only compiles, stopped when the caller's time is up."""

from __future__ import annotations

import subprocess
import time
from typing import Any


def run_fill(
    command: list[str],
    env: dict[str, str],
    timeout: float | None,
    record: dict[str, Any],
    stopped: str,
) -> dict[str, Any]:
    """Run `command` (a benchmark that fills Inductor's caches) with `env`, for at most
    `timeout` seconds (None: no limit); `record` with the seconds it took and, where it failed,
    its last line of errors, or `stopped` where the timeout ended it."""
    begin = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            record["error"] = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    except subprocess.TimeoutExpired:
        record["error"] = stopped
    record["seconds"] = round(time.perf_counter() - begin, 1)
    return record
