"""A durable, multi-process, disk-backed queue of activities (SQLite through diskcache).

The recorder's promise rests on this module: an activity whose :meth:`DurableQueue.put`
returned is delivered **at least once**, whatever happens to the process (SIGKILL, OOM
kill, deploy). Items are deleted only when acknowledged; duplicates are possible and
accepted (Per counts unique users).

Guarantees
----------
* Every state change (put, queue -> lease, lease -> retry, lease -> dead letter,
  lease -> deleted) is one SQLite transaction (WAL, ``synchronous=NORMAL``): a process
  kill at any instant leaves either the old or the new state. A power loss can roll
  back the last commits (``synchronous=NORMAL``).
* Claims are leases (owner, expiry). Expired leases, and leases whose owner process on
  this host is gone (checked when the queue is opened and by :meth:`DurableQueue.reclaim`),
  go back to the front of the ready queue.
* Several processes (forked or spawned) may share one directory. Lock contention is
  retried with backoff for ``lock_timeout`` seconds, then :class:`QueueError` is raised.
  After ``os.fork()`` the child reopens its own connections on first use.
* Bounded and never silent: ``max_items`` / ``max_bytes`` with ``drop_newest`` or
  ``drop_oldest``; every refused or evicted item is counted by reason, persistently.
  diskcache is configured never to evict or cull anything.
* Self-healing: an unreadable database (garbage, truncated, missing or mangled WAL,
  "file is not a database", "database disk image is malformed") is moved aside to a
  ``quarantine-<UTC timestamp>-db-<n>/`` folder, logged at ERROR, counted, and a fresh
  database takes over. A full disk or an unwritable directory raises :class:`QueueError`
  and leaves stored items intact; a small ballast file (``reserve.bin``) is released
  when the disk fills so that claims and acks can still drain the queue.

Order
-----
Ready entries come out in this order: first the *retry space*, groups whose
``not_before`` has passed, by (``not_before`` in milliseconds, group sequence number),
each group's entries in the order they had in their claim; then the *main queue* in
``put`` order (ascending ids). :meth:`~DurableQueue.release` makes one group of the
released entries (in claim order); :meth:`~DurableQueue.release_claim`,
:meth:`~DurableQueue.reclaim` and automatic expiry make one group per lease with
``not_before = 0`` (ahead of everything else); :meth:`~DurableQueue.requeue_dead_letters`
makes one group per dead-letter record (in dead-letter order) with ``not_before = 0``.

Storage layout
--------------
``directory/`` (mode 0700) holds ``queue.lock`` (``flock``: shared for every operation,
exclusive while opening a new database or moving a broken one aside), ``reserve.bin``
(ballast) and the live database in the highest-numbered ``db-<n>/`` folder (a diskcache
``Cache``: ``cache.db`` with its ``-wal`` and ``-shm``). Inside, all keys are strings:

* ``meta:counters``: one JSON row with every counter (pending, in flight, dead,
  payload bytes, next id, sequence numbers, dropped-by-reason), rewritten in the same
  transaction as the change it counts, so :meth:`~DurableQueue.stats` is O(1).
* ``q-<first id:015d>``: one row per chunk of up to 512 entries, as compact JSON
  ``[[id, billing_id, user_id, activity_type_id, recorded_at, attempts, last_error], ...]``
  (never pickle). Keys sort in put order; diskcache's ``peek(prefix="q")`` reads the
  front with an index range query, O(log n). A claim takes chunks from the front and
  rewrites the remainder of the last one under the same key.
* ``r-<not_before ms:015d>-<sequence:015d>``: retry groups, sorted by readiness.
* ``lease:<lease id>``: one row per claim (owner, host, pid, expiry, entries), and
  ``meta:leases``: a small index of live leases so reclaim never scans.
* ``d-<sequence:015d>``: one row per :meth:`~DurableQueue.dead_letter` call (reason,
  time, entries), contiguous between two counters.

Deleted rows' pages are reused by later writes (``auto_vacuum=INCREMENTAL``): the
files stay at their high-water mark, which ``max_bytes`` bounds.

SQL outside diskcache's API
---------------------------
Every queue operation uses diskcache's public API (``transact``, ``get``, ``set``,
``delete``, ``peek``) and meets the throughput targets with it. Raw SQL is issued in
three narrow places only, each for something diskcache cannot do: ``ROLLBACK`` on
diskcache's connection when a failed ``COMMIT`` left a transaction open;
``PRAGMA wal_checkpoint(TRUNCATE)`` on it when the disk is full (the only way to give
the WAL's space back); and, when opening after a crash, a separate short-lived
connection that lets SQLite recover the WAL and reports how many frames it kept.

The file-level machinery (inspecting and quarantining databases, locks, the reserve,
process liveness, fork safety, the three raw SQL uses) lives in the private module
``per_buffer._queue_storage``, whose ``_QueueStorage`` is the base class of
:class:`DurableQueue`.

``max_bytes`` counts *payload* bytes: the UTF-8 size of the three IDs and the last
error of each stored entry plus 32 bytes; JSON, SQLite pages, indexes and the WAL come
on top (about 2x for short IDs). ``max_items`` and ``max_bytes`` cover every stored
entry: pending, in flight and dead-lettered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, TypeVar

import diskcache

from ._queue_storage import (
    _INSTANCES,
    _ORPHANS,
    _classify,
    _CorruptData,
    _LockTimeout,
    _QueueStorage,
)
from .errors import QueueError
from .models import Activity

__all__ = [
    "Claim",
    "DeadLetter",
    "DurableQueue",
    "Entry",
    "FullPolicy",
    "QueueStats",
]

_log = logging.getLogger("per_buffer.queue")

_T = TypeVar("_T")

#: What :meth:`DurableQueue.put` does when the queue is full.
FullPolicy = Literal["drop_newest", "drop_oldest"]

_META_KEY: Final = "meta:counters"
_LEASES_KEY: Final = "meta:leases"
_LEASE_PREFIX: Final = "lease:"
_MAIN: Final = "q"
_RETRY: Final = "r"
_DEAD_FORMAT: Final = "d-{:015d}"

_CHUNK_ITEMS: Final = 512  # entries per stored main-queue chunk or retry group row
_CHUNK_BYTES: Final = 256 * 1024  # payload bytes per chunk row (values stay far below 16 MiB)
_CLAIM_BYTES: Final = 1024 * 1024  # payload bytes per lease row
_ENTRY_OVERHEAD: Final = 32
_MAX_TEXT: Final = 1000  # longest stored last_error / dead-letter reason, in characters
_MAX_NOT_BEFORE_MS: Final = 999_999_999_999_998
_BATCH_RECORDS: Final = 64  # dead-letter records moved per transaction by requeue/purge
_DROP_LOG_INTERVAL: Final = 60.0
_RESERVE_CHECK_INTERVAL: Final = 1.0

_dumps = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, check_circular=False, allow_nan=False
).encode


# --------------------------------------------------------------------------- public data


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored activity as the consumer sees it.

    Attributes:
        id: unique within the directory, assigned by :meth:`DurableQueue.put` in put order.
        activity: the activity triple.
        recorded_at: unix time given by the producer.
        attempts: failed attempts counted so far (0 on the first claim).
        last_error: the error given with the last :meth:`DurableQueue.release`, if any.
    """

    id: int
    activity: Activity
    recorded_at: float
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class Claim:
    """A lease on some entries, returned by :meth:`DurableQueue.claim`.

    Attributes:
        lease_id: random, unique lease identifier.
        entries: the leased entries, in claim order.
        expires_at: unix time (queue clock) after which the entries may be reclaimed.
    """

    lease_id: str
    entries: tuple[Entry, ...]
    expires_at: float


