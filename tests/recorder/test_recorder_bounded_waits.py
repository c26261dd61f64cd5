"""Bounded waits (adversarial review): another process holding the queue database's
write lock never holds up constructing a recorder, record(), stats(), flush(), close(),
os.fork() or the exit of a recording process; ``durability="sync"`` delivers without
flush(); process delivery's counters survive a quarantine; and the API called from a
signal handler that interrupted flush(), close() or the first record() never deadlocks.

The lock holder is a real second process that keeps ``BEGIN IMMEDIATE`` open on the
directory's live SQLite database (:func:`write_lock_held`). Time bounds: the library's
own bound plus ``SLACK`` for a busy machine; the waits they guard against were 2-60 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from per_buffer import Recorder, RecorderStats
from per_buffer.queue import DurableQueue
from per_buffer.testing import PerServer

pytestmark = pytest.mark.usefixtures("counters_add_up")

SLACK = 0.3  # seconds of scheduling noise allowed beyond a documented bound
QUICK = 0.5  # "at once": what must not wait for the disk at all
CLOSE_SLACK = 0.5  # close(timeout) returns within timeout + 0.5 s (its docstring)
FAST = {"backoff_initial": 0.02, "backoff_max": 0.2, "poll_interval": 0.05}

HOLDER = textwrap.dedent(
    """
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
    print("ready", flush=True)
    sys.stdin.readline()
    db.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes this pipe
    db.execute("ROLLBACK")
    """
)


def live_db(directory: Path) -> Path:
    """The live database of a queue directory (the highest generation)."""
    return max(directory.glob("db-*/cache.db"), key=lambda p: int(p.parent.name[3:]))


class LockHolder:
    """Another process, connected to ``directory``'s live database, that takes its write
    lock (``BEGIN IMMEDIATE``) when told (:meth:`lock` returns once it holds it) and
    lets go when the ``with`` block ends. It says so on stdout: no sleeps."""

    def __init__(self, directory: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(live_db(directory))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == word, line

    def __enter__(self) -> LockHolder:
        self._expect("ready")
        return self

    def lock(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("lock\n")
        self.proc.stdin.flush()
        self._expect("locked")

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def write_lock_held(directory: Path) -> Iterator[None]:
    """Another process holds the write lock of ``directory``'s live database for the
    duration of the block."""
    with LockHolder(directory) as holder:
        holder.lock()
        yield


def make(server: PerServer, directory: Path, **options: Any) -> Recorder:
    settings = {**FAST, "coalesce_window": 0, **options}
    return Recorder(
        server.activity_token, "login", directory=directory, base_url=server.url, **settings
    )


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    value = call()
    return value, time.monotonic() - started


def new_queue(directory: Path) -> None:
    """A queue directory with its database, as an earlier recorder leaves it."""
    with DurableQueue(directory):
        pass


def on_disk(directory: Path) -> int:
    with DurableQueue(directory) as queue:
        return sum(queue.counts())


def users(server: PerServer) -> set[str]:
    return {a.user_id for a in server.activities}


# ---------------------------------------------------------------------- construction


@pytest.mark.parametrize("delivery", ["thread", "process"])
def test_construction_and_record_do_not_wait_for_a_locked_database(
    server: PerServer, tmp_path: Path, delivery: str
) -> None:
    """Constructing used to open the queue (up to 60 s per diskcache statement while
    another process held the lock); now the committer opens it in the background."""
    directory = tmp_path / "q"
    new_queue(directory)
    with write_lock_held(directory):
        rec, took = timed(lambda: make(server, directory, delivery=delivery))
        assert took < QUICK, f"Recorder() took {took:.2f} s"
        _, took = timed(lambda: [rec.record("acme", f"u{i}") for i in range(100)])
        assert took < QUICK, f"100 record() calls took {took:.2f} s"
        _, took = timed(lambda: rec.close(0.3))
        assert took <= 0.3 + CLOSE_SLACK + SLACK, f"close(0.3) took {took:.2f} s"
        stats, took = timed(rec.stats)  # closed: the last figures, no wait
        assert took < QUICK
        assert stats.dropped.get("unwritten_at_close") == 100, stats
    assert on_disk(directory) == 0  # nothing was written after close() returned


def test_stats_right_after_construction_waits_at_most_half_a_second(
    server: PerServer, tmp_path: Path
) -> None:
    """Right after construction stats() waits up to about 0.5 s for the committer to open
    the queue (documented), then reports what is in memory; with the database locked
    elsewhere it used to wait 2.5 s, and the next call ~1.5 s more (the committer's first
    open attempt takes two lock timeouts)."""
    directory = tmp_path / "q"
    new_queue(directory)
    with write_lock_held(directory):
        rec = make(server, directory)
        rec.record("acme", "u1")
        for _ in range(2):
            stats, took = timed(rec.stats)
            assert took <= 0.5 + SLACK, f"stats() took {took:.2f} s"
            assert stats.buffered == 1 and stats.pending == 1, stats
        rec.close(0)


# ---------------------------------------------------------------------- stats, flush, close


@pytest.mark.parametrize("delivery", ["thread", "process"])
def test_stats_and_flush_never_wait_for_a_write_lock_held_elsewhere(
    server: PerServer, tmp_path: Path, delivery: str
) -> None:
    """stats() reads a snapshot and flush(timeout) keeps its deadline; both used to run
    write transactions that waited up to the queue's 2 s lock timeout."""
    directory = tmp_path / "q"
    rec = make(server, directory, delivery=delivery)
    rec.record("acme", "u0")
    assert rec.flush(10)
    with write_lock_held(directory):
        for i in range(1, 11):
            rec.record("acme", f"u{i}")
        for _ in range(3):
            stats, took = timed(rec.stats)
            assert took < QUICK, f"stats() took {took:.2f} s"
        assert stats.pending >= 10 and stats.delivered == 1, stats
        done, took = timed(lambda: rec.flush(0))
        assert done is False and took < QUICK, f"flush(0) took {took:.2f} s"
        done, took = timed(lambda: rec.flush(0.3))
        assert done is False and took <= 0.3 + SLACK, f"flush(0.3) took {took:.2f} s"
    assert rec.flush(10)  # the lock is gone: everything goes through
    assert users(server) == {f"u{i}" for i in range(11)}
    rec.close()


