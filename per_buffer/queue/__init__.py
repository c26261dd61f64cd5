"""A durable, multi-process, disk-backed queue of activities (SQLite through diskcache).

The recorder's promise rests on this package: an activity whose :meth:`DurableQueue.put`
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
  ``drop_oldest``; every refused or evicted item is counted by reason, persistently,
  and counted once: items of a put batch that are not stored are ``queue_full`` (and in
  the batch's :attr:`PutResult.refused`); older stored entries that ``drop_oldest``
  removed to make room are ``evicted_oldest``. diskcache never evicts or culls anything.
* Self-healing: an unreadable database (garbage, truncated, missing or mangled WAL,
  "file is not a database", "database disk image is malformed") is moved aside to a
  ``quarantine-<UTC timestamp>-db-<n>/`` folder, logged at ERROR with the number of
  entries it held, counted in ``totals.json``, and a fresh database takes over;
  :func:`salvage` re-queues what it still holds. A full disk or an unwritable directory
  raises :class:`QueueError` and leaves stored items intact; a small ballast file
  (``reserve.bin``) is released when the disk fills so that claims and acks can still
  drain the queue.
* Retry times are wall time on disk: with ``max_delay``, a retry group due more than
  ``max_delay`` seconds ahead (a clock stepped backwards, a huge ``Retry-After``) is
  ready at once.

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
A group made ready by ``max_delay`` gets ``not_before`` = the claim's time.

Attempt counters
----------------
Each entry counts ``attempts`` (Per itself refused it: ``release(..., refused=True)`` and
dead-lettering; what ``max_attempts`` and the dead letters go by) and ``failures``
(every failed attempt of any kind: ``release(..., failed=True)``; what the backoff goes
by). A requeued dead letter starts again from zero.

Failure log
-----------
Whenever entries are released with ``failed=True``, dead-lettered, evicted by
``drop_oldest`` or refused by ``put``, their keys ``(billing_id, user_id,
activity_type_id)`` are appended to a bounded log in the same transaction, and its
sequence number grows by one. A recorder that coalesces repeats of keys it believes
queued compares :attr:`PutResult.failure_seq` (or :meth:`DurableQueue.failure_seq`)
with the last value it saw and calls :meth:`DurableQueue.failures_since` only when it
changed, to forget the keys whose copy failed in any process. Sequence numbers of
database ``n`` start at ``(n - 1) * 10**12``, so a number from a database that was
replaced is recognised (the answer is then "forget everything").

Storage layout
--------------
``directory/`` (mode 0700) holds ``queue.lock`` (``flock``: shared for every operation,
exclusive while opening a new database, moving a broken one aside or writing
``totals.json``), ``reserve.bin`` (ballast), ``totals.json`` and the live database in
the highest-numbered ``db-<n>/`` folder (a diskcache ``Cache``: ``cache.db`` with its
``-wal`` and ``-shm``). Ids are unique in the directory: database n starts at
``(n - 1) * 10**12 + 1``. Inside a database, all keys are strings:

* ``meta:counters``: one JSON object with every counter, rewritten in the same
  transaction as the change it counts, so :meth:`~DurableQueue.stats` is O(1):
  ``pending``, ``inflight``, ``dead``, ``bytes`` (payload), ``next_id``, ``seq`` (next
  retry group), ``dfirst``/``dnext`` (dead-letter records), ``dropped`` (reason ->
  count), and since 0.2 ``delivered`` (entries acked), ``coalesced`` (entries acked with
  ``coalesced=True``), ``dead_total`` (entries ever dead-lettered), ``fseq`` (failure log
  sequence number), ``ffirst`` (oldest failure log row kept) and ``fkeys`` (keys in the
  kept rows). A 0.1 row lacks the 0.2 fields: they read as 0 (``dead_total`` as
  ``dead``, the failure log as empty).
* ``q-<first id:015d>``: one row per chunk of up to 512 entries, as compact JSON
  ``[[id, billing_id, user_id, activity_type_id, recorded_at, attempts, last_error
  (, failures (, [window, margin]))], ...]`` (never pickle). The 8th field is written
  when ``failures`` differs from ``attempts`` or a 9th follows; a 7-field row (all rows
  of 0.1) has ``failures == attempts``. The 9th is the producer's coalescing rule
  (``put(..., coalescing=)``). Keys sort in put order; diskcache's ``peek(prefix="q")``
  reads the front with an index range query, O(log n). A claim takes chunks from the front and
  rewrites the remainder of the last one under the same key.
* ``r-<not_before ms:015d>-<sequence:015d>-<smallest id:015d>``: retry groups (up to 512
  entries), sorted by readiness; the smallest id lets
  :meth:`~DurableQueue.settled_through` skip reading them. 0.1 wrote the first two
  parts only (such a group is read instead).
* ``lease:<lease id>``: one row per claim (owner, host, pid, start ticks, expiry,
  entries), and ``meta:leases``: a small index of live leases (expiry, host, pid, start
  ticks, oldest ``recorded_at``, smallest id; 0.1 wrote no smallest id) so reclaim never
  scans.
* ``d-<sequence:015d>``: one row per :meth:`~DurableQueue.dead_letter` call (reason,
  time, entries), contiguous between two counters.
* ``f-<sequence:015d>``: the failure log, one row per event holding a JSON list of
  keys, or ``"*"`` for an event with more than 10,000 keys ("forget everything"). At
  most 2,000 rows and 100,000 keys are kept; older rows are deleted.
* ``meta:delivery``: a small JSON object the delivery worker stores with
  :meth:`~DurableQueue.set_delivery_state` for ``per-buffer status``.

``totals.json`` (written atomically under the exclusive lock) keeps what must survive
the database it describes: ``quarantines`` (databases moved aside),
``quarantined_entries`` (entries they held: from their counters row when readable, else
by counting the readable rows, else unknown and counted in ``quarantines_uncounted``)
and ``salvaged_entries``. A quarantined folder that :func:`salvage` read holds
``salvaged.json`` with the result.

Deleted rows' pages are reused by later writes (``auto_vacuum=INCREMENTAL``): the
files stay at their high-water mark, which ``max_bytes`` bounds.

``max_bytes`` counts *payload* bytes: the UTF-8 size of the three IDs of each stored
entry plus 32 bytes; JSON, SQLite pages, indexes and the WAL come on top (about 2x for
short IDs). ``max_items`` and ``max_bytes`` cover every stored entry: pending, in
flight and dead-lettered.

SQL outside diskcache's API
---------------------------
Every operation of a live queue uses diskcache's public API (``transact``, ``get``,
``set``, ``delete``, ``peek``, ``iterkeys``) and meets the throughput targets with it.
Raw SQL is issued in four narrow places only, each for something diskcache cannot do:
``ROLLBACK`` on diskcache's connection when a failed ``COMMIT`` left a transaction
open; ``PRAGMA wal_checkpoint(TRUNCATE)`` on it when the disk is full (the only way to
give the WAL's space back); when opening after a crash, a separate short-lived
connection that lets SQLite recover the WAL and reports how many frames it kept; and
read-only connections that read a database without opening it as a queue
(:func:`inspect`, the count of a database moved aside, :func:`salvage`'s row-by-row
reading of a damaged copy).

Modules
-------
``_queue`` (:class:`DurableQueue`: one transaction per operation), ``_model`` (how
entries move between rows: the data model), ``_rows`` (stored formats), ``_storage``
(open, transact with retry/heal/full-disk handling, quarantine, close; fork safety),
``_health`` (damage checks before opening, error classes), ``_layout`` (the directory's
files, ``totals.json``), ``_process`` (lease owners), ``_reader`` (read-only and
damage-tolerant reading), ``_inspect``, ``_salvage`` and ``_types`` (the public values).
"""

from __future__ import annotations

from ..errors import QueueError
from ._inspect import inspect
from ._layout import is_queue_directory, quarantined_folders, queue_directories
from ._queue import DurableQueue
from ._salvage import AlreadySalvagedError, salvage
from ._types import (
    Claim,
    DeadLetter,
    Entry,
    FullPolicy,
    PutResult,
    QueueStats,
    SalvageResult,
)

__all__ = [
    "AlreadySalvagedError",
    "Claim",
    "DeadLetter",
    "DurableQueue",
    "Entry",
    "FullPolicy",
    "PutResult",
    "QueueError",
    "QueueStats",
    "SalvageResult",
    "inspect",
    "is_queue_directory",
    "quarantined_folders",
    "queue_directories",
    "salvage",
]
