""":class:`DurableQueue`: the public operations, each one transaction on its storage."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, TypeVar

from ..errors import QueueError
from . import _model as model
from ._health import CorruptData
from ._reader import count_entries
from ._rows import (
    DEAD_FORMAT,
    DELIVERY_KEY,
    LEASE_PREFIX,
    MAX_TEXT,
    Counters,
    dumps,
    from_entry,
    load_leases,
    loads,
    new_row,
    not_before_ms,
    payload_size,
    record_rows,
    row_key,
    row_size,
    rows_size,
    save_leases,
    to_entry,
)
from ._rows import count_attempt as count_row_attempt
from ._storage import Storage
from ._types import Claim, DeadLetter, Entry, FullPolicy, PutResult, QueueStats

_log = logging.getLogger("per_buffer.queue")

_T = TypeVar("_T")

_BATCH_RECORDS: Final = 64  # dead-letter records moved per transaction by requeue/purge
_DROP_LOG_INTERVAL: Final = 60.0
_RESERVE_CHECK_INTERVAL: Final = 1.0
_EMPTY: Final[Mapping[str, int]] = MappingProxyType({})
_ID: Final = operator.itemgetter(0)
_RECORDED_AT: Final = operator.itemgetter(4)


def _attempt_flags(
    count_attempt: bool | None, refused: bool, failed: bool, stacklevel: int = 3
) -> tuple[bool, bool]:
    """(refused, failed), with the deprecated ``count_attempt`` overriding both."""
    if count_attempt is None:
        return refused, failed
    warnings.warn(
        "count_attempt= is deprecated: pass refused= (Per refused it: counts toward "
        "max_attempts) and failed= (any failed attempt: drives the backoff)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return bool(count_attempt), bool(count_attempt)


def _validated_items(
    items: Sequence[tuple[tuple[str, str, str], float]],
    coalescing: tuple[float, float] | None = None,
) -> tuple[list[list[Any]], list[int]]:
    rows: list[list[Any]] = []
    sizes: list[int] = []
    policy: list[float] | None = None
    if coalescing is not None:
        window, margin = float(coalescing[0]), float(coalescing[1])
        if not (math.isfinite(window) and math.isfinite(margin) and window >= 0 <= margin):
            raise ValueError("coalescing must be (window, margin): finite seconds >= 0")
        policy = [window, margin]
    for item in items:
        activity, recorded_at = item
        billing_id, user_id, activity_type_id = activity
        for value in (billing_id, user_id, activity_type_id):
            if not isinstance(value, str):
                raise TypeError(f"activity fields must be str, not {type(value).__name__}")
        stamp = float(recorded_at)
        if not math.isfinite(stamp):
            raise ValueError("recorded_at must be a finite number")
        rows.append(new_row(str(billing_id), str(user_id), str(activity_type_id), stamp, policy))
        sizes.append(payload_size(billing_id, user_id, activity_type_id))
    return rows, sizes


class DurableQueue:
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
        max_delay: a retry group whose ``not_before`` is more than this many seconds
            ahead is ready now (for :meth:`claim` and :meth:`next_ready_at`): a stored
            ``not_before`` is wall time, and neither a clock stepped backwards nor a huge
            ``Retry-After`` written by an earlier run may strand entries. None: no cap.
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
        max_delay: float | None = None,
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
        if max_delay is not None and not 0 < max_delay < math.inf:
            raise ValueError("max_delay must be a positive number of seconds or None")
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._full_policy: FullPolicy = full_policy
        self._lease_seconds = float(lease_seconds)
        self._clock = clock
        self._far_ms = None if max_delay is None else float(max_delay) * 1000.0
        self._last_drop_log = -math.inf
        self._failure_seq = 0
        self._storage = Storage(
            Path(os.fspath(directory)).expanduser().absolute(),
            lock_timeout=float(lock_timeout),
            reserve_bytes=reserve_bytes,
            probe=model.probe,
            count_entries=count_entries,
        )
        self._reclaimed_open = 0
        try:
            self._storage.open()
        except QueueError as exc:
            _log.error(
                "cannot open the durable queue in %s (%s); every operation will retry and "
                "raise QueueError until the storage works again",
                self._storage.directory,
                exc,
            )
            return
        self._storage.ensure_reserve()
        self._reclaimed_open = self._storage.opened
        try:
            self.reclaim()
        except QueueError as exc:
            _log.warning("reclaiming leases in %s at open failed: %s", self.directory, exc)

    # ------------------------------------------------------------------ properties

    @property
    def directory(self) -> Path:
        """The queue directory."""
        return self._storage.directory

    @property
    def generation(self) -> int:
        """Number of the database folder (``db-<n>``) this object uses; 0 before any.

        Reading it costs nothing. It changes when this object switches to another
        database (after it or another process quarantined the old one): entries stored
        in the old database are no longer in the queue. It is updated by operations,
        so read it after one.
        """
        return self._storage.generation

    # ------------------------------------------------------------------ producing

    def put(
        self,
        items: Sequence[tuple[tuple[str, str, str], float]],
        *,
        coalescing: tuple[float, float] | None = None,
    ) -> PutResult:
        """Store ``(activity, recorded_at)`` pairs in one transaction.

        ``activity`` is an :class:`Activity` or any ``(billing_id, user_id,
        activity_type_id)`` tuple of str. The stored items get contiguous ids in batch
        order (``first_id..last_id``). ``coalescing``: the producer's ``(window,
        margin)``, stored with each item (:attr:`Entry.coalescing`) so that whoever
        delivers them coalesces under the producer's rule.

        When the queue is full, the items of this batch that are not stored are in
        ``refused["queue_full"]`` and counted once in ``stats().dropped["queue_full"]``;
        with ``drop_oldest``, the older pending entries evicted to make room are counted
        in ``stats().dropped["evicted_oldest"]`` only. Both are logged at WARNING at most
        once a minute, and their keys go to the failure log.

        Raises:
            QueueError: storage failure (disk full, read-only, locked too long); items
                stored before are intact and nothing of this batch is stored.
            TypeError, ValueError: an item is not (Activity of str, finite number).
        """
        rows, sizes = _validated_items(items, coalescing)
        if not rows:
            return PutResult(0, None, None, _EMPTY, self._failure_seq)
        return self._store_batch("put", rows, sizes)

    def restore(self, entries: Sequence[Entry]) -> PutResult:
        """Store entries read elsewhere (by :func:`salvage`) as pending, like :meth:`put`.

        Each keeps its ``recorded_at``, ``attempts``, ``failures`` and ``last_error``;
        it gets a new id. The bounds apply as for :meth:`put`. What is stored is added
        to ``stats().salvaged_entries``.
        """
        rows = [from_entry(entry) for entry in entries]
        if not rows:
            return PutResult(0, None, None, _EMPTY, self._failure_seq)
        result = self._store_batch("restore", rows, [row_size(row) for row in rows])
        self._count_salvaged(result.stored)
        return result

    def _count_salvaged(self, count: int) -> None:
        if count:
            try:
                self._storage.add_salvaged(count)
            except QueueError as exc:
                _log.warning("%d salvaged entries were stored but not counted: %s", count, exc)

    def _store_batch(self, what: str, rows: list[list[Any]], sizes: list[int]) -> PutResult:
        def txn(cache: Any) -> tuple[PutResult, int]:
            meta = Counters.load(cache, self._storage.first_id)
            start, end, evicted = model.admit(
                cache,
                meta,
                sizes,
                policy=self._full_policy,
                max_items=self._max_items,
                max_bytes=self._max_bytes,
            )
            first = meta.next_id
            model.store_rows(cache, meta, rows[start:end], sizes[start:end])
            refused = len(rows) - (end - start)
            if refused or evicted:
                meta.drop("queue_full", refused)
                lost = evicted + [row_key(row) for row in rows[:start]]
                model.log_failures(cache, meta, lost + [row_key(row) for row in rows[end:]])
            meta.save(cache)
            result = PutResult(
                stored=end - start,
                first_id=first if end > start else None,
                last_id=first + end - start - 1 if end > start else None,
                refused=MappingProxyType({"queue_full": refused}) if refused else _EMPTY,
                failure_seq=meta.fseq,
            )
            return result, len(evicted)

        result, evicted = self._run(what, txn)
        self._failure_seq = result.failure_seq
        if result.refused or evicted:
            self._log_drops(dict(result.refused), evicted)
        self._storage.ensure_reserve(at_most_every=_RESERVE_CHECK_INTERVAL)
        return result

    def restore_dead_letters(self, letters: Sequence[DeadLetter]) -> int:
        """Store dead letters read elsewhere (by :func:`salvage`) as dead letters.

        Consecutive letters with the same reason and time form one record. They never
        evict anything: what does not fit under the bounds is refused (counted as
        ``queue_full``). Returns how many were stored (added to
        ``stats().salvaged_entries``).
        """
        groups: list[tuple[str, float, list[list[Any]]]] = []
        for letter in letters:
            reason, dead_at = str(letter.reason)[:MAX_TEXT], float(letter.dead_at)
            if not groups or groups[-1][:2] != (reason, dead_at):
                groups.append((reason, dead_at, []))
            groups[-1][2].append(from_entry(letter.entry))
        if not groups:
            return 0

        def txn(cache: Any) -> int:
            meta = Counters.load(cache, self._storage.first_id)
            stored = refused = 0
            for reason, dead_at, rows in groups:
                fits: list[list[Any]] = []
                for row in rows:
                    size = row_size(row)
                    if (
                        meta.stored + len(fits) >= self._max_items
                        or meta.bytes + size > self._max_bytes
                    ):
                        refused += 1
                        continue
                    row[0] = meta.next_id
                    meta.next_id += 1
                    meta.bytes += size
                    fits.append(row)
                if fits:
                    model.add_dead_record(cache, meta, reason, dead_at, fits)
                    stored += len(fits)
            meta.drop("queue_full", refused)
            meta.save(cache)
            return stored

        stored = self._run("restore_dead_letters", txn)
        self._count_salvaged(stored)
        return stored

    # ------------------------------------------------------------------ consuming

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
        groups, and with ``max_delay`` a group due further ahead than that is ready.
        Expired leases are returned to the queue first. A claim holds at most about
        1 MiB of payload. ``owner`` defaults to ``host:pid:nonce`` of this process.
        """
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        seconds = self._lease_seconds if lease_seconds is None else float(lease_seconds)
        if not seconds > 0:
            raise ValueError("lease_seconds must be positive")

        def txn(cache: Any) -> Claim | None:
            now = self._clock()
            meta = Counters.load(cache, self._storage.first_id)
            leases = load_leases(cache)
            expired = [lease_id for lease_id, info in leases.items() if info[0] <= now]
            moved = model.requeue_leases(cache, meta, leases, expired)
            taken = model.take_ready(
                cache,
                now * 1000.0,
                max_items,
                ignore_not_before=ignore_not_before,
                far_ms=self._far_ms,
            )
            if not taken:
                if moved:
                    meta.save(cache)
                    save_leases(cache, leases)
                return None
            claim = self._lease(
                cache, leases=leases, taken=taken, expires_at=now + seconds, owner=owner
            )
            meta.pending -= len(taken)
            meta.inflight += len(taken)
            meta.save(cache)
            return claim

        return self._run("claim", txn, frees_space=True)

    def _lease(
        self,
        cache: Any,
        *,
        leases: dict[str, list[Any]],
        taken: list[list[Any]],
        expires_at: float,
        owner: str | None,
    ) -> Claim:
        """Store the lease row and its index entry for ``taken``."""
        entries = tuple(to_entry(row) for row in taken)
        lease_id = uuid.uuid4().hex
        me = self._storage.identity
        lease = {
            "o": me.owner if owner is None else owner,
            "h": me.host,
            "p": me.pid,
            "s": me.start_ticks,
            "x": expires_at,
            "e": taken,
        }
        cache.set(LEASE_PREFIX + lease_id, dumps(lease))
        oldest = float(min(map(_RECORDED_AT, taken)))
        smallest = min(map(_ID, taken))
        leases[lease_id] = [expires_at, me.host, me.pid, me.start_ticks, oldest, smallest]
        save_leases(cache, leases)
        return Claim(lease_id=lease_id, entries=entries, expires_at=expires_at)

    def ack(self, claim: Claim, ids: Iterable[int], *, coalesced: bool = False) -> int:
        """Entries delivered: delete them for good; return how many were deleted.

        ``coalesced=True``: they were settled without a request because Per had already
        counted their key (counted in ``stats().coalesced`` as well as ``delivered``).
        Ids no longer held by the claim (its lease expired and was reclaimed) are
        ignored and not counted: another consumer may deliver them again.
        """
        wanted = {int(value) for value in ids}
        if not wanted:
            return 0

        def settle(cache: Any, meta: Counters, gone: list[list[Any]]) -> None:
            meta.bytes -= rows_size(gone)
            meta.delivered += len(gone)
            if coalesced:
                meta.coalesced += len(gone)

        return self._settle("ack", claim, wanted, settle)

    def release(
        self,
        claim: Claim,
        ids: Iterable[int],
        *,
        not_before: float,
        error: str | None = None,
        refused: bool = False,
        failed: bool = True,
        count_attempt: bool | None = None,
    ) -> int:
        """Give entries back for a retry at ``not_before`` (unix time) or later.

        They wait in the retry space and do not block the entries behind them.
        ``refused``: Per itself refused them (``ok: false``): ``attempts`` + 1 (counts
        toward ``max_attempts``). ``failed``: the attempt failed in any way: ``failures``
        + 1 (drives the backoff) and their keys go to the failure log. A hand-back that
        is no failure (e.g. a paused worker) passes ``failed=False``. ``error`` (at most
        1,000 characters kept) becomes ``last_error`` when given. ``count_attempt`` is
        deprecated: True means ``refused=True, failed=True``, False means neither.
        Returns how many entries were moved (ids the claim no longer holds are ignored).
        """
        refused, failed = _attempt_flags(count_attempt, refused, failed)
        wanted = {int(value) for value in ids}
        if not wanted:
            return 0
        ready_ms = not_before_ms(float(not_before))
        text = None if error is None else str(error)[:MAX_TEXT]

        def settle(cache: Any, meta: Counters, gone: list[list[Any]]) -> None:
            for row in gone:
                count_row_attempt(row, refused=refused, failed=failed)
                if text is not None:
                    row[6] = text
            model.push_group(cache, meta, ready_ms, gone)
            meta.pending += len(gone)
            if failed:
                model.log_failures(cache, meta, [row_key(row) for row in gone])

        return self._settle("release", claim, wanted, settle)

    def dead_letter(
        self,
        claim: Claim,
        ids: Iterable[int],
        reason: str,
        *,
        refused: bool = True,
        failed: bool = True,
        count_attempt: bool | None = None,
    ) -> int:
        """Set entries aside for good (until requeued or purged), with a reason.

        The attempt that led here counts as refused (``attempts`` + 1) and failed
        (``failures`` + 1) unless ``refused``/``failed`` say otherwise (``count_attempt``
        is deprecated, as in :meth:`release`). ``reason`` is kept up to 1,000
        characters. Their keys go to the failure log. Returns how many were moved.
        """
        refused, failed = _attempt_flags(count_attempt, refused, failed)
        wanted = {int(value) for value in ids}
        if not wanted:
            return 0
        text = str(reason)[:MAX_TEXT]

        def settle(cache: Any, meta: Counters, gone: list[list[Any]]) -> None:
            for row in gone:
                count_row_attempt(row, refused=refused, failed=failed)
            model.add_dead_record(cache, meta, text, self._clock(), gone)
            model.log_failures(cache, meta, [row_key(row) for row in gone])

        return self._settle("dead_letter", claim, wanted, settle)

    def release_claim(self, claim: Claim) -> int:
        """Give back every entry still held by ``claim``: ready at once, counts unchanged.

        Returns how many entries were moved.
        """

        def settle(cache: Any, meta: Counters, gone: list[list[Any]]) -> None:
            model.push_group(cache, meta, 0, gone)
            meta.pending += len(gone)

        return self._settle("release_claim", claim, None, settle)

    def _settle(
        self,
        what: str,
        claim: Claim,
        wanted: set[int] | None,
        settle: Callable[[Any, Counters, list[list[Any]]], None],
    ) -> int:
        """Take ``wanted`` (None: all) of ``claim``'s entries out of its lease, in one transaction.

        ``settle(cache, counters, rows)`` then moves or deletes the rows taken and the
        counters are saved. Returns how many were taken.
        """

        def txn(cache: Any) -> int:
            meta = Counters.load(cache, self._storage.first_id)
            gone = model.detach(cache, meta, claim.lease_id, wanted)
            if not gone:
                return 0
            settle(cache, meta, gone)
            meta.save(cache)
            return len(gone)

        return self._run(what, txn, frees_space=True)

    def reclaim(self) -> int:
        """Return entries of expired leases and of dead owners (this host) to the front.

        Runs automatically when the queue is opened; claims also return expired leases.
        Returns the number of entries made ready again.
        """

        def txn(cache: Any) -> int:
            now = self._clock()
            meta = Counters.load(cache, self._storage.first_id)
            leases = load_leases(cache)
            me = self._storage.identity
            stale = [
                lease_id
                for lease_id, info in leases.items()
                if info[0] <= now or me.owner_gone(info[1], info[2], info[3])
            ]
            if not stale:
                return 0
            moved = model.requeue_leases(cache, meta, leases, stale)
            save_leases(cache, leases)
            meta.save(cache)
            return moved

        moved = self._run("reclaim", txn, frees_space=True)
        if moved:
            _log.info("returned %d leased entries to the queue in %s", moved, self.directory)
        return moved

    def next_ready_at(self) -> float | None:
        """Earliest unix time an entry becomes claimable (now if ready), None if none pending.

        With ``max_delay``, a retry group due further ahead than that counts as ready.
        """

        def txn(cache: Any) -> float | None:
            now = self._clock()
            meta = Counters.load(cache, self._storage.first_id)
            ready = model.next_ready_ms(cache, meta, now * 1000.0, self._far_ms)
            if ready is None:
                return None
            return now if ready <= now * 1000.0 else ready / 1000.0

        return self._run("next_ready_at", txn)

    def settled_through(self, last_id: int) -> bool:
        """True when no pending or in-flight entry has an id <= ``last_id``.

        Entries delivered, dead-lettered, evicted or refused, and entries lost with a
        quarantined database, all count as settled. Use the ``last_id`` of a
        :class:`PutResult` to wait for what one process stored. Cheap when the answer is
        False (the front of the main queue, then the lease index); the retry groups'
        keys are read only when those checks pass. A read-only snapshot: it never waits
        for another process's write lock.
        """
        bound = int(last_id)
        return self._run(
            "settled_through",
            lambda cache: model.settled_through(cache, bound),
            write=False,
            snapshot=True,
        )

    # ------------------------------------------------------------------ failure log

    def failure_seq(self) -> int:
        """The failure log's sequence number: one indexed read, no write lock.

        It grows by one with every release (``failed=True``), dead-lettering, eviction
        or refused put, in any process; compare it with the last value seen (every
        :class:`PutResult` carries it) before calling :meth:`failures_since`.
        """

        def read(cache: Any) -> int:
            return Counters.load(cache, self._storage.first_id).fseq

        self._failure_seq = self._run("failure_seq", read, write=False)
        return self._failure_seq

    def failures_since(self, seq: int) -> tuple[int, list[tuple[str, str, str]] | None]:
        """(current sequence number, keys logged after ``seq``), deduplicated, in order.

        The keys are ``(billing_id, user_id, activity_type_id)`` of entries whose attempt
        failed, that were dead-lettered, evicted by ``drop_oldest`` or refused by put,
        in any process. None instead of the keys when some were already trimmed from
        the log (it keeps about 2,000 events and 100,000 keys), when one event had more
        than 10,000 keys, or when ``seq`` belongs to another database of the directory:
        the caller should then forget every key it holds.
        """
        since = int(seq)

        def txn(cache: Any) -> tuple[int, list[tuple[str, str, str]] | None]:
            meta = Counters.load(cache, self._storage.first_id)
            return model.failures_since(cache, meta, since)

        current, keys = self._run("failures_since", txn)
        self._failure_seq = current
        return current, keys

    # ------------------------------------------------------------------ delivery state

    def set_delivery_state(self, state: Mapping[str, Any]) -> None:
        """Store a small JSON object describing delivery (for ``per-buffer status``).

        Replaces the previous one; at most 64 KiB encoded. Cheap (one row written).

        Raises:
            TypeError: ``state`` is not a mapping with str keys of JSON values.
            ValueError: it is larger than 64 KiB encoded, or holds NaN/infinity.
        """
        if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
            raise TypeError("the delivery state must be a mapping with str keys")
        text = json.dumps(dict(state), separators=(",", ":"), allow_nan=False)
        if len(text) > model.DELIVERY_STATE_BYTES:
            raise ValueError(
                f"the delivery state is larger than {model.DELIVERY_STATE_BYTES} bytes"
            )

        def txn(cache: Any) -> None:
            cache.set(DELIVERY_KEY, text)

        self._run("set_delivery_state", txn)

    def delivery_state(self) -> dict[str, Any] | None:
        """The object last stored by :meth:`set_delivery_state` (by any process), or None."""
        state = self._run("delivery_state", model.delivery_state, write=False)
        return None if state is None else dict(state)

    # ------------------------------------------------------------------ dead letters

    def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first, at most ``limit`` of them."""

        def txn(cache: Any) -> list[DeadLetter]:
            meta = Counters.load(cache, self._storage.first_id)
            out: list[DeadLetter] = []
            for number in range(meta.dfirst, meta.dnext):
                if limit is not None and len(out) >= limit:
                    break
                key = DEAD_FORMAT.format(number)
                raw = cache.get(key)
                if raw is None:
                    continue
                record = loads(raw, key)
                rows = record_rows(record, key)
                try:
                    reason, dead_at = str(record["r"]), float(record["t"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise CorruptData(f"{key}: malformed dead letter") from exc
                for row in rows[: None if limit is None else limit - len(out)]:
                    out.append(DeadLetter(entry=to_entry(row), reason=reason, dead_at=dead_at))
            return out

        return self._run("dead_letters", txn)

    def requeue_dead_letters(self) -> int:
        """Move every dead letter back to the front of the ready queue, counts reset.

        Works in batches of transactions; returns the number of entries moved.
        """
        return self._drain_dead_letters(requeue=True)

    def purge_dead_letters(self) -> int:
        """Delete every dead letter (counted as ``dead_letters_purged``); return how many."""
        return self._drain_dead_letters(requeue=False)

    def _drain_dead_letters(self, *, requeue: bool) -> int:
        stop: list[int] = []

        def txn(cache: Any) -> tuple[int, bool]:
            meta = Counters.load(cache, self._storage.first_id)
            if not stop:
                stop.append(meta.dnext)
            end = min(meta.dnext, stop[0], meta.dfirst + _BATCH_RECORDS)
            moved = 0
            for number in range(meta.dfirst, end):
                key = DEAD_FORMAT.format(number)
                raw = cache.get(key)
                if raw is None:
                    continue
                rows = record_rows(loads(raw, key), key)
                if requeue:
                    for row in rows:
                        row[5] = 0
                        if len(row) > 8:  # the recorder's coalescing travels on
                            row[7] = 0
                        else:
                            del row[7:]
                    if rows:
                        model.push_group(cache, meta, 0, rows)
                    meta.pending += len(rows)
                else:
                    meta.bytes -= rows_size(rows)
                    meta.drop("dead_letters_purged", len(rows))
                cache.delete(key)
                meta.dead -= len(rows)
                moved += len(rows)
            more = end < min(meta.dnext, stop[0])
            if end > meta.dfirst:
                meta.dfirst = end
                meta.save(cache)
            return moved, more

        what = "requeue_dead_letters" if requeue else "purge_dead_letters"
        total = 0
        while True:
            moved, more = self._run(what, txn)
            total += moved
            if not more:
                return total

    # ------------------------------------------------------------------ observing

    def stats(self) -> QueueStats:
        """Counters, totals and the age of the oldest undelivered entry, in O(leases).

        A read-only snapshot: it never waits for another process's write lock.
        """
        totals = self._storage.totals()

        def txn(cache: Any) -> QueueStats:
            now = self._clock()
            meta = Counters.load(cache, self._storage.first_id)
            oldest = model.oldest_recorded(cache, meta)
            return meta.stats(
                totals,
                oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
                bytes_on_disk=self._storage.bytes_on_disk(),
                quarantined=self._storage.quarantined,
                generation=self._storage.generation,
                delivery_state=model.delivery_state(cache),
            )

        return self._run("stats", txn, write=False, snapshot=True)

    def counts(self) -> tuple[int, int]:
        """``(pending, in_flight)``: one indexed read, no write lock (for flush polling)."""

        def read(cache: Any) -> tuple[int, int]:
            meta = Counters.load(cache, self._storage.first_id)
            return meta.pending, meta.inflight

        return self._run("counts", read, write=False)

    # ------------------------------------------------------------------ lifecycle

    def deadline(self, at: float | None) -> contextlib.AbstractContextManager[None]:
        """Bound this thread's operations inside the ``with`` block by ``at``
        (:func:`time.monotonic` seconds; None: only ``lock_timeout``).

        An operation that would start after ``at`` raises :class:`QueueError` without
        touching the database, and one under way gives up at ``at``, whatever holds it
        up (a write lock held by another process, another thread of this one, the
        directory lock, opening the database). Blocks nest; the earliest deadline wins.
        """
        return self._storage.deadline(at)

    def close(self) -> None:
        """Close this object's database connection; later calls raise :class:`QueueError`."""
        self._storage.close()

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
        return f"DurableQueue({str(self.directory)!r})"

    # ------------------------------------------------------------------ internals

    def _run(
        self,
        what: str,
        fn: Callable[[Any], _T],
        *,
        write: bool = True,
        frees_space: bool = False,
        snapshot: bool = False,
    ) -> _T:
        storage = self._storage
        if (
            write
            and storage.opened != self._reclaimed_open
            and what != "reclaim"
            and not storage.closed
        ):
            # A database was (re)opened since the last operation: run the open-time
            # reclaim (with the next write: reads never wait for the write lock).
            self._reclaimed_open = storage.opened
            try:
                self.reclaim()
            except QueueError as exc:
                _log.debug("reclaim after reopening %s failed: %s", self.directory, exc)
        return storage.run(what, fn, write=write, frees_space=frees_space, snapshot=snapshot)

    def _log_drops(self, refused: dict[str, int], evicted: int) -> None:
        now = time.monotonic()
        if now - self._last_drop_log < _DROP_LOG_INTERVAL:
            return
        self._last_drop_log = now
        drops = dict(refused)
        if evicted:
            drops["evicted_oldest"] = evicted
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(drops.items()))
        _log.warning(
            "durable queue in %s is full (max_items=%d, max_bytes=%d, policy %s): dropped %s; "
            "totals in stats().dropped (this message repeats at most once a minute)",
            self.directory,
            self._max_items,
            self._max_bytes,
            self._full_policy,
            detail,
        )
