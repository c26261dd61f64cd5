"""The buffered recorder: ``record()`` on the hot path, everything else in the background.

Flow: ``record()`` validates its arguments, asks the coalescer whether a repeat may
be left unsent (see :mod:`per_buffer.coalesce` for the rule), and appends the
activity to a bounded memory batch (in ``sync`` mode it then waits until a commit
settled it). A committer thread, started with the recorder, opens the
:class:`~per_buffer.queue.DurableQueue`, writes each batch to it within
``commit_interval`` (or as soon as it gets the CPU) and keeps delivery going;
delivery drains the queue to Per. ``record()`` never waits for the disk, for a lock
held across I/O or for another thread: when the committer falls behind (or the
database stays locked), the batch grows up to ``memory_buffer`` and then drops with
a count.

Every wait is bounded: queue operations by the queue's ``lock_timeout`` or a
caller's deadline (``close()``, ``flush()``, a fork), reads for figures are
read-only snapshots that never wait for another process's write lock, and the API a
signal handler may call takes no lock when it interrupted this library
(:mod:`._reentry`).

Every activity is accounted for: at quiescence, for one recorder on a private
directory, ``recorded == coalesced + delivered + dead_lettered + pending + in_flight
+ sum(dropped)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, TypeVar

from ..coalesce import Coalescer
from ..config import RecorderConfig
from ..drainer import RECORDERS_LOCK, FileLock, interpreter
from ..errors import ConfigurationError, QueueError
from ..health import Health, health
from ..models import MAX_ID_LENGTH, validate_id
from ..queue import DurableQueue, PutResult, QueueStats
from ..stats import RecorderStats
from ._modes import DeliveryMode, DrainerDelivery, ExternalDelivery, Figures, ThreadDelivery
from ._reentry import reentrant

__all__ = ["Recorder", "registry"]

logger = logging.getLogger("per_buffer.recorder")

_Key = tuple[str, str, str]  # (billing_id, user_id, activity_type_id)
_T = TypeVar("_T")
_MAX = MAX_ID_LENGTH
_getpid = os.getpid
_monotonic = time.monotonic

_HELD_RETRY_MIN = 0.2
_HELD_RETRY_MAX = 5.0
_LOG_EVERY = 60.0
_CLOSE_SLACK = 0.45  # seconds close() may take beyond its timeout, to stop threads
_CLOSE_BOUND = 0.5  # ... and in all (the README's promise)
_LAST_READ = 0.05  # seconds close() gives its last read of the figures at least
_COMMIT_GRACE = 0.3  # seconds the committer gets for its last write after the deadline
_LOCK_TIMEOUT = 2.0  # a write lock held elsewhere fails a queue operation within this
# stats() waits this long for the committer's first open (milliseconds on a healthy disk;
# a database another process keeps locked shows as not open yet instead of stalling it)
_OPEN_WAIT = 0.5
_SYNC_WAIT = 0.05  # a sync record() looks this often whether a commit settled its call
_SYNC_BOUND = _LOCK_TIMEOUT + 0.5  # ... and returns after this long, its activity in memory
_FORK_COMMIT = 0.05  # seconds a fork may spend writing the memory batch
_FORK_LOCK_WAIT = 0.05  # seconds a fork waits for the recorder's (short-held) lock
_REFRESH_EVERY = 1.0  # seconds between the committer's reads of a drainer's figures


#: Every open recorder of this process (for the fork hooks and the exit handler).
registry: weakref.WeakSet[Recorder] = weakref.WeakSet()
_fork_reset_lock = threading.Lock()  # one reset per recorder when several threads notice


def renew_fork_reset_lock() -> None:
    """In a forked child: a parent thread may have held the reset lock at the fork."""
    global _fork_reset_lock
    _fork_reset_lock = threading.Lock()


class Recorder:
    """Records activities durably and delivers them to Per in the background.

    Arguments are taken from keywords, else the environment, else defaults
    (see the README's configuration table or :data:`per_buffer.config.KNOBS`).

    ``record()`` never waits on the network or the disk (in the default mode) and
    never raises for a runtime fault; bad arguments raise ``TypeError``/``ValueError``
    at once. Constructing one never waits for the database either: it creates the
    directory, and its committer thread opens the queue in the background.

    Raises:
        ValueError: a missing token or activity type, or a bad setting.
        ConfigurationError: the queue directory cannot be created or written.
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
        self._coalescer = Coalescer(
            config.coalesce_window, config.coalesce_margin, config.coalesce_max_keys
        )
        self._admit = self._coalescer.admit
        self._coalescing = (self._coalescer.window, self._coalescer.margin)  # stored per entry
        self._memory_bound = max(1, config.memory_buffer)
        self._recorded = 0
        self._coalesced = 0
        self._enqueued = 0
        self._queue_errors = 0
        self._dropped: dict[str, int] = {}
        self._closed = False  # record() counts calls as dropped; no thread starts
        self._shut = False  # close() finished
        self._closed_warned = False
        self._last_queue_log = -_LOG_EVERY
        self._last_sync_log = -_LOG_EVERY
        self._last_error: str | None = None
        self._queue: DurableQueue | None = None  # set once open, figures read, delivery chosen
        self._opening: DurableQueue | None = None  # made, not usable yet: retried
        self._open_attempts = 0
        self._last_id: int | None = None  # the highest id this process stored
        self._feed_seq = 0
        self._generation = 0
        self._quarantined_at_open = 0
        self._lag_max = 0.0
        self._queue_stats: QueueStats | None = None  # the last read, for signal handlers
        self._stats_read_at = -_REFRESH_EVERY
        self._queue_closed = False
        self._close_deadline: float | None = None  # no write after it (close() sets it)
        self._attached: FileLock | None = None  # recorders.lock, held shared while open
        self._reset_process_state()
        registry.add(self)
        if self._enabled:
            self._prepare_directory()
            self._ensure_threads()

    # ------------------------------------------------------------------ setup

    def _reset_process_state(self) -> None:
        """Fresh locks, buffers and threads: at construction and in a forked child.

        ``_pid`` is set last: another thread sees the new pid only once the new
        locks and buffers exist.
        """
        self._threads_lock = threading.Lock()  # held while starting the committer only
        self._lock = threading.Lock()  # never held across I/O or a wait
        self._commit_lock = threading.Lock()  # held by whoever writes a batch
        self._close_lock = threading.Lock()  # one close() at a time
        self._close_claim = threading.Lock()  # taken once, without waiting: one closer thread
        self._buffer: list[tuple[_Key, float]] = []
        self._held: deque[tuple[_Key, float]] = deque()
        self._committing = 0  # activities a commit took and has not stored yet
        self._committing_since = 0.0  # monotonic time the oldest of them was recorded
        self._takes = 0  # batches taken from memory so far (each by one commit)
        self._stored_take = 0  # the last take stored: every call before it is settled
        self._failed_take = 0  # the last take the disk refused (back in memory)
        self._abandoned = False  # close() gave up on a batch being written and counted it
        self._final = False  # close() counted what was left in memory; nobody retries
        self._want_delivery = False  # something to deliver: keep delivery going
        self._delivering = False  # delivery.start() was called in this process
        self._fork_held = False  # the fork hook holds _lock
        self._commit_pending = False
        self._urgent = False  # a flush or close waits: commit without waiting for neighbours
        self._buffer_since = 0.0  # monotonic time of the oldest activity in _buffer
        self._commit_wake = threading.Event()
        self._hurry = threading.Event()  # ends the committer's wait for neighbours
        self._disk_progress = threading.Condition()  # notified after every commit
        self._stop = threading.Event()
        self._committer: threading.Thread | None = None
        self._delivery: DeliveryMode | None = None  # chosen when the queue opens
        self._held_delay = _HELD_RETRY_MIN
        self._pid = os.getpid()

    def _prepare_directory(self) -> None:
        """Create the queue directory (mode 0700) and check that it can be written: a
        bad directory is a ConfigurationError at once. Nothing waits for the database."""
        directory = self._config.directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "cannot write there", str(directory))
        except OSError as exc:
            raise ConfigurationError(_unusable(directory, exc)) from None

    def _open_queue(self) -> bool:
        """Open the queue, read its figures and choose delivery (in a forked child: take
        the parent's queue object over). The caller holds the commit lock: the committer,
        or a sync record(). Bounded by the queue's lock timeout (and close()'s deadline);
        on failure the next commit or committer pass tries again."""
        config = self._config
        queue = self._queue or self._opening
        try:
            if queue is None:
                if _passed(self._close_deadline):
                    raise QueueError(
                        f"the queue in {config.directory} was not opened before close()"
                    )
                queue = self._opening = DurableQueue(
                    config.directory,
                    max_items=config.max_queue_items,
                    max_bytes=config.max_queue_bytes,
                    full_policy=config.full_policy,
                    lease_seconds=config.lease_seconds,
                    # a write lock held elsewhere fails an operation within 2 s (the batch
                    # waits in memory and is retried) instead of stalling flush() and close()
                    lock_timeout=_LOCK_TIMEOUT,
                    max_delay=config.backoff_max,
                )  # real time: leases must not expire at the speed of a test's clock
            with queue.deadline(self._close_deadline):
                stats = queue.stats()
        except (QueueError, OSError) as exc:
            self._queue_fault(exc)
            self._held_delay = min(_HELD_RETRY_MAX, self._held_delay * 2)
            self._opened_attempt()
            return False
        self._opening = None
        self._queue_stats = stats
        self._stats_read_at = _monotonic()
        self._generation = stats.generation
        self._feed_seq = stats.failure_seq
        self._quarantined_at_open = stats.quarantined_entries
        if stats.pending + stats.in_flight:
            self._want_delivery = True  # a backlog: deliver it
        if self._attached is None:
            self._attach()
        self._delivery = self._choose_delivery(queue, stats)
        self._queue = queue  # last: a queue is seen once its figures and delivery exist
        self._opened_attempt()
        return True

    def _opened_attempt(self) -> None:
        self._open_attempts += 1
        with self._disk_progress:
            self._disk_progress.notify_all()

    def _attach(self) -> None:
        """Hold ``recorders.lock`` shared while open: a drainer sees someone records here."""
        lock = FileLock(self._config.directory / RECORDERS_LOCK)
        for _ in range(100):  # a drainer holds it exclusively for microseconds at a time
            try:
                if lock.try_shared():
                    self._attached = lock
                    return
            except OSError:
                return
            time.sleep(0.001)
        lock.close()

    def _choose_delivery(self, queue: DurableQueue, stats: QueueStats) -> DeliveryMode:
        mode = self._config.delivery
        if self._config.clock is not time.time or self._config.on_error is not None:
            mode = "thread"  # a test's clock or an on_error callback stays in this process
        if mode == "external":
            return ExternalDelivery(queue, self._config, None, stats)
        if mode == "process":
            python = interpreter()
            if python is not None:
                return DrainerDelivery(queue, self._config, python, stats)
            logger.info(
                "per_buffer: no Python interpreter to start a drainer with (%s); delivering "
                "from a thread of this process instead",
                os.path.basename(sys.executable) or "embedded",
            )
        return ThreadDelivery(queue, self._config, self)

    def _ensure_threads(self) -> None:
        """Start the committer (once per process, never after close). It only starts a
        thread: the committer opens the queue and keeps delivery going itself."""
        with self._threads_lock:
            if self._closed:
                return
            committer = self._committer
            if committer is None or committer.ident is None:  # none, or start() interrupted
                committer = threading.Thread(
                    target=self._commit_loop, name="per-buffer-commit", daemon=True
                )
                self._committer = committer
                committer.start()

    def _keep_delivering(self) -> None:
        """The committer's duty: start delivery once there is something to deliver, and
        keep it alive (a drainer that died is replaced)."""
        delivery = self._delivery
        if delivery is None or not self._want_delivery or self._closed:
            return
        if not self._delivering:
            self._delivering = True
            delivery.start()
        delivery.check()

    # ------------------------------------------------------------------ hot path

    # Longer than the project's ~60 lines on purpose: the hot path is one frame (each
    # call saved is ~5 % of a coalesced record(), see the hot_path benchmark), and the
    # outcome markers for _settle_interrupted must live in the frame that sets them.
    def record(self, billing_id: str, user_id: str, activity_type_id: str | None = None) -> None:
        """Record that ``user_id`` of ``billing_id`` was active; returns at once.

        In the default ``batched`` mode it only appends to the memory batch. With
        ``durability="sync"`` it returns once the activity is on disk, or, when the disk
        refuses it (a write lock held elsewhere for longer than the queue's 2 s lock
        timeout, a full or failing disk), after that bounded wait with the activity
        still in memory: it is part of ``stats().buffered``, the failure counts in
        ``stats().queue_errors`` and is logged, and the committer writes it once the disk
        works again. A runtime fault never raises here.

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
        entered = False
        try:
            if self._pid != _getpid():
                self._after_fork_in_child()
            key = (billing_id, user_id, activity_type_id)
            with self._lock:
                entered = True
                recorded = self._recorded
                # markers for _settle_interrupted: which outcome this call was giving
                dropping: str | None = None
                before = coalesced = -1
                item: tuple[_Key, float] | None = None
                try:
                    self._recorded = recorded + 1
                    now = self._clock()  # under the lock: admit() must judge the present
                    if self._closed:
                        dropping, before = "closed", self._dropped.get("closed", 0)
                        self._drop_closed()
                        return
                    if not self._admit(key, now, batched=not self._sync):
                        coalesced = self._coalesced
                        self._coalesced = coalesced + 1
                        return
                    if not self._enabled:  # counted: nothing will be sent
                        dropping, before = "disabled", self._dropped.get("disabled", 0)
                        self._dropped["disabled"] = before + 1
                        return
                    buffer = self._buffer
                    if len(buffer) + len(self._held) + self._committing >= self._memory_bound:
                        self._coalescer.failed(key)
                        dropping, before = "memory_full", self._dropped.get("memory_full", 0)
                        self._dropped["memory_full"] = before + 1
                        return
                    if not buffer:
                        self._buffer_since = _monotonic()
                    item = (key, now)
                    buffer.append(item)
                    if self._sync:
                        ticket = self._takes  # a later take holds this call's activity
                        wake = False
                    else:
                        ticket = 0
                        wake = not self._commit_pending
                        self._commit_pending = True
                except BaseException as exc:
                    # a runtime fault is counted and logged, never raised into the caller;
                    # an exception a signal handler raised in here (SystemExit) goes on
                    fault = isinstance(exc, Exception)
                    self._settle_interrupted(
                        recorded,
                        key,
                        dropping=dropping,
                        before=before,
                        coalesced=coalesced,
                        item=item,
                        reason="internal_error" if fault else "interrupted",
                    )
                    if not fault:
                        raise
                    logger.exception("per_buffer: record() failed internally")
                    return
            if wake:
                if self._committer is None:  # a forked child's first call
                    self._ensure_threads()
                self._commit_wake.set()
            elif self._sync:
                self._commit_sync(ticket)
        except Exception:  # never raise a runtime fault into the caller
            if not entered:  # nothing counted yet
                with self._lock:
                    self._recorded += 1
                    self._dropped["internal_error"] = self._dropped.get("internal_error", 0) + 1
            logger.exception("per_buffer: record() failed internally")

    def _settle_interrupted(
        self,
        recorded: int,
        key: _Key,
        *,
        dropping: str | None,
        before: int,
        coalesced: int,
        item: tuple[_Key, float] | None,
        reason: str = "internal_error",
    ) -> None:
        """An exception interrupted record() inside its lock (the caller holds it): count
        the call once, with the outcome it reached, or as dropped for ``reason``."""
        self._recorded = recorded + 1
        if dropping is not None:
            if self._dropped.get(dropping, 0) > before:
                return
        elif coalesced >= 0:
            if self._coalesced > coalesced:
                return
        elif item is not None and self._buffer and self._buffer[-1] is item:
            return
        self._coalescer.failed(key)  # no copy of it waits in memory
        self._dropped[reason] = self._dropped.get(reason, 0) + 1

    def _drop_closed(self) -> None:
        """Count a call after close() (the caller holds ``_lock``); warn once."""
        self._dropped["closed"] = self._dropped.get("closed", 0) + 1
        if not self._closed_warned:
            self._closed_warned = True
            logger.warning("per_buffer: record() after close(); activity dropped")

    def _commit_sync(self, ticket: int) -> None:
        """Sync mode: return once a commit that took this call's activity (any take after
        ``ticket``) stored it. The committer thread writes, never the caller's: a signal
        handler that raises in the caller (SystemExit, KeyboardInterrupt) can then never
        cut a write short or leave a lock held. Commits take everything in memory, so
        concurrent sync calls share one. The wait is bounded (``_SYNC_BOUND``): if the
        disk refused the write, or the committer could not write in time, the activity
        stays in memory (counted in ``buffered``) and the committer retries."""
        committer = self._committer
        if committer is None:  # a forked child's first call
            self._ensure_threads()
            committer = self._committer
        self._commit_wake.set()
        deadline = _monotonic() + _SYNC_BOUND
        progress = self._disk_progress
        with progress:
            while self._stored_take <= ticket and self._failed_take <= ticket:
                left = deadline - _monotonic()
                if left <= 0 or committer is None or not committer.is_alive():
                    break
                progress.wait(min(_SYNC_WAIT, left))
        if self._stored_take <= ticket:
            self._sync_unwritten()
        elif not self._delivering:
            self._commit_wake.set()  # the committer starts delivery

    def _sync_unwritten(self) -> None:
        """A sync record() returns with its activity in memory: say so (once a minute)."""
        self._commit_wake.set()  # the committer retries it
        now = time.monotonic()
        if now - self._last_sync_log >= _LOG_EVERY:
            self._last_sync_log = now
            logger.warning(
                "per_buffer: durability='sync' but the disk queue at %s refused the write "
                "(%s); record() returned with the activity in memory (stats().buffered) "
                "and it is written when the disk works again",
                self._config.directory,
                self._last_error,
            )

    # ------------------------------------------------------------------ committing

    def _commit_loop(self) -> None:
        interval = self._config.commit_interval
        poll = self._config.poll_interval
        stop = self._stop
        while not stop.is_set():
            if self._queue is None or self._delivery is None:
                self._open_in_committer()
            unopened = self._queue is None
            timeout = self._held_delay if self._held or unopened else poll
            woken = self._commit_wake.wait(timeout)
            if stop.is_set():
                break
            if woken and self._commit_pending and not self._sync and not self._urgent:
                # let neighbours join the batch; the first waits at most interval / 2 here
                # (a flush, a close or a stop cuts it short)
                self._hurry.wait(interval / 2)
            self._hurry.clear()
            with self._lock:
                self._commit_pending = False
                self._urgent = False
                self._commit_wake.clear()
            try:
                self._commit(deadline=self._close_deadline)
                if not woken:
                    self._read_feedback()
                    self._refresh_figures()
                self._keep_delivering()
            except Exception:
                logger.exception("per_buffer: commit failed unexpectedly")
        try:  # the last commit, for close(): no write after its deadline
            self._commit(deadline=self._close_deadline)
            self._hand_over_at_close()
        except Exception:
            logger.exception("per_buffer: the final commit failed unexpectedly")

    def _hand_over_at_close(self) -> None:
        """What the last commit stored waits on disk; a drainer delivers it after this
        process is gone: start one if none was started yet (a close right after the
        first record())."""
        delivery = self._delivery
        if (
            delivery is not None
            and delivery.spawns
            and self._want_delivery
            and not self._delivering
        ):
            self._delivering = True
            delivery.start()

    def _open_in_committer(self) -> None:
        with self._commit_lock:
            if self._queue is None or self._delivery is None:
                self._open_queue()
        self._keep_delivering()

    def _refresh_figures(self) -> None:
        """A drainer's figures live on disk: read them about once a second, so that those
        of a database another process moves aside are kept (see ``DrainerDelivery``)."""
        queue, delivery = self._queue, self._delivery
        if queue is None or delivery is None or not delivery.figures_on_disk:
            return
        if _monotonic() - self._stats_read_at >= _REFRESH_EVERY and not self._queue_closed:
            with contextlib.suppress(QueueError):
                self._read_stats(queue, self._close_deadline)

    def _commit(self, *, wait: float | None = None, deadline: float | None = None) -> bool:
        """Write the memory batch (and held activities) to disk; True when all are on disk.

        ``wait``: seconds to wait for a commit already running elsewhere (None: as long
        as it takes; 0: not at all, returning False). ``deadline``: no write after this
        monotonic time (the batch goes back to memory).
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
                since = self._buffer_since
                batch_from_memory = len(batch)
                if self._held:
                    batch = [*self._held, *batch]
                    self._held.clear()
                self._takes += 1
                take = self._takes
                self._committing = len(batch)
                self._committing_since = since if batch_from_memory else _monotonic()
                stood = self._coalescer.take()
            if stood:  # a copy is stored as recorded when the last call it stood for was
                batch = [(key, max(at, stood.get(key, at))) for key, at in batch]
            if batch_from_memory:
                self._lag_max = max(self._lag_max, _monotonic() - since)
            stored = not batch or self._store(batch, deadline)
            if stored:
                self._stored_take = take
            else:
                self._failed_take = take
        finally:
            self._commit_lock.release()
            with self._disk_progress:
                self._disk_progress.notify_all()
        if stored and batch and self._delivery is not None:
            self._delivery.wake()
        return stored

    def _store(self, batch: list[tuple[_Key, float]], deadline: float | None = None) -> bool:
        """Put one batch; on a storage fault hold it in memory. The caller holds the commit lock."""
        if (self._queue is None or self._delivery is None) and not self._open_queue():
            self._hold(batch)
            return False
        assert self._queue is not None
        try:
            with self._queue.deadline(deadline):
                result = self._put(batch)
        except QueueError as exc:
            self._queue_fault(exc)
            self._hold(batch)
            return False
        self._held_delay = _HELD_RETRY_MIN
        self._want_delivery = True
        with self._lock:
            self._committing = 0
            self._enqueued += result.stored
            if self._abandoned:  # close() counted this batch as unwritten: it reached the
                self._abandoned = False  # queue, which stored or refused (and counted) each
                self._undrop("unwritten_at_close", len(batch))
        if result.last_id is not None:
            self._last_id = result.last_id
        lost = len(batch) - result.stored
        if lost:  # refused by a full queue: drop_newest keeps the front, drop_oldest the back
            front = self._config.full_policy == "drop_newest"
            refused = batch[result.stored :] if front else batch[:lost]
            self._coalescer_failed(key for key, _ in refused)
        if result.failure_seq != self._feed_seq or self._queue.generation != self._generation:
            self._read_feedback(result.failure_seq)
        return True

    def _put(self, batch: list[tuple[_Key, float]]) -> PutResult:
        """``queue.put`` that never loses a batch to one item the storage cannot take.

        A storage fault (QueueError) propagates: the whole batch is held and retried.
        Anything else means an item is at fault: the batch is stored one by one and
        the items that still fail are dropped as ``invalid`` (counted and logged).
        """
        assert self._queue is not None
        try:
            result = self._queue.put(batch, coalescing=self._coalescing)
        except QueueError:
            raise
        except Exception:
            logger.exception("per_buffer: the queue refused a batch; storing it item by item")
            return self._put_one_by_one(batch)
        for reason, count in result.refused.items():
            self._drop(reason, count)
        return result

    def _put_one_by_one(self, batch: list[tuple[_Key, float]]) -> PutResult:
        assert self._queue is not None
        stored = invalid = 0
        last = seq = None
        refused: dict[str, int] = {}
        for item in batch:
            try:
                result = self._queue.put([item], coalescing=self._coalescing)
            except QueueError:
                raise
            except Exception:
                invalid += 1
                self._coalescer_failed([item[0]])
                continue
            stored += result.stored
            last = result.last_id if result.last_id is not None else last
            seq = result.failure_seq
            for reason, count in result.refused.items():
                refused[reason] = refused.get(reason, 0) + count
        if invalid:
            self._drop("invalid", invalid)
        for reason, count in refused.items():
            self._drop(reason, count)
        return PutResult(stored, None, last, refused, seq if seq is not None else self._feed_seq)

    def _hold(self, batch: list[tuple[_Key, float]]) -> None:
        with self._lock:
            self._committing = 0
            if self._abandoned:  # close() already counted this batch as unwritten
                self._abandoned = False
                return
            if self._final:  # close() is over: nobody would retry it
                self._dropped["unwritten_at_close"] = self._dropped.get(
                    "unwritten_at_close", 0
                ) + len(batch)
                return
            room = self._memory_bound - len(self._held) - len(self._buffer)
            lost: list[tuple[_Key, float]] = []
            if room < len(batch):
                keep = max(room, 0)
                lost, batch = batch[keep:], batch[:keep]
            self._held.extend(batch)
            if not self._sync:  # back in memory, they stand for repeats again (a sync
                self._coalescer.held(key for key, _ in batch)  # repeat writes again)
        if lost:
            self._coalescer_failed(key for key, _ in lost)
            self._drop("memory_full", len(lost))
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

    def _undrop(self, reason: str, count: int) -> None:
        """A batch counted lost at close() reached the disk after all (holding ``_lock``)."""
        left = self._dropped.get(reason, 0) - count
        if left > 0:
            self._dropped[reason] = left
        else:
            self._dropped.pop(reason, None)
        logger.info(
            "per_buffer: %d activities counted as unwritten at close reached the disk after all",
            count,
        )

    # ------------------------------------------------------------------ coalescing feedback

    def _coalescer_failed(self, keys: Iterable[_Key]) -> None:
        failed = self._coalescer.failed
        with self._lock:
            for key in keys:
                failed(key)

    def _read_feedback(self, seq_now: int | None = None) -> None:
        """Forget keys whose copies failed in any process, or everything after a quarantine.

        ``seq_now``: the failure log's sequence number if just read (by a put).
        """
        queue = self._queue
        if queue is None or not self._coalescer.window:
            return
        try:
            seq = self._feed_seq
            if queue.generation == self._generation:
                if seq_now is None:
                    seq_now = queue.failure_seq()
                if seq_now == seq:
                    return
                seq_now, keys = queue.failures_since(seq)
            else:
                seq_now, keys = queue.failure_seq(), None
        except QueueError:
            return
        if keys is None:
            with self._lock:
                self._coalescer.forget()
        else:
            self._coalescer_failed(keys)
        self._feed_seq = seq_now
        self._generation = queue.generation

    def acknowledged(self, key: _Key, sent_at: float) -> None:
        """Delivery: Per acknowledged a copy of ``key`` sent at ``sent_at`` (this clock)."""
        with self._lock:
            self._coalescer.acknowledged(key, sent_at)

    def failed(self, keys: Iterable[_Key]) -> None:
        """Delivery: copies of ``keys`` failed or were dead-lettered; forget them."""
        self._coalescer_failed(keys)

    # ------------------------------------------------------------------ flush and close

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver everything this process recorded so far; True when done.

        Returns True once every activity this process recorded before the call is
        settled: delivered, or dead-lettered (Per refused it for good), or dropped and
        counted. Returns False at ``timeout`` seconds (None waits without limit) and
        never blocks past it, even if Per hangs or another process holds the queue's
        write lock. Activities other processes put in a shared directory are not waited
        for. From a signal handler that interrupted this library it returns False at
        once.
        """
        if reentrant():  # called from a signal handler that interrupted this library
            return False
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        if not self._enabled:
            return True
        if self._closed:
            return False
        if self._pid != os.getpid():
            self._after_fork_in_child()
        if not self._written(deadline):
            return False
        last_id = self._last_id
        queue = self._queue
        if last_id is None or queue is None:
            return not self._held
        return self._deliver(deadline, _settled(queue, last_id, deadline))

    def drain(self, timeout: float | None = None) -> bool:
        """Deliver everything in the queue directory, whoever recorded it; True when done.

        Like :meth:`flush`, but waits until the directory holds nothing undelivered:
        use it to hand a backlog left by another process (or a crash) to Per. On a
        directory that busy neighbours keep filling it may never return True.
        """
        if reentrant():
            return False
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        if not self._enabled:
            return True
        if self._closed or not self._written(deadline):
            return False
        queue = self._await_open(deadline)
        if queue is None:
            return False
        return self._deliver(deadline, lambda: _bounded(queue, deadline, queue.counts) == (0, 0))

    def _deliver(self, deadline: float | None, done: Callable[[], bool]) -> bool:
        """Flush mode until ``done()`` says so, or the deadline (delivery does the sending)."""
        self._want_delivery = True
        self._ensure_threads()
        delivery = self._delivery
        return delivery is not None and delivery.deliver(deadline, done)

    def _await_open(
        self, deadline: float | None, *, first_attempt: bool = False
    ) -> DurableQueue | None:
        """The open queue, waiting until ``deadline`` for the committer to open it (with
        ``first_attempt``, only until its first try ended); None if it is not open."""
        if self._queue is not None or self._closed:
            return self._queue
        self._ensure_threads()
        with self._disk_progress:
            while self._queue is None and not self._closed:
                if first_attempt and self._open_attempts:
                    break
                left = _remaining(deadline)
                if left is not None and left <= 0:
                    break
                committer = self._committer
                if committer is None or not committer.is_alive():
                    break
                self._disk_progress.wait(0.05 if left is None else min(0.05, left))
        return self._queue

    def _written(self, deadline: float | None) -> bool:
        """Wait until what is in memory is on disk (the committer writes it); False at the
        deadline. The caller's thread never writes, so a locked database cannot hold it."""
        if not (self._buffer or self._held or self._committing):
            return True
        self._ensure_threads()
        with self._disk_progress:
            while True:
                with self._lock:
                    if not (self._buffer or self._held or self._committing):
                        return True
                    self._commit_pending = self._urgent = True
                self._hurry.set()
                self._commit_wake.set()
                left = _remaining(deadline)
                if left is not None and left <= 0:
                    return False
                committer = self._committer
                if committer is None or not committer.is_alive():
                    return False
                self._disk_progress.wait(0.05 if left is None else min(0.05, left))

    def close(self, timeout: float | None = None) -> None:
        """Write what is in memory to disk, deliver for up to ``timeout`` seconds (default
        ``exit_timeout``) unless a drainer process goes on delivering, then stop.

        With a drainer running (the ``process`` and ``external`` modes) close() only
        writes the memory batch and returns, usually in milliseconds: the drainer
        delivers after this process is gone. Otherwise it flushes up to ``timeout``.
        Returns within ``timeout`` + 0.5 s whatever the disk does, and writes nothing
        after that. Whatever was not delivered stays on disk; the next recorder or
        drainer on the directory delivers it. What could not reach the disk by then is
        counted in ``stats().dropped["unwritten_at_close"]`` and logged at WARNING. Calls
        to ``record()`` afterwards are counted as dropped (reason ``closed``). From a
        signal handler that interrupted this library it returns at once and a thread
        closes (the exit handler waits for it).
        """
        if timeout is None:
            timeout = self._config.exit_timeout
        timeout = max(0.0, timeout)
        if reentrant():  # a signal handler interrupted this library: close in a thread
            self._close_in_background(timeout)
            return
        deadline = time.monotonic() + timeout
        # another close() (a thread a signal handler started, say) is under way: it keeps
        # the same bounds, so waiting for it keeps this call's
        if not self._close_lock.acquire(timeout=timeout + _CLOSE_SLACK):
            return
        try:
            if not self._shut:
                self._close(deadline)
        finally:
            self._close_lock.release()

    def _close(self, deadline: float) -> None:
        hard = deadline + _CLOSE_SLACK  # stopping threads may take this much beyond timeout
        if self._pid != os.getpid():
            self._after_fork_in_child()
        self._close_deadline = hard  # the committer writes nothing after it
        if self._enabled and not self._closed and self._written(deadline):
            self._hand_over_at_close()  # a starved committer may not have started a drainer
            delivery = self._delivery
            queue, last_id = self._queue, self._last_id
            if (
                delivery is not None
                and queue is not None
                and last_id is not None
                and not delivery.delivers_after_exit(max(0.0, deadline - time.monotonic()))
            ):
                self._deliver(deadline, _settled(queue, last_id, deadline))
        with self._threads_lock, self._lock:  # no thread starts after this
            self._closed = True
        self._stop_committer(min(hard, max(deadline, time.monotonic()) + _COMMIT_GRACE))
        delivery = self._delivery
        stopped = delivery is None or delivery.stop(max(0.05, hard - time.monotonic()))
        if self._attached is not None and self._pid == os.getpid():
            self._attached.close()
            self._attached = None
        queue = self._queue
        committer = self._committer
        # the last figures are read even when stopping used up the slack: a snapshot read
        # takes milliseconds, and stats() after close() would show stale ones for good
        read_by = min(deadline + _CLOSE_BOUND, max(hard, time.monotonic() + _LAST_READ))
        if (
            queue is not None
            and stopped
            and (committer is None or not committer.is_alive())
            and self._commit_lock.acquire(timeout=max(0.0, read_by - time.monotonic()))
        ):
            try:  # no commit runs: the last figures are kept for stats() after close
                read = False
                with contextlib.suppress(QueueError):
                    self._read_stats(queue, read_by)
                    read = True
                self._log_left()
                if read:  # else the queue stays open: stats() reads it (never stale)
                    self._queue_closed = True
                    queue.close()
            finally:
                self._commit_lock.release()
        opening, self._opening = self._opening, None
        if opening is not None and (committer is None or not committer.is_alive()):
            opening.close()
        self._shut = True
        registry.discard(self)

    def _stop_committer(self, until: float) -> None:
        """The committer writes what is in memory and ends; what is not on disk is counted."""
        self._stop.set()
        self._hurry.set()
        self._commit_wake.set()
        committer = self._committer
        if (
            committer is not None
            and committer is not threading.current_thread()
            and committer.ident is not None
        ):
            committer.join(max(0.0, until - time.monotonic()))
        with self._lock:
            unwritten = len(self._buffer) + len(self._held)
            if self._committing and not self._abandoned:
                # a batch still being written (by the committer or a sync record()):
                # counted now; if it lands after all, the count is taken back
                unwritten += self._committing
                self._abandoned = True
            self._buffer.clear()
            self._held.clear()
            self._final = True
            if unwritten:
                self._dropped["unwritten_at_close"] = (
                    self._dropped.get("unwritten_at_close", 0) + unwritten
                )
        if unwritten:
            logger.warning(
                "per_buffer: %d activities could not be written to %s before close() and "
                "are lost (counted in stats().dropped['unwritten_at_close'])",
                unwritten,
                self._config.directory,
            )

    def _close_in_background(self, timeout: float) -> None:
        """From a signal handler: take no lock the interrupted code may hold; a thread
        closes (once, however many signals come)."""
        if self._shut or not self._close_claim.acquire(blocking=False):
            return
        threading.Thread(
            target=self.close, args=(timeout,), name="per-buffer-close", daemon=True
        ).start()

    def _log_left(self) -> None:
        qs = self._queue_stats
        if qs is not None and qs.pending + qs.in_flight:
            logger.info(
                "per_buffer: %d activities left on disk in %s; the next recorder on "
                "that directory delivers them",
                qs.pending + qs.in_flight,
                self._config.directory,
            )

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
        """Write the memory batch if the disk takes it at once (a parent that leaves with
        ``os._exit`` after forking, as daemons do, would lose it), and hold the recorder's
        lock so the child copies consistent counters. Never waits for the disk: what is
        not written stays in this process's memory and its committer writes it; the
        child starts with an empty batch."""
        self._fork_held = False
        if self._closed or self._pid != os.getpid():
            return
        if self._queue is not None and self._buffer and not self._held:
            try:
                self._commit(wait=0, deadline=time.monotonic() + _FORK_COMMIT)
            except Exception:
                logger.exception("per_buffer: commit before fork failed")
        self._fork_held = self._lock.acquire(timeout=_FORK_LOCK_WAIT)

    def _after_fork_in_parent(self) -> None:
        if self._fork_held:
            self._fork_held = False
            self._lock.release()

    def _after_fork_in_child(self) -> None:
        """The parent's threads are gone and its memory batch is its own: start afresh.

        Only state is reset here. Opening files or starting threads waits for the first
        ``record()``/``flush()``: a child that only runs ``exec`` (``subprocess`` with
        ``preexec_fn``) must not claim entries it will never deliver.
        """
        with _fork_reset_lock:
            if self._pid != os.getpid():
                attached, self._attached = self._attached, None
                if attached is not None:
                    attached.forget_after_fork()  # the parent's lock stays the parent's
                self._reset_process_state()
                self._coalescer.forget()  # the parent's copies are its own to account for

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
        """A snapshot of counters, queue state and delivery state.

        The queue's figures come from a read-only snapshot, which never waits for
        another process's write lock (right after construction it waits up to about
        0.5 s for the committer to open the queue). Safe from a signal handler: when it
        interrupted this library it reports the last queue figures read instead of
        reading the disk.
        """
        if reentrant():
            return self._snapshot(self._queue_stats, locked=False)
        if self._pid != os.getpid():
            self._after_fork_in_child()
        queue = self._queue
        if queue is None and self._enabled:
            queue = self._await_open(time.monotonic() + _OPEN_WAIT, first_attempt=True)
        if queue is not None and not self._queue_closed:
            try:
                self._read_stats(queue, None)
            except QueueError as exc:
                self._last_error = str(exc)
        return self._snapshot(self._queue_stats, locked=True)

    def _read_stats(self, queue: DurableQueue, deadline: float | None) -> QueueStats:
        """Read the queue's figures (a snapshot, bounded by ``deadline``) and keep them."""
        with queue.deadline(deadline):
            qs = queue.stats()
        self._queue_stats = qs
        self._stats_read_at = _monotonic()
        delivery = self._delivery
        if delivery is not None:
            delivery.observe(qs)
        if qs.generation != self._generation:  # a database was moved aside
            with self._lock:
                self._coalescer.forget()
            self._generation, self._feed_seq = qs.generation, qs.failure_seq
        return qs

    def _snapshot(self, qs: QueueStats | None, *, locked: bool) -> RecorderStats:
        if locked:
            with self._lock:
                mine = self._memory_figures()
        else:
            mine = self._memory_figures()
        buffered, dropped, first, counts = mine
        delivery = self._delivery
        ws = delivery.figures(qs) if delivery is not None else Figures()
        pending = in_flight = dead = size = 0
        oldest: float | None = None
        queue_dropped: Mapping[str, int] = {}
        quarantined = 0
        if qs is not None:
            pending, in_flight, dead = qs.pending, qs.in_flight, qs.dead_lettered
            oldest, size, queue_dropped = qs.oldest_pending_age, qs.bytes_on_disk, qs.dropped
            quarantined = qs.quarantined_entries
            lost = quarantined - self._quarantined_at_open
            if lost > 0:
                dropped["quarantined"] = lost
        if first is not None:
            age = self._clock() - first
            oldest = age if oldest is None else max(oldest, age)
        for reason, count in queue_dropped.items():
            # queue_full is counted from put's result; a purge is a decision, not a loss
            if reason not in ("queue_full", "dead_letters_purged"):
                dropped[f"queue:{reason}"] = count
        lag = self._commit_lag()
        return RecorderStats(
            recorded=counts[0],
            coalesced=counts[1] + ws.coalesced,
            enqueued=counts[2],
            delivered=ws.delivered,
            retried=ws.retried,
            dead_lettered=ws.dead_lettered,
            dropped=MappingProxyType(dropped),
            pending=pending + buffered,
            in_flight=in_flight,
            oldest_pending_age=oldest,
            paused_until=ws.paused_until,
            pause_reason=ws.pause_reason,
            last_error=ws.last_error or self._last_error,
            buffered=buffered,
            late_deliveries=ws.late_deliveries,
            dead_letters=dead,
            bytes_on_disk=size,
            queue_errors=self._queue_errors,
            failures=ws.failures,
            attempts=ws.attempts,
            flow=ws.flow,
            commit_lag=lag,
            commit_lag_max=max(self._lag_max, lag),
            quarantined_entries=quarantined,
            delivery=delivery.name if delivery is not None else self._config.delivery,
        )

    def _commit_lag(self) -> float:
        """Seconds the oldest activity not yet on disk has waited (0 when none waits)."""
        now = _monotonic()
        lag = now - self._buffer_since if self._buffer and self._buffer_since else 0.0
        if self._committing and self._committing_since:
            lag = max(lag, now - self._committing_since)
        held = self._held
        if held:
            lag = max(lag, self._clock() - held[0][1])
        return max(0.0, lag)

    def _memory_figures(
        self,
    ) -> tuple[int, dict[str, int], float | None, tuple[int, int, int]]:
        buffered = len(self._buffer) + len(self._held) + self._committing
        first = self._held[0] if self._held else self._buffer[0] if self._buffer else None
        counts = (self._recorded, self._coalesced, self._enqueued)
        return buffered, dict(self._dropped), None if first is None else first[1], counts

    def health(self, **limits: Any) -> Health:
        """Whether delivery keeps up, for a readiness or liveness check.

        Keyword arguments are passed to :func:`per_buffer.health.health`.
        """
        return health(self.stats(), **limits)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"Recorder(directory={str(self._config.directory)!r}, "
            f"base_url={self._config.base_url!r}, token=<hidden>, {state})"
        )


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until a monotonic deadline (None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _passed(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _settled(queue: DurableQueue, last_id: int, deadline: float | None) -> Callable[[], bool]:
    """Whether every entry up to ``last_id`` is settled (a check that gives up at
    ``deadline``, raising QueueError)."""
    return lambda: _bounded(queue, deadline, queue.settled_through, last_id)


def _bounded(
    queue: DurableQueue, deadline: float | None, read: Callable[..., _T], *args: Any
) -> _T:
    """``read(*args)``, a queue operation that gives up at ``deadline``."""
    with queue.deadline(deadline):
        return read(*args)


def _unusable(directory: Path, exc: BaseException) -> str:
    return (
        f"the queue directory {directory} cannot be used ({exc}); set PER_BUFFER_DIR (or "
        "directory=) to a writable local directory"
    )
