"""Stop requests: SIGTERM (a scheduler's notice of preemption) and SIGINT (Ctrl-C).

While :class:`StopSignals` is active, the first such signal only records itself; the training
loop asks :meth:`StopSignals.stop_now` after every step, then writes a checkpoint for that
step and ends. A second signal ends the process at once (SIGINT raises `KeyboardInterrupt`,
SIGTERM exits with 143), through `finally` blocks, so no temporary file is left behind.

Under torchrun the ranks must stop after the same step. Each step all-reduces the local flag
without waiting for it, and the answer is read one step later, when that collective has long
finished: every rank then decides from the same value at the same step, with no host sync.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

from diffunet.training.distributed import DistInfo

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Catch SIGTERM/SIGINT for a `with` block; :meth:`stop_now` says when to stop.

    `signum` is the signal that asked for the stop (on every rank, once agreed).
    """

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.received: int = 0  # the first signal this process got
        self.signum: int = 0  # the agreed signal, once the loop stops
        self._previous: dict[int, object] = {}
        self._pending: tuple[object, torch.Tensor, torch.Tensor, object] | None = None
        self._host: torch.Tensor | None = None  # where the agreed signal lands (pinned on GPUs)

    # ------------------------------------------------------------------ handlers
    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            self.received = signum
            return
        if signum == signal.SIGINT:  # the second signal: stop at once
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    # ------------------------------------------------------------------ the decision
    def stop_now(self) -> bool:
        """Whether the loop stops after the step it just finished (the same answer on every
        rank); afterwards `signum` names the signal."""
        if not self.info.enabled:
            self.signum = self.received
            return bool(self.signum)
        agreed = self._collect()
        self._launch()
        if agreed:
            self.signum = agreed
        return bool(agreed)

    def _launch(self) -> None:
        """All-reduce this rank's signal (the largest wins: SIGTERM over SIGINT) in the
        background, copying the answer to the host when it arrives."""
        device = self.info.device
        # `full`, not `tensor`: a fill kernel, where a copy from the host would wait for the GPU.
        flag = torch.full((1,), self.received, dtype=torch.int32, device=device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if self._host is None:
            self._host = torch.empty(1, dtype=torch.int32, pin_memory=device.type == "cuda")
        host, event = self._host, None
        if device.type == "cuda":
            assert work is not None
            work.wait()  # orders the copy after the collective on this stream; no host wait
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending = (work, flag, host, event)

    def _collect(self) -> int:
        """The all-reduced signal launched one step ago (0 on the first step)."""
        if self._pending is None:
            return 0
        work, flag, host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]
            return int(host.item())
        work.wait()  # type: ignore[attr-defined]
        return int(flag.item())

    def finish(self) -> None:
        """Wait for the last background all-reduce, so no collective is left in flight."""
        self._collect()
