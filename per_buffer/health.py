"""Is delivery keeping up? A verdict on one :class:`~per_buffer.RecorderStats` snapshot.

:func:`health` is a pure function of the snapshot (and optionally the previous one, to
count what happened since the last check), for a readiness or liveness endpoint or an
alert. ``failing`` means activities are at risk or piling up with no end in sight;
``degraded`` means delivery is slowed or something was lost, but it goes on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .stats import RecorderStats

__all__ = ["Health", "HealthStatus", "health"]

HealthStatus = Literal["ok", "degraded", "failing"]


@dataclass(frozen=True)
class Health:
    """The verdict and the figures behind it.

    Attributes:
        ok: False only when ``status`` is ``"failing"``.
        status: ``"ok"``, ``"degraded"`` or ``"failing"``.
        reasons: one sentence per problem found (empty when ``ok``), worst first.
        pending: activities waiting for delivery (on disk or in memory).
        in_flight: activities being sent.
        oldest_pending_age: seconds the oldest undelivered activity has waited, or None.
        max_pending_age: the limit it was compared with.
        pause_reason: why delivery is paused (``"auth"``, ``"rate_limited"``), or None.
        paused_until: unix time delivery resumes, or None.
        buffered: activities in memory, not yet on disk.
        queue_errors: disk queue failures since the previous snapshot (or ever, without one).
        dropped: activities dropped since the previous snapshot (or ever), by reason.
        dead_lettered: activities dead-lettered since the previous snapshot (or ever).
    """

    ok: bool
    status: HealthStatus
    reasons: tuple[str, ...]
    pending: int
    in_flight: int
    oldest_pending_age: float | None
    max_pending_age: float
    pause_reason: str | None
    paused_until: float | None
    buffered: int
    queue_errors: int
    dropped: Mapping[str, int]
    dead_lettered: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (lists and dicts)."""
        data = asdict(self)
        data["reasons"] = list(self.reasons)
        data["dropped"] = dict(self.dropped)
        return data


def health(
    stats: RecorderStats,
    *,
    max_pending_age: float = 300.0,
    previous: RecorderStats | None = None,
) -> Health:
    """Say whether delivery keeps up, from one stats snapshot.

    Failing:
        delivery is paused because Per refused the token (nothing will be delivered until
        it is fixed); the oldest undelivered activity is older than ``max_pending_age``
        seconds (Per is down or delivery cannot keep up; Per counts activities when they
        arrive, so late ones land in a later period); the disk queue failed since the
        previous snapshot and activities wait in memory (a crash would lose them).
    Degraded:
        delivery is paused for another reason (Per's rate limit); the disk queue failed
        but nothing waits in memory; activities were dropped or dead-lettered.

    Args:
        stats: the snapshot to judge (``recorder.stats()``).
        max_pending_age: seconds an activity may wait undelivered.
        previous: the snapshot of the previous check: drops, dead letters and queue
            errors count since then. Without it they count since the recorder started.

    Raises:
        TypeError: ``stats`` or ``previous`` is not a RecorderStats.
        ValueError: ``max_pending_age`` is not a positive number of seconds.
    """
    _check_arguments(stats, max_pending_age, previous)
    queue_errors = _since(stats.queue_errors, previous.queue_errors if previous else 0)
    dead = _since(stats.dead_lettered, previous.dead_lettered if previous else 0)
    dropped = _dropped_since(stats, previous)
    failing, degraded = _reasons(stats, max_pending_age, queue_errors, dropped, dead)
    status: HealthStatus = "failing" if failing else "degraded" if degraded else "ok"
    return Health(
        ok=status != "failing",
        status=status,
        reasons=(*failing, *degraded),
        pending=stats.pending,
        in_flight=stats.in_flight,
        oldest_pending_age=stats.oldest_pending_age,
        max_pending_age=float(max_pending_age),
        pause_reason=stats.pause_reason,
        paused_until=stats.paused_until,
        buffered=stats.buffered,
        queue_errors=queue_errors,
        dropped=dropped,
        dead_lettered=dead,
    )


def _check_arguments(
    stats: RecorderStats, max_pending_age: float, previous: RecorderStats | None
) -> None:
    """Raise the TypeError or ValueError :func:`health` documents for bad arguments."""
    if not isinstance(stats, RecorderStats):
        raise TypeError(f"stats must be a RecorderStats, not {type(stats).__name__}")
    if previous is not None and not isinstance(previous, RecorderStats):
        raise TypeError(f"previous must be a RecorderStats or None, not {type(previous).__name__}")
    if (
        isinstance(max_pending_age, bool)
        or not isinstance(max_pending_age, int | float)
        or not math.isfinite(max_pending_age)
        or max_pending_age <= 0
    ):
        raise ValueError(
            f"max_pending_age must be a positive number of seconds, not {max_pending_age!r}"
        )


def _dropped_since(stats: RecorderStats, previous: RecorderStats | None) -> dict[str, int]:
    """Activities dropped since ``previous`` (or ever), by reason; reasons with none left out."""
    before = previous.dropped if previous else {}
    return {
        reason: n
        for reason, count in stats.dropped.items()
        if (n := _since(count, before.get(reason, 0)))
    }


def _reasons(
    stats: RecorderStats,
    max_pending_age: float,
    queue_errors: int,
    dropped: Mapping[str, int],
    dead: int,
) -> tuple[list[str], list[str]]:
    """``(failing, degraded)``: one sentence per problem, in the order :func:`health` lists."""
    failing: list[str] = []
    degraded: list[str] = []
    reason = stats.pause_reason
    if reason == "auth":
        failing.append("delivery is paused: Per refused the token (check PER_ACTIVITY_TOKEN)")
    elif reason is not None:
        degraded.append(f"delivery is paused ({reason})")
    age = stats.oldest_pending_age
    if age is not None and age > max_pending_age:
        failing.append(
            f"the oldest undelivered activity has waited {age:.0f} s (limit {max_pending_age:g} s)"
        )
    if queue_errors and stats.buffered:
        failing.append(
            f"the disk queue failed {queue_errors} times; "
            f"{stats.buffered} activities wait in memory"
        )
    elif queue_errors:
        degraded.append(f"the disk queue failed {queue_errors} times")
    if dropped:
        total = sum(dropped.values())
        by_reason = ", ".join(f"{r}={n}" for r, n in sorted(dropped.items()))
        degraded.append(f"{total} activities dropped ({by_reason})")
    if dead:
        degraded.append(f"{dead} activities dead-lettered (Per refused them)")
    return failing, degraded


def _since(now: int, before: int) -> int:
    """Growth of a counter since ``before``; a smaller value means a new recorder (a reset)."""
    return now - before if now >= before else now
