"""The files under a durable queue: open, transact, heal, quarantine, close.

:class:`Storage` is what :class:`~per_buffer.queue.DurableQueue` holds to reach its
database. It knows files, locks and SQLite's failure modes, and nothing of the queue's
rows: the queue hands it a ``probe`` (read a little of every kind of row) and a
``count_entries`` (how many entries a database moved aside held). Its interface:

* :meth:`Storage.open` finds, creates, inspects, opens and probes the live database under
  the exclusive directory lock (constructing a ``Storage`` opens nothing);
* :meth:`Storage.run` runs one function on the diskcache ``Cache`` in one transaction
  (a write transaction, or a read-only snapshot that never waits for the write lock)
  under the shared directory lock, retrying a locked database until ``lock_timeout``,
  moving a corrupt one aside and retrying once on a fresh one, releasing the reserve and
  truncating the WAL when the disk is full, and raising :class:`QueueError` otherwise;
* :meth:`Storage.deadline` bounds every operation of the calling thread inside it: none
  starts after the deadline and none waits past it (the open included);
* :meth:`Storage.quarantine` moves the live database aside and opens a fresh one;
  :meth:`Storage.totals` and :meth:`Storage.add_salvaged` read and update
  ``totals.json`` (quarantine counts survive the database they describe);
* :meth:`Storage.close`.

Waiting is bounded everywhere: SQLite's own busy handler waits at most
``_BUSY_SLICE`` per statement, the rest of a wait for a locked database happens in
Python between attempts, with :attr:`Storage.lock` released (so another thread of the
process, or a fork, gets it within one slice), and diskcache's constructor (which
retries a locked database for 60 s per statement on its own) gives up at the open's
deadline.

It also keeps connections safe across ``fork()`` (a child never closes its parent's
connections, and no thread is inside SQLite when the process forks unless one stayed
inside a statement longer than ``_FORK_WAIT``: a write to a stalled disk, which holds
no SQLite-wide mutex), and the small ballast file ``reserve.bin``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import random
import sqlite3
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVar

import diskcache

from ..errors import QueueError
from ._health import CorruptData, LockTimeout, classify, file_size, inspect_files
from ._layout import (
    DB_NAME,
    GEN_PREFIX,
    LOCK_NAME,
    QUARANTINE_PREFIX,
    RESERVE_NAME,
    Totals,
    first_id,
    generation_number,
    generations,
    read_totals,
    replace_file,
    utc_stamp,
    write_totals,
)
from ._process import ProcessIdentity

if sys.platform != "win32":
    import fcntl

_log = logging.getLogger("per_buffer.queue")

_T = TypeVar("_T")

_OPEN_EXCLUSIVE_TRY: Final = 0.25
_BUSY_SLICE: Final = 0.05  # seconds SQLite's busy handler may wait inside one statement
_FORK_WAIT: Final = 0.2  # seconds a fork waits, in all, for threads inside SQLite

CACHE_SETTINGS: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "eviction_policy": "none",  # never evict silently (diskcache #281, #105)
        "cull_limit": 0,
        "size_limit": 2**62,
        "disk_min_file_size": 16 * 1024 * 1024,  # values never spill to separate files
        "statistics": 0,
        "tag_index": 0,
        # Freed pages go to the freelist and are reused: FULL auto-vacuum relocated tail
        # pages on every delete and made claim+ack 1.7x slower with a 1M backlog.
        "sqlite_auto_vacuum": 2,  # INCREMENTAL
        "sqlite_mmap_size": 0,  # no SIGBUS if a file is truncated under us; flat RSS
        "sqlite_cache_size": 1024,  # pages (4 MiB) per connection
        "sqlite_journal_mode": "wal",
        "sqlite_synchronous": 1,  # NORMAL
    }
)

#: Exceptions from the storage that :meth:`Storage.run` classifies and handles.
STORAGE_ERRORS: Final = (sqlite3.Error, diskcache.Timeout, OSError, CorruptData, LockTimeout)

# Cache objects and connections that must never be closed by us: connections inherited
# through fork() (closing them in the child can delete the parent's WAL, diskcache #325)
# and connections to databases moved aside. Keeping a reference prevents GC closing them.
_ORPHANS: list[object] = []
# Database folders this process has opened: their files are never read directly again
# (closing any descriptor of a file drops this process's POSIX locks held by SQLite).
_OPENED_GENERATIONS: set[str] = set()

_FORK_LOCK = threading.Lock()
_INSTANCES: weakref.WeakSet[Storage] = weakref.WeakSet()
_HELD_AT_FORK: list[threading.RLock] = []


def _before_fork() -> None:
    # No thread may be inside SQLite when the process forks: SQLite's global mutexes
    # (its allocator's, for one) would stay locked forever in the child, whose first
    # connection would then hang. Every statement runs under its storage's lock, which
    # is released between attempts on a locked database; a thread that keeps it longer
    # than _FORK_WAIT is blocked in the kernel (a stalled disk), not in a global mutex,
    # and the fork goes on without waiting for the disk. The child replaces the lock.
    until = time.monotonic() + _FORK_WAIT
    for storage in list(_INSTANCES):
        lock = storage.lock
        if lock.acquire(timeout=max(0.0, until - time.monotonic())):
            _HELD_AT_FORK.append(lock)


def _after_fork_in_parent() -> None:
    while _HELD_AT_FORK:
        _HELD_AT_FORK.pop().release()


def _after_fork_in_child() -> None:
    # Pin every inherited Cache at once, even of queues the child never uses: garbage
    # collecting one would close the parent's SQLite connection from the child.
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()
    _HELD_AT_FORK.clear()  # each storage replaces its lock when it notices the new pid
    for storage in list(_INSTANCES):
        _ORPHANS.append(storage.cache)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def _flock(fd: int, exclusive: bool) -> bool:
    """Try to take a shared or exclusive lock without blocking."""
    if sys.platform == "win32":
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _funlock(fd: int) -> None:
    if sys.platform != "win32":
        fcntl.flock(fd, fcntl.LOCK_UN)


def _owned(lock: Any) -> bool:
    """Whether this thread holds the (reentrant) ``lock``."""
    return bool(lock._is_owned())


def _sleep_backoff(delay: float, ceiling: float, deadline: float = math.inf) -> float:
    """Sleep about ``delay`` (never past ``deadline``); return the next delay."""
    time.sleep(_pause(delay, deadline))
    return min(delay * 2, ceiling)


def _pause(delay: float, deadline: float) -> float:
    """``delay`` with jitter, cut to the time left until ``deadline``."""
    return max(0.0, min(delay * random.uniform(0.5, 1.5), deadline - time.monotonic()))


class _Cache(diskcache.Cache):  # type: ignore[misc]
    """diskcache's ``Cache`` whose set-up gives up on a locked database at the open's
    deadline: ``Cache.__init__`` writes its settings with statements it retries for
    60 s each (``_sql_retry``), whatever the caller's patience."""

    @property
    def _sql_retry(self) -> Callable[..., Any]:
        deadline = getattr(_OPENING, "deadline", None)
        if deadline is None:
            return diskcache.Cache._sql_retry.fget(self)  # type: ignore[no-any-return]
        sql = self._sql

        def execute(statement: str, *args: Any, **kwargs: Any) -> Any:
            delay = 0.001
            while True:
                try:
                    return sql(statement, *args, **kwargs)
                except sqlite3.OperationalError as exc:
                    if str(exc) != "database is locked" or time.monotonic() >= deadline:
                        raise
                    delay = _sleep_backoff(delay, 0.05, deadline)

        return execute


