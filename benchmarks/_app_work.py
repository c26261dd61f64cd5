"""What the ``app`` benchmark's web apps do per request (shared by ``app_wsgi`` and ``app_asgi``).

Both endpoints do the same work: draw a user (a new one per request in the ``worst`` case,
one from a Zipf pool in the ``zipf`` case), build its billing ID and count the request in
a per-process counter file; ``/r`` also calls ``per_buffer.record(billing, user)``.

The counters live in a small memory-mapped file per process (``<pid>.cnt`` in
``$PER_BENCH_APP_COUNTERS``), written in place on every request (no system call), so the
benchmark can read exact totals from outside, even after the server has exited:

* bytes 0-32 for ``/r``, 32-64 for ``/p``: calls (``record()`` calls that returned, or
  calls of a no-op in its place), nanoseconds spent in them, the longest (the benchmark
  zeroes it between runs), calls of 1 ms or more;
* then one bit per user of the Zipf pool, set once that user was recorded.
"""

from __future__ import annotations

import bisect
import itertools
import json
import mmap
import os
import random
import struct
import time
from pathlib import Path
from typing import NamedTuple

import per_buffer

__all__ = [
    "CASE_ENV",
    "COUNTERS_ENV",
    "HEADER",
    "POOL_ENV",
    "PREFIX_ENV",
    "ZIPF_ENV",
    "Counts",
    "Work",
    "read_counters",
    "reset_max",
    "zipf_cdf",
]

CASE_ENV = "PER_BENCH_APP_CASE"  # "worst" (a new user per request) or "zipf"
PREFIX_ENV = "PER_BENCH_APP_PREFIX"  # user IDs start with it (one per configuration)
COUNTERS_ENV = "PER_BENCH_APP_COUNTERS"  # directory of the counter files
POOL_ENV = "PER_BENCH_APP_POOL"  # users in the Zipf pool
ZIPF_ENV = "PER_BENCH_APP_ZIPF_S"  # the Zipf exponent
_SLOT = 32  # bytes of counters per endpoint
HEADER = 2 * _SLOT
SLOW_NS = 1_000_000
BILLING_IDS = 97
_COUNT = struct.Struct("<Q")


def zipf_cdf(users: int, s: float) -> list[float]:
    """The cumulative distribution of a Zipf law with exponent ``s`` over ``users`` ranks."""
    weights = [1.0 / (rank**s) for rank in range(1, users + 1)]
    total = sum(weights)
    cdf: list[float] = []
    running = 0.0
    for weight in weights:
        running += weight
        cdf.append(running / total)
    cdf[-1] = 1.0
    return cdf


def _bitmap_bytes(pool: int) -> int:
    return (pool + 7) // 8


