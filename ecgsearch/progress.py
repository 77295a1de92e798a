"""One progress display for a long command: step k of n, units done of N, elapsed, time left.

    [rle] step 3/9 | 10 candidates: 4/10 done | elapsed 2m13s | ~5m40s left

A *phase* is a batch of units (RLE candidates of one step, study trials); `plan` says how many
units are still to come after it, so the estimate covers the whole command, not one phase.

On a terminal the display is one line redrawn in place; a ticker redraws it every `refresh_s`
so elapsed time moves while a long unit runs. On anything else (CI logs, `make demo | tee`) a
redrawn line would be a mess of carriage returns, so it prints one plain line when a phase
starts and one per `done` call, and nothing in between. `note` lines are permanent on both.
"""
from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import Callable, TextIO

_CLEAR = "\r\x1b[K"  # back to column 0 and erase to the end of the line


def format_duration(seconds: float) -> str:
    """13s, 2m05s, 1h02m: short enough for one status line, precise enough for an estimate."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def format_status(title: str, label: str, n_units: int, n_done: int, *, elapsed: float,
                  eta: float | None, left: int, step: int | None = None, n_steps: int | None = None) -> str:
    """The display text. `eta` None: no unit finished yet; `left` 0: nothing to estimate."""
    head = f"[{title}]"
    if step is not None:
        head += f" step {step}/{n_steps}" if n_steps is not None else f" step {step}"
    parts = [f"{n_units} {label}: {n_done}/{n_units} done", f"elapsed {format_duration(elapsed)}"]
    if left > 0:
        parts.append("estimating" if eta is None else f"~{format_duration(eta)} left")
    # "[tune] 4 trials: ..." but "[rle] step 3/9 | 10 candidates: ...".
    return head + (" | " if step is not None else " ") + " | ".join(parts)


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """See the module docstring. `enabled=False` shows no display but still prints notes, so a
    command run with --verbose (Ray's own output on the console) keeps its summary lines."""

    def __init__(self, title: str, *, stream: TextIO | None = None, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic, refresh_s: float = 1.0) -> None:
        self.title, self.enabled, self._clock = title, enabled, clock
        self._stream = stream if stream is not None else sys.stderr
        self._tty = _is_tty(self._stream)
        self._refresh_s = refresh_s
        self._lock = threading.RLock()
        self._t0 = clock()
        self._work_t0: float | None = None  # first phase start: set-up before it is not a unit's cost
        self._t_last: float | None = None   # when the last unit finished
        self._timed = 0                     # units finished while we watched (not `done_before`)
        self._rates: dict[str, tuple[float, int]] = {}   # kind -> (seconds, units) while watched
        self._kind: str | None = None
        self._mark = self._t0
        self._label: str | None = None
        self._n = self._done = self._planned = 0
        self._step: int | None = None
        self._n_steps: int | None = None
        self._drawn = ""                    # what the terminal line shows now ("" = nothing)
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._closed = False
        self._last_line = clock()         # when the last plain (non-terminal) line was printed

    # -- the interface --------------------------------------------------------------
    def phase(self, label: str, n_units: int, *, step: int | None = None, n_steps: int | None = None,
              done_before: int = 0, kind: str | None = None) -> None:
        """Start a phase of `n_units` units, `done_before` of them already finished (a resumed
        step or study): they count as done but not in the time per unit."""
        if n_units < 0 or not 0 <= done_before <= n_units:
            raise ValueError(f"invalid phase {label!r}: n_units={n_units}, done_before={done_before}")
        with self._lock:
            now = self._clock()
            if self._work_t0 is None:
                self._work_t0 = now
            # Units of one kind (trainings, predictions) take alike; the estimate uses that kind's
            # rate, so seconds-long predictions are not priced like minutes-long trainings.
            self._kind = kind or label
            self._mark = now
            # The plan counted this phase's units among those still to come: they are here now.
            self._planned = max(0, self._planned - n_units)
            self._label, self._n, self._done = label, n_units, done_before
            self._step, self._n_steps = step, n_steps
            self._show(always_line=True)

    def done(self, n: int = 1) -> None:
        """`n` more units of the current phase finished (counts past the phase size are capped)."""
        if n < 0:
            raise ValueError(f"done(n={n}): n must be >= 0")
        with self._lock:
            if self._label is None:
                raise RuntimeError("Progress.done() before any phase()")
            n = min(n, self._n - self._done)
            if n == 0:
                return
            self._done += n
            self._timed += n
            self._t_last = self._clock()
            spent, count = self._rates.get(self._kind, (0.0, 0))
            self._rates[self._kind] = (spent + self._t_last - self._mark, count + n)
            self._mark = self._t_last
            self._show(always_line=self._line_due())

    def _line_due(self) -> bool:
        """Non-terminal streams: a line at the phase's end, each tenth of it, or every 30 s.

        A line per unit would flood a log with hundreds of lines on a search of 12 leads x seeds.
        """
        step = max(1, self._n // 10)
        now = self._clock()
        due = self._done == self._n or self._done % step == 0 or now - self._last_line >= 30.0
        if due:
            self._last_line = now
        return due

    def plan(self, remaining_units: int) -> None:
        """Units still to come after the current phase, for the estimate; prints no line."""
        if remaining_units < 0:
            raise ValueError(f"plan(remaining_units={remaining_units}): must be >= 0")
        with self._lock:
            self._planned = int(remaining_units)
            self._show(always_line=False)

    def note(self, text: str) -> None:
        """A permanent line printed above the display."""
        with self._lock:
            if self._drawn:
                self._write(_CLEAR)
            self._write(text.rstrip("\n") + "\n")
            if self._drawn:
                self._drawn = ""
                self._show(always_line=False)

    def close(self) -> None:
        """Stop the ticker and leave the last display on its own line."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            if self._drawn:
                self._draw(self.text())
                self._write("\n")
                self._drawn = ""
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join(timeout=5)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what is shown -----------------------------------------------------------------
    def eta(self) -> float | None:
        """Mean seconds per finished unit so far x units still to come; None before the first."""
        with self._lock:
            if not self._timed or self._work_t0 is None or self._t_last is None:
                return None
            spent, count = self._rates.get(self._kind, (0.0, 0))
            per_unit = spent / count if count else (self._t_last - self._work_t0) / self._timed
            return per_unit * (self._n - self._done + self._planned)

    def text(self) -> str:
        with self._lock:
            if self._label is None:
                return f"[{self.title}] elapsed {format_duration(self._clock() - self._t0)}"
            return format_status(self.title, self._label, self._n, self._done, elapsed=self._clock() - self._t0,
                                 eta=self.eta(), left=self._n - self._done + self._planned,
                                 step=self._step, n_steps=self._n_steps)

    def _show(self, *, always_line: bool) -> None:
        if not self.enabled or self._closed:
            return
        if self._tty:
            self._draw(self.text())
            self._start_ticker()
        elif always_line:
            self._write(self.text() + "\n")

    def _draw(self, text: str) -> None:
        # A line longer than the terminal wraps, and \r then redraws only its last row.
        width = shutil.get_terminal_size((120, 24)).columns - 1
        if len(text) > width > 3:
            text = text[: width - 3] + "..."
        self._write(_CLEAR + text)
        self._drawn = text

    def _write(self, s: str) -> None:
        self._stream.write(s)
        self._stream.flush()

    def _start_ticker(self) -> None:
        if self._ticker is not None or not self._refresh_s or self._refresh_s <= 0:
            return
        self._ticker = threading.Thread(target=self._tick, name=f"progress-{self.title}", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self._refresh_s):
            with self._lock:
                if self._closed:
                    return
                text = self.text()
                if self._drawn and text != self._drawn:
                    try:
                        self._draw(text)
                    except (ValueError, OSError):  # the stream was closed under us: stop quietly
                        return
