"""The queue's data model: how entries move between the stored rows.

Functions over one open transaction: ``cache`` is a diskcache ``Cache`` (or, for reads, a
:class:`~per_buffer.queue._reader.ReadOnlyView`) and ``meta`` the :class:`Counters`
loaded in the same transaction, which the caller saves. They implement the main queue,
retry groups, leases, dead letters, the bounds and the failure log described in
:mod:`per_buffer.queue`; :class:`~per_buffer.queue.DurableQueue` wraps each public
operation around them in one transaction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final

from ._health import CorruptData
from ._rows import (
    CHUNK_BYTES,
    CHUNK_ITEMS,
    DEAD_FORMAT,
    DELIVERY_KEY,
    FAILURE_FORMAT,
    FORGET_ALL,
    LEASE_PREFIX,
    MAIN,
    MAIN_FORMAT,
    RETRY,
    Counters,
    dumps,
    entry_rows,
    load_leases,
    loads,
    record_rows,
    retry_key,
    retry_key_min_id,
    retry_key_ms,
    retry_key_seq,
    row_key,
    row_size,
    save_leases,
)
from ._types import FullPolicy

CLAIM_BYTES: Final = 1024 * 1024  # payload bytes per lease row
FAILURE_ROWS_KEPT: Final = 2_000
FAILURE_KEYS_KEPT: Final = 100_000
FAILURE_KEYS_PER_ROW: Final = 10_000  # more keys in one event are logged as "forget all"
DELIVERY_STATE_BYTES: Final = 64 * 1024

Key = tuple[str, str, str]


# --------------------------------------------------------------------------- main queue and bounds


def store_rows(cache: Any, meta: Counters, rows: list[list[Any]], sizes: list[int]) -> None:
    """Append ``rows`` (ids assigned here, in order) to the main queue as chunk rows."""
    next_id = meta.next_id
    chunk: list[list[Any]] = []
    chunk_bytes = 0
    total = 0
    for row, size in zip(rows, sizes, strict=True):
        row[0] = next_id
        next_id += 1
        if chunk and (len(chunk) >= CHUNK_ITEMS or chunk_bytes >= CHUNK_BYTES):
            cache.set(MAIN_FORMAT.format(chunk[0][0]), dumps(chunk))
            chunk, chunk_bytes = [], 0
        chunk.append(row)
        chunk_bytes += size
        total += size
    if chunk:
        cache.set(MAIN_FORMAT.format(chunk[0][0]), dumps(chunk))
    meta.next_id = next_id
    meta.pending += len(rows)
    meta.bytes += total


def admit(
    cache: Any,
    meta: Counters,
    sizes: list[int],
    *,
    policy: FullPolicy,
    max_items: int,
    max_bytes: int,
) -> tuple[int, int, list[Key]]:
    """Apply the bounds to a batch: the slice [start, end) of it to store.

    Also returns the keys of older entries ``drop_oldest`` evicted to make room (counted
    here as ``evicted_oldest``); the items outside the slice are the caller's to count.
    """
    count = len(sizes)
    stored = meta.stored
    if stored + count <= max_items and meta.bytes + sum(sizes) <= max_bytes:
        return 0, count, []
    if policy == "drop_newest":
        room, room_bytes = max_items - stored, max_bytes - meta.bytes
        end = total = 0
        while end < count and end < room and total + sizes[end] <= room_bytes:
            total += sizes[end]
            end += 1
        return 0, end, []
    # drop_oldest: the newest suffix of the batch that can fit at all ...
    start, total = count, 0
    while start > 0 and count - start < max_items and total + sizes[start - 1] <= max_bytes:
        start -= 1
        total += sizes[start]
    # ... then evict old pending entries to make room for it ...
    need_items = stored + (count - start) - max_items
    need_bytes = meta.bytes + total - max_bytes
    evicted: list[Key] = []
    if need_items > 0 or need_bytes > 0:
        evicted, freed_bytes = evict(cache, meta, need_items, need_bytes)
        meta.drop("evicted_oldest", len(evicted))
        need_items -= len(evicted)
        need_bytes -= freed_bytes
    # ... and refuse the oldest of the batch if leased/dead entries fill the rest.
    while start < count and (need_items > 0 or need_bytes > 0):
        need_items -= 1
        need_bytes -= sizes[start]
        start += 1
    return start, count, evicted


def evict(cache: Any, meta: Counters, need_items: int, need_bytes: int) -> tuple[list[Key], int]:
    """Delete the oldest pending entries (main queue, then retry groups): keys, bytes freed."""
    keys: list[Key] = []
    freed_bytes = 0
    for prefix in (MAIN, RETRY):
        while len(keys) < need_items or freed_bytes < need_bytes:
            key, raw = cache.peek(prefix=prefix, default=(None, None))
            if key is None:
                break
            rows = entry_rows(raw, key)
            count = 0
            while count < len(rows) and (len(keys) < need_items or freed_bytes < need_bytes):
                keys.append(row_key(rows[count]))
                freed_bytes += row_size(rows[count])
                count += 1
            put_back(cache, prefix, key, rows[count:])
    meta.pending -= len(keys)
    meta.bytes -= freed_bytes
    return keys, freed_bytes


def put_back(cache: Any, prefix: str, key: str, rest: list[list[Any]]) -> None:
    """Rewrite what is left of a chunk or retry group after some of it was taken.

    A main-queue chunk keeps its key (its number stays at or below its first id); a
    retry group gets a key with its new smallest id at the same place in the order.
    """
    if not rest:
        cache.delete(key)
    elif prefix == MAIN:
        cache.set(key, dumps(rest))
    else:
        cache.delete(key)
        cache.set(retry_key(retry_key_ms(key), retry_key_seq(key), rest), dumps(rest))


# --------------------------------------------------------------------------- claims and leases


def take_ready(
    cache: Any,
    now_ms: float,
    max_items: int,
    *,
    ignore_not_before: bool,
    far_ms: float | None,
) -> list[list[Any]]:
    """Take up to ``max_items`` ready rows (about ``CLAIM_BYTES`` at most), in order.

    Ready retry groups first (by not_before, then sequence), then the main queue.
    ``far_ms``: a retry group due more than this many milliseconds after ``now_ms`` is
    ready now (see ``max_delay``).
    """
    taken: list[list[Any]] = []
    taken_bytes = 0
    for prefix in (RETRY, MAIN):
        while len(taken) < max_items and taken_bytes < CLAIM_BYTES:
            key, raw = cache.peek(prefix=prefix, default=(None, None))
            if key is None:
                break
            if prefix == RETRY and not ignore_not_before and retry_key_ms(key) > now_ms:
                if far_ms is None or not clamp_far_group(cache, now_ms, far_ms):
                    break
                continue
            chunk = entry_rows(raw, key)
            count = 0
            while (
                count < len(chunk)
                and len(taken) < max_items
                and (taken_bytes < CLAIM_BYTES or not taken)
            ):
                taken.append(chunk[count])
                taken_bytes += row_size(chunk[count])
                count += 1
            put_back(cache, prefix, key, chunk[count:])
    return taken


def clamp_far_group(cache: Any, now_ms: float, far_ms: float) -> bool:
    """Make the last retry group ready now if it is due more than ``far_ms`` ahead.

    A stored not_before is wall time: a clock stepped backwards or a huge Retry-After
    must not strand entries. The group keeps its sequence number.
    """
    key, raw = cache.peek(prefix=RETRY, side="back", default=(None, None))
    if key is None or retry_key_ms(key) <= now_ms + far_ms:
        return False
    rows = entry_rows(raw, key)
    cache.delete(key)
    cache.set(retry_key(math.floor(now_ms), retry_key_seq(key), rows), raw)
    return True


def next_ready_ms(cache: Any, meta: Counters, now_ms: float, far_ms: float | None) -> float | None:
    """Earliest time (ms) an entry is claimable (``now_ms`` if ready), None if none pending."""
    if meta.pending <= 0:
        return None
    key, _ = cache.peek(prefix=MAIN, default=(None, None))
    if key is not None:
        return now_ms
    key, _ = cache.peek(prefix=RETRY, default=(None, None))
    if key is None:
        return None
    ready = retry_key_ms(key)
    if ready <= now_ms:
        return now_ms
    if far_ms is not None:
        last, _ = cache.peek(prefix=RETRY, side="back", default=(None, None))
        if last is not None and retry_key_ms(last) > now_ms + far_ms:
            return now_ms
    return float(ready)


def push_group(cache: Any, meta: Counters, ready_ms: int, rows: list[list[Any]]) -> None:
    """Store ``rows`` as retry group(s) with consecutive sequence numbers."""
    for start in range(0, len(rows), CHUNK_ITEMS):
        group = rows[start : start + CHUNK_ITEMS]
        cache.set(retry_key(ready_ms, meta.seq, group), dumps(group))
        meta.seq += 1


def requeue_leases(
    cache: Any, meta: Counters, leases: dict[str, list[Any]], lease_ids: list[str]
) -> int:
    """Move whole leases to the front (retry groups ready at once); count entries."""
    moved = 0
    for lease_id in lease_ids:
        leases.pop(lease_id, None)
        key = LEASE_PREFIX + lease_id
        raw = cache.get(key)
        if raw is None:
            continue
        rows = record_rows(loads(raw, key), key)
        if rows:
            push_group(cache, meta, 0, rows)
        cache.delete(key)
        meta.inflight -= len(rows)
        meta.pending += len(rows)
        moved += len(rows)
    return moved


def detach(cache: Any, meta: Counters, lease_id: str, ids: set[int] | None) -> list[list[Any]]:
    """Take ``ids`` (all if None) out of a lease and count them out of in-flight.

    Returns the rows taken, in claim order ([] if the lease is gone: its ids are then
    ignored, another consumer may hold them).
    """
    key = LEASE_PREFIX + lease_id
    raw = cache.get(key)
    if raw is None:
        return []
    lease = loads(raw, key)
    rows = record_rows(lease, key)
    if ids is None:
        gone, keep = rows, []
    else:
        gone = [row for row in rows if row[0] in ids]
        keep = [row for row in rows if row[0] not in ids]
    if not gone:
        return []
    if keep:
        lease["e"] = keep
        cache.set(key, dumps(lease))
    else:
        cache.delete(key)
        leases = load_leases(cache)
        if leases.pop(lease_id, None) is not None:
            save_leases(cache, leases)
    meta.inflight -= len(gone)
    return gone


def add_dead_record(
    cache: Any, meta: Counters, reason: str, dead_at: float, rows: list[list[Any]]
) -> None:
    """Store ``rows`` as one dead-letter record (counted as dead)."""
    cache.set(DEAD_FORMAT.format(meta.dnext), dumps({"r": reason, "t": dead_at, "e": rows}))
    meta.dnext += 1
    meta.dead += len(rows)
    meta.dead_total += len(rows)


# --------------------------------------------------------------------------- settled


def settled_through(cache: Any, last_id: int) -> bool:
    """True when no pending or in-flight entry has an id <= ``last_id``.

    Cheap checks first: the front of the main queue (ordered by id) and the smallest id
    of each lease in the lease index (a lease row is read only when its smallest id
    says it may hold one); then the keys of every retry group, which carry their
    smallest id (a group stored by version 0.1 is read).
    """
    key, raw = cache.peek(prefix=MAIN, default=(None, None))
    if key is not None and int(key[2:]) <= last_id and entry_rows(raw, key)[0][0] <= last_id:
        return False
    for lease_id, info in load_leases(cache).items():
        if len(info) > 5 and int(info[5]) > last_id:
            continue
        lease_key = LEASE_PREFIX + lease_id
        lease_raw = cache.get(lease_key)
        if lease_raw is not None and any(
            row[0] <= last_id for row in record_rows(loads(lease_raw, lease_key), lease_key)
        ):
            return False
    for retry in cache.iterkeys(reverse=True):
        if not isinstance(retry, str) or not retry.startswith(f"{RETRY}-"):
            if isinstance(retry, str) and retry > f"{RETRY}-":
                continue  # a key sorting after the retry space
            break
        smallest = retry_key_min_id(retry)
        if smallest is None:
            rows = entry_rows(cache.get(retry), retry)
            smallest = min(row[0] for row in rows)
        if smallest <= last_id:
            return False
    return True


# --------------------------------------------------------------------------- failure log


def log_failures(cache: Any, meta: Counters, keys: Iterable[Key]) -> None:
    """Append one failure log row with ``keys`` (deduplicated) and trim the oldest rows."""
    unique = list(dict.fromkeys(keys))
    if not unique:
        return
    meta.fseq += 1
    if len(unique) > FAILURE_KEYS_PER_ROW:
        cache.set(FAILURE_FORMAT.format(meta.fseq), dumps(FORGET_ALL))
    else:
        cache.set(FAILURE_FORMAT.format(meta.fseq), dumps(unique))
        meta.fkeys += len(unique)
    while meta.ffirst <= meta.fseq and (
        meta.fseq - meta.ffirst >= FAILURE_ROWS_KEPT or meta.fkeys > FAILURE_KEYS_KEPT
    ):
        key = FAILURE_FORMAT.format(meta.ffirst)
        raw = cache.get(key)
        if raw is not None:
            value = loads(raw, key)
            if type(value) is list:
                meta.fkeys -= len(value)
            cache.delete(key)
        meta.ffirst += 1


def failures_since(cache: Any, meta: Counters, seq: int) -> tuple[int, list[Key] | None]:
    """(current sequence number, keys logged after ``seq``), None when some are gone."""
    if seq == meta.fseq:
        return meta.fseq, []
    if seq > meta.fseq or seq < meta.ffirst - 1:
        return meta.fseq, None
    keys: list[Key] = []
    for number in range(seq + 1, meta.fseq + 1):
        key = FAILURE_FORMAT.format(number)
        raw = cache.get(key)
        if raw is None:
            return meta.fseq, None
        value = loads(raw, key)
        if value == FORGET_ALL:
            return meta.fseq, None
        if type(value) is not list:
            raise CorruptData(f"{key}: malformed failure log row")
        for item in value:
            if type(item) is not list or len(item) != 3:
                raise CorruptData(f"{key}: malformed failure log row")
            keys.append((str(item[0]), str(item[1]), str(item[2])))
    return meta.fseq, list(dict.fromkeys(keys))


# --------------------------------------------------------------------------- stats and probing


def oldest_recorded(cache: Any, meta: Counters) -> float | None:
    """Smallest ``recorded_at`` among the front chunk, the first retry group and leases."""
    if meta.pending + meta.inflight <= 0:
        return None
    candidates: list[float] = []
    for prefix in (MAIN, RETRY):
        key, raw = cache.peek(prefix=prefix, default=(None, None))
        if key is not None:
            rows = entry_rows(raw, key)
            if prefix == MAIN:
                candidates.append(float(rows[0][4]))
            else:
                candidates.append(min(float(row[4]) for row in rows))
    for info in load_leases(cache).values():
        candidates.append(float(info[4]))
    return min(candidates) if candidates else None


def delivery_state(cache: Any) -> Mapping[str, Any] | None:
    """The stored delivery state, None if absent or unreadable (never treated as damage)."""
    raw = cache.get(DELIVERY_KEY)
    if raw is None:
        return None
    try:
        value = loads(raw, DELIVERY_KEY)
    except CorruptData:
        return None
    return MappingProxyType(value) if isinstance(value, dict) else None


def probe(cache: Any) -> None:
    """Read a little of every kind of row: counters, leases, both ends of the queues."""
    meta = Counters.load(cache)
    for lease_id in list(load_leases(cache))[:4]:
        raw = cache.get(LEASE_PREFIX + lease_id)
        if raw is not None:
            record_rows(loads(raw, lease_id), lease_id)
    for prefix, side in ((MAIN, "front"), (MAIN, "back"), (RETRY, "front")):
        key, raw = cache.peek(prefix=prefix, side=side, default=(None, None))
        if key is not None:
            entry_rows(raw, key)
    if meta.dnext > meta.dfirst:
        key = DEAD_FORMAT.format(meta.dfirst)
        raw = cache.get(key)
        if raw is not None:
            record_rows(loads(raw, key), key)
