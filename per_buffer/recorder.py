"""The buffered recorder: ``record()`` on the hot path, everything else in the background.

Flow: ``record()`` validates its arguments, drops repeats the coalescer says
cannot change a report, and appends the activity to an in-memory batch (or,
in ``sync`` mode, writes it to disk before returning). A committer thread
writes each batch to the :class:`~per_buffer.queue.DurableQueue` within
``commit_interval``; the :class:`~per_buffer.delivery.DeliveryWorker` drains
the queue to Per. When the disk refuses a batch the activities wait in a
bounded memory buffer and are written when the disk works again.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

from .coalesce import Coalescer
from .config import RecorderConfig
from .delivery import DeliveryWorker
from .errors import QueueError
from .models import MAX_ID_LENGTH, validate_id
from .queue import DurableQueue

__all__ = [
    "Recorder",
    "RecorderStats",
    "configure",
    "flush",
    "get_recorder",
    "record",
    "shutdown",
]

logger = logging.getLogger("per_buffer.recorder")

_Key = tuple[str, str, str]  # (billing_id, user_id, activity_type_id)
_MAX = MAX_ID_LENGTH
_getpid = os.getpid
_monotonic = time.monotonic

_HELD_RETRY_MIN = 0.2
_HELD_RETRY_MAX = 5.0
_LOG_EVERY = 60.0


@dataclass(frozen=True)
class RecorderStats:
    """A snapshot of a recorder's counters and its queue.

    Attributes:
        recorded: valid ``record()`` calls accepted (coalesced ones included).
        coalesced: calls not sent because their key was already sent in the window.
        enqueued: activities written to the disk queue.
        delivered: activities Per accepted (by this process's worker).
        retried: failed attempts that will be retried.
        dead_lettered: activities moved to the dead letters by this process.
        dropped: reason -> count of activities lost on purpose (e.g. ``closed``,
            ``queue_full``, ``memory_full``).
        pending: activities waiting for delivery: on disk, or still in memory.
        in_flight: activities leased by a sender (any process on the directory).
        oldest_pending_age: seconds since the oldest undelivered activity was
            recorded, or None. Per stamps activities on arrival, so this is how
            late the next delivery will be counted.
        paused_until: unix time delivery resumes, while paused; else None.
        pause_reason: ``"auth"`` or ``"rate_limited"`` while paused; else None.
        last_error: the last delivery or queue error, as text without secrets.
        buffered: activities in memory, not yet on disk (part of ``pending``).
        late_deliveries: deliveries that landed in a later coalescing window
            (15 minutes when coalescing is off) than their ``record()``.
        dead_letters: dead letters stored in the directory.
        bytes_on_disk: size of the queue database.
        queue_errors: disk queue failures seen by this process.
    """

    recorded: int
    coalesced: int
    enqueued: int
    delivered: int
    retried: int
    dead_lettered: int
    dropped: Mapping[str, int]
    pending: int
    in_flight: int
    oldest_pending_age: float | None
    paused_until: float | None
    pause_reason: str | None
    last_error: str | None
    buffered: int = 0
    late_deliveries: int = 0
    dead_letters: int = 0
    bytes_on_disk: int = 0
    queue_errors: int = 0


_registry: weakref.WeakSet[Recorder] = weakref.WeakSet()
_fork_reset_lock = threading.Lock()  # one reset per recorder when several threads notice


class Recorder:
    """Records activities durably and delivers them to Per in the background.

    Arguments are taken from keywords, else the environment, else defaults
    (see the README's configuration table or :data:`per_buffer.config.KNOBS`).

    ``record()`` never waits on the network and never raises for a runtime
    fault; bad arguments raise ``TypeError``/``ValueError`` at once.

    Raises:
        ValueError: a missing token or activity type, or a bad setting.
    """

    def __init__(
        self,
        token: str | None = None,
        activity_type_id: str | None = None,
        *,
        directory: str | os.PathLike[str] | None = None,
        base_url: str | None = None,
        **options: Any,
    ) -> None:
        self._config = RecorderConfig.resolve(
            token=token,
            activity_type_id=activity_type_id,
            directory=directory,
            base_url=base_url,
            **options,
        )
        config = self._config
        self._clock = config.clock
        self._enabled = config.enabled
        self._sync = config.durability == "sync"
        self._commit_interval = config.commit_interval
        # a disabled recorder (development, tests) needs no activity type to accept calls
        self._default_type = config.activity_type_id or (None if self._enabled else "unset")
        self._coalescer = Coalescer(config.coalesce_window, config.coalesce_max_keys)
        self._admit = self._coalescer.admit
        # with the default clock its reading serves the overdue check (no second clock call)
        self._wall_clock = config.clock is time.time
        self._recorded = 0
        self._coalesced = 0
        self._enqueued = 0
        self._queue_errors = 0
        self._dropped: dict[str, int] = {}
        self._closed = False
        self._closed_warned = False
        self._last_queue_log = 0.0
        self._last_error: str | None = None
        self._queue: DurableQueue | None = None
        self._reset_process_state()
        if self._enabled and self._open_queue() and self._backlog():
            self._ensure_threads()
        _registry.add(self)

    # ------------------------------------------------------------------ setup

    def _reset_process_state(self) -> None:
        """Fresh locks, buffers and threads: at construction and in a forked child.

        ``_pid`` is set last: another thread sees the new pid only once the new
        locks and buffers exist.
        """
        self._threads_lock = threading.Lock()
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._buffer: list[tuple[_Key, float]] = []
        self._held: deque[tuple[_Key, float]] = deque()
        self._commit_pending = False
        self._buffer_since = 0.0  # monotonic time of the oldest activity in _buffer
        self._commit_wake = threading.Event()
        self._stop = threading.Event()
        self._committer: threading.Thread | None = None
        self._worker: DeliveryWorker | None = None
        self._held_delay = _HELD_RETRY_MIN
        self._pid = os.getpid()

    def _open_queue(self) -> bool:
        config = self._config
        try:
            self._queue = DurableQueue(
                config.directory,
                max_items=config.max_queue_items,
                max_bytes=config.max_queue_bytes,
                full_policy=config.full_policy,
                lease_seconds=config.lease_seconds,
                # a write lock held elsewhere fails a put within 2 s (the batch waits in
                # memory and is retried) instead of stalling flush() and close()
                lock_timeout=2.0,
            )  # real time: leases must not expire at the speed of a test's clock
        except (QueueError, OSError) as exc:
            self._queue = None
            self._queue_fault(exc)
            return False
        return True

    def _backlog(self) -> bool:
        assert self._queue is not None
        try:
            pending, in_flight = self._queue.counts()
        except QueueError:
            return False
        return pending + in_flight > 0

    def _ensure_threads(self) -> None:
        """Start the committer and the delivery worker on first use (once, never after close)."""
        with self._threads_lock:
            if not self._closed:
                self._start_threads()

    def _start_threads(self) -> None:
        if self._committer is None:
            committer = threading.Thread(
                target=self._commit_loop, name="per-buffer-commit", daemon=True
            )
            self._committer = committer
            committer.start()
        config = self._config
        if self._worker is None and self._queue is not None and config.token:
            worker = DeliveryWorker(
                self._queue,
                token=config.token,
                base_url=config.base_url,
                timeout=config.timeout,
                concurrency=config.concurrency,
                max_attempts=config.max_attempts,
                backoff_initial=config.backoff_initial,
                backoff_max=config.backoff_max,
                auth_probe_interval=config.auth_probe_interval,
                poll_interval=config.poll_interval,
                window=config.coalesce_window,
                lease_seconds=config.lease_seconds,
                on_error=config.on_error,
                clock=config.clock,
            )
            self._worker = worker
            worker.start()

    # ------------------------------------------------------------------ hot path

    def record(self, billing_id: str, user_id: str, activity_type_id: str | None = None) -> None:
        """Record that ``user_id`` of ``billing_id`` was active; returns at once.

        Args:
            billing_id: the customer being billed.
            user_id: the user, unique within the billing ID.
            activity_type_id: the activity type; defaults to the recorder's.

        Raises:
            TypeError, ValueError: an ID is not a valid Per ID (naming it).
        """
        # The hot path: a printable, non-empty str within the limit is valid; anything
        # else takes the full check, which raises or normalises (a str subclass, say).
        if not (
            type(billing_id) is str and billing_id.isprintable() and 0 < len(billing_id) <= _MAX
        ):
            billing_id = validate_id(billing_id, "billing_id")
        if not (type(user_id) is str and user_id.isprintable() and 0 < len(user_id) <= _MAX):
            user_id = validate_id(user_id, "user_id")
        if activity_type_id is None:
            activity_type_id = self._default_type
            if activity_type_id is None:
                raise ValueError(
                    "activity_type_id is required: this recorder has no default activity type"
                )
        elif not (
            type(activity_type_id) is str
            and activity_type_id.isprintable()
            and 0 < len(activity_type_id) <= _MAX
        ):
            activity_type_id = validate_id(activity_type_id, "activity_type_id")
        try:
            if self._pid != _getpid():
                self._after_fork_in_child()
            now = self._clock()
            key = (billing_id, user_id, activity_type_id)
            wake = overdue = False
            with self._lock:
                if self._closed:
                    self._drop_closed()
                    return
                self._recorded += 1
                if not self._admit(key, now):
                    self._coalesced += 1
                    return
                if not self._enabled:
                    return
                if not self._sync:
                    buffer = self._buffer
                    mono = now if self._wall_clock else _monotonic()
                    if not buffer:
                        self._buffer_since = mono
                    buffer.append((key, now))
                    if not self._commit_pending:
                        self._commit_pending = wake = True
                    # The committer thread is late (a CPU-bound caller starves it of the
                    # GIL): commit here, so nothing stays in memory past commit_interval.
                    overdue = mono - self._buffer_since > self._commit_interval
            if self._sync:
                self._commit_sync(key, now)
                return
            if overdue:  # never wait here: a busy commit lock means a commit is under way
                self._commit(wait=0)
            if wake:
                if self._committer is None:
                    self._ensure_threads()
                self._commit_wake.set()
        except Exception:  # never raise a runtime fault into the caller
            self._drop("internal_error", 1)
            logger.exception("per_buffer: record() failed internally; activity dropped")

    def _drop_closed(self) -> None:
        """Count a call after close() (the caller holds ``_lock``); warn once."""
        self._dropped["closed"] = self._dropped.get("closed", 0) + 1
        if not self._closed_warned:
            self._closed_warned = True
            logger.warning("per_buffer: record() after close(); activity dropped")

    def _commit_sync(self, key: _Key, now: float) -> None:
        self._commit([(key, now)])
        if self._held:  # the disk refused it: the committer retries
            self._ensure_threads()
            self._commit_wake.set()

    # ------------------------------------------------------------------ committing

    def _commit_loop(self) -> None:
        interval = self._config.commit_interval
        stop = self._stop
        while not stop.is_set():
            timeout = self._held_delay if self._held else None
            self._commit_wake.wait(timeout)
            if stop.is_set():
                return
            if self._commit_pending and not self._sync:
                # let neighbours join the batch; the first waits at most interval / 2 here
                stop.wait(interval / 2)
            with self._lock:
                self._commit_pending = False
                self._commit_wake.clear()
            try:
                self._commit()
            except Exception:
                logger.exception("per_buffer: commit failed unexpectedly")

    def _commit(
        self, extra: list[tuple[_Key, float]] | None = None, *, wait: float | None = None
    ) -> bool:
        """Write the memory batch (and held activities) to disk; True when all are on disk.

        ``wait``: seconds to wait for a commit already running elsewhere (None: as long
        as it takes; 0: not at all, returning False).
        """
        if wait is None:
            acquired = self._commit_lock.acquire()
        elif wait > 0:
            acquired = self._commit_lock.acquire(timeout=wait)
        else:
            acquired = self._commit_lock.acquire(blocking=False)
        if not acquired:
            return False
        try:
            with self._lock:
                batch, self._buffer = self._buffer, []
            if extra:
                batch.extend(extra)
            if self._held:
                batch = [*self._held, *batch]
                self._held.clear()
            if not batch:
                return True
            if self._queue is None and not self._open_queue():
                self._hold(batch)
                return False
            assert self._queue is not None
            try:
                stored = self._put(batch)
            except QueueError as exc:
                self._queue_fault(exc)
                self._hold(batch)
                return False
            self._held_delay = _HELD_RETRY_MIN
            with self._lock:
                self._enqueued += stored
        finally:
            self._commit_lock.release()
        worker = self._worker
        if worker is not None:
            worker.wake()
        elif self._config.token:
            self._ensure_threads()
        return True

    def _put(self, batch: list[tuple[_Key, float]]) -> int:
        """``queue.put`` that never loses a batch to one item the storage cannot take.

        A storage fault (QueueError) propagates: the whole batch is held and retried.
        Anything else means an item is at fault: the batch is stored one by one and
        the items that still fail are dropped as ``invalid`` (counted and logged).
        """
        assert self._queue is not None
        try:
            stored = self._queue.put(batch)
        except QueueError:
            raise
        except Exception:
            logger.exception("per_buffer: the queue refused a batch; storing it item by item")
            stored = invalid = 0
            for item in batch:
                try:
                    stored += self._queue.put([item])
                except QueueError:
                    raise
                except Exception:
                    invalid += 1
            if invalid:
                self._drop("invalid", invalid)
            return stored
        if stored < len(batch):
            self._drop("queue_full", len(batch) - stored)
        return stored

    def _hold(self, batch: list[tuple[_Key, float]]) -> None:
        room = self._config.memory_buffer - len(self._held)
        if room < len(batch):
            lost = len(batch) - max(room, 0)
            self._drop("memory_full", lost)
            batch = batch[: max(room, 0)]
        self._held.extend(batch)
        self._held_delay = min(_HELD_RETRY_MAX, self._held_delay * 2)

    def _queue_fault(self, exc: BaseException) -> None:
        self._queue_errors += 1
        self._last_error = str(exc)
        now = time.monotonic()
        if now - self._last_queue_log >= _LOG_EVERY:
            self._last_queue_log = now
            logger.error(
                "per_buffer: the disk queue at %s failed (%s); activities wait in memory "
                "(up to %d) and are written when it works again",
                self._config.directory,
                exc,
                self._config.memory_buffer,
            )

    def _drop(self, reason: str, count: int) -> None:
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + count
        logger.warning("per_buffer: %d activities dropped (%s)", count, reason)

    # ------------------------------------------------------------------ flush and close

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver everything recorded so far; True when done, False at ``timeout`` seconds.

        Returns once the queue directory holds nothing undelivered (activities
        Per refused for good count as done: they are in the dead letters).
        Never blocks past ``timeout``, even if Per hangs. ``None`` waits without limit.
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        if not self._enabled:
            return True
        if self._closed:
            return False
        if self._pid != os.getpid():
            self._after_fork_in_child()
        while not self._commit(wait=_remaining(deadline)):
            left = _remaining(deadline)
            if left is not None and left <= 0:
                return False
            self._stop.wait(0.05 if left is None else min(0.05, left))
        self._ensure_threads()
        worker = self._worker
        if worker is None:
            return False
        worker.begin_flush()
        try:
            return worker.wait_drained(deadline)
        finally:
            worker.end_flush()

    def close(self, timeout: float | None = None) -> None:
        """Flush for up to ``timeout`` seconds (default ``exit_timeout``), then stop.

        Whatever was not delivered stays on disk; the next recorder opened on
        the same directory delivers it. Calls to ``record()`` afterwards are
        counted as dropped (reason ``closed``).
        """
        if self._closed:
            return
        if self._pid != os.getpid():
            self._after_fork_in_child()
        if timeout is None:
            timeout = self._config.exit_timeout
        deadline = time.monotonic() + max(0.0, timeout)
        if self._enabled and (self._worker is not None or self._buffer or self._held):
            self.flush(timeout)
        with self._lock:
            self._closed = True
        self._stop.set()
        self._commit_wake.set()
        committer = self._committer
        if committer is not None and committer is not threading.current_thread():
            committer.join(max(0.1, deadline - time.monotonic()))
        if self._enabled:
            self._commit(wait=max(1.0, deadline - time.monotonic()))
            if self._held or self._buffer:
                lost = len(self._held) + len(self._buffer)
                self._held.clear()
                self._buffer.clear()
                self._drop("unwritable_at_close", lost)
                logger.error(
                    "per_buffer: %d activities could not be written to %s before close and "
                    "are lost",
                    lost,
                    self._config.directory,
                )
        worker = self._worker
        if worker is not None:
            worker.stop(max(0.5, deadline - time.monotonic()))
        queue = self._queue
        if queue is not None:
            try:
                pending, in_flight = queue.counts()
                if pending + in_flight:
                    logger.info(
                        "per_buffer: %d activities left on disk in %s; the next recorder on "
                        "that directory delivers them",
                        pending + in_flight,
                        self._config.directory,
                    )
            except QueueError:
                pass
            queue.close()
        _registry.discard(self)

    async def aflush(self, timeout: float | None = None) -> bool:
        """:meth:`flush` without blocking the event loop (runs in a thread)."""
        return await asyncio.to_thread(self.flush, timeout)

    async def aclose(self, timeout: float | None = None) -> None:
        """:meth:`close` without blocking the event loop (runs in a thread)."""
        await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Recorder:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ fork

    def _before_fork(self) -> None:
        if self._closed or self._pid != os.getpid():
            return
        try:
            self._commit()
        except Exception:
            logger.exception("per_buffer: commit before fork failed")
        self._commit_lock.acquire()
        self._lock.acquire()

    def _after_fork_in_parent(self) -> None:
        if self._closed or self._pid != os.getpid():
            return
        self._lock.release()
        self._commit_lock.release()

    def _after_fork_in_child(self) -> None:
        """The parent's threads are gone and its memory batch is its own: start afresh.

        Only state is reset here. Opening files or starting threads waits for the first
        ``record()``/``flush()``: a child that only runs ``exec`` (``subprocess`` with
        ``preexec_fn``) must not claim entries it will never deliver.
        """
        with _fork_reset_lock:
            if self._pid != os.getpid():
                self._reset_process_state()

    # ------------------------------------------------------------------ observing

    @property
    def config(self) -> RecorderConfig:
        """The resolved settings (the token is hidden from its repr)."""
        return self._config

    @property
    def directory(self) -> Path:
        """The queue directory."""
        return self._config.directory

    def stats(self) -> RecorderStats:
        """A snapshot of counters, queue state and pause state."""
        if self._pid != os.getpid():
            self._after_fork_in_child()
        worker = self._worker
        ws = worker.stats if worker is not None else None
        pending = in_flight = dead = size = 0
        oldest: float | None = None
        queue_dropped: Mapping[str, int] = {}
        if self._queue is not None:
            try:
                qs = self._queue.stats()
                pending, in_flight, dead = qs.pending, qs.in_flight, qs.dead_lettered
                oldest, size, queue_dropped = qs.oldest_pending_age, qs.bytes_on_disk, qs.dropped
            except QueueError as exc:
                self._last_error = str(exc)
        with self._lock:
            buffered = len(self._buffer) + len(self._held)
            dropped = dict(self._dropped)
            first = self._held[0] if self._held else self._buffer[0] if self._buffer else None
            if first is not None:  # held activities are older than the batch
                age = self._clock() - first[1]
                oldest = age if oldest is None else max(oldest, age)
            counts = (self._recorded, self._coalesced, self._enqueued)
        for reason, count in queue_dropped.items():
            # queue_full is counted above from put's result; a purge is a decision, not a loss
            if reason not in ("queue_full", "dead_letters_purged"):
                dropped[f"queue:{reason}"] = count
        last_error = ws.last_error if ws is not None and ws.last_error else self._last_error
        return RecorderStats(
            recorded=counts[0],
            coalesced=counts[1],
            enqueued=counts[2],
            delivered=ws.delivered if ws else 0,
            retried=ws.retried if ws else 0,
            dead_lettered=ws.dead_lettered if ws else 0,
            dropped=MappingProxyType(dropped),
            pending=pending + buffered,
            in_flight=in_flight,
            oldest_pending_age=oldest,
            paused_until=ws.paused_until if ws else None,
            pause_reason=ws.pause_reason if ws else None,
            last_error=last_error,
            buffered=buffered,
            late_deliveries=ws.late_deliveries if ws else 0,
            dead_letters=dead,
            bytes_on_disk=size,
            queue_errors=self._queue_errors,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"Recorder(directory={str(self._config.directory)!r}, "
            f"base_url={self._config.base_url!r}, token=<hidden>, {state})"
        )


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until a monotonic deadline (None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# ---------------------------------------------------------------------- process hooks


def _before_fork() -> None:
    for recorder in list(_registry):
        recorder._before_fork()


def _after_fork_in_parent() -> None:
    for recorder in list(_registry):
        recorder._after_fork_in_parent()


def _after_fork_in_child() -> None:
    for recorder in list(_registry):
        recorder._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def _close_all_at_exit() -> None:
    for recorder in list(_registry):
        try:
            stats = recorder.stats()
            if stats.pending or stats.in_flight:
                logger.info(
                    "per_buffer: delivering %d pending activities before exit (up to %.1f s)",
                    stats.pending + stats.in_flight,
                    recorder.config.exit_timeout,
                )
            recorder.close(recorder.config.exit_timeout)
        except Exception:
            logger.exception("per_buffer: closing a recorder at exit failed")


atexit.register(_close_all_at_exit)


# ---------------------------------------------------------------------- module-level API

_default: Recorder | None = None
_default_lock = threading.Lock()


def configure(**options: Any) -> Recorder:
    """Create the default recorder used by :func:`record` (closing any previous one).

    Takes the same keyword arguments as :class:`Recorder`.
    """
    global _default
    recorder = Recorder(**options)
    with _default_lock:
        previous, _default = _default, recorder
    if previous is not None:
        previous.close()
    return recorder


def get_recorder() -> Recorder:
    """The default recorder, built from the environment on first use."""
    global _default
    recorder = _default
    if recorder is not None:
        return recorder
    with _default_lock:
        if _default is None:
            _default = Recorder()
        return _default


def record(billing_id: str, user_id: str, activity_type_id: str | None = None) -> None:
    """Record an activity with the default recorder (see :meth:`Recorder.record`)."""
    recorder = _default
    if recorder is None:
        recorder = get_recorder()
    recorder.record(billing_id, user_id, activity_type_id)


def flush(timeout: float | None = None) -> bool:
    """Flush the default recorder; True when everything was delivered (or nothing to do)."""
    recorder = _default
    return True if recorder is None else recorder.flush(timeout)


def shutdown(timeout: float | None = None) -> None:
    """Close the default recorder (flushing up to ``timeout``) and forget it."""
    global _default
    with _default_lock:
        recorder, _default = _default, None
    if recorder is not None:
        recorder.close(timeout)