def test_flush_keeps_its_deadline_while_the_worker_waits_to_acknowledge(
    server: PerServer, tmp_path: Path
) -> None:
    """Thread delivery: Per answers while another process holds the lock, so the worker's
    acknowledgement waits for it. flush(0.2) used to wait 2-6 s (its check was a write,
    and the worker kept the storage lock through its own retries)."""
    directory = tmp_path / "q"
    rec = make(server, directory, delivery="thread")
    rec.record("acme", "u0")
    assert rec.flush(10)
    latency = 0.4
    server.set_latency(latency)
    with LockHolder(directory) as holder:  # started now: it takes the lock in milliseconds
        for i in range(1, 20):
            rec.record("acme", f"u{i}")
        assert server.wait_for_activities(20, 10)  # claimed and sent; answers in `latency` s
        arrived = time.monotonic()
        holder.lock()
        assert time.monotonic() < arrived + latency / 2  # locked before the answers came
        # from before the answers until the worker's acknowledgement has waited a while
        while time.monotonic() < arrived + latency + 0.5:
            done, took = timed(lambda: rec.flush(0.2))
            assert done is False and took <= 0.2 + SLACK, f"flush(0.2) took {took:.2f} s"
            _, took = timed(rec.stats)
            assert took < QUICK, f"stats() took {took:.2f} s"
        _, took = timed(lambda: rec.close(0.2))
        assert took <= 0.2 + CLOSE_SLACK + SLACK, f"close(0.2) took {took:.2f} s"
    server.set_latency(0)


@pytest.mark.parametrize("delivery", ["thread", "process"])
def test_close_keeps_its_deadline_on_a_locked_database_with_nothing_in_memory(
    server: PerServer, tmp_path: Path, delivery: str
) -> None:
    """close(0.3) with everything delivered returns within 0.3 + 0.5 s, counts nothing
    as unwritten and writes nothing afterwards; it used to read the queue's figures as
    a write after its deadline (2 s more). A batch in memory at close is
    test_recorder_accounting.py's test_close_keeps_its_deadline_and_counts_what_is_not_on_disk."""
    directory = tmp_path / "q"
    rec = make(server, directory, delivery=delivery)
    rec.record("acme", "u0")
    assert rec.flush(10)
    with write_lock_held(directory):
        _, took = timed(lambda: rec.close(0.3))
        assert took <= 0.3 + CLOSE_SLACK + SLACK, f"close(0.3) took {took:.2f} s"
        committer = rec._committer
        assert committer is not None
        committer.join(2)
        assert not committer.is_alive()
        stats = rec.stats()
        assert stats.dropped == {} and stats.delivered == 1, stats
    assert on_disk(directory) == 0  # nothing was written after close() returned
    assert users(server) == {"u0"}


