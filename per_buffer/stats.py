"""What a recorder reports: :class:`RecorderStats`, one frozen snapshot."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .flow import FlowState

__all__ = ["RecorderStats"]


@dataclass(frozen=True)
class RecorderStats:
    """A snapshot of a recorder's counters and its queue.

    At quiescence, for one recorder on a private directory:
    ``recorded == coalesced + delivered + dead_lettered + pending + in_flight +
    sum(dropped.values())``.

    Attributes:
        recorded: valid ``record()`` calls (coalesced and dropped ones included).
        coalesced: calls not sent because Per already counts the key in this window:
            repeats suppressed by ``record()``, and queued copies acknowledged without a
            request because a copy of the same key was delivered.
        enqueued: activities written to the disk queue.
        delivered: activities Per acknowledged (by this process's delivery).
        retried: entries given back for a later attempt.
        dead_lettered: activities moved to the dead letters by this process.
        dropped: reason -> count of activities lost on purpose or by a fault, e.g.
            ``closed`` (record() after close), ``queue_full``, ``memory_full``,
            ``unwritten_at_close``, ``queue:evicted_oldest``, ``quarantined``.
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
        failures: failed delivery attempts by error class (``rate_limited``,
            ``server_error``, ``network_error``, ``not_per_response``,
            ``refused_by_per``, ``auth``, ``too_large``).
        attempts: delivery requests sent by this process.
        flow: the flow controller's state (in-flight limit, learned rate, success ratio
            over the last minute, probing), None before delivery started here.
        commit_lag: seconds the oldest activity in memory has waited for the disk.
        commit_lag_max: the longest such wait seen when a batch reached the disk.
        quarantined_entries: entries of this directory's databases moved aside as
            unreadable, ever (see ``per-buffer salvage``).
        delivery: ``"thread"``, ``"process"`` or ``"external"`` (who delivers).
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
    failures: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    attempts: int = 0
    flow: FlowState | None = None
    commit_lag: float = 0.0
    commit_lag_max: float = 0.0
    quarantined_entries: int = 0
    delivery: str = "thread"
