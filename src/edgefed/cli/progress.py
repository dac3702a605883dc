"""Long work in the terminal: a spinner per phase, bars for training and scoring, polite Ctrl-C.

On a terminal scoring shows a bar with tokens/s and an ETA; elsewhere (a log file, CI, cron,
nohup) a bar would be noise and a spinner prints nothing, so progress comes as plain lines
(`LogLines`): an hour of training under nohup still says where it is.
"""

from __future__ import annotations

import re
import signal
import threading
import time
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
LOG_LINE_SECONDS = 60.0  # the least time between two training lines when not on a terminal
STATUS_DELAY_SECONDS = 2.0  # a phase this short is not worth a line in a log


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
        self._lines = None if stderr.is_terminal else LogLines()
        if self._lines is None:
            self._status.start()

    def status(self, message: str) -> None:
        if self._lines is not None:
            self._lines.status(message)
            return
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
        if self._lines is not None:
            self._lines.training(event)
            return
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
        if self._lines is not None:
            self._lines.close()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._status.stop()

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LogLines:
    """Progress as plain lines, for a stderr that is not a terminal.

    A phase is printed once it has lasted `STATUS_DELAY_SECONDS` (a command that fails at once
    still says one line, its error), a phase of the same shape with new figures (a wait's
    clock) at most once a minute; training at its first step, then at most once a minute with
    its loss, speed and time left, and at its last step.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: threading.Timer | None = None
        self._message = ""
        self._printed = ("", -LOG_LINE_SECONDS)  # the last phase line's shape and time
        self._training: tuple[float, float] | None = None  # started, last line
        self._first_step = 0  # the step before this process's first (a resumed run)

    def status(self, message: str) -> None:
        with self._lock:
            same_shape = _shape(message) == _shape(self._message)
            self._message = message
            if self._pending is not None and same_shape:
                return  # the timer prints the newest figures
            self._cancel()
            self._pending = threading.Timer(STATUS_DELAY_SECONDS, self._print_status)
            self._pending.daemon = True
            self._pending.start()

    def _print_status(self) -> None:
        with self._lock:
            self._pending = None
            shape, now = _shape(self._message), time.monotonic()
            if shape == self._printed[0] and now - self._printed[1] < LOG_LINE_SECONDS:
                return
            self._printed = (shape, now)
            stderr.print(f"{self._message} ...", highlight=False, soft_wrap=True)

    def training(self, event) -> None:
        with self._lock:
            self._cancel()  # training has begun: the phase before it is over
        now = time.monotonic()
        if self._training is None:
            self._training = (now, -LOG_LINE_SECONDS)
            self._first_step = event.step - 1
            if event.step > 1:
                stderr.print(f"resumed from the checkpoint at step {event.step - 1}")
        started, last = self._training
        if now - last < LOG_LINE_SECONDS and 1 < event.step < event.total_steps:
            return
        self._training = (started, now)
        done = max(event.step - self._first_step, 1)
        left = (now - started) / done * (event.total_steps - event.step)
        stderr.print(
            f"training: step {event.step}/{event.total_steps}, loss {event.loss:.3f}, "
            f"{event.tokens_per_second:,.0f} tok/s"
            + (f", about {_duration(left)} left" if event.step < event.total_steps else ""),
            highlight=False,
        )

    def close(self) -> None:
        with self._lock:
            self._cancel()

    def _cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


def _shape(message: str) -> str:
    """A status line without its figures: 'waiting for bob, 4:31 left' is one shape."""
    return re.sub(r"\d+", "#", message)


def _duration(seconds: float) -> str:
    """2h 05m, 12 min, 40 s: as precise as a log reader needs."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
