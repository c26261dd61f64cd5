"""Storage health for :mod:`per_buffer.queue`: files, locks, recovery checks and quarantine.

:class:`~per_buffer.queue.DurableQueue` keeps the queue's data model (rows, leases, retry
groups, dead letters, bounds) in ``queue.py``; everything here is about the files that
hold it and whether they can be trusted:

* inspecting a database folder before SQLite opens it (header, truncation, the WAL
  against its shared-memory index, WAL checksums) and counting the frames SQLite's
  recovery kept after a crash;
* classifying storage errors as corrupt, full, locked or other;
* process liveness on this host (``/proc``, boot time) for stale leases;
* ``flock`` on ``queue.lock``, the numbered ``db-<n>/`` folders, quarantine folders and
  the ``reserve.bin`` ballast;
* fork safety: connections inherited through ``fork()`` are never closed by the child;
* :class:`_QueueStorage`, the base class of ``DurableQueue`` with its private methods
  that open, probe, reopen and move aside the live database, and track which process
  owns the object.

It is a separate module only to keep ``queue.py`` small enough to read in one sitting;
it has no public API and the queue's module documentation describes the behaviour.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import secrets
import sqlite3
import struct
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import diskcache

from .errors import QueueError

if sys.platform != "win32":
    import fcntl

# The queue's logger: these messages are the queue's, whichever module emits them.
_log = logging.getLogger("per_buffer.queue")

_DB_NAME: Final = "cache.db"
_GEN_PREFIX: Final = "db-"
_QUARANTINE_PREFIX: Final = "quarantine-"
_LOCK_NAME: Final = "queue.lock"
_RESERVE_NAME: Final = "reserve.bin"

_IDS_PER_GENERATION: Final = 10**12
_OPEN_EXCLUSIVE_TRY: Final = 0.25

_CACHE_SETTINGS: Final[Mapping[str, Any]] = MappingProxyType(
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

# SQLite primary result codes (sqlite3.Error.sqlite_errorcode exists from Python 3.11).
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_NOTADB: Final = 26
_SQLITE_IOERR_SHMSIZE: Final = 10 | (19 << 8)

_WAL_MAGIC: Final = (0x377F0682, 0x377F0683)
_WAL_VERSION: Final = 3007000
_SHM_HEADER: Final = struct.Struct("=IIIBBHII2I8s2I")  # WalIndexHdr, 48 bytes, native order


# Cache objects whose connections must never be closed by us: connections inherited
# through fork() (closing them in the child can delete the parent's WAL, diskcache #325)
# and connections to databases moved aside. Keeping a reference prevents GC closing them.
_ORPHANS: list[object] = []
# Database folders this process has opened: their files are never read directly again
# (closing any descriptor of a file drops this process's POSIX locks held by SQLite).
_OPENED_GENERATIONS: set[str] = set()


class _CorruptData(Exception):
    """A stored row could not be decoded: treated like SQLite corruption."""


class _LockTimeout(Exception):
    """The directory lock could not be taken before the deadline."""


_FORK_LOCK = threading.Lock()
_INSTANCES: weakref.WeakSet[_QueueStorage] = weakref.WeakSet()


_HELD_AT_FORK: list[threading.RLock] = []


def _before_fork() -> None:
    # No thread may be inside SQLite when the process forks: SQLite's global mutexes
    # (its allocator's, for one) would stay locked forever in the child, whose first
    # connection would then hang. Every queue operation runs under its queue's lock.
    for queue in list(_INSTANCES):
        lock = queue._lock
        lock.acquire()
        _HELD_AT_FORK.append(lock)


def _after_fork_in_parent() -> None:
    while _HELD_AT_FORK:
        _HELD_AT_FORK.pop().release()


def _after_fork_in_child() -> None:
    # Pin every inherited Cache at once, even of queues the child never uses: garbage
    # collecting one would close the parent's SQLite connection from the child.
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()
    _HELD_AT_FORK.clear()  # each queue replaces its lock when it notices the new pid
    for queue in list(_INSTANCES):
        _ORPHANS.append(queue._cache)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def _error_codes(exc: BaseException) -> Iterator[tuple[int | None, str]]:
    """(sqlite error code, lowercase message) of ``exc`` and of its context chain."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 6:
        if isinstance(current, sqlite3.Error):
            code = getattr(current, "sqlite_errorcode", None)
            yield (code if isinstance(code, int) else None), str(current).lower()
        elif isinstance(current, OSError):
            yield None, f"oserror {current.errno}"
        seen += 1
        current = current.__cause__ or current.__context__


