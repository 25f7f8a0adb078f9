"""Where a step's host time goes without a profiler: a background thread samples the Python
stacks of the running threads at a fixed interval and counts the functions it finds.

`torch.profiler` records every op and kernel launch, which inflates a host-bound step (a
compiled step of many small kernels) and can hide what costs it time outside the profiler.
Sampling costs the step the sampler's turns at the interpreter lock, which is why
`sample_steps` times the steps once without it. A function's *self* share counts the samples
where it was the innermost Python frame of a thread (time in C code it called, such as a kernel
launch, counts towards its caller); its *total* share counts the samples where it was anywhere
on the stack. The thread that enters the sampler counts its frames below the sampled block;
other threads (autograd runs a CUDA backward on its own thread) count theirs, marked `[other]`,
while they run: where the system shows each thread's CPU time (Linux's `/proc`), while it
advances, so that threads blocked in C (a compile worker pool's reader, a timer asleep) do not
count; elsewhere while they are not waiting in the standard library's locks, queues or
selectors.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import CodeType, FrameType, TracebackType
from typing import Any


def code_name(code: CodeType) -> str:
    """`folder/file.py:Class.function` of a code object (the file's last two path parts)."""
    path = Path(code.co_filename)
    name = getattr(code, "co_qualname", code.co_name)  # Python 3.11+
    return f"{'/'.join(path.parts[-2:])}:{name}"


#: Modules whose frames, innermost on another thread, mean that thread is waiting (where its
#: CPU time cannot be read).
WAITING_FILES = frozenset({"threading.py", "queue.py", "selectors.py", "connection.py"})
#: Another thread runs while its CPU time advances by at least this share of the wall time
#: between two reads of it: a thread that only wakes briefly (a timer) stays far below it, and
#: a running one stays above it on a loaded machine too.
RUNNING_SHARE = 0.1
#: How often (ns) a thread's CPU time is read; between reads it keeps the last verdict.
CPU_READ_INTERVAL_NS = 10_000_000


def thread_cpu_ns(native_id: int) -> int | None:
    """CPU time (ns) the thread `native_id` (a `threading.get_native_id()`) has run, from
    Linux's `/proc/self/task/<id>/schedstat`; None where that is not readable (another
    platform, a thread that has ended)."""
    try:
        with open(f"/proc/self/task/{native_id}/schedstat", "rb") as stat:
            return int(stat.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class StackSampler:
    """Samples the Python stacks of the thread that enters it and of the other running threads
    every `interval` seconds, from a background thread, until the block ends. Of the entering
    thread only the frames below the block count; other threads count while they run
    (`RUNNING_SHARE` of their CPU clock, else not in `WAITING_FILES`), marked `[other]`.

    The interpreter's switch interval is shortened to `interval` for the block, so the
    sampler gets its turns while the sampled threads run Python.
    """

    def __init__(self, interval: float = 1e-3) -> None:
        self.interval = interval
        self.samples = 0
        # By (code object, whether on another thread) while sampling, named in `summary`.
        self.self_counts: Counter[tuple[CodeType, bool]] = Counter()
        self.total_counts: Counter[tuple[CodeType, bool]] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._target = 0
        self._root: FrameType | None = None
        self._switch_interval = sys.getswitchinterval()
        # Per native thread id: its CPU time and the wall time at the last read, and whether
        # it ran over the interval before that read.
        self._clocks: dict[int, tuple[int, int]] = {}
        self._verdicts: dict[int, bool] = {}

    def __enter__(self) -> StackSampler:
        self._target = threading.get_ident()
        self._root = sys._getframe(1)  # the block's frame: its callers are not counted
        self._clocks.clear()
        self._verdicts.clear()
        # The threads already there get a first clock now, so that a sleeping one is told
        # from a running one at its first sample rather than by its frame.
        now = time.perf_counter_ns()
        for thread in threading.enumerate():
            cpu = thread_cpu_ns(thread.native_id) if thread.native_id is not None else None
            if cpu is not None:
                self._clocks[thread.native_id] = (cpu, now)
        self._stop.clear()
        sys.setswitchinterval(self.interval)
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._root = None
        sys.setswitchinterval(self._switch_interval)

    def _running(self, ident: int, frame: FrameType, now: int, natives: dict[int, int]) -> bool:
        """Whether another thread runs: its CPU time advanced by `RUNNING_SHARE` of the wall
        time since its last read (the block's start for a thread already there then); for a
        thread started since, before its second read, or where its CPU time cannot be read,
        whether its innermost frame is outside `WAITING_FILES`."""
        native = natives.get(ident)
        last = self._clocks.get(native) if native is not None else None
        if native in self._verdicts and last is not None and now - last[1] < CPU_READ_INTERVAL_NS:
            return self._verdicts[native]
        not_waiting = Path(frame.f_code.co_filename).name not in WAITING_FILES
        cpu = thread_cpu_ns(native) if native is not None else None
        if cpu is None:
            return not_waiting
        self._clocks[native] = (cpu, now)
        running = not_waiting if last is None else cpu - last[0] >= RUNNING_SHARE * (now - last[1])
        self._verdicts[native] = running
        return running

    def _run(self) -> None:
        own = threading.get_ident()
        while not self._stop.wait(self.interval):
            self._sample(own)

    def _sample(self, own: int) -> None:
        """One sample of every thread's stack. A frame object kept past its function's return
        keeps that function's locals alive (a replayed CUDA graph's liveness check, in
        cudagraph trees, fails on such a tensor), and the dict of frames holds this frame too,
        a cycle: so it is emptied before the sampler sleeps."""
        frames = sys._current_frames()
        try:
            if self._target not in frames:
                return
            self.samples += 1
            now = time.perf_counter_ns()
            natives = {t.ident: t.native_id for t in threading.enumerate() if t.ident is not None}
            for ident, frame in frames.items():
                other = ident != self._target
                if ident == own or (other and not self._running(ident, frame, now, natives)):
                    continue
                self.self_counts[frame.f_code, other] += 1
                seen = set()
                while frame is not None and frame is not self._root:
                    seen.add((frame.f_code, other))
                    frame = frame.f_back
                self.total_counts.update(seen)
        finally:
            frames.clear()

    def summary(self, top: int = 15) -> dict[str, Any]:
        """The sample count and the `top` functions by self and by total share."""

        def ranked(counts: Counter[tuple[CodeType, bool]], inclusive: bool) -> list[dict[str, Any]]:
            # Code objects of one name (a function defined again, lambdas): one row. A thread's
            # sample has one innermost frame, so self counts add up; total counts may overlap.
            named: Counter[str] = Counter()
            for (code, other), count in counts.items():
                name = ("[other] " if other else "") + code_name(code)
                named[name] = max(named[name], count) if inclusive else named[name] + count
            n = max(self.samples, 1)
            return [{"function": f, "share": c / n} for f, c in named.most_common(top)]

        return {
            "samples": self.samples,
            "interval_s": self.interval,
            "self": ranked(self.self_counts, inclusive=False),
            "total": ranked(self.total_counts, inclusive=True),
        }


def sample_steps(step: Any, steps: int, sync: Any, interval: float = 1e-3) -> dict[str, Any]:
    """Run `step(i)` for `steps` steps, `sync()` after the last, twice: timed as they are
    (`wall_ms_per_step`), then under a `StackSampler` (`wall_ms_per_step_sampled` and the
    sampler's summary)."""

    def timed() -> float:
        begin = time.perf_counter()
        for i in range(steps):
            step(i)
        sync()
        return 1e3 * (time.perf_counter() - begin) / steps

    wall = timed()
    with StackSampler(interval) as sampler:
        sampled = timed()
    return {
        "wall_ms_per_step": wall,
        "wall_ms_per_step_sampled": sampled,
        "steps": steps,
        **sampler.summary(),
    }
