"""Who delivers what a recorder commits: a thread of this process, or a drainer process.

* ``thread``: a :class:`~per_buffer.delivery.DeliveryWorker` in a daemon thread of the
  recording process (version 0.1's only mode).
* ``process``: the directory's drainer, a separate process started on demand (spawned,
  never forked) and replaced if it dies; recording processes only record and commit.
* ``external``: the same drainer, run by the operator (``per-buffer drain --follow``
  as a sidecar or a systemd unit); recorders never start one.

Each mode gives the recorder the same few operations and the figures for its stats.
The recorder's committer thread calls :meth:`DeliveryMode.start` and
:meth:`DeliveryMode.check`, so a ``record()`` call never waits for what they do
(creating lock files, starting a process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..config import RecorderConfig
from ..delivery import DeliverySettings, DeliveryWorker, Feedback
from ..drainer import FLUSH_REQUEST, DrainerOptions, drainer_running, read_identity, spawn
from ..errors import QueueError
from ..flow import FlowState
from ..outcomes import FAILURE_CLASSES
from ..queue import DurableQueue, QueueStats

__all__ = ["DeliveryMode", "DrainerDelivery", "ExternalDelivery", "Figures", "ThreadDelivery"]

logger = logging.getLogger("per_buffer.recorder")

_CHECK_EVERY = 1.0  # seconds between looks for a live drainer
_FLUSH_TOUCH = 0.5  # seconds between flush requests while a flush waits
_WAIT_STEP = 0.02
_SPAWN_EXISTS = 0.5  # seconds close() waits for a drainer being started to exist
_HANDOVER = "handover.json"  # a newer recorder made the drainer step down: it starts the next
_HANDOVER_FOR = 10.0  # seconds older recorders leave the next start to that newer one


def _no_failures() -> Mapping[str, int]:
    return MappingProxyType(dict.fromkeys(FAILURE_CLASSES, 0))


@dataclass(frozen=True)
class Figures:
    """Delivery's part of a recorder's stats."""

    delivered: int = 0
    coalesced: int = 0
    retried: int = 0
    dead_lettered: int = 0
    late_deliveries: int = 0
    attempts: int = 0
    failures: Mapping[str, int] = field(default_factory=_no_failures)
    flow: FlowState | None = None
    paused_until: float | None = None
    pause_reason: str | None = None
    last_error: str | None = None


class DeliveryMode:
    """The operations a recorder needs from whoever delivers (a base: delivers nothing)."""

    name = "thread"
    #: The figures come from the queue's counters (another process delivers).
    figures_on_disk = False
    #: start() starts a drainer process, which delivers after this process is gone.
    spawns = False

    def start(self) -> None:
        """Begin delivering (idempotent; may touch the disk: the committer calls it)."""

    def wake(self) -> None:
        """A batch was committed."""

    def check(self) -> None:
        """Called about once a second by the committer: keep delivery alive."""

    def deliver(self, deadline: float | None, done: Callable[[], bool]) -> bool:
        """Deliver with priority (flush mode) until ``done()`` or the deadline."""
        return False

    def delivers_after_exit(self, timeout: float) -> bool:
        """True when delivery goes on after this process closes (a live drainer); waits
        at most ``timeout`` seconds to find out."""
        return False

    def stop(self, timeout: float) -> bool:
        """Stop this process's part of delivery; True when it stopped in time."""
        return True

    def observe(self, stats: QueueStats) -> None:
        """The recorder read the queue's figures (not from a signal handler)."""

    def figures(self, stats: QueueStats | None) -> Figures:
        """Delivery's counters for the recorder's stats (takes no lock: a signal handler
        may ask)."""
        return Figures()


class ThreadDelivery(DeliveryMode):
    """A delivery worker in a daemon thread of this process."""

    name = "thread"

    def __init__(self, queue: DurableQueue, config: RecorderConfig, feedback: Feedback) -> None:
        self._queue = queue
        self._config = config
        self._feedback = feedback
        self._lock = threading.Lock()
        self.worker: DeliveryWorker | None = None
        self._threadless = False  # its thread could not start (interpreter shutdown)
        self._ran_here = False  # ... so deliver() ran it in the calling thread

    def start(self) -> None:
        with self._lock:
            if self.worker is None and self._config.token:
                worker = DeliveryWorker(
                    self._queue, DeliverySettings.from_config(self._config), feedback=self._feedback
                )
                self.worker = worker
                try:
                    worker.start()
                except RuntimeError:  # an exit handler: Python 3.12 starts no new thread
                    self._threadless = True

    def wake(self) -> None:
        worker = self.worker
        if worker is not None:
            worker.wake()

    def deliver(self, deadline: float | None, done: Callable[[], bool]) -> bool:
        self.start()
        worker = self.worker
        if worker is None:
            return False
        if self._threadless:  # deliver from this thread (an exit handler) until done
            if not self._ran_here:  # a worker's loop runs once
                self._ran_here = True
                worker.run_until(done, deadline)
            try:
                return done()
            except QueueError:
                return False
        worker.begin_flush()
        try:
            while True:
                try:
                    if done():
                        return True
                except QueueError:
                    pass
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or not worker.running:
                    return False
                worker.wait_progress(0.05 if left is None else min(0.05, left))
        finally:
            worker.end_flush()

    def stop(self, timeout: float) -> bool:
        worker = self.worker
        return worker is None or worker.stop(timeout)

    def figures(self, stats: QueueStats | None) -> Figures:
        worker = self.worker
        if worker is None:
            return Figures()
        s = worker.stats
        return Figures(
            delivered=s.delivered,
            coalesced=s.coalesced,
            retried=s.retried,
            dead_lettered=s.dead_lettered,
            late_deliveries=s.late_deliveries,
            attempts=s.attempts,
            failures=MappingProxyType(dict(s.failures)),
            flow=s.flow,
            paused_until=s.paused_until,
            pause_reason=s.pause_reason,
            last_error=s.last_error,
        )


