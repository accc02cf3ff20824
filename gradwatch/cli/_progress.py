"""A one-line progress display of training steps, with an honest ETA and log lines kept off it.

`StepProgress` draws `label [#####-----]  120/432 steps  0:04 left  job` on a terminal. The ETA
appears only once the step rate is known (`ETA_AFTER_STEPS` steps and `ETA_AFTER_S` seconds after
the first step, whose setup cost says nothing about the rate), so a 7-second job never starts at
"00:23:41". `LogLines` routes log records (the agent's warnings) through `message`, which clears
the line, prints the record on a line of its own and redraws the progress below it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

#: The ETA is shown once this many steps ran after the first one ...
ETA_AFTER_STEPS = 10
#: ... and this many seconds passed since the first step ended.
ETA_AFTER_S = 1.0
#: Steps redraw the line at most this often (a message or the last step always redraws it).
REDRAW_S = 0.1
BAR_WIDTH = 30


def clock_text(seconds: float) -> str:
    """0:07, 1:05, 1:02:03."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StepProgress:
    """Progress over `total` steps, redrawn in place on `stream` when `live` (a terminal); off a
    terminal only messages are written. Thread-safe: log records may come from any thread."""

    def __init__(self, total: int, stream: TextIO, label: str = "training", live: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.stream = stream
        self.label = label
        self.live = stream.isatty() if live is None else live
        self.clock = clock
        self.done = 0
        self.name = ""
        self._first_at: float | None = None  # when the first step ended: the rate is measured from there
        self._started = clock()
        self._drawn_at: float | None = None
        self._lock = threading.RLock()

    def eta(self) -> float | None:
        """Seconds left at the rate measured since the first step; None until that rate is known."""
        if self._first_at is None or self.done - 1 < ETA_AFTER_STEPS:
            return None
        elapsed = self.clock() - self._first_at
        if elapsed < ETA_AFTER_S:
            return None
        return (self.total - self.done) * elapsed / (self.done - 1)

    def line(self) -> str:
        """The progress line as drawn (without the carriage return)."""
        filled = BAR_WIDTH * self.done // max(1, self.total)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        eta = self.eta()
        when = "" if eta is None else f"  {clock_text(eta)} left"
        return f"{self.label}  [{bar}]  {self.done}/{self.total} steps{when}  {self.name}".rstrip()

    def step(self, name: str) -> None:
        """One step of job `name` done."""
        with self._lock:
            self.done += 1
            self.name = name
            now = self.clock()
            if self._first_at is None:
                self._first_at = now
            if self._drawn_at is None or now - self._drawn_at >= REDRAW_S or self.done == self.total:
                self._draw()

    def message(self, text: str) -> None:
        """`text` on a line of its own; the progress line is redrawn below it."""
        with self._lock:
            if self.live:
                self.stream.write("\r\x1b[2K")
            self.stream.write(text.rstrip("\n") + "\n")
            self._draw()

    def close(self) -> None:
        """End the progress line with the time the steps took."""
        with self._lock:
            if self.live:
                took = clock_text(self.clock() - self._started)
                self.stream.write(f"\r\x1b[2K{self.label}  {self.done}/{self.total} steps in {took}\n")
                self.stream.flush()

    def _draw(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K" + self.line())
            self._drawn_at = self.clock()
        self.stream.flush()


class LogLines(logging.Handler):
    """A logging handler writing each record through `StepProgress.message`."""

    def __init__(self, progress: StepProgress) -> None:
        super().__init__()
        self.progress = progress
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.message(self.format(record))
        except Exception:  # noqa: BLE001 - logging's contract: a handler never raises into the caller
            self.handleError(record)


@contextmanager
def progress(total: int, stream: TextIO, logger: str = "gradwatch.agent", live: bool | None = None,
             clock: Callable[[], float] = time.monotonic) -> Iterator[StepProgress]:
    """A `StepProgress` for the duration of the block, with `logger`'s records (the agent's warnings)
    printed through it instead of over it; the logger is restored after."""
    bar = StepProgress(total, stream, live=live, clock=clock)
    log = logging.getLogger(logger)
    handler = LogLines(bar)
    propagate = log.propagate
    log.addHandler(handler)
    log.propagate = False  # printed once, here, not again by a handler of the root logger
    try:
        yield bar
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
        bar.close()
