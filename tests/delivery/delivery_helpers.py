"""Helpers of the delivery tests: recorders with fast settings, and waiting on their stats."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from raw_per import RawPer, Reply

from per_buffer import Recorder, RecorderStats
from per_buffer.config import KNOBS
from per_buffer.queue import DeadLetter, DurableQueue

#: The activity token of every delivery test (grepped for in logs and files).
TOKEN = "tok-DELIVERY-SECRET-5e1f9a"

#: Fast settings: small backoff, quick polls, no coalescing (every record is a request).
FAST: dict[str, Any] = {
    "coalesce_window": 0,
    "backoff_initial": 0.05,
    "backoff_max": 2.0,
    "poll_interval": 0.05,
    "auth_probe_interval": 0.5,
}
# These tests are about the delivery worker itself: it runs in a thread of the test's
# process (not in a drainer process), so that stats() shows its counters as they change.
if any(knob.name == "delivery" for knob in KNOBS):
    FAST["delivery"] = "thread"


def make(url: str, directory: Path, **options: Any) -> Recorder:
    """A recorder on ``directory`` delivering to ``url`` with :data:`FAST` settings."""
    return Recorder(TOKEN, "login", directory=directory, base_url=url, **{**FAST, **options})


def record_users(rec: Recorder, count: int, prefix: str = "u") -> list[str]:
    """Record ``count`` distinct users of billing ID ``acme``; return their IDs."""
    users = [f"{prefix}{i}" for i in range(count)]
    for user in users:
        rec.record("acme", user)
    return users


def hanging_bounds_flush_and_close(
    raw: RawPer, recorder: Callable[..., Recorder], count: int, **options: Any
) -> tuple[list[str], Recorder]:
    """``raw`` never answers: ``flush(timeout=1)`` and ``close(timeout=1)`` still end in time.

    The recorder (``recorder(raw.url, **options)``) keeps the default request timeout
    of 10 s. Returns the ``count`` users it recorded and the closed recorder.
    """
    raw.script = lambda hit: Reply(hang=True)
    rec = recorder(raw.url, **options)
    users = record_users(rec, count)
    assert raw.wait_for(lambda server: len(server.hits) >= 1, timeout=5)
    started = time.monotonic()
    assert rec.flush(timeout=1) is False
    assert time.monotonic() - started < 1.2
    started = time.monotonic()
    rec.close(timeout=1)
    closed_in = time.monotonic() - started
    assert closed_in < 1.5, closed_in
    return users, rec


def wait_stats(
    rec: Recorder, predicate: Callable[[RecorderStats], bool], timeout: float
) -> RecorderStats | None:
    """Poll ``rec.stats()`` every 20 ms until ``predicate`` holds; None at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        stats = rec.stats()
        if predicate(stats):
            return stats
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def dead_letters(directory: Path) -> list[DeadLetter]:
    """The dead letters stored in a queue directory (opened on its own, read only)."""
    queue = DurableQueue(directory)
    try:
        return queue.dead_letters()
    finally:
        queue.close()


def close_all(recorders: Iterable[Recorder]) -> None:
    """Close recorders quickly (test teardown)."""
    for rec in recorders:
        rec.close(timeout=0.5)