_Counts = tuple[int, int, int]  # delivered (acknowledged), coalesced, dead-lettered


def _counts(stats: QueueStats) -> _Counts:
    return (stats.delivered, stats.coalesced, stats.dead_lettered_total)


def _plus(a: _Counts, b: _Counts) -> _Counts:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def _minus(a: _Counts, b: _Counts) -> _Counts:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


@dataclass(frozen=True)
class _Seen:
    """What the queue's counters said, replaced whole (a signal handler reads it).

    The counters restart from zero in a fresh database after a quarantine: what this
    recorder saw counted in the old one is ``carried`` over, and the new one counts
    from zero (it was made when the old one was moved aside).
    """

    generation: int
    base: _Counts  # the counters of this generation when this recorder began
    carried: _Counts  # counted in earlier generations since then
    last: _Counts  # the latest counters of this generation

    def total(self, stats: QueueStats | None) -> _Counts:
        if stats is not None and stats.generation == self.generation:
            now = _counts(stats)
        elif stats is not None and stats.generation > self.generation:
            return _plus(_plus(self.carried, _minus(self.last, self.base)), _counts(stats))
        else:
            now = self.last
        return _plus(self.carried, _minus(now, self.base))

    def after(self, stats: QueueStats) -> _Seen:
        if stats.generation == self.generation:
            return replace(self, last=_counts(stats))
        if stats.generation < self.generation:
            return self
        zero = (0, 0, 0)
        return _Seen(stats.generation, zero, self.total(None), _counts(stats))