def _classify(exc: BaseException) -> str:
    """One of "corrupt", "full", "locked", "other"."""
    if isinstance(exc, _CorruptData):
        return "corrupt"
    if isinstance(exc, _LockTimeout):
        return "locked"
    kinds: set[str] = set()
    for code, message in _error_codes(exc):
        primary = None if code is None else code & 0xFF
        if (
            primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
            or "malformed" in message
            or "not a database" in message
        ):
            kinds.add("corrupt")
        elif (
            primary == _SQLITE_FULL
            or code == _SQLITE_IOERR_SHMSIZE
            or "disk is full" in message
            or message in (f"oserror {errno.ENOSPC}", f"oserror {errno.EDQUOT}")
        ):
            kinds.add("full")
        elif primary in (_SQLITE_BUSY, _SQLITE_LOCKED) or "locked" in message or "busy" in message:
            kinds.add("locked")
    if isinstance(exc, diskcache.Timeout) and not kinds:
        kinds.add("locked")
    for kind in ("corrupt", "full", "locked"):
        if kind in kinds:
            return kind
    return "other"


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    try:
        fields = text[text.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (ValueError, IndexError):
        return None


def _process_gone(pid: int, start: int | None) -> bool:
    """True when ``pid`` (started at ``start`` ticks, if known) no longer runs here."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # EPERM: it exists, owned by someone else
    state = _proc_state(pid)
    if state is None:
        return False
    letter, started = state
    if letter in ("Z", "X"):
        return True  # exited, not yet reaped
    return start is not None and started != start


def _wal_checksum(
    data: bytes, big_endian: bool, start: tuple[int, int] = (0, 0)
) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data``, continuing from ``start``."""
    words = struct.unpack((">" if big_endian else "<") + f"{len(data) // 4}I", data)
    s1, s2 = start
    for index in range(0, len(words), 2):
        s1 = (s1 + words[index] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[index + 1] + s1) & 0xFFFFFFFF
    return s1, s2


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _inspect_files(gen: Path) -> tuple[str | None, int | None]:
    """Look for damage SQLite would hide or trip on later.

    Returns (a description of the damage or None, the number of WAL frames the index
    promises when some are not yet copied into the database, else None).

    Reads the database header and compares the WAL with its shared-memory index: the
    state a killed process leaves behind. An index written before the last boot is not
    trusted (after a power loss a short WAL is expected with ``synchronous=NORMAL``).
    Must only run while no operation is in progress (exclusive directory lock) and no
    connection of this process is open on these files (closing a descriptor would drop
    this process's POSIX locks).
    """
    db = gen / _DB_NAME
    wal = gen / (_DB_NAME + "-wal")
    shm = gen / (_DB_NAME + "-shm")
    db_size, wal_size, shm_size = _file_size(db), _file_size(wal), _file_size(shm)
    try:
        if db_size <= 0:
            if wal_size > 32:
                return f"{db} is missing or empty but {wal} holds {wal_size} bytes", None
            return None, None
        with open(db, "rb") as handle:
            head = handle.read(100)
        if len(head) < 100 or head[:16] != b"SQLite format 3\x00":
            return f"{db} does not start with a SQLite header", None
        page_size = struct.unpack(">H", head[16:18])[0]
        page_size = 65536 if page_size == 1 else page_size
        if page_size < 512 or page_size & (page_size - 1):
            return f"{db} has an invalid page size {page_size}", None
        (header_pages,) = struct.unpack(">I", head[28:32])
        header_size_valid = head[24:28] == head[92:96] and header_pages > 0

        index = None
        booted = _boot_time()
        if shm_size >= 136 and (booted is None or os.stat(shm).st_mtime >= booted):
            with open(shm, "rb") as handle:
                raw = handle.read(136)
            if len(raw) == 136 and raw[:48] == raw[48:96]:
                fields = _SHM_HEADER.unpack(raw[:48])
                if fields[0] == _WAL_VERSION and fields[3] == 1:
                    (n_backfill,) = struct.unpack("=I", raw[96:100])
                    index = fields, n_backfill
        unbackfilled = 0
        if index is not None:
            fields, n_backfill = index
            unbackfilled = max(0, fields[6] - n_backfill)
            if unbackfilled:
                if wal_size < 0:
                    return (
                        f"{wal} is missing: {unbackfilled} committed frames had not been "
                        "copied into the database"
                    ), None
                return _check_wal(wal, wal_size, fields), fields[6]
        elif wal_size > 0:
            with open(wal, "rb") as handle:
                first = handle.read(4)
            if len(first) < 4 or struct.unpack(">I", first)[0] not in _WAL_MAGIC:
                return f"{wal} does not start with a WAL header (overwritten?)", None
        if (
            header_size_valid
            and (wal_size <= 0 or (index is not None and index[0][6] == index[1]))
            and db_size < header_pages * page_size
        ):
            return (
                f"{db} is truncated: {db_size} bytes, its header says "
                f"{header_pages} pages of {page_size} bytes"
            ), None
    except OSError:
        return None, None  # unreadable for us: let SQLite decide
    return None, None


def _check_wal(wal: Path, wal_size: int, index: tuple[Any, ...]) -> str | None:
    """Compare the WAL with its index header ``index`` (the unpacked WalIndexHdr).

    Checks the WAL header, the size, and the last committed frame in full: its stored
    checksum must match the index and its content, chained from the previous frame.
    """
    page_size = 65536 if index[5] == 1 else index[5]
    mx_frame, cksum, salt = index[6], tuple(index[8:10]), index[10]
    with open(wal, "rb") as handle:
        head = handle.read(32)
        if len(head) < 32:
            return f"{wal} is truncated ({len(head)} bytes)"
        magic = struct.unpack(">I", head[:4])[0]
        if magic not in _WAL_MAGIC:
            return f"{wal} does not start with a WAL header (overwritten?)"
        big_endian = bool(magic & 1)
        if _wal_checksum(head[:24], big_endian) != struct.unpack(">II", head[24:32]):
            return f"{wal} has a damaged header (checksum mismatch)"
        if head[16:24] != salt:
            return f"{wal} does not belong to its index (salt mismatch)"
        frame = 24 + page_size
        if wal_size < 32 + mx_frame * frame:
            return f"{wal} is truncated: {wal_size} bytes for {mx_frame} frames"
        if mx_frame > 1:
            handle.seek(32 + (mx_frame - 2) * frame)
            before = struct.unpack(">II", handle.read(24)[16:24])
        else:
            before = struct.unpack(">II", head[24:32])
        handle.seek(32 + (mx_frame - 1) * frame)
        last = handle.read(frame)
        stored = struct.unpack(">II", last[16:24])
        computed = _wal_checksum(last[:8] + last[24:], big_endian, before)
        if last[8:16] != salt or stored != cksum or computed != cksum:
            return f"{wal} has a damaged last frame (checksum mismatch)"
    return None


def _recovered_frames(gen: Path, timeout: float) -> tuple[int, sqlite3.Connection]:
    """Open the database once on its own (SQLite recovers the WAL if nobody has it open)
    and return how many WAL frames it kept, with the still open connection."""
    con = sqlite3.connect(str(gen / _DB_NAME), timeout=timeout, isolation_level=None)
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        row = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except BaseException:
        _ORPHANS.append(con)  # closing could checkpoint and delete the evidence
        raise
    return int(row[1]) if row is not None else -1, con


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def _generation_number(name: str) -> int | None:
    if name.startswith(_GEN_PREFIX):
        tail = name[len(_GEN_PREFIX) :]
    elif name.startswith(_QUARANTINE_PREFIX) and f"-{_GEN_PREFIX}" in name:
        tail = name.rsplit(f"-{_GEN_PREFIX}", 1)[1]
    else:
        return None
    return int(tail) if tail.isdigit() else None


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


# --------------------------------------------------------------------------- the queue's files


class _QueueStorage:
    """The files-and-locks half of :class:`~per_buffer.queue.DurableQueue` (its base class).

    Finds, creates, inspects, opens, probes and quarantines the live database under the
    directory lock, manages the reserve file, and notices a fork. The attributes below
    are set by ``DurableQueue.__init__``; :meth:`_probe_once`, which reads the queue's
    rows, is defined by the queue.
    """

    _directory: Path
    _lock_timeout: float
    _busy_timeout: float
    _reserve_bytes: int
    _cache: Any
    _gen: Path | None
    _gen_ino: int
    _first_id: int
    _lock_fd: int | None
    _quarantined: int
    _last_reserve_check: float
    _reclaim_due: bool
    _lock: threading.RLock
    _host: str
    _pid: int
    _start_ticks: int | None
    _owner: str

    def _probe_once(self, cache: Any) -> None:
        """Read a little of every kind of row in ``cache`` (defined by the queue)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ files and locks

    def _bytes_on_disk(self) -> int:
        if self._gen is None:
            return 0
        total = 0
        for suffix in ("", "-wal", "-shm"):
            size = _file_size(self._gen / (_DB_NAME + suffix))
            if size > 0:
                total += size
        return total

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
                raise _LockTimeout(f"could not lock {self._directory / _LOCK_NAME}")
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.02)
        try:
            yield
        finally:
            _funlock(fd)

    def _prepare_directory(self) -> None:
        path = self._directory
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
            lock_path = path / _LOCK_NAME
            flags = os.O_CLOEXEC if hasattr(os, "O_CLOEXEC") else 0
            try:
                self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | flags, 0o600)
            except OSError:
                try:
                    self._lock_fd = os.open(lock_path, os.O_RDONLY | flags)
                except OSError:
                    self._lock_fd = None  # unwritable directory: SQLite's locks only

    def _generations(self) -> tuple[list[tuple[int, Path]], int]:
        """Live database folders (sorted) and the highest number ever used."""
        live: list[tuple[int, Path]] = []
        highest = 0
        try:
            names = os.listdir(self._directory)
        except OSError as exc:
            raise QueueError(f"cannot list the queue directory {self._directory}: {exc}") from exc
        for name in names:
            number = _generation_number(name)
            if number is None:
                continue
            highest = max(highest, number)
            path = self._directory / name
            if name.startswith(_GEN_PREFIX) and path.is_dir():
                live.append((number, path))
        live.sort()
        return live, highest

    def _construct(self, gen: Path, deadline: float) -> Any:
        delay = 0.002
        while True:
            try:
                return diskcache.Cache(str(gen), timeout=self._busy_timeout, **_CACHE_SETTINGS)
            except (sqlite3.Error, diskcache.Timeout) as exc:
                # Concurrent construction races ("database is locked", diskcache #266/#85).
                if _classify(exc) != "locked" or time.monotonic() >= deadline:
                    raise
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 0.05)

    def _probe(self, cache: Any, deadline: float) -> None:
        """Cheap readability check: counters, lease index, both ends of the queues."""
        delay = 0.002
        while True:
            try:
                self._probe_once(cache)
                return
            except (sqlite3.Error, diskcache.Timeout) as exc:
                self._rollback_if_open(cache)
                if _classify(exc) != "locked" or time.monotonic() >= deadline:
                    raise
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 0.05)

    def _install(self, gen: Path, cache: Any) -> None:
        number = _generation_number(gen.name) or 1
        # Ids stay unique within the directory across quarantines: database n starts
        # at (n - 1) * 10**12 + 1 (keys hold 15 digits: 999 databases).
        self._first_id = (min(number, 999) - 1) * _IDS_PER_GENERATION + 1
        self._cache = cache
        self._gen = gen
        self._gen_ino = os.stat(gen).st_ino
        self._reclaim_due = True
        _OPENED_GENERATIONS.add(str(gen))

    def _orphan_cache(self) -> None:
        if self._cache is not None:
            _ORPHANS.append(self._cache)
        self._cache = None
        self._gen = None

    def _reopen(self, deadline: float) -> None:
        if self._cache is not None:
            _log.info(
                "queue database in %s was replaced by another process; reopening", self._directory
            )
        self._orphan_cache()
        self._open(deadline)

    def _open(self, deadline: float) -> None:
        """Open the live database, creating or replacing it when needed.

        Raises:
            QueueError: no working database could be opened before ``deadline``.
        """
        try:
            self._open_locked(deadline)
        except QueueError:
            raise
        except (sqlite3.Error, diskcache.Timeout, OSError, _CorruptData, _LockTimeout) as exc:
            raise self._open_error(exc) from exc

    def _open_locked(self, deadline: float) -> None:
        self._prepare_directory()
        fd = self._lock_fd
        if fd is not None and not self._try_exclusive(
            min(deadline, time.monotonic() + _OPEN_EXCLUSIVE_TRY)
        ):
            # Others keep the lock busy: the database is live; open it under a shared lock.
            live, _ = self._generations()
            if live:
                gen = live[-1][1]
                cache = None
                try:
                    with self._directory_lock(False, deadline):
                        if gen.is_dir():
                            cache = self._construct(gen, deadline)
                            self._probe(cache, deadline)
                            self._install(gen, cache)
                            return
                except (sqlite3.Error, diskcache.Timeout, OSError, _CorruptData) as exc:
                    if cache is not None:
                        _ORPHANS.append(cache)
                    if _classify(exc) != "corrupt":
                        raise self._open_error(exc) from exc
                except _LockTimeout as exc:
                    raise self._open_error(exc) from exc
            if not self._try_exclusive(deadline):
                raise self._open_error(_LockTimeout(f"could not lock {self._directory}"))
        try:
            self._open_exclusive(deadline)
        finally:
            if fd is not None:
                _funlock(fd)

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
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.02)

    def _open_error(self, exc: BaseException) -> QueueError:
        kind = _classify(exc)
        if kind == "locked":
            return QueueError(
                f"the queue database in {self._directory} stayed locked for more than "
                f"{self._lock_timeout:g} s"
            )
        if kind == "full":
            return QueueError(f"no space left on the device holding {self._directory}")
        return QueueError(
            f"cannot open the queue database in {self._directory}: {type(exc).__name__}: {exc}"
        )

    def _open_exclusive(self, deadline: float) -> None:
        """With the exclusive directory lock: find/create, inspect, open, probe."""
        reserve_used = False
        for _attempt in range(5):
            live, highest = self._generations()
            if live:
                gen = live[-1][1]
                if len(live) > 1:
                    _log.warning(
                        "several queue databases in %s; using %s",
                        self._directory,
                        gen.name,
                    )
            else:
                gen = self._directory / f"{_GEN_PREFIX}{highest + 1:04d}"
                try:
                    gen.mkdir(mode=0o700)
                except OSError as exc:
                    raise self._open_error(exc) from exc
            problem: str | None = None
            promised: int | None = None
            if str(gen) not in _OPENED_GENERATIONS:
                problem, promised = _inspect_files(gen)
            if problem is None:
                cache = None
                try:
                    if promised is not None:
                        problem = self._check_recovery(gen, promised)
                        if problem is not None:
                            self._move_aside(gen, problem)
                            continue
                    cache = self._construct(gen, deadline)
                    self._probe(cache, deadline)
                except (sqlite3.Error, diskcache.Timeout, OSError, _CorruptData) as exc:
                    if cache is not None:
                        _ORPHANS.append(cache)
                    kind = _classify(exc)
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
        raise QueueError(f"could not open a working queue database in {self._directory}")

    def _check_recovery(self, gen: Path, promised: int) -> str | None:
        """After a crash: did SQLite's recovery keep every frame the index promised?"""
        kept, con = _recovered_frames(gen, self._busy_timeout)
        if 0 <= kept < promised:
            _ORPHANS.append(con)  # keep the damaged WAL for the quarantine folder
            return (
                f"{gen / (_DB_NAME + '-wal')} is damaged: SQLite's recovery kept {kept} of "
                f"{promised} committed frames"
            )
        con.close()
        return None

    def _move_aside(self, gen: Path, problem: str) -> None:
        target = self._directory / f"{_QUARANTINE_PREFIX}{_utc_stamp()}-{gen.name}"
        try:
            os.rename(gen, target)
        except OSError as exc:
            raise QueueError(
                f"the queue database {gen / _DB_NAME} is unreadable ({problem}) and could not "
                f"be moved aside: {exc}"
            ) from exc
        self._quarantined += 1
        _log.error(
            "queue database %s is unreadable (%s); moved it aside to %s and started a fresh "
            "queue: entries stored there were not delivered",
            gen / _DB_NAME,
            problem,
            target,
        )

    def _quarantine(self, problem: str) -> None:
        """Move the current database aside (unless another process did) and reopen."""
        gen, ino = self._gen, self._gen_ino
        self._orphan_cache()
        deadline = time.monotonic() + self._lock_timeout
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
        except _LockTimeout as exc:
            raise self._open_error(exc) from exc

    def _ensure_reserve(self) -> None:
        if self._reserve_bytes <= 0:
            return
        path = self._directory / _RESERVE_NAME
        if _file_size(path) >= self._reserve_bytes:
            return
        temp = path.with_name(f".{_RESERVE_NAME}.{os.getpid()}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, self._reserve_bytes)
                else:
                    os.write(fd, b"\0" * self._reserve_bytes)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temp)

    def _release_reserve(self) -> bool:
        path = self._directory / _RESERVE_NAME
        try:
            os.unlink(path)
        except OSError:
            return False
        self._last_reserve_check = time.monotonic() + 30.0  # let the queue drain first
        _log.warning(
            "disk full under %s: released the %d-byte reserve so that stored entries can "
            "still be claimed and acknowledged",
            self._directory,
            self._reserve_bytes,
        )
        return True

    # ------------------------------------------------------------------ processes and fork

    def _check_fork(self) -> None:
        if self._pid == os.getpid():
            return
        with _FORK_LOCK:
            if self._pid == os.getpid():
                return
            # Never close what the parent opened: keep it referenced forever.
            _ORPHANS.append(self._cache)
            self._cache = None
            self._gen = None
            self._lock = threading.RLock()
            if self._lock_fd is not None:
                # flock belongs to the open file description shared with the parent:
                # closing our descriptor does not release the parent's lock.
                with contextlib.suppress(OSError):
                    os.close(self._lock_fd)
                self._lock_fd = None
            self._set_process_identity()

    def _set_process_identity(self) -> None:
        self._pid = os.getpid()
        state = _proc_state(self._pid)
        self._start_ticks = None if state is None else state[1]
        self._owner = f"{self._host}:{self._pid}:{secrets.token_hex(4)}"

    def _owner_gone(self, info: list[Any]) -> bool:
        try:
            host, pid, start = info[1], int(info[2]), info[3]
        except (IndexError, TypeError, ValueError):
            return False
        if host != self._host:
            return False
        if pid == self._pid:
            return (
                start is not None and self._start_ticks is not None and start != self._start_ticks
            )
        return _process_gone(pid, start if isinstance(start, int) else None)

    # ------------------------------------------------------------------ SQL outside diskcache

    @staticmethod
    def _rollback_if_open(cache: Any) -> None:
        # After SQLITE_FULL/BUSY at COMMIT, SQLite may leave the transaction open; a
        # connection left inside a write transaction would block every process. The
        # connection is private to diskcache (see "SQL outside diskcache's API").
        con = getattr(getattr(cache, "_local", None), "con", None)
        if isinstance(con, sqlite3.Connection) and con.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")
            cache._txn_id = None

    @staticmethod
    def _truncate_wal(cache: Any) -> None:
        # Disk full: the WAL only gives its space back when a checkpoint copies it into
        # the database and truncates it; diskcache has no API for that, so this runs the
        # pragma on diskcache's connection (see "SQL outside diskcache's API").
        con = getattr(getattr(cache, "_local", None), "con", None)
        if isinstance(con, sqlite3.Connection) and not con.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def is_queue_directory(path: Path) -> bool:
    """True when ``path`` holds a per_buffer queue (its lock file or a database folder)."""
    try:
        return (path / _LOCK_NAME).exists() or any(path.glob(f"{_GEN_PREFIX}*"))
    except OSError:
        return False


def quarantined_folders(path: Path) -> list[str]:
    """Names of the databases moved aside as unreadable (``quarantine-*`` folders)."""
    try:
        return sorted(p.name for p in path.glob(f"{_QUARANTINE_PREFIX}*") if p.is_dir())
    except OSError:
        return []
