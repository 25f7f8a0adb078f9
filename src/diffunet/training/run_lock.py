"""One process per run folder: an advisory lock that `diffunet train` holds while it runs.

The lock is `fcntl.flock` on `<run>/train.lock`, which holds the owner's PID and host. The
operating system releases it when the process ends, however it ends, so a SIGKILL never leaves
a stale lock; the file itself stays (removing it would race with a process about to lock it).
Under torchrun rank 0 holds it. On systems without `fcntl` (Windows) runs are not locked.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import TracebackType

from diffunet.errors import TrainingError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "train.lock"


class RunLock:
    """The lock on one run folder; `acquire()` raises :class:`TrainingError` naming the holder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._handle = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._handle is not None

    def acquire(self) -> RunLock:
        """Take the lock (the folder must exist), or say which process holds it."""
        if self.held or fcntl is None:
            return self
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            pid, _, host = holder.partition(" ")
            where = f" on {host}" if host and host != socket.gethostname() else ""
            raise TrainingError(
                f"{self.path.parent} is in use by another diffunet train (PID {pid}{where}); "
                "wait for it to finish or stop it, or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Let go of the lock (closing the file releases it)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