class Work:
    """The request work of both apps, configured from the environment."""

    def __init__(self) -> None:
        self.case = os.environ.get(CASE_ENV, "worst")
        if self.case not in ("worst", "zipf"):
            raise ValueError(f"{CASE_ENV} must be 'worst' or 'zipf', not {self.case!r}")
        self.prefix = os.environ.get(PREFIX_ENV, "bench")
        directory = os.environ.get(COUNTERS_ENV)
        self.directory = Path(directory) if directory else None
        self.pool = int(os.environ.get(POOL_ENV, "10000"))
        self._cdf = zipf_cdf(self.pool, float(os.environ.get(ZIPF_ENV, "1.0")))
        self._random = random.Random()
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._map: mmap.mmap | None = None
        # per endpoint (/r, /p): calls, nanoseconds in the call, (unused), calls >= 1 ms
        self._counts = [[0, 0, 0, 0], [0, 0, 0, 0]]
        self._numbers = itertools.count()
        self._random.seed()

    def _counters(self) -> mmap.mmap | None:
        if self._map is None and self.directory is not None:
            size = HEADER + _bitmap_bytes(self.pool)
            path = self.directory / f"{self._pid}.cnt"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, size)
                self._map = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        return self._map

    def who(self) -> tuple[str, str, int]:
        """``(billing_id, user_id, pool index or -1)`` of this request's user."""
        if self.case == "zipf":
            index = bisect.bisect_left(self._cdf, self._random.random())
            return f"org-{index % BILLING_IDS}", f"{self.prefix}-u{index}", index
        n = next(self._numbers)
        return f"org-{n % BILLING_IDS}", f"{self.prefix}-{self._pid}-{n}", -1

    def handle(self, record: bool) -> None:
        """One request's work; ``record``: record the activity, else call a no-op instead.

        Both time the call the same way, so the no-op's figures are the control for
        ``record()``'s (a thread switch or a preemption stalls both alike).
        """
        billing, user, index = self.who()
        call = per_buffer.record if record else _skip
        started = time.perf_counter_ns()
        call(billing, user)
        took = time.perf_counter_ns() - started
        counts = self._counts[0 if record else 1]
        counts[0] += 1
        counts[1] += took
        if took >= SLOW_NS:
            counts[3] += 1
        counters = self._counters()
        if counters is None:
            return
        base = 0 if record else _SLOT
        _COUNT.pack_into(counters, base, counts[0])
        _COUNT.pack_into(counters, base + 8, counts[1])
        if took > _COUNT.unpack_from(counters, base + 16)[0]:
            _COUNT.pack_into(counters, base + 16, took)
        if took >= SLOW_NS:
            _COUNT.pack_into(counters, base + 24, counts[3])
        if record and index >= 0:
            counters[HEADER + (index >> 3)] |= 1 << (index & 7)

    def stats_json(self) -> bytes:
        """This process's recorder figures as JSON (for the benchmark, not timed)."""
        stats = per_buffer.get_recorder().stats()
        return json.dumps(
            {
                "pid": self._pid,
                "recorded": stats.recorded,
                "coalesced": stats.coalesced,
                "enqueued": stats.enqueued,
                "dropped": dict(stats.dropped),
                "buffered": stats.buffered,
                "commit_lag": stats.commit_lag,
                "commit_lag_max": stats.commit_lag_max,
                "delivery": stats.delivery,
            }
        ).encode()


def _skip(billing_id: str, user_id: str) -> None:
    """What ``/p`` calls where ``/r`` calls ``record()``."""


class Counts(NamedTuple):
    """The counters of every process of a server, added up (r: ``/r``; p: ``/p``)."""

    records: int  # record() calls that returned
    plain: int  # requests to /p
    distinct: int  # distinct pool users recorded (Zipf case)
    record_ns: int  # time spent in record()
    record_max_ns: int  # the longest record() call since the last reset_max()
    record_slow: int  # record() calls of 1 ms or more
    skip_ns: int  # the same for the no-op /p calls in record()'s place
    skip_max_ns: int
    skip_slow: int


def read_counters(directory: Path, pool: int) -> Counts:
    """The counters of every process that wrote a file in ``directory``."""
    totals = [0] * 8  # r: calls, ns, max, slow; p: the same
    bitmap = bytearray(_bitmap_bytes(pool))
    for path in sorted(directory.glob("*.cnt")):
        data = path.read_bytes()
        if len(data) < HEADER:
            continue
        for slot in (0, 1):
            calls, spent, longest, slow = struct.unpack_from("<4Q", data, slot * _SLOT)
            base = slot * 4
            totals[base] += calls
            totals[base + 1] += spent
            totals[base + 2] = max(totals[base + 2], longest)
            totals[base + 3] += slow
        for i, byte in enumerate(data[HEADER : HEADER + len(bitmap)]):
            bitmap[i] |= byte
    distinct = sum(bin(byte).count("1") for byte in bitmap)
    r_calls, r_ns, r_max, r_slow, p_calls, p_ns, p_max, p_slow = totals
    return Counts(r_calls, p_calls, distinct, r_ns, r_max, r_slow, p_ns, p_max, p_slow)


def reset_max(directory: Path) -> None:
    """Zero every process's longest call (between runs; a race loses one)."""
    zero = _COUNT.pack(0)
    for path in directory.glob("*.cnt"):
        with open(path, "r+b") as handle:
            for slot in (0, 1):
                handle.seek(slot * _SLOT + 16)
                handle.write(zero)