_OPENING = threading.local()  # .deadline: the monotonic time a _Cache set-up gives up


# --------------------------------------------------------------------------- SQL outside diskcache


def _rollback_if_open(cache: Any) -> None:
    # After SQLITE_FULL/BUSY at COMMIT, SQLite may leave the transaction open; a
    # connection left inside a write transaction would block every process. The
    # connection is private to diskcache (see "SQL outside diskcache's API").
    con = getattr(getattr(cache, "_local", None), "con", None)
    if isinstance(con, sqlite3.Connection) and con.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
        cache._txn_id = None


def _truncate_wal(cache: Any) -> None:
    # Disk full: the WAL only gives its space back when a checkpoint copies it into
    # the database and truncates it; diskcache has no API for that, so this runs the
    # pragma on diskcache's connection (see "SQL outside diskcache's API").
    con = getattr(getattr(cache, "_local", None), "con", None)
    if isinstance(con, sqlite3.Connection) and not con.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _begin_snapshot(cache: Any) -> None:
    # A read transaction (BEGIN DEFERRED: a WAL snapshot, no write lock) on diskcache's
    # connection of this thread, marked as diskcache's own so that its calls inside
    # (peek opens BEGIN IMMEDIATE otherwise) nest in it. The storage lock keeps other
    # threads off this Cache meanwhile (see "SQL outside diskcache's API").
    cache._con.execute("BEGIN")
    cache._txn_id = threading.get_ident()


