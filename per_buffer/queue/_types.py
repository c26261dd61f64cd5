"""The values :class:`~per_buffer.queue.DurableQueue` hands out (all frozen)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import FullPolicy
from ..models import Activity

__all__ = ["Claim", "DeadLetter", "Entry", "FullPolicy", "PutResult", "QueueStats", "SalvageResult"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored activity as the consumer sees it.

    Attributes:
        id: unique within the directory, assigned by :meth:`DurableQueue.put` in put order.
        activity: the activity triple.
        recorded_at: unix time given by the producer.
        attempts: attempts Per itself refused (``release(..., refused=True)`` and
            dead-lettering); these count toward ``max_attempts`` (0 on the first claim).
        last_error: the error given with the last :meth:`DurableQueue.release`, if any.
        failures: failed attempts of any kind (``release(..., failed=True)``); these drive
            the backoff. A row stored by version 0.1 reads as ``failures == attempts``.
        coalescing: ``(window, margin)`` in seconds of the recorder that stored it (see
            :mod:`per_buffer.coalesce`), None when it gave none (then the consumer's own
            settings apply).
    """

    id: int
    activity: Activity
    recorded_at: float
    attempts: int
    last_error: str | None
    failures: int = 0
    coalescing: tuple[float, float] | None = None


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


@dataclass(frozen=True, slots=True)
class PutResult:
    """What :meth:`DurableQueue.put` did with one batch.

    Attributes:
        stored: items of the batch stored (they are now durable).
        first_id: id of the first stored item, None when none was stored.
        last_id: id of the last stored item; the stored items have the ids
            ``first_id..last_id`` in batch order (contiguous).
        refused: items of *this batch* not stored, by reason (``"queue_full"``). Each is
            also counted once in the directory's ``stats().dropped["queue_full"]``.
            Older entries that ``drop_oldest`` evicted to make room are not in here: they
            are counted as ``dropped["evicted_oldest"]`` only.
        failure_seq: the failure log's sequence number after this put (see
            :meth:`DurableQueue.failures_since`); for an empty batch, the last value this
            object saw.
    """

    stored: int
    first_id: int | None
    last_id: int | None
    refused: Mapping[str, int]
    failure_seq: int


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of a queue directory, from :meth:`DurableQueue.stats` or :func:`inspect`.

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
        dropped: reason -> count of entries refused or evicted, kept in the database:
            ``queue_full`` (items of a put batch not stored), ``evicted_oldest`` (older
            pending entries removed by ``drop_oldest``), ``dead_letters_purged``.
        quarantined: databases this object moved aside since it was opened (0 from
            :func:`inspect`).
        delivered: entries acknowledged (:meth:`DurableQueue.ack`) in the live database,
            including the coalesced ones.
        coalesced: of ``delivered``, entries acknowledged with ``coalesced=True``: settled
            without a request because Per had already counted their key.
        dead_lettered_total: entries ever dead-lettered in the live database (requeued
            and purged ones included).
        quarantines: databases of this directory ever moved aside (``totals.json``).
        quarantined_entries: entries those databases held when moved aside, as far as
            they could be counted.
        quarantines_uncounted: of ``quarantines``, databases whose entries could not be
            counted at all.
        salvaged_entries: entries :func:`salvage` stored again from quarantined databases.
        generation: number of the live database folder (``db-<n>``); it changes when a
            database is replaced, after which the entries stored before are gone.
        failure_seq: the failure log's sequence number (see
            :meth:`DurableQueue.failures_since`).
        delivery_state: the object last stored by :meth:`DurableQueue.set_delivery_state`,
            None if never.
    """

    pending: int
    in_flight: int
    dead_lettered: int
    oldest_pending_age: float | None
    bytes_on_disk: int
    dropped: Mapping[str, int]
    quarantined: int
    delivered: int = 0
    coalesced: int = 0
    dead_lettered_total: int = 0
    quarantines: int = 0
    quarantined_entries: int = 0
    quarantines_uncounted: int = 0
    salvaged_entries: int = 0
    generation: int = 0
    failure_seq: int = 0
    delivery_state: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class SalvageResult:
    """What :func:`salvage` recovered from one quarantined database.

    Attributes:
        requeued: entries (main queue, retry groups, leases) stored as pending in the
            live queue, their attempts, failures and last error kept.
        dead_letters: dead letters stored as dead letters in the live queue (same reason
            and attempts; ``per-buffer dead-letters requeue`` sends them again).
        unreadable: damaged places found: each stored row that could not be decoded
            (a row holds up to 512 entries) and each stretch of rows SQLite could not
            read (a damaged or missing page); 1 when SQLite cannot read the database at
            all. ``missing`` says how many entries they held, when it is known.
        missing: entries the database's counters row says it held minus the entries
            found; None when the counters row itself is unreadable.
        duplicates_skipped: entries found twice in the database (same id), stored once.
        refused: readable entries the live queue refused because it is full (counted in
            its ``dropped["queue_full"]``).
    """

    requeued: int
    dead_letters: int
    unreadable: int
    missing: int | None
    duplicates_skipped: int
    refused: int
