"""Live progress on stderr for the long commands (``drain``, ``demo``): line, state, rate."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
import time
from collections import deque
from typing import IO

from ..recorder import RecorderStats
from ._common import age, one_line

TTY_INTERVAL = 0.2  # seconds between rewrites of the progress line on a terminal
PLAIN_INTERVAL = 1.0  # seconds between progress lines when stderr is not a terminal


class Progress:
    """Live status on stderr: one rewritten line on a terminal, periodic plain lines otherwise."""

    def __init__(
        self, stream: IO[str] | None = None, *, plain_interval: float = PLAIN_INTERVAL
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        try:
            self.tty = self._stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._interval = TTY_INTERVAL if self.tty else plain_interval
        self._last = -math.inf
        self._dirty = False

    def update(self, text: str, *, force: bool = False) -> None:
        """Show ``text`` unless the previous update was too recent (``force`` shows it anyway)."""
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        try:
            if self.tty:
                width = max(20, self._columns() - 1)
                if len(text) > width:
                    text = text[: width - 1] + "…"
                self._stream.write("\r" + text + "\x1b[K")
                self._dirty = True
            else:
                self._stream.write(text + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def _columns(self) -> int:
        """Width of the terminal behind the stream (stdout may be redirected meanwhile)."""
        with contextlib.suppress(ValueError):
            columns = int(os.environ.get("COLUMNS", ""))
            if columns > 0:
                return columns
        try:
            return os.get_terminal_size(self._stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            return shutil.get_terminal_size((100, 20)).columns

    def note(self, text: str) -> None:
        """A message on its own line (the live line is redrawn by the next update)."""
        self.done()
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(text + "\n")
            self._stream.flush()

    def done(self) -> None:
        """End the live line so that following output starts on a fresh line."""
        if self._dirty:
            self._dirty = False
            with contextlib.suppress(OSError, ValueError):
                self._stream.write("\n")
                self._stream.flush()


def short_error(text: str | None) -> str:
    """The gist of a delivery error for a progress line: ``HTTP 503``, ``ConnectError``..."""
    if not text:
        return "error"
    match = re.search(r"HTTP \d{3}|\b\w+(?:Error|Timeout)\b|invalid_auth_token", text)
    return match.group(0) if match else one_line(text)[:40]


class DeliveryState:
    """Names what delivery is doing from successive stats: sending, retrying, paused, caught up."""

    def __init__(self) -> None:
        self._delivered = -1
        self._progress_at = time.monotonic()

    def update(self, stats: RecorderStats, now: float) -> str:
        """The state after ``stats`` (taken at monotonic time ``now``)."""
        if stats.delivered != self._delivered:
            self._delivered, self._progress_at = stats.delivered, now
        if stats.pause_reason:
            until = ""
            if stats.paused_until is not None:
                until = f", {max(0.0, stats.paused_until - time.time()):.0f} s left"
            return f"paused ({stats.pause_reason}{until})"
        if not (stats.pending or stats.in_flight):
            return "caught up"
        if now - self._progress_at > 0.75 and stats.retried and stats.last_error:
            return f"retrying ({short_error(stats.last_error)})"
        return "sending"


class Rate:
    """Activities per second over the last ``window`` seconds, and the time left at that pace."""

    def __init__(self, window: float = 10.0) -> None:
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> None:
        """Record that ``done`` activities were finished at monotonic time ``now``."""
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()

    def per_second(self) -> float | None:
        """The recent rate, or None before two samples a little apart."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 0.5:
            return None
        return max(0.0, (d1 - d0) / (t1 - t0))

    def text(self, left: int) -> str:
        """``120/s, ETA 4.2 s`` (or ``-`` parts when unknown or stalled)."""
        rate = self.per_second()
        if rate is None:
            return "rate -, ETA -"
        if left == 0:
            return f"{rate:,.0f}/s, ETA 0 s"
        if rate <= 0:
            return "0/s, ETA -"
        return f"{rate:,.0f}/s, ETA {age(left / rate)}"


def bar(fraction: float, width: int = 24) -> str:
    """``[#####-----]  42.0%``."""
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + f"] {fraction * 100:5.1f}%"