def _end_snapshot(cache: Any) -> None:
    cache._txn_id = None
    con = getattr(getattr(cache, "_local", None), "con", None)
    if isinstance(con, sqlite3.Connection) and con.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            con.execute("COMMIT")


def _recovered_frames(gen: Path, timeout: float) -> tuple[int, sqlite3.Connection]:
    """Open the database once on its own (SQLite recovers the WAL if nobody has it open)
    and return how many WAL frames it kept, with the still open connection."""
    con = sqlite3.connect(str(gen / DB_NAME), timeout=timeout, isolation_level=None)
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        row = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except BaseException:
        _ORPHANS.append(con)  # closing could checkpoint and delete the evidence
        raise
    return int(row[1]) if row is not None else -1, con


@dataclass
class _Retry:
    """The state of one :meth:`Storage.run` across its retries."""

    deadline: float
    healed: bool = False
    reserve_used: bool = False
    checkpointed: bool = False
    delay: float = 0.001


# --------------------------------------------------------------------------- the storage


class Storage:
    """The live database of one queue directory, for one :class:`DurableQueue`.

    Thread-safe: :meth:`run` serializes on :attr:`lock` (released while it waits for a
    locked database). Attributes read by the queue:
    :attr:`directory`, :attr:`first_id` (ids of the live database start there),
    :attr:`generation` (its folder number), :attr:`opened` (how many times a database
    was (re)opened: the queue reclaims leases after each), :attr:`quarantined` (databases
    this object moved aside) and :attr:`identity` (this process as a lease owner).

    Args:
        directory: the queue directory (created mode 0700 when missing).
        lock_timeout: how long :meth:`run` retries a locked database.
        reserve_bytes: size of ``reserve.bin`` (0: none).
        probe: reads a little of every kind of row of a ``Cache`` (inside a transaction);
            raises on damage.
        count_entries: entries held by a database folder moved aside, None if unknown.
    """

    def __init__(
        self,
        directory: Path,
        *,
        lock_timeout: float,
        reserve_bytes: int,
        probe: Callable[[Any], None],
        count_entries: Callable[[Path], int | None],
    ) -> None:
        self.directory = directory
        self.lock_timeout = lock_timeout
        self._busy_timeout = max(0.01, min(lock_timeout, _BUSY_SLICE))
        self._local = threading.local()  # .deadline: set by deadline() for one thread
        self._reserve_bytes = reserve_bytes
        self._probe_rows = probe
        self._count_entries = count_entries
        self.lock = threading.RLock()
        self.closed = False
        self.cache: Any = None
        self._gen: Path | None = None
        self._gen_ino = -1
        self.first_id = 1
        self.generation = 0
        self.opened = 0
        self.quarantined = 0
        self._lock_fd: int | None = None
        self._last_reserve_check = -math.inf
        self.identity = ProcessIdentity.current()
        self._pid = self.identity.pid
        _INSTANCES.add(self)

    # ------------------------------------------------------------------ interface

    def open(self) -> None:
        """Open the live database (creating or replacing it when needed).

        Raises:
            QueueError: no working database could be opened within ``lock_timeout``
                (or before the thread's :meth:`deadline`).
        """
        self._check_fork()
        deadline = self._deadline("open")
        lock = self.lock
        nested, got = _owned(lock), False
        try:
            got = lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
            if not got:
                raise QueueError(self._busy("open"))
            self._open(deadline)
        finally:  # see run(): no Python call before the release
            if got or not nested:
                try:  # noqa: SIM105 (suppress() is a Python call a handler could interrupt)
                    lock.release()
                except RuntimeError:  # never acquired
                    pass

    @contextlib.contextmanager
    def deadline(self, at: float | None) -> Iterator[None]:
        """Bound the calling thread's operations inside the block by monotonic time
        ``at`` (None: no bound beyond ``lock_timeout``): an operation that would start
        after it raises :class:`QueueError` without touching the database, and one
        under way gives up at it (waits for a locked database, for the storage's lock,
        for the directory lock and for an open included). Blocks nest; the earliest
        deadline wins."""
        local = self._local
        previous: float | None = getattr(local, "deadline", None)
        if at is not None and previous is not None:
            at = min(at, previous)
        local.deadline = previous if at is None else at
        try:
            yield
        finally:
            local.deadline = previous

    def _deadline(self, what: str) -> float:
        """When an operation starting now must end: ``lock_timeout`` from now, or the
        thread's :meth:`deadline` if earlier (raises when that has passed)."""
        now = time.monotonic()
        at: float | None = getattr(self._local, "deadline", None)
        if at is None:
            return now + self.lock_timeout
        if now >= at:
            raise QueueError(f"{what}: its deadline passed before it started ({self.directory})")
        return min(at, now + self.lock_timeout)

    def _busy(self, what: str) -> str:
        return (
            f"{what}: another thread kept the queue in {self.directory} busy past the "
            "operation's deadline"
        )

    def run(
        self,
        what: str,
        fn: Callable[[Any], _T],
        *,
        write: bool = True,
        frees_space: bool = False,
        snapshot: bool = False,
    ) -> _T:
        """Run ``fn(cache)`` in one transaction (``write``) under the shared directory lock.

        Without ``write`` it runs outside a transaction (one indexed read, no write
        lock), or with ``snapshot`` in a read transaction: a consistent view of several
        rows that never waits for another writer (``fn`` must not write).
        Locked: retried with backoff until ``lock_timeout`` (or the thread's
        :meth:`deadline`), with :attr:`lock` released between attempts. Corrupt: the
        database is moved aside, a fresh one opened, and ``fn`` retried once. Disk full:
        for operations that free space (``frees_space``) the reserve is released; then
        the WAL is checkpointed and truncated and ``fn`` retried once. Anything else
        from the storage: :class:`QueueError`.
        """
        if self.closed:
            raise QueueError(f"{what}: the queue in {self.directory} is closed")
        self._check_fork()
        deadline = self._deadline(what)
        lock = self.lock
        nested = _owned(lock)
        retry: _Retry | None = None  # made on the first failure: the common path is short
        while True:
            pause, got = 0.0, False
            try:
                got = lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
                if not got:
                    raise QueueError(self._busy(what))
                if self.closed:
                    raise QueueError(f"{what}: the queue in {self.directory} is closed")
                cache = None
                try:
                    if self.cache is None or not self._generation_current():
                        self._reopen(deadline)
                    cache = self.cache
                    with self._directory_lock(False, deadline):
                        if not self._generation_current():
                            continue
                        if write:
                            with cache.transact():
                                return fn(cache)
                        if not snapshot:
                            return fn(cache)
                        _begin_snapshot(cache)
                        try:
                            return fn(cache)
                        finally:
                            _end_snapshot(cache)
                except QueueError:
                    raise
                except STORAGE_ERRORS as exc:
                    if cache is not None:
                        _rollback_if_open(cache)
                    retry = retry or _Retry(deadline)
                    pause = self._recover(what, exc, cache, retry, frees_space)
                except BaseException:  # a signal handler's exception, a bug in fn: never
                    if cache is not None:  # leave the connection inside a transaction
                        _rollback_if_open(cache)
                    raise
            finally:
                # Release what this pass acquired, also when an exception a signal handler
                # raised landed between the acquisition and noting it (``got`` still
                # False): a thread that did not hold the lock before and holds it now
                # took it here. No Python-level call comes before the release, so no
                # handler can run in between; a release of a lock never acquired raises
                # RuntimeError. (Nested in this thread's own hold, only ``got`` counts.)
                if got or not nested:
                    try:  # noqa: SIM105 (suppress() is a Python call: see above)
                        lock.release()
                    except RuntimeError:  # the acquisition never happened
                        pass
            if pause:
                time.sleep(pause)  # without the lock: other threads (and a fork) go on

    def quarantine(self, problem: str) -> None:
        """Move the live database aside (unless another process did) and open a fresh one."""
        self._check_fork()
        with self.lock:
            gen, ino = self._gen, self._gen_ino
            self._orphan_cache()
            deadline = time.monotonic() + self.lock_timeout
            try:
                with self._directory_lock(True, deadline):
                    if gen is not None:
                        try:
                            still_live = os.stat(gen).st_ino == ino
                        except OSError:
                            still_live = False
                        if still_live:
                            self._move_aside(gen, problem)
                    self._open_exclusive(deadline)
            except LockTimeout as exc:
                raise self._open_error(exc) from exc

    def totals(self) -> Totals:
        """The directory's ``totals.json`` (quarantines, salvaged entries)."""
        return read_totals(self.directory)

    def add_salvaged(self, count: int) -> None:
        """Add ``count`` to ``salvaged_entries`` in ``totals.json`` (exclusive lock).

        Raises:
            QueueError: the lock could not be taken or the file not written.
        """
        self._check_fork()
        with self.lock:
            try:
                with self._directory_lock(True, time.monotonic() + self.lock_timeout):
                    totals = read_totals(self.directory)
                    write_totals(
                        self.directory,
                        replace(totals, salvaged_entries=totals.salvaged_entries + count),
                    )
            except (OSError, LockTimeout) as exc:
                raise QueueError(f"cannot update the totals in {self.directory}: {exc}") from exc

    def bytes_on_disk(self) -> int:
        """Size of the live database files (db, WAL, shared memory)."""
        if self._gen is None:
            return 0
        total = 0
        for suffix in ("", "-wal", "-shm"):
            size = file_size(self._gen / (DB_NAME + suffix))
            if size > 0:
                total += size
        return total

    def ensure_reserve(self, *, at_most_every: float = 0.0) -> None:
        """Recreate ``reserve.bin`` if it is missing (checked at most every few seconds)."""
        now = time.monotonic()
        if now - self._last_reserve_check < at_most_every:
            return
        self._last_reserve_check = now
        if self._reserve_bytes <= 0:
            return
        path = self.directory / RESERVE_NAME
        if file_size(path) >= self._reserve_bytes:
            return
        size = self._reserve_bytes

        def fill(fd: int) -> None:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            else:
                os.write(fd, b"\0" * size)

        with contextlib.suppress(OSError):
            replace_file(path, fill)

    def close(self) -> None:
        """Close the connection and the lock file; later :meth:`run` calls raise."""
        self._check_fork()
        with self.lock:
            if self.closed:
                return
            self.closed = True
            cache, self.cache = self.cache, None
            if os.getpid() != self._pid:
                _ORPHANS.append(cache)
                return
            if cache is not None:
                with contextlib.suppress(sqlite3.Error, OSError):
                    cache.close()
            if self._lock_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._lock_fd)
                self._lock_fd = None

    # ------------------------------------------------------------------ failures in run

    def _recover(
        self, what: str, exc: BaseException, cache: Any, retry: _Retry, frees_space: bool
    ) -> float:
        """Prepare the next try of :meth:`run` after ``exc`` and return how long to wait
        before it (without the lock), or raise :class:`QueueError`."""
        kind = classify(exc)
        if kind == "locked":
            if time.monotonic() >= retry.deadline:
                until = (
                    "until the operation's deadline"
                    if getattr(self._local, "deadline", None) == retry.deadline
                    else f"for more than {self.lock_timeout:g} s"
                )
                raise QueueError(
                    f"{what}: the queue database in {self.directory} stayed locked {until}"
                ) from exc
            pause = _pause(retry.delay, retry.deadline)
            retry.delay = min(retry.delay * 2, 0.05)
            return pause
        if kind == "corrupt":
            if retry.healed:
                raise QueueError(
                    f"{what}: the queue database in {self.directory} is "
                    f"unreadable even after starting afresh: {exc}"
                ) from exc
            retry.healed = True
            self.quarantine(f"{type(exc).__name__}: {exc}")
            return 0.0
        if kind == "full":
            if frees_space and not retry.reserve_used and self._release_reserve():
                retry.reserve_used = True
                retry.checkpointed = False
            if not retry.checkpointed and cache is not None:
                retry.checkpointed = True
                _truncate_wal(cache)
                return 0.0
            raise QueueError(
                f"{what}: no space left on the device holding {self.directory}"
            ) from exc
        raise QueueError(
            f"{what} failed on the queue in {self.directory}: {type(exc).__name__}: {exc}"
        ) from exc

    # ------------------------------------------------------------------ files and locks

    def _generation_current(self) -> bool:
        if self._gen is None:
            return False
        try:
            return os.stat(self._gen).st_ino == self._gen_ino
        except OSError:
            return False

    @contextlib.contextmanager
    def _directory_lock(self, exclusive: bool, deadline: float) -> Iterator[None]:
        fd = self._lock_fd
        if fd is None:
            yield
            return
        delay = 0.0005
        while not _flock(fd, exclusive):
            if time.monotonic() >= deadline:
                raise LockTimeout(f"could not lock {self.directory / LOCK_NAME}")
            delay = _sleep_backoff(delay, 0.02, deadline)
        try:
            yield
        finally:
            _funlock(fd)

    def _prepare_directory(self) -> None:
        path = self.directory
        try:
            if not path.is_dir():
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.stat(path)
            if info.st_uid == os.geteuid() and info.st_mode & 0o777 != 0o700:
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o700)
        except OSError as exc:
            raise QueueError(f"cannot create the queue directory {path}: {exc}") from exc
        if self._lock_fd is None:
            lock_path = path / LOCK_NAME
            flags = os.O_CLOEXEC if hasattr(os, "O_CLOEXEC") else 0
            try:
                self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | flags, 0o600)
            except OSError:
                try:
                    self._lock_fd = os.open(lock_path, os.O_RDONLY | flags)
                except OSError:
                    self._lock_fd = None  # unwritable directory: SQLite's locks only

    def _generations(self) -> tuple[list[tuple[int, Path]], int]:
        try:
            return generations(self.directory)
        except OSError as exc:
            raise QueueError(f"cannot list the queue directory {self.directory}: {exc}") from exc

    def _construct(self, gen: Path, deadline: float) -> Any:
        delay = 0.002
        while True:
            _OPENING.deadline = deadline
            try:
                return _Cache(str(gen), timeout=self._busy_timeout, **CACHE_SETTINGS)
            except (sqlite3.Error, diskcache.Timeout) as exc:
                # Concurrent construction races ("database is locked", diskcache #266/#85).
                if classify(exc) != "locked" or time.monotonic() >= deadline:
                    raise
                delay = _sleep_backoff(delay, 0.05, deadline)
            finally:
                _OPENING.deadline = None

    def _probe(self, cache: Any, deadline: float) -> None:
        """Cheap readability check of a freshly opened database (the queue's probe)."""
        delay = 0.002
        while True:
            try:
                with cache.transact():
                    self._probe_rows(cache)
                return
            except (sqlite3.Error, diskcache.Timeout) as exc:
                _rollback_if_open(cache)
                if classify(exc) != "locked" or time.monotonic() >= deadline:
                    raise
                delay = _sleep_backoff(delay, 0.05, deadline)

    def _install(self, gen: Path, cache: Any) -> None:
        number = generation_number(gen.name) or 1
        self.first_id = first_id(number)
        self.cache = cache
        self._gen = gen
        self._gen_ino = os.stat(gen).st_ino
        self.generation = number
        self.opened += 1
        _OPENED_GENERATIONS.add(str(gen))

    def _orphan_cache(self) -> None:
        if self.cache is not None:
            _ORPHANS.append(self.cache)
        self.cache = None
        self._gen = None

    def _reopen(self, deadline: float) -> None:
        if self.cache is not None:
            _log.info(
                "queue database in %s was replaced by another process; reopening", self.directory
            )
        self._orphan_cache()
        self._open(deadline)

    def _open(self, deadline: float) -> None:
        try:
            self._open_locked(deadline)
        except QueueError:
            raise
        except STORAGE_ERRORS as exc:
            raise self._open_error(exc) from exc

    def _open_locked(self, deadline: float) -> None:
        self._prepare_directory()
        fd = self._lock_fd
        if fd is not None and not self._try_exclusive(
            min(deadline, time.monotonic() + _OPEN_EXCLUSIVE_TRY)
        ):
            # Others keep the lock busy: the database is live; open it under a shared lock.
            if self._open_shared(deadline):
                return
            if not self._try_exclusive(deadline):
                raise self._open_error(LockTimeout(f"could not lock {self.directory}"))
        try:
            self._open_exclusive(deadline)
        finally:
            if fd is not None:
                _funlock(fd)

    def _open_shared(self, deadline: float) -> bool:
        """Open the live database under a shared lock; False when it must be replaced."""
        live, _ = self._generations()
        if not live:
            return False
        gen = live[-1][1]
        cache = None
        try:
            with self._directory_lock(False, deadline):
                if gen.is_dir():
                    cache = self._construct(gen, deadline)
                    self._probe(cache, deadline)
                    self._install(gen, cache)
                    return True
        except (sqlite3.Error, diskcache.Timeout, OSError, CorruptData) as exc:
            if cache is not None:
                _ORPHANS.append(cache)
            if classify(exc) != "corrupt":
                raise self._open_error(exc) from exc
        except LockTimeout as exc:
            raise self._open_error(exc) from exc
        return False

    def _try_exclusive(self, deadline: float) -> bool:
        fd = self._lock_fd
        if fd is None:
            return True
        delay = 0.0005
        while True:
            try:
                if _flock(fd, True):
                    return True
            except OSError:
                return False
            if time.monotonic() >= deadline:
                return False
            delay = _sleep_backoff(delay, 0.02, deadline)

    def _open_error(self, exc: BaseException) -> QueueError:
        kind = classify(exc)
        if kind == "locked":
            return QueueError(
                f"the queue database in {self.directory} stayed locked for more than "
                f"{self.lock_timeout:g} s"
            )
        if kind == "full":
            return QueueError(f"no space left on the device holding {self.directory}")
        return QueueError(
            f"cannot open the queue database in {self.directory}: {type(exc).__name__}: {exc}"
        )

    def _open_exclusive(self, deadline: float) -> None:
        """With the exclusive directory lock: find/create, inspect, open, probe."""
        reserve_used = False
        for _attempt in range(5):
            gen = self._live_or_new_generation()
            problem: str | None = None
            promised: int | None = None
            if str(gen) not in _OPENED_GENERATIONS:
                problem, promised = inspect_files(gen)
            if problem is None:
                cache = None
                try:
                    if promised is not None:
                        problem = self._check_recovery(gen, promised, deadline)
                        if problem is not None:
                            self._move_aside(gen, problem)
                            continue
                    cache = self._construct(gen, deadline)
                    self._probe(cache, deadline)
                except (sqlite3.Error, diskcache.Timeout, OSError, CorruptData) as exc:
                    if cache is not None:
                        _ORPHANS.append(cache)
                    kind = classify(exc)
                    if kind == "full" and not reserve_used and self._release_reserve():
                        reserve_used = True
                        continue
                    if kind != "corrupt":
                        raise self._open_error(exc) from exc
                    problem = f"{type(exc).__name__}: {exc}"
                else:
                    self._install(gen, cache)
                    return
            self._move_aside(gen, problem)
        raise QueueError(f"could not open a working queue database in {self.directory}")

    def _live_or_new_generation(self) -> Path:
        live, highest = self._generations()
        if live:
            if len(live) > 1:
                _log.warning(
                    "several queue databases in %s; using %s", self.directory, live[-1][1].name
                )
            return live[-1][1]
        gen = self.directory / f"{GEN_PREFIX}{highest + 1:04d}"
        try:
            gen.mkdir(mode=0o700)
        except OSError as exc:
            raise self._open_error(exc) from exc
        return gen

    def _check_recovery(self, gen: Path, promised: int, deadline: float) -> str | None:
        """After a crash: did SQLite's recovery keep every frame the index promised?"""
        kept, con = _recovered_frames(gen, max(0.01, deadline - time.monotonic()))
        if 0 <= kept < promised:
            _ORPHANS.append(con)  # keep the damaged WAL for the quarantine folder
            return (
                f"{gen / (DB_NAME + '-wal')} is damaged: SQLite's recovery kept {kept} of "
                f"{promised} committed frames"
            )
        con.close()
        return None

    def _move_aside(self, gen: Path, problem: str) -> None:
        """Rename a database folder to ``quarantine-*`` and count it (exclusive lock held)."""
        target = self.directory / f"{QUARANTINE_PREFIX}{utc_stamp()}-{gen.name}"
        try:
            os.rename(gen, target)
        except OSError as exc:
            raise QueueError(
                f"the queue database {gen / DB_NAME} is unreadable ({problem}) and could not "
                f"be moved aside: {exc}"
            ) from exc
        self.quarantined += 1
        entries = self._count_entries(target)
        _log.error(
            "queue database %s is unreadable (%s); moved it aside to %s and started a fresh "
            "queue: %s stored there were not delivered (per-buffer salvage can re-queue "
            "what is readable)",
            gen / DB_NAME,
            problem,
            target,
            "an unknown number of entries" if entries is None else f"{entries} entries",
        )
        totals = read_totals(self.directory)
        totals = replace(
            totals,
            quarantines=totals.quarantines + 1,
            quarantined_entries=totals.quarantined_entries + (entries or 0),
            quarantines_uncounted=totals.quarantines_uncounted + (entries is None),
        )
        try:
            write_totals(self.directory, totals)
        except OSError as exc:
            _log.warning("cannot record the quarantine in %s: %s", self.directory, exc)

    def _release_reserve(self) -> bool:
        path = self.directory / RESERVE_NAME
        try:
            os.unlink(path)
        except OSError:
            return False
        self._last_reserve_check = time.monotonic() + 30.0  # let the queue drain first
        _log.warning(
            "disk full under %s: released the %d-byte reserve so that stored entries can "
            "still be claimed and acknowledged",
            self.directory,
            self._reserve_bytes,
        )
        return True

    # ------------------------------------------------------------------ fork

    def _check_fork(self) -> None:
        if self._pid == os.getpid():
            return
        with _FORK_LOCK:
            if self._pid == os.getpid():
                return
            # Never close what the parent opened: keep it referenced forever.
            _ORPHANS.append(self.cache)
            self.cache = None
            self._gen = None
            self.lock = threading.RLock()
            if self._lock_fd is not None:
                # flock belongs to the open file description shared with the parent:
                # closing our descriptor does not release the parent's lock.
                with contextlib.suppress(OSError):
                    os.close(self._lock_fd)
                self._lock_fd = None
            self.identity = ProcessIdentity.current()
            self._pid = self.identity.pid