# ---------------------------------------------------------------------- fork, exit


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_does_not_wait_for_a_locked_database(server: PerServer, tmp_path: Path) -> None:
    """The before-fork hook used to write the memory batch synchronously: 2-3.6 s per
    os.fork() while another process held the lock. What it cannot write at once stays
    in the parent's memory and is delivered later; the child starts empty."""
    directory = tmp_path / "q"
    rec = make(server, directory)
    rec.record("acme", "u0")
    assert rec.flush(10)
    forks: list[float] = []
    with write_lock_held(directory):
        for i in range(3):
            rec.record("acme", f"new-{i}")  # a new key waits in memory: the disk is locked
            started = time.monotonic()
            pid = os.fork()
            if pid == 0:  # the child leaves at once
                os._exit(0)
            forks.append(time.monotonic() - started)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    assert max(forks) < QUICK, f"os.fork() took {forks}"
    assert rec.flush(10)
    assert users(server) == {"u0", "new-0", "new-1", "new-2"}
    rec.close()


EXIT_CHILD = textwrap.dedent(
    """
    import atexit, json, sys, time

    def report():  # registered first, so it runs after per_buffer's exit handler
        stats = per_buffer.get_recorder().stats()
        print("dropped", json.dumps(dict(stats.dropped)), flush=True)

    atexit.register(report)
    import per_buffer

    case = sys.argv[1]
    if case != "first-record":
        per_buffer.record("acme", "u0")
        assert per_buffer.flush(15), "delivered"
    print("ready", flush=True)
    sys.stdin.readline()  # the parent holds the lock now
    started = time.monotonic()
    if case != "nothing-in-memory":
        per_buffer.record("acme", "u1")
    print(f"record {time.monotonic() - started:.3f}", flush=True)
    """
)