class DrainerDelivery(DeliveryMode):
    """The directory's drainer process delivers; this process starts one when none runs."""

    name = "process"
    spawns = True
    figures_on_disk = True

    def __init__(
        self, queue: DurableQueue, config: RecorderConfig, python: str | None, stats: QueueStats
    ) -> None:
        self._queue = queue
        self._config = config
        self._python = python
        self._directory = Path(config.directory)
        self._last_check = -_CHECK_EVERY
        self._spawning: threading.Thread | None = None
        self._started = threading.Event()  # the spawned process exists (or none will be)
        self._warned = False
        self._created_at = time.time()
        self._handed_over: int | None = None  # the pid this recorder asked to step down
        self._spawned_at_exit = False  # start() ran at interpreter shutdown and spawned one
        now = _counts(stats)
        self._seen = _Seen(stats.generation, now, (0, 0, 0), now)
        self._observing = threading.Lock()

    def _options(self) -> DrainerOptions:
        config = self._config
        return DrainerOptions(
            directory=self._directory,
            settings=DeliverySettings.from_config(config),
            max_queue_items=config.max_queue_items,
            max_queue_bytes=config.max_queue_bytes,
            full_policy=config.full_policy,
            lease_seconds=config.lease_seconds,
            nice=config.drainer_nice,
            spawned_at=self._created_at,
        )

    def start(self) -> None:
        if not self.spawns or self._python is None or not self._config.token:
            return
        spawning = self._spawning
        if spawning is not None and spawning.is_alive():
            return
        if drainer_running(self._directory) or self._defers():
            return
        python = self._python
        options = self._options()
        self._started = started = threading.Event()
        thread = threading.Thread(
            target=spawn, args=(options, python, started), name="per-buffer-spawn", daemon=True
        )
        self._spawning = thread
        try:
            thread.start()
        except RuntimeError:
            # at interpreter shutdown (an exit handler: Python 3.12 refuses new threads
            # there) start the process from this thread, without waiting for it to report
            self._spawning = None
            self._spawned_at_exit = spawn(options, python, started, wait=False) is not None

    def _defers(self) -> bool:
        """True while a newer recorder with other settings took the directory over: it
        starts the next drainer (two recorders would otherwise take turns replacing each
        other's); after ``_HANDOVER_FOR`` seconds without one, anybody may."""
        try:
            handover = json.loads((self._directory / _HANDOVER).read_text())
            created_at = float(handover["created_at"])
            at = float(handover["at"])
            fingerprint = handover["fingerprint"]
        except (OSError, ValueError, TypeError, KeyError):
            return False
        return (
            created_at > self._created_at
            and fingerprint != self._options().fingerprint
            and 0 <= time.time() - at < _HANDOVER_FOR
        )

    def check(self) -> None:
        now = time.monotonic()
        if now - self._last_check < _CHECK_EVERY:
            return
        self._last_check = now
        if self.spawns:
            self._take_over_if_outdated()
            self.start()
        elif not self._warned and not drainer_running(self._directory):
            self._warned = True
            logger.warning(
                "per_buffer: delivery is external but no drainer runs for %s; start "
                "`per-buffer drain --follow --dir %s` (activities wait on disk meanwhile)",
                self._directory,
                self._directory,
            )

    def deliver(self, deadline: float | None, done: Callable[[], bool]) -> bool:
        self.start()
        request = self._directory / FLUSH_REQUEST
        touched = -_FLUSH_TOUCH
        while True:
            try:
                if done():
                    return True
            except QueueError:
                pass
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            if now - touched >= _FLUSH_TOUCH:
                touched = now
                _touch(request)
                self.check()
            time.sleep(_WAIT_STEP if deadline is None else min(_WAIT_STEP, deadline - now))

    def delivers_after_exit(self, timeout: float) -> bool:
        if self._spawned_at_exit:  # started from an exit handler: it exists
            return True
        spawning = self._spawning
        if spawning is not None and spawning.is_alive():
            # a drainer being started delivers once its process exists: no need to wait
            # for it to be ready (close() stays in milliseconds)
            return self._started.wait(min(_SPAWN_EXISTS, timeout))
        return drainer_running(self._directory)

    def _take_over_if_outdated(self) -> None:
        """A drainer running with other settings (a rotated token, another URL) steps down
        for a recorder made after the one that started it: the next check starts ours."""
        identity = read_identity(self._directory)
        if identity is None or not drainer_running(self._directory):
            return
        options = self._options()
        pid = identity.get("pid")
        if identity.get("fingerprint") == options.fingerprint or not isinstance(pid, int):
            return
        spawned_at = identity.get("spawned_at")
        if not isinstance(spawned_at, int | float) or spawned_at >= self._created_at:
            return  # started for a newer recorder: it wins
        if pid == self._handed_over or not _is_drainer(pid):
            return
        self._handed_over = pid
        handover = {
            "created_at": self._created_at,
            "at": time.time(),
            "fingerprint": options.fingerprint,
        }
        with contextlib.suppress(OSError):
            (self._directory / _HANDOVER).write_text(json.dumps(handover))
        logger.warning(
            "per_buffer: the drainer of %s (pid %d) runs with other settings (token, URL or "
            "proxy); it steps down for this recorder's",
            self._directory,
            pid,
        )
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)

    def observe(self, stats: QueueStats) -> None:
        with self._observing:
            self._seen = self._seen.after(stats)

    def figures(self, stats: QueueStats | None) -> Figures:
        if stats is None:
            return Figures()
        acknowledged, coalesced, dead = self._seen.total(stats)
        state: Mapping[str, Any] = stats.delivery_state or {}
        failures = state.get("failures")
        paused_until = state.get("paused_until")
        if not isinstance(paused_until, int | float) or paused_until <= time.time():
            paused_until = None
        reason = state.get("pause_reason")
        return Figures(
            delivered=acknowledged - coalesced,
            coalesced=coalesced,
            dead_lettered=dead,
            retried=int(state.get("retried") or 0),
            late_deliveries=int(state.get("late_deliveries") or 0),
            last_error=state.get("last_error"),
            attempts=int(state.get("attempts") or 0),
            failures=MappingProxyType(
                {**dict.fromkeys(FAILURE_CLASSES, 0), **failures}
                if isinstance(failures, dict)
                else dict.fromkeys(FAILURE_CLASSES, 0)
            ),
            flow=_flow(state),
            paused_until=paused_until,
            pause_reason=reason if paused_until or reason == "auth" else None,
        )


class ExternalDelivery(DrainerDelivery):
    """An operator runs the drainer (``per-buffer drain --follow``); never start one."""

    name = "external"
    spawns = False

    def delivers_after_exit(self, timeout: float) -> bool:
        """Delivery is someone else's: close() only writes to disk, never waits for it."""
        return True


def _is_drainer(pid: int) -> bool:
    """True when ``pid`` is a drainer process (never signal anything else)."""
    try:
        return b"per_buffer.drainer" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.write_text(f"{os.getpid()} {time.time():.3f}\n")


def _flow(state: Mapping[str, Any]) -> FlowState | None:
    try:
        return FlowState(
            limit=int(state["limit"]),
            max_concurrency=int(state["max_concurrency"]),
            rate=state.get("rate"),
            success_ratio=state.get("success_ratio"),
            probing=bool(state.get("probing")),
            paused_for=None,
            pause_reason=state.get("pause_reason"),
            throttle=0.0,
        )
    except (KeyError, TypeError, ValueError):
        return None
