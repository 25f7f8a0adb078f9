"""Training progress: a tqdm bar on a terminal, one-line logs otherwise, a CSV file, TensorBoard.

`log.csv` has one row per logged step (`step, loss, lr, grad_norm, it_per_s, elapsed_s`);
TensorBoard event files go to `tb/` when the `tensorboard` package is installed. On resume,
rows after the resumed step are dropped, so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from diffunet.model.checkpoint import atomic_write_bytes

CSV_NAME = "log.csv"
CSV_FIELDS = ("step", "loss", "lr", "grad_norm", "it_per_s", "elapsed_s")


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def truncate_csv(path: Path, after_step: int) -> None:
    """Drop rows whose step is greater than `after_step` (rows of steps a resume will redo)."""
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        rows = [
            row
            for row in csv.DictReader(handle)
            if row.get("step", "").isdigit() and int(row["step"]) <= after_step
        ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(buffer.getvalue()))


def last_logged_step(run_dir: str | Path) -> int:
    """The highest step in a run's `log.csv`, 0 before the first row; safe to call while the
    run is writing it (a half-written last row is skipped)."""
    try:
        lines = (Path(run_dir) / CSV_NAME).read_text().splitlines()[1:]
    except OSError:
        return 0
    steps = [line.split(",", 1)[0] for line in lines]
    return max((int(step) for step in steps if step.isdigit()), default=0)


class RunLog:
    """Progress display plus CSV and TensorBoard logs for rank 0 (`enabled=False` elsewhere)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        start_step: int,
        total_steps: int,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start_step, self.total_steps = start_step, total_steps
        self.start_time = time.perf_counter()
        self._last_time, self._last_step = self.start_time, start_step
        self.bar = None
        self.tb = None
        self.csv_handle = None
        if not enabled:
            return
        csv_path = run_dir / CSV_NAME
        truncate_csv(csv_path, start_step)
        new_file = not csv_path.is_file()
        self.csv_handle = csv_path.open("a", newline="")
        self.csv = csv.DictWriter(self.csv_handle, fieldnames=CSV_FIELDS)
        if new_file:
            self.csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is optional
            self.tb = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                file=self.stream,
                desc="train",
            )

    def message(self, text: str) -> None:
        """Print a line above the progress bar (or plainly)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def tick(self, step: int) -> None:
        """Advance the progress bar to `step` (cheap; every step)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def step(self, step: int, values: dict[str, float], *, log_line: bool) -> None:
        """Record the metrics of `step`; advance the bar; write a text line when `log_line`."""
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        elapsed = now - self.start_time
        row: dict[str, Any] = {
            "step": step,
            **{k: f"{v:.6g}" for k, v in values.items()},
            "it_per_s": f"{rate:.4g}",
            "elapsed_s": f"{elapsed:.2f}",
        }
        self.csv.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        self.csv_handle.flush()
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"train/{key}", value, step)
            self.tb.add_scalar("train/it_per_s", rate, step)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{values.get('loss', float('nan')):.4f}",
                lr=f"{values.get('lr', 0):.2e}",
                refresh=False,
            )
            self.bar.update(step - self.bar.n)
        elif log_line:
            # The rate since the last line, as in log.csv: since the start it would count the
            # compilation and cuDNN tuning of the first steps, and the eta would be far off.
            eta = (self.total_steps - step) / rate if rate > 0 else 0.0
            self.message(
                f"step {step}/{self.total_steps}  loss {values.get('loss', float('nan')):.4f}  "
                f"lr {values.get('lr', 0):.2e}  {rate:.2f} it/s  "
                f"elapsed {_format_duration(elapsed)}  eta {_format_duration(eta)}"
            )

    def scalar(self, name: str, value: float, step: int) -> None:
        """Record an extra scalar (e.g. an evaluation number) in TensorBoard."""
        if self.enabled and self.tb is not None:
            self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        """Flush and close everything."""
        if self.bar is not None:
            self.bar.close()
        if self.csv_handle is not None:
            self.csv_handle.close()
        if self.tb is not None:
            self.tb.close()