@pytest.mark.shared_directory
@pytest.mark.parametrize("case", ["first-record", "nothing-in-memory", "new-key"])
def test_exit_keeps_exit_timeout_on_a_locked_database(
    server: PerServer, tmp_path: Path, case: str
) -> None:
    """A recording process's exit (the atexit close) took ~3-4 s while another process
    held the lock: it read the queue's figures before closing. Default (process)
    delivery, PER_BUFFER_EXIT_TIMEOUT=0.5: with nothing in memory the exit takes
    milliseconds (README), else at most exit_timeout + 0.5 s. ``first-record``: the
    process's first per_buffer.record() builds the default recorder under the lock."""
    directory = tmp_path / "q"
    new_queue(directory)
    exit_timeout = 0.5
    env = {k: v for k, v in os.environ.items() if not k.startswith("PER_")}
    env.update(
        PER_ACTIVITY_TOKEN=server.activity_token,
        PER_ACTIVITY_TYPE_ID="login",
        PER_BASE_URL=server.url,
        PER_BUFFER_DIR=str(directory),
        PER_BUFFER_EXIT_TIMEOUT=str(exit_timeout),
        PER_BUFFER_DRAINER_NICE="0",
    )
    child = subprocess.Popen(
        [sys.executable, "-c", EXIT_CHILD, case],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        with write_lock_held(directory):
            child.stdin.write("go\n")
            child.stdin.flush()
            line = child.stdout.readline()
            last_statement = time.monotonic()
            assert line.startswith("record "), line
            child.wait(30)
            took = time.monotonic() - last_statement
    finally:
        if child.poll() is None:
            child.kill()
        # read through the text wrappers: readline() may already hold the next line in
        # its buffer, which communicate() (reading the raw pipes) would drop
        assert child.stdin is not None and child.stdout is not None and child.stderr is not None
        child.stdin.close()
        rest, err = child.stdout.read(), child.stderr.read()
        child.wait(10)
    assert child.returncode == 0, err
    assert float(line.split()[1]) < QUICK, line
    bound = QUICK if case == "nothing-in-memory" else exit_timeout + CLOSE_SLACK + 2 * SLACK
    assert took <= bound, f"exit took {took:.2f} s"
    # what could not reach the disk is counted, not lost silently
    unwritten = {} if case == "nothing-in-memory" else {"unwritten_at_close": 1}
    assert rest.splitlines() == [f"dropped {json.dumps(unwritten)}"], (rest, err)


# ---------------------------------------------------------------------- sync, quarantine


@pytest.mark.parametrize("delivery", ["thread", "process"])
def test_sync_durability_delivers_without_flush(
    server: PerServer, tmp_path: Path, delivery: str
) -> None:
    """``durability="sync"`` never started delivery: nothing reached Per before a
    flush() or close()."""
    rec = make(server, tmp_path / "q", durability="sync", delivery=delivery)
    for i in range(5):
        rec.record("acme", f"u{i}")
    assert server.wait_for_activities(5, 15), f"Per received {len(server.activities)} of 5"
    assert users(server) == {f"u{i}" for i in range(5)}
    rec.close()


def assert_whole(stats: RecorderStats) -> None:
    counters = {
        "recorded": stats.recorded,
        "coalesced": stats.coalesced,
        "delivered": stats.delivered,
        "dead_lettered": stats.dead_lettered,
        "pending": stats.pending,
        "in_flight": stats.in_flight,
        **{f"dropped[{k}]": v for k, v in stats.dropped.items()},
    }
    assert all(v >= 0 for v in counters.values()), counters
    accounted = sum(v for k, v in counters.items() if k != "recorded")
    assert stats.recorded == accounted, counters


@pytest.mark.parametrize("history", [False, True])
def test_process_delivery_counters_add_up_across_a_quarantine(
    server: PerServer, tmp_path: Path, history: bool
) -> None:
    """The drainer's counters restart from zero in the fresh database another process
    makes when it moves a damaged one aside; the recorder subtracted its base from them
    (``delivered`` went negative). ``history``: an earlier recorder delivered 50 in the
    directory first (a larger base)."""
    directory = tmp_path / "q"
    if history:
        old = make(server, directory, delivery="thread")
        for i in range(50):
            old.record("acme", f"old{i}")
        assert old.flush(10)
        old.close()
    rec = make(server, directory, delivery="process")
    for i in range(50):
        rec.record("acme", f"a{i}")
    assert rec.flush(10)
    assert_whole(rec.stats())
    with DurableQueue(directory) as other:  # another process finds the database broken
        other._storage.quarantine("simulated damage")
    for i in range(10):
        rec.record("acme", f"b{i}")
    assert rec.flush(10)
    stats = rec.stats()
    assert_whole(stats)
    assert stats.recorded == 60 and stats.delivered == 60, stats
    assert users(server) >= {f"a{i}" for i in range(50)} | {f"b{i}" for i in range(10)}
    rec.close()
    assert_whole(rec.stats())


@pytest.mark.xfail(
    strict=True,
    reason=(
        "defect: process delivery's figures keep only the counters the recorder read before "
        "the database was moved aside (stats(), or the committer's refresh about once a "
        "second when idle): what the drainer delivered since that read is lost from "
        "stats().delivered (here 10 instead of 60) and the counters no longer add up"
    ),
)
@pytest.mark.shared_directory  # the test checks the identity itself (the fixture would too)
def test_process_delivery_counters_add_up_across_a_quarantine_nobody_read_before(
    server: PerServer, tmp_path: Path
) -> None:
    """As above, but nothing reads the figures between the deliveries and the quarantine
    (poll_interval=30: the committer's idle refresh does not come either)."""
    directory = tmp_path / "q"
    rec = make(server, directory, delivery="process", poll_interval=30)
    for i in range(50):
        rec.record("acme", f"a{i}")
    assert rec.flush(10)
    with DurableQueue(directory) as other:  # another process finds the database broken
        other._storage.quarantine("simulated damage")
    for i in range(10):
        rec.record("acme", f"b{i}")
    assert rec.flush(10)
    stats = rec.stats()
    rec.close()
    assert len(server.activities) == 60
    assert stats.delivered == 60, stats
    assert_whole(stats)


# ---------------------------------------------------------------------- signal handlers
#
# A signal handler runs on the main thread between two lines of whatever it interrupted.
# The child process (this file run as a script: _signal_child) simulates the signal
# deterministically: a trace function runs the handler at a line of library code inside
# the API call, with the interrupted frames below it, as a real signal would. "every"
# phases run it at every line of per_buffer.recorder, .queue, .delivery, .drainer,
# .coalesce and threading (handlers that only read); "trials" phases make one fresh
# call per line position of per_buffer.recorder (evenly spread, up to a limit) and run
# the handler (one that closes) at that position only. A deadlock is a main thread
# stuck: the child dumps its stack and exits after 20 s.

_EVERY = (
    "per_buffer.recorder",
    "per_buffer.queue",
    "per_buffer.delivery",
    "per_buffer.drainer",
    "per_buffer.coalesce",
    "threading",
)
_TRIALS = ("per_buffer.recorder",)  # the API's code and every lock it takes


class _Interrupter:
    """Runs ``handler`` at line events of library code on this thread, as a signal."""

    def __init__(self) -> None:
        self.handler: Callable[[], object] = lambda: None
        self.modules: tuple[str, ...] = _EVERY
        self.at: int | None = None  # the position to interrupt at; None: every one
        self.position = 0
        self.handled = 0
        self.busy = False

    def _line(self, frame: Any, event: str, arg: object) -> Any:
        if event == "line" and not self.busy:
            name = frame.f_globals.get("__name__", "")
            if isinstance(name, str) and name.startswith(self.modules):
                if self.at is None or self.position == self.at:
                    self.busy = True  # the handler itself is not interrupted
                    try:
                        self.handled += 1
                        self.handler()
                    finally:
                        self.busy = False
                self.position += 1
        return self._line

    def _call(self, frame: Any, event: str, arg: object) -> Any:
        return self._line

    def run(self, call: Callable[[], object], at: int | None = None) -> int:
        """``call()`` with the handler run at position ``at`` (None: at every position of
        ``_EVERY``); returns how many positions the call had."""
        self.modules = _EVERY if at is None else _TRIALS
        self.at, self.position = at, 0
        sys.settrace(self._call)
        try:
            call()
        finally:
            sys.settrace(None)
        return self.position

    def trials(self, fresh: Callable[[], Callable[[], object]], limit: int) -> str:
        """Up to ``limit`` trials at positions spread over ``fresh()``'s call (a dry run
        counts them), each on a fresh ``fresh()``."""
        positions = self.run(fresh(), at=-1)
        stride = max(1, -(-positions // limit))
        for at in range(0, positions, stride):
            self.run(fresh(), at)
        return f"positions {positions} stride {stride} "


def _child_whole(recorder: Recorder) -> None:
    stats = recorder.stats()
    accounted = stats.coalesced + stats.delivered + stats.dead_lettered + stats.pending
    accounted += stats.in_flight + sum(stats.dropped.values())
    if stats.recorded != accounted or min(stats.pending, stats.in_flight, stats.delivered) < 0:
        raise SystemExit(f"counters do not add up: {stats}")


def _signal_child(phase: str, url: str, token: str, base: str) -> None:
    """The child of test_signal_handlers_interrupting_the_api_never_deadlock."""
    import faulthandler  # noqa: PLC0415
    import random  # noqa: PLC0415
    import signal  # noqa: PLC0415

    import per_buffer  # noqa: PLC0415

    faulthandler.dump_traceback_later(20, exit=True)
    os.environ.update(
        PER_ACTIVITY_TOKEN=token,
        PER_ACTIVITY_TYPE_ID="login",
        PER_BASE_URL=url,
        PER_BUFFER_COALESCE_WINDOW="0",
        PER_BUFFER_POLL_INTERVAL="0.05",
        PER_BUFFER_EXIT_TIMEOUT="2",
        PER_BUFFER_DELIVERY="thread",
    )
    root = Path(base)
    interrupter = _Interrupter()
    serial = iter(range(10**9))
    figures = ""

    def recorder(delivery: str) -> Recorder:
        return Recorder(directory=root / f"{delivery}{next(serial) % 4}", delivery=delivery)

    def fresh_default() -> None:
        per_buffer.shutdown(1)  # the next record() builds a new default recorder
        os.environ["PER_BUFFER_DIR"] = str(root / f"default{next(serial) % 4}")

    if phase == "flush-every-line":  # stats() and flush(0) interrupting flush()
        rec = recorder("process")
        rec.record("acme", "warm")
        assert rec.flush(10)
        interrupter.handler = lambda: (rec.stats(), rec.flush(0))
        for i in range(20):
            rec.record("acme", f"u{i}")
            interrupter.run(lambda: rec.flush(0))
        rec.record("acme", "last")
        done: list[bool] = []
        interrupter.run(lambda: done.append(rec.flush(10)))
        assert done == [True], done
        interrupter.run(lambda: rec.close(2))
        _child_whole(rec)
    elif phase == "close":  # stats(), flush(0) and close() interrupting close()
        made: list[Recorder] = []

        def fresh_close() -> Callable[[], object]:
            rec = recorder("thread")
            made.append(rec)
            for i in range(5):
                rec.record("acme", f"c{i}")

            def handler() -> None:
                rec.stats()
                rec.flush(0)
                rec.close(1)

            interrupter.handler = handler
            return lambda: rec.close(2)

        figures = interrupter.trials(fresh_close, limit=30)
        for rec in made:
            rec.close(2)  # waits for a close a handler started in a thread
            _child_whole(rec)
    elif phase in ("first-record-shutdown", "first-record-stats"):
        # the default recorder's first record() (builds it, starts its committer)
        if phase.endswith("shutdown"):
            interrupter.handler = lambda: per_buffer.shutdown(1)
        else:
            interrupter.handler = lambda: per_buffer.get_recorder().stats()

        def fresh_first() -> Callable[[], object]:
            fresh_default()
            return lambda: per_buffer.record("acme", "first")

        figures = interrupter.trials(fresh_first, limit=70 if phase.endswith("shutdown") else 25)
    elif phase == "flush-shutdown":  # the README's SIGTERM recipe interrupting flush()
        interrupter.handler = lambda: per_buffer.shutdown(5)

        def fresh_flush() -> Callable[[], object]:
            fresh_default()
            per_buffer.record("acme", "warm")
            per_buffer.record("acme", f"new{next(serial)}")
            return lambda: per_buffer.flush(2)

        figures = interrupter.trials(fresh_flush, limit=30)
    elif phase == "real-signals":  # a real timer signal during flush() and close()
        rec = recorder("process")

        def on_alarm(signum: int, frame: object) -> None:
            interrupter.handled += 1
            rec.stats()
            rec.flush(0)
            signal.setitimer(signal.ITIMER_REAL, random.uniform(5e-5, 3e-4))

        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.001)
        end = time.monotonic() + 0.7
        i = 0
        while time.monotonic() < end:
            rec.record("acme", f"u{i}")
            rec.flush(0)
            i += 1
        rec.close(2)
        signal.setitimer(signal.ITIMER_REAL, 0)
        _child_whole(rec)
    else:
        raise SystemExit(f"unknown phase {phase}")
    per_buffer.shutdown(2)
    print(f"{figures}handled {interrupter.handled}", flush=True)


@pytest.mark.parametrize(
    "phase",
    [
        "flush-every-line",
        "close",
        "first-record-shutdown",
        "first-record-stats",
        "flush-shutdown",
        "real-signals",
    ],
)
def test_signal_handlers_interrupting_the_api_never_deadlock(
    server: PerServer, tmp_path: Path, phase: str
) -> None:
    """stats(), flush(0), close() and per_buffer.shutdown() from a handler that
    interrupted flush(), close() or the default recorder's first record() used to wait
    for a lock the interrupted code held (the recorder's, the default recorder's, the
    one held while starting threads) and hung the process for ever."""
    child = subprocess.run(
        [sys.executable, __file__, phase, server.url, server.activity_token, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert child.returncode == 0, f"{child.stdout}\n{child.stderr[-4000:]}"
    handled = int(child.stdout.split()[-1])
    assert handled >= 15, child.stdout  # the handler really ran, at many places


if __name__ == "__main__":
    _signal_child(*sys.argv[1:])
