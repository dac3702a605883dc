"""Long work in the terminal: a spinner per phase, a bar for training, polite Ctrl-C."""

from __future__ import annotations

import signal
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from edgefed.cli.output import stderr

EXIT_INTERRUPTED = 130


@contextmanager
def stop_on_signals():
    """Turn the first Ctrl-C or SIGTERM into a polite stop request; a second one aborts."""
    requested: list[int] = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        stderr.print("stopping after this step and saving a checkpoint (again to abort) ...")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class TrainDisplay:
    """A spinner for each phase and a progress bar for the steps: rich shows one at a time."""

    def __init__(self) -> None:
        self._status = stderr.status("starting ...")
        self._progress: Progress | None = None
        self._task = None
        self._status.start()

    def status(self, message: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._status.start()
        self._status.update(f"{message} ...")

    def progress(self, event) -> None:
        if self._progress is None:
            self._status.stop()
            if event.step > 1:
                stderr.print(f"resumed from the checkpoint at step {event.step - 1}")
            self._progress = Progress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.3f}"),
                TextColumn("{task.fields[speed]:,.0f} tok/s"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=stderr,
            )
            self._task = self._progress.add_task(
                "training", total=event.total_steps, completed=event.step - 1, loss=0.0, speed=0.0
            )
            self._progress.start()
        self._progress.update(
            self._task, completed=event.step, loss=event.loss, speed=event.tokens_per_second
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._status.stop()