@dataclass(frozen=True)
class DeadLetter:
    """An entry set aside by :meth:`DurableQueue.dead_letter`.

    Attributes:
        entry: the entry as it was when dead-lettered.
        reason: why it was set aside (at most 1,000 characters).
        dead_at: unix time (queue clock) when it was set aside.
    """

    entry: Entry
    reason: str
    dead_at: float


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of the queue, from :meth:`DurableQueue.stats`.

    Attributes:
        pending: entries ready or waiting for a retry (not leased, not dead).
        in_flight: leased entries.
        dead_lettered: entries in the dead-letter space.
        oldest_pending_age: seconds since ``recorded_at`` of the oldest entry not yet
            delivered (pending or in flight), None when there is none. Approximate: it
            looks at the front of the main queue, the first retry group and every lease;
            an entry waiting in a later retry group, or acked out of a partly acked lease,
            can make it miss or keep an older value.
        bytes_on_disk: size of the live database files (db, WAL, shared memory).
        dropped: reason -> count of items refused or evicted, kept in the directory:
            ``queue_full`` (refused by ``drop_newest``, or by ``drop_oldest`` when nothing
            was evictable), ``evicted_oldest`` (removed or skipped by ``drop_oldest``),
            ``dead_letters_purged``.
        quarantined: databases this object moved aside since it was opened.
    """

    pending: int
    in_flight: int
    dead_lettered: int
    oldest_pending_age: float | None
    bytes_on_disk: int
    dropped: Mapping[str, int]
    quarantined: int


# --------------------------------------------------------------------------- internals


@dataclass
class _Meta:
    pending: int = 0
    inflight: int = 0
    dead: int = 0
    bytes: int = 0
    next_id: int = 1
    seq: int = 1
    dfirst: int = 1
    dnext: int = 1
    dropped: dict[str, int] = field(default_factory=dict)

    _INTS = ("pending", "inflight", "dead", "bytes", "next_id", "seq", "dfirst", "dnext")

    @classmethod
    def load(cls, cache: Any, first_id: int = 1) -> _Meta:
        raw = cache.get(_META_KEY)
        if raw is None:
            return cls(next_id=first_id)
        data = _loads(raw, _META_KEY)
        try:
            meta = cls()
            for name in cls._INTS:
                setattr(meta, name, int(data[name]))
            meta.dropped = {str(k): int(v) for k, v in data["dropped"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _CorruptData(f"{_META_KEY} is malformed") from exc
        return meta

    def save(self, cache: Any) -> None:
        data: dict[str, Any] = {name: getattr(self, name) for name in self._INTS}
        data["dropped"] = self.dropped
        cache.set(_META_KEY, _dumps(data))

    def drop(self, reason: str, count: int) -> None:
        if count > 0:
            self.dropped[reason] = self.dropped.get(reason, 0) + count


def _loads(raw: object, what: str) -> Any:
    if not isinstance(raw, (str, bytes)):
        raise _CorruptData(f"{what}: unexpected stored type {type(raw).__name__}")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise _CorruptData(f"{what}: not valid JSON ({exc})") from exc


def _rows(raw: object, what: str) -> list[list[Any]]:
    rows = _loads(raw, what)
    if type(rows) is not list or not rows:
        raise _CorruptData(f"{what}: not a non-empty list of entries")
    for row in rows:
        if type(row) is not list or len(row) != 7 or type(row[0]) is not int:
            raise _CorruptData(f"{what}: malformed entry")
    return rows


def _lease_rows(lease: Any, what: str) -> list[list[Any]]:
    try:
        rows = lease["e"]
    except (KeyError, TypeError) as exc:
        raise _CorruptData(f"{what}: malformed lease") from exc
    if type(rows) is not list:
        raise _CorruptData(f"{what}: malformed lease")
    return rows


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _payload_size(billing_id: str, user_id: str, activity_type_id: str) -> int:
    """Payload bytes counted against ``max_bytes`` for one entry.

    Only what ``put`` admits is counted: a ``last_error`` added by ``release`` (at most
    ``_MAX_TEXT`` characters) is not, because a leased entry can never be refused for
    lack of room, so counting it would let ``bytes`` exceed ``max_bytes``.
    """
    return (
        _ENTRY_OVERHEAD + _utf8_len(billing_id) + _utf8_len(user_id) + _utf8_len(activity_type_id)
    )


def _row_size(row: list[Any]) -> int:
    return _payload_size(row[1], row[2], row[3])


def _entry(row: list[Any]) -> Entry:
    try:
        return Entry(
            id=int(row[0]),
            activity=Activity(str(row[1]), str(row[2]), str(row[3])),
            recorded_at=float(row[4]),
            attempts=int(row[5]),
            last_error=None if row[6] is None else str(row[6]),
        )
    except (IndexError, TypeError, ValueError) as exc:
        raise _CorruptData(f"malformed entry {row!r:.200}") from exc


def _retry_key(not_before_ms: int, seq: int) -> str:
    return f"{_RETRY}-{not_before_ms:015d}-{seq:015d}"


def _retry_key_ms(key: str) -> int:
    try:
        return int(key[2:17])
    except ValueError as exc:
        raise _CorruptData(f"malformed retry key {key!r}") from exc


def _not_before_ms(not_before: float) -> int:
    if math.isnan(not_before) or not_before <= 0:
        return 0
    if not_before * 1000 >= _MAX_NOT_BEFORE_MS:
        return _MAX_NOT_BEFORE_MS
    return math.ceil(not_before * 1000)


# --------------------------------------------------------------------------- the queue


class DurableQueue(_QueueStorage):
    """A durable at-least-once queue of activities in ``directory``.

    Thread-safe (operations of one object are serialized) and safe for several
    processes on one directory. Every public method raises :class:`QueueError` when the
    storage fails (disk full, unwritable, locked longer than ``lock_timeout``). The
    constructor does not: when no database can be opened (unwritable or missing
    filesystem) it logs at ERROR and every operation retries the open, raising
    :class:`QueueError` until the storage works again. Errors in the arguments raise
    :class:`TypeError` or :class:`ValueError`.

    Args:
        directory: created with mode 0700 if missing (and chmod-ed to 0700 if ours).
        max_items: most entries stored (pending, in flight and dead-lettered).
        max_bytes: most payload bytes stored (see the module documentation).
        full_policy: ``"drop_newest"`` refuses new items when full; ``"drop_oldest"``
            evicts the oldest pending entries (main queue first, then retry groups;
            never leased or dead-lettered ones) to make room.
        lease_seconds: default lease duration of a claim.
        lock_timeout: how long to retry a locked database before raising.
        clock: unix time source (injectable for tests).
        reserve_bytes: size of the ballast file ``reserve.bin``, released when the disk
            fills so that claims and acks can still run and drain the queue (0: none).
            4 MiB covers a checkpoint of a full WAL (1,000 pages).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_items: int = 10_000_000,
        max_bytes: int = 2 * 1024**3,
        full_policy: FullPolicy = "drop_newest",
        lease_seconds: float = 300.0,
        lock_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        reserve_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if full_policy not in ("drop_newest", "drop_oldest"):
            raise ValueError("full_policy must be 'drop_newest' or 'drop_oldest'")
        if not lease_seconds > 0:
            raise ValueError("lease_seconds must be positive")
        if not lock_timeout > 0:
            raise ValueError("lock_timeout must be positive")
        if reserve_bytes < 0:
            raise ValueError("reserve_bytes must not be negative")
        self._directory = Path(os.fspath(directory)).expanduser().absolute()
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._full_policy = full_policy
        self._lease_seconds = float(lease_seconds)
        self._lock_timeout = float(lock_timeout)
        self._busy_timeout = max(0.01, min(self._lock_timeout, 2.0))
        self._clock = clock
        self._reserve_bytes = reserve_bytes
        self._lock = threading.RLock()
        self._closed = False
        self._cache: Any = None
        self._gen: Path | None = None
        self._gen_ino = -1
        self._first_id = 1
        self._lock_fd: int | None = None
        self._quarantined = 0
        self._last_drop_log = -math.inf
        self._last_reserve_check = -math.inf
        self._host = socket.gethostname()
        self._reclaim_due = False
        self._set_process_identity()
        _INSTANCES.add(self)
        try:
            self._open(time.monotonic() + self._lock_timeout)
        except QueueError as exc:
            _log.error(
                "cannot open the durable queue in %s (%s); every operation will retry and "
                "raise QueueError until the storage works again",
                self._directory,
                exc,
            )
            return
        self._ensure_reserve()
        self._reclaim_due = False
        try:
            self.reclaim()
        except QueueError as exc:
            _log.warning("reclaiming leases in %s at open failed: %s", self._directory, exc)

    # ------------------------------------------------------------------ public API

    @property
    def directory(self) -> Path:
        """The queue directory."""
        return self._directory

    def put(self, items: Sequence[tuple[tuple[str, str, str], float]]) -> int:
        """Store ``(activity, recorded_at)`` pairs in one transaction; return how many.

        ``activity`` is an :class:`Activity` or any ``(billing_id, user_id,
        activity_type_id)`` tuple of str.

        Items refused because the queue is full are counted in ``stats().dropped``
        (``"queue_full"``; ``"evicted_oldest"`` for what ``drop_oldest`` removed or
        skipped) and logged at WARNING at most once a minute.

        Raises:
            QueueError: storage failure (disk full, read-only, locked too long); items
                stored before are intact and nothing of this batch is stored.
            TypeError, ValueError: an item is not (Activity of str, finite number).
        """
        rows: list[list[Any]] = []
        sizes: list[int] = []
        for item in items:
            activity, recorded_at = item
            billing_id, user_id, activity_type_id = activity
            for value in (billing_id, user_id, activity_type_id):
                if not isinstance(value, str):
                    raise TypeError(f"activity fields must be str, not {type(value).__name__}")
            stamp = float(recorded_at)
            if not math.isfinite(stamp):
                raise ValueError("recorded_at must be a finite number")
            rows.append([0, str(billing_id), str(user_id), str(activity_type_id), stamp, 0, None])
            sizes.append(_payload_size(billing_id, user_id, activity_type_id))
        if not rows:
            return 0

        def txn(cache: Any) -> tuple[int, dict[str, int]]:
            meta = self._load_meta(cache)
            drops: dict[str, int] = {}
            start, end = self._admit(cache, meta, sizes, drops)
            stored = 0
            chunk: list[list[Any]] = []
            chunk_bytes = 0
            for index in range(start, end):
                row = rows[index]
                row[0] = meta.next_id
                meta.next_id += 1
                if chunk and (len(chunk) >= _CHUNK_ITEMS or chunk_bytes >= _CHUNK_BYTES):
                    cache.set(f"{_MAIN}-{chunk[0][0]:015d}", _dumps(chunk))
                    chunk, chunk_bytes = [], 0
                chunk.append(row)
                chunk_bytes += sizes[index]
                meta.bytes += sizes[index]
                stored += 1
            if chunk:
                cache.set(f"{_MAIN}-{chunk[0][0]:015d}", _dumps(chunk))
            meta.pending += stored
            for reason, count in drops.items():
                meta.drop(reason, count)
            meta.save(cache)
            return stored, drops

        stored, drops = self._run("put", txn)
        if drops:
            self._log_drops(drops)
        now = time.monotonic()
        if now - self._last_reserve_check >= _RESERVE_CHECK_INTERVAL:
            self._last_reserve_check = now
            self._ensure_reserve()
        return stored

    def claim(
        self,
        max_items: int,
        *,
        owner: str | None = None,
        lease_seconds: float | None = None,
        ignore_not_before: bool = False,
    ) -> Claim | None:
        """Lease up to ``max_items`` ready entries, oldest first; None when none is ready.

        Retry groups whose ``not_before`` has passed come first (earliest first), then the
        main queue in put order; ``ignore_not_before=True`` also takes waiting retry
        groups. Expired leases are returned to the queue first. A claim holds at most
        about 1 MiB of payload. ``owner`` defaults to ``host:pid:nonce`` of this object.
        """
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        seconds = self._lease_seconds if lease_seconds is None else float(lease_seconds)
        if not seconds > 0:
            raise ValueError("lease_seconds must be positive")

        def txn(cache: Any) -> Claim | None:
            now = self._clock()
            now_ms = now * 1000.0
            meta = self._load_meta(cache)
            leases = self._load_leases(cache)
            expired = [lease_id for lease_id, info in leases.items() if info[0] <= now]
            moved = self._requeue_leases(cache, meta, leases, expired)
            taken: list[list[Any]] = []
            taken_bytes = 0
            for prefix in (_RETRY, _MAIN):
                while len(taken) < max_items and taken_bytes < _CLAIM_BYTES:
                    key, raw = cache.peek(prefix=prefix, default=(None, None))
                    if key is None:
                        break
                    if prefix == _RETRY and not ignore_not_before and _retry_key_ms(key) > now_ms:
                        break
                    chunk = _rows(raw, key)
                    count = 0
                    while (
                        count < len(chunk)
                        and len(taken) < max_items
                        and (taken_bytes < _CLAIM_BYTES or not taken)
                    ):
                        taken.append(chunk[count])
                        taken_bytes += _row_size(chunk[count])
                        count += 1
                    if count == len(chunk):
                        cache.delete(key)
                    else:
                        cache.set(key, _dumps(chunk[count:]))
            if not taken:
                if moved:
                    meta.save(cache)
                    self._save_leases(cache, leases)
                return None
            entries = tuple(_entry(row) for row in taken)
            lease_id = uuid.uuid4().hex
            expires_at = now + seconds
            lease = {
                "o": self._owner if owner is None else owner,
                "h": self._host,
                "p": self._pid,
                "s": self._start_ticks,
                "x": expires_at,
                "e": taken,
            }
            cache.set(_LEASE_PREFIX + lease_id, _dumps(lease))
            oldest = min(entry.recorded_at for entry in entries)
            leases[lease_id] = [expires_at, self._host, self._pid, self._start_ticks, oldest]
            self._save_leases(cache, leases)
            meta.pending -= len(taken)
            meta.inflight += len(taken)
            meta.save(cache)
            return Claim(lease_id=lease_id, entries=entries, expires_at=expires_at)

        return self._run("claim", txn, frees_space=True)

    def ack(self, claim: Claim, ids: Iterable[int]) -> None:
        """Entries delivered: delete them for good.

        Ids no longer held by the claim (its lease expired and was reclaimed) are
        ignored: another consumer may deliver them again (at-least-once).
        """
        wanted = {int(value) for value in ids}
        if not wanted:
            return

        def txn(cache: Any) -> None:
            meta = self._load_meta(cache)
            gone = self._detach(cache, meta, claim.lease_id, wanted)
            if gone:
                meta.bytes -= sum(_row_size(row) for row in gone)
                meta.save(cache)

        self._run("ack", txn, frees_space=True)

    def release(
        self,
        claim: Claim,
        ids: Iterable[int],
        *,
        not_before: float,
        error: str | None = None,
        count_attempt: bool = True,
    ) -> None:
        """Give entries back for a retry at ``not_before`` (unix time) or later.

        They wait in the retry space and do not block the entries behind them.
        ``attempts`` grows by one when ``count_attempt``; ``error`` (at most 1,000
        characters kept) becomes ``last_error`` when given.
        """
        wanted = {int(value) for value in ids}
        if not wanted:
            return
        ready_ms = _not_before_ms(float(not_before))
        text = None if error is None else str(error)[:_MAX_TEXT]

        def txn(cache: Any) -> None:
            meta = self._load_meta(cache)
            gone = self._detach(cache, meta, claim.lease_id, wanted)
            if not gone:
                return
            for row in gone:
                if count_attempt:
                    row[5] += 1
                if text is not None:
                    row[6] = text
            self._push_group(cache, meta, ready_ms, gone)
            meta.pending += len(gone)
            meta.save(cache)

        self._run("release", txn, frees_space=True)

    def dead_letter(
        self, claim: Claim, ids: Iterable[int], reason: str, *, count_attempt: bool = True
    ) -> None:
        """Set entries aside for good (until requeued or purged), with a reason.

        The attempt that led here counts as failed (``attempts`` + 1) unless
        ``count_attempt`` is False. ``reason`` is kept up to 1,000 characters.
        """
        wanted = {int(value) for value in ids}
        if not wanted:
            return
        text = str(reason)[:_MAX_TEXT]

        def txn(cache: Any) -> None:
            meta = self._load_meta(cache)
            gone = self._detach(cache, meta, claim.lease_id, wanted)
            if not gone:
                return
            if count_attempt:
                for row in gone:
                    row[5] += 1
            record = {"r": text, "t": self._clock(), "e": gone}
            cache.set(_DEAD_FORMAT.format(meta.dnext), _dumps(record))
            meta.dnext += 1
            meta.dead += len(gone)
            meta.save(cache)

        self._run("dead_letter", txn, frees_space=True)

    def release_claim(self, claim: Claim) -> None:
        """Give back every entry still held by ``claim``: ready at once, attempts unchanged."""

        def txn(cache: Any) -> None:
            meta = self._load_meta(cache)
            gone = self._detach(cache, meta, claim.lease_id, None)
            if gone:
                self._push_group(cache, meta, 0, gone)
                meta.pending += len(gone)
                meta.save(cache)

        self._run("release_claim", txn, frees_space=True)

    def reclaim(self) -> int:
        """Return entries of expired leases and of dead owners (this host) to the front.

        Runs automatically when the queue is opened; claims also return expired leases.
        Returns the number of entries made ready again.
        """

        def txn(cache: Any) -> int:
            now = self._clock()
            meta = self._load_meta(cache)
            leases = self._load_leases(cache)
            stale = [
                lease_id
                for lease_id, info in leases.items()
                if info[0] <= now or self._owner_gone(info)
            ]
            if not stale:
                return 0
            moved = self._requeue_leases(cache, meta, leases, stale)
            self._save_leases(cache, leases)
            meta.save(cache)
            return moved

        moved = self._run("reclaim", txn, frees_space=True)
        if moved:
            _log.info("returned %d leased entries to the queue in %s", moved, self._directory)
        return moved

    def next_ready_at(self) -> float | None:
        """Earliest unix time an entry becomes claimable (now if ready), None if none pending."""

        def txn(cache: Any) -> float | None:
            now = self._clock()
            meta = self._load_meta(cache)
            if meta.pending <= 0:
                return None
            key, _ = cache.peek(prefix=_MAIN, default=(None, None))
            if key is not None:
                return now
            key, _ = cache.peek(prefix=_RETRY, default=(None, None))
            if key is None:
                return None
            ready = _retry_key_ms(key) / 1000.0
            return now if ready <= now else ready

        return self._run("next_ready_at", txn)

    def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first, at most ``limit`` of them."""

        def txn(cache: Any) -> list[DeadLetter]:
            meta = self._load_meta(cache)
            out: list[DeadLetter] = []
            for number in range(meta.dfirst, meta.dnext):
                if limit is not None and len(out) >= limit:
                    break
                key = _DEAD_FORMAT.format(number)
                raw = cache.get(key)
                if raw is None:
                    continue
                record = _loads(raw, key)
                rows = _lease_rows(record, key)
                try:
                    reason, dead_at = str(record["r"]), float(record["t"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise _CorruptData(f"{key}: malformed dead letter") from exc
                for row in rows:
                    if limit is not None and len(out) >= limit:
                        break
                    out.append(DeadLetter(entry=_entry(row), reason=reason, dead_at=dead_at))
            return out

        return self._run("dead_letters", txn)

    def requeue_dead_letters(self) -> int:
        """Move every dead letter back to the front of the ready queue, attempts reset.

        Works in batches of transactions; returns the number of entries moved.
        """
        return self._drain_dead_letters(requeue=True)

    def purge_dead_letters(self) -> int:
        """Delete every dead letter (counted as ``dead_letters_purged``); return how many."""
        return self._drain_dead_letters(requeue=False)

    def stats(self) -> QueueStats:
        """Counters and the age of the oldest undelivered entry, in O(leases)."""

        def txn(cache: Any) -> QueueStats:
            now = self._clock()
            meta = self._load_meta(cache)
            oldest: float | None = None
            if meta.pending + meta.inflight > 0:
                candidates: list[float] = []
                for prefix in (_MAIN, _RETRY):
                    key, raw = cache.peek(prefix=prefix, default=(None, None))
                    if key is not None:
                        rows = _rows(raw, key)
                        if prefix == _MAIN:
                            candidates.append(float(rows[0][4]))
                        else:
                            candidates.append(min(float(row[4]) for row in rows))
                for info in self._load_leases(cache).values():
                    candidates.append(float(info[4]))
                if candidates:
                    oldest = min(candidates)
            return QueueStats(
                pending=meta.pending,
                in_flight=meta.inflight,
                dead_lettered=meta.dead,
                oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
                bytes_on_disk=self._bytes_on_disk(),
                dropped=MappingProxyType(dict(meta.dropped)),
                quarantined=self._quarantined,
            )

        return self._run("stats", txn)

    def counts(self) -> tuple[int, int]:
        """``(pending, in_flight)``: one indexed read, no write lock (for flush polling)."""

        def read(cache: Any) -> tuple[int, int]:
            meta = self._load_meta(cache)
            return meta.pending, meta.inflight

        return self._run("counts", read, transact=False)

    def close(self) -> None:
        """Close this object's database connection; later calls raise :class:`QueueError`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cache, self._cache = self._cache, None
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

    def __enter__(self) -> DurableQueue:
        """Return self; :meth:`close` on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the queue."""
        self.close()

    def __repr__(self) -> str:
        """Show the directory."""
        return f"DurableQueue({str(self._directory)!r})"

    # ------------------------------------------------------------------ transactions

    def _run(
        self,
        what: str,
        fn: Callable[[Any], _T],
        *,
        transact: bool = True,
        frees_space: bool = False,
    ) -> _T:
        """Run ``fn(cache)`` in one transaction under the shared directory lock.

        Locked: retried with backoff until ``lock_timeout``. Corrupt: the database is
        moved aside, a fresh one opened, and ``fn`` retried once. Disk full: for
        operations that free space (``frees_space``) the reserve is released; then the
        WAL is checkpointed and truncated and ``fn`` retried once. Anything else from
        the storage: :class:`QueueError`.
        """
        if self._closed:
            raise QueueError(f"{what}: the queue in {self._directory} is closed")
        self._check_fork()
        if self._reclaim_due and what != "reclaim":
            # A database was (re)opened since the last operation: run the open-time reclaim.
            self._reclaim_due = False
            with contextlib.suppress(QueueError):
                self.reclaim()
        with self._lock:
            if self._closed:
                raise QueueError(f"{what}: the queue in {self._directory} is closed")
            deadline = time.monotonic() + self._lock_timeout
            healed = False
            reserve_used = False
            checkpointed = False
            delay = 0.001
            while True:
                cache: Any = None
                try:
                    if self._cache is None or not self._generation_current():
                        self._reopen(deadline)
                    cache = self._cache
                    with self._directory_lock(False, deadline):
                        if not self._generation_current():
                            continue
                        if not transact:
                            return fn(cache)
                        with cache.transact():
                            return fn(cache)
                except QueueError:
                    raise
                except (
                    sqlite3.Error,
                    diskcache.Timeout,
                    OSError,
                    _CorruptData,
                    _LockTimeout,
                ) as exc:
                    if cache is not None:
                        self._rollback_if_open(cache)
                    kind = _classify(exc)
                    if kind == "locked":
                        if time.monotonic() >= deadline:
                            raise QueueError(
                                f"{what}: the queue database in {self._directory} stayed "
                                f"locked for more than {self._lock_timeout:g} s"
                            ) from exc
                        time.sleep(delay * random.uniform(0.5, 1.5))
                        delay = min(delay * 2, 0.05)
                        continue
                    if kind == "corrupt":
                        if healed:
                            raise QueueError(
                                f"{what}: the queue database in {self._directory} is "
                                f"unreadable even after starting afresh: {exc}"
                            ) from exc
                        healed = True
                        self._quarantine(f"{type(exc).__name__}: {exc}")
                        continue
                    if kind == "full":
                        if frees_space and not reserve_used and self._release_reserve():
                            reserve_used = True
                            checkpointed = False
                        if not checkpointed and cache is not None:
                            checkpointed = True
                            self._truncate_wal(cache)
                            continue
                        raise QueueError(
                            f"{what}: no space left on the device holding {self._directory}"
                        ) from exc
                    raise QueueError(
                        f"{what} failed on the queue in {self._directory}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc

    # ------------------------------------------------------------------ row helpers

    @staticmethod
    def _load_leases(cache: Any) -> dict[str, list[Any]]:
        raw = cache.get(_LEASES_KEY)
        if raw is None:
            return {}
        leases = _loads(raw, _LEASES_KEY)
        if type(leases) is not dict or any(
            type(info) is not list or len(info) != 5 for info in leases.values()
        ):
            raise _CorruptData(f"{_LEASES_KEY} is malformed")
        return leases

    @staticmethod
    def _save_leases(cache: Any, leases: dict[str, list[Any]]) -> None:
        cache.set(_LEASES_KEY, _dumps(leases))

    @staticmethod
    def _push_group(cache: Any, meta: _Meta, ready_ms: int, rows: list[list[Any]]) -> None:
        """Store ``rows`` as retry group(s) with consecutive sequence numbers."""
        for start in range(0, len(rows), _CHUNK_ITEMS):
            cache.set(_retry_key(ready_ms, meta.seq), _dumps(rows[start : start + _CHUNK_ITEMS]))
            meta.seq += 1

    def _requeue_leases(
        self, cache: Any, meta: _Meta, leases: dict[str, list[Any]], lease_ids: list[str]
    ) -> int:
        """Move whole leases to the front (retry groups ready at once); count entries."""
        moved = 0
        for lease_id in lease_ids:
            leases.pop(lease_id, None)
            key = _LEASE_PREFIX + lease_id
            raw = cache.get(key)
            if raw is None:
                continue
            rows = _lease_rows(_loads(raw, key), key)
            if rows:
                self._push_group(cache, meta, 0, rows)
            cache.delete(key)
            meta.inflight -= len(rows)
            meta.pending += len(rows)
            moved += len(rows)
        return moved

    def _detach(
        self, cache: Any, meta: _Meta, lease_id: str, ids: set[int] | None
    ) -> list[list[Any]]:
        """Take ``ids`` (all if None) out of a lease and count them out of in-flight.

        Returns the rows taken, in claim order ([] if the lease is gone).
        """
        key = _LEASE_PREFIX + lease_id
        raw = cache.get(key)
        if raw is None:
            return []
        lease = _loads(raw, key)
        rows = _lease_rows(lease, key)
        if ids is None:
            gone, keep = rows, []
        else:
            gone = [row for row in rows if row[0] in ids]
            keep = [row for row in rows if row[0] not in ids]
        if not gone:
            return []
        if keep:
            lease["e"] = keep
            cache.set(key, _dumps(lease))
        else:
            cache.delete(key)
            leases = self._load_leases(cache)
            if leases.pop(lease_id, None) is not None:
                self._save_leases(cache, leases)
        meta.inflight -= len(gone)
        return gone

    def _admit(
        self, cache: Any, meta: _Meta, sizes: list[int], drops: dict[str, int]
    ) -> tuple[int, int]:
        """Apply the bounds to a batch: the slice [start, end) of it to store."""
        count = len(sizes)
        stored = meta.pending + meta.inflight + meta.dead
        if self._full_policy == "drop_newest":
            room = self._max_items - stored
            room_bytes = self._max_bytes - meta.bytes
            end = 0
            total = 0
            while end < count and end < room and total + sizes[end] <= room_bytes:
                total += sizes[end]
                end += 1
            if count - end:
                drops["queue_full"] = count - end
            return 0, end
        # drop_oldest: the newest suffix of the batch that can fit at all ...
        start = count
        total = 0
        while (
            start > 0
            and count - start < self._max_items
            and total + sizes[start - 1] <= self._max_bytes
        ):
            start -= 1
            total += sizes[start]
        if start:
            drops["evicted_oldest"] = start
        # ... then evict old pending entries to make room for it ...
        need_items = stored + (count - start) - self._max_items
        need_bytes = meta.bytes + total - self._max_bytes
        if need_items > 0 or need_bytes > 0:
            freed_items, freed_bytes = self._evict(cache, meta, need_items, need_bytes)
            drops["evicted_oldest"] = drops.get("evicted_oldest", 0) + freed_items
            need_items -= freed_items
            need_bytes -= freed_bytes
        # ... and refuse the oldest of the batch if leased/dead entries fill the rest.
        refused = 0
        while start < count and (need_items > 0 or need_bytes > 0):
            need_items -= 1
            need_bytes -= sizes[start]
            start += 1
            refused += 1
        if refused:
            drops["queue_full"] = refused
        return start, count

    def _evict(self, cache: Any, meta: _Meta, need_items: int, need_bytes: int) -> tuple[int, int]:
        freed_items = freed_bytes = 0
        for prefix in (_MAIN, _RETRY):
            while freed_items < need_items or freed_bytes < need_bytes:
                key, raw = cache.peek(prefix=prefix, default=(None, None))
                if key is None:
                    break
                rows = _rows(raw, key)
                count = 0
                while count < len(rows) and (freed_items < need_items or freed_bytes < need_bytes):
                    freed_items += 1
                    freed_bytes += _row_size(rows[count])
                    count += 1
                if count == len(rows):
                    cache.delete(key)
                else:
                    cache.set(key, _dumps(rows[count:]))
        meta.pending -= freed_items
        meta.bytes -= freed_bytes
        return freed_items, freed_bytes

    def _drain_dead_letters(self, *, requeue: bool) -> int:
        stop: list[int] = []

        def txn(cache: Any) -> tuple[int, bool]:
            meta = self._load_meta(cache)
            if not stop:
                stop.append(meta.dnext)
            end = min(meta.dnext, stop[0], meta.dfirst + _BATCH_RECORDS)
            moved = 0
            for number in range(meta.dfirst, end):
                key = _DEAD_FORMAT.format(number)
                raw = cache.get(key)
                if raw is None:
                    continue
                rows = _lease_rows(_loads(raw, key), key)
                if requeue:
                    for row in rows:
                        row[5] = 0
                    if rows:
                        self._push_group(cache, meta, 0, rows)
                    meta.pending += len(rows)
                else:
                    meta.bytes -= sum(_row_size(row) for row in rows)
                    meta.drop("dead_letters_purged", len(rows))
                cache.delete(key)
                meta.dead -= len(rows)
                moved += len(rows)
            more = end < min(meta.dnext, stop[0])
            if end > meta.dfirst:
                meta.dfirst = end
                meta.save(cache)
            return moved, more

        total = 0
        while True:
            moved, more = self._run(
                "requeue_dead_letters" if requeue else "purge_dead_letters", txn
            )
            total += moved
            if not more:
                return total

    def _log_drops(self, drops: dict[str, int]) -> None:
        now = time.monotonic()
        if now - self._last_drop_log < _DROP_LOG_INTERVAL:
            return
        self._last_drop_log = now
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(drops.items()))
        _log.warning(
            "durable queue in %s is full (max_items=%d, max_bytes=%d, policy %s): dropped %s; "
            "totals in stats().dropped (this message repeats at most once a minute)",
            self._directory,
            self._max_items,
            self._max_bytes,
            self._full_policy,
            detail,
        )

    # ------------------------------------------------------------------ probing (for _QueueStorage)

    def _probe_once(self, cache: Any) -> None:
        with cache.transact():
            meta = self._load_meta(cache)
            for lease_id in list(self._load_leases(cache))[:4]:
                raw = cache.get(_LEASE_PREFIX + lease_id)
                if raw is not None:
                    _lease_rows(_loads(raw, lease_id), lease_id)
            for prefix, side in ((_MAIN, "front"), (_MAIN, "back"), (_RETRY, "front")):
                key, raw = cache.peek(prefix=prefix, side=side, default=(None, None))
                if key is not None:
                    _rows(raw, key)
            if meta.dnext > meta.dfirst:
                key = _DEAD_FORMAT.format(meta.dfirst)
                raw = cache.get(key)
                if raw is not None:
                    _lease_rows(_loads(raw, key), key)

    def _load_meta(self, cache: Any) -> _Meta:
        return _Meta.load(cache, self._first_id)
