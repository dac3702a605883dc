"""Long work in the terminal: a spinner per phase, bars for training and scoring, polite Ctrl-C.

On a terminal scoring shows a bar with tokens/s and an ETA; elsewhere (a log file, CI, cron) a
bar would be noise, so it prints one line per scored adapter instead.
"""

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
from edgefed.scoring import ScoreProgress

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


class ScoringDisplay:
    """Progress of one scoring batch (ScoreProgress events): a bar, or a line per adapter."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task = None
        self._batch: tuple[str, int] | None = None

    def update(self, event: ScoreProgress) -> None:
        batch = (event.task, event.tokens_total)
        if not stderr.is_terminal:
            if event.finished is not None:
                stderr.print(
                    f"{event.task}: scored {event.finished} "
                    f"({event.jobs_done}/{event.jobs_total}, "
                    f"{event.tokens_per_second:,.0f} tok/s)",
                    highlight=False,
                )
            return
        if self._progress is None or batch != self._batch:
            self.close()
            self._batch = batch
            self._progress = Progress(
                TextColumn(f"[bold]{event.task}"),
                BarColumn(),
                TextColumn("{task.fields[jobs]}"),
                TextColumn("{task.fields[speed]:,.0f} tok/s"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=stderr,
                transient=True,
            )
            self._task = self._progress.add_task(
                event.task, total=event.tokens_total, jobs="", speed=0
            )
            self._progress.start()
        self._progress.update(
            self._task,
            completed=event.tokens_done,
            jobs=f"{event.jobs_done}/{event.jobs_total}",
            speed=event.tokens_per_second,
        )
        if event.tokens_done >= event.tokens_total:
            self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._batch = None


class ProgressDisplay:
    """A spinner for each phase, a bar for training steps or for scoring: one at a time.

    `progress` takes training's TrainProgress and scoring's ScoreProgress events alike.
    """

    def __init__(self) -> None:
        self._status = stderr.status("starting ...")
        self._progress: Progress | None = None
        self._task = None
        self._scoring = ScoringDisplay()
        self._status.start()

    def status(self, message: str) -> None:
        self._scoring.close()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._status.start()  # no-op while it runs; back after a bar
        self._status.update(f"{message} ...")

    def progress(self, event) -> None:
        if isinstance(event, ScoreProgress):  # one live display at a time
            self._status.stop()
            if self._progress is not None:
                self._progress.stop()
                self._progress = None
            self._scoring.update(event)
            return
        self._scoring.close()
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
        self._scoring.close()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._status.stop()

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
