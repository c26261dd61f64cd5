"""``stats()`` as metrics: one declarative table, read by every exporter.

Each row of :data:`METRICS` maps one :class:`~per_buffer.RecorderStats` field to a
Prometheus name (``_total`` for counters, the unit in the name) and an OpenTelemetry name
(dotted, the unit apart, as UCUM). A new stats field is one new row. A row whose field the
stats do not have (yet) is skipped, never an error.

A field's value may be a number (one sample), None (0: nothing pending, not paused), a
mapping (one sample per key, the key in the row's ``label``) or a string naming a state
(``1`` for the current one and ``0`` for the row's other known ``states``).

The exporters: :mod:`per_buffer.integrations.prometheus` and
:mod:`per_buffer.integrations.opentelemetry`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["METRICS", "NOT_EXPORTED", "Metric", "Point", "points", "rows"]

logger = logging.getLogger("per_buffer.metrics")

MetricKind = Literal["counter", "gauge"]

_MISSING = object()

#: Prometheus unit suffixes of the UCUM units used in :data:`METRICS`.
PROMETHEUS_UNITS = {"s": "seconds", "By": "bytes"}


@dataclass(frozen=True)
class Metric:
    """One exported stats field.

    Attributes:
        field: the :class:`~per_buffer.RecorderStats` attribute (``flow.limit``: an
            attribute of one; None while the record is None, exported as 0).
        prometheus: the Prometheus name (``_total`` for a counter; unit suffix included).
        opentelemetry: the OpenTelemetry instrument name.
        kind: ``"counter"`` (monotonic for one recorder) or ``"gauge"``.
        unit: the UCUM unit (``"s"``, ``"By"``, ``"{activity}"``, ``"1"``).
        help: one line describing it.
        label: the label (attribute) name for a mapping or state field; else None.
        states: a state field's known values, exported as 0 while not current.
    """

    field: str
    prometheus: str
    opentelemetry: str
    kind: MetricKind
    unit: str
    help: str
    label: str | None = None
    states: tuple[str, ...] = ()

    @property
    def prometheus_unit(self) -> str:
        """The unit suffix of the Prometheus name (``"seconds"``, ``"bytes"``) or ``""``."""
        return PROMETHEUS_UNITS.get(self.unit, "")


_ACT = "{activity}"

#: Every exported field. Keep in step with RecorderStats (a test checks it).
# fmt: off
METRICS: tuple[Metric, ...] = (
    Metric("recorded", "per_buffer_activities_recorded_total", "per_buffer.activities.recorded", "counter", _ACT, "Valid record() calls accepted, coalesced ones included."),  # noqa: E501
    Metric("coalesced", "per_buffer_activities_coalesced_total", "per_buffer.activities.coalesced", "counter", _ACT, "Calls not sent: their key was already sent in the coalescing window."),  # noqa: E501
    Metric("enqueued", "per_buffer_activities_enqueued_total", "per_buffer.activities.enqueued", "counter", _ACT, "Activities written to the disk queue."),  # noqa: E501
    Metric("delivered", "per_buffer_activities_delivered_total", "per_buffer.activities.delivered", "counter", _ACT, "Activities Per accepted (this process's worker)."),  # noqa: E501
    Metric("retried", "per_buffer_activities_retried_total", "per_buffer.activities.retried", "counter", "{attempt}", "Failed delivery attempts that will be retried."),  # noqa: E501
    Metric("dead_lettered", "per_buffer_activities_dead_lettered_total", "per_buffer.activities.dead_lettered", "counter", _ACT, "Activities Per refused for good, moved to the dead letters."),  # noqa: E501
    Metric("dropped", "per_buffer_activities_dropped_total", "per_buffer.activities.dropped", "counter", _ACT, "Activities lost on purpose, by reason (queue_full, memory_full, closed, ...).", label="reason"),  # noqa: E501
    Metric("late_deliveries", "per_buffer_activities_delivered_late_total", "per_buffer.activities.delivered_late", "counter", _ACT, "Deliveries that landed in a later window than their record()."),  # noqa: E501
    Metric("queue_errors", "per_buffer_queue_errors_total", "per_buffer.queue.errors", "counter", "{error}", "Disk queue failures seen by this process."),  # noqa: E501
    Metric("pending", "per_buffer_queue_pending", "per_buffer.queue.pending", "gauge", _ACT, "Activities waiting for delivery, on disk or in memory."),  # noqa: E501
    Metric("in_flight", "per_buffer_queue_in_flight", "per_buffer.queue.in_flight", "gauge", _ACT, "Activities leased by a sender (any process on the directory)."),  # noqa: E501
    Metric("buffered", "per_buffer_memory_buffered", "per_buffer.memory.buffered", "gauge", _ACT, "Activities in memory, not yet on disk (part of pending)."),  # noqa: E501
    Metric("dead_letters", "per_buffer_queue_dead_letters", "per_buffer.queue.dead_letters", "gauge", _ACT, "Dead letters stored in the queue directory."),  # noqa: E501
    Metric("oldest_pending_age", "per_buffer_oldest_pending_age_seconds", "per_buffer.queue.oldest_pending_age", "gauge", "s", "Age of the oldest undelivered activity (0 when none)."),  # noqa: E501
    Metric("bytes_on_disk", "per_buffer_queue_bytes", "per_buffer.queue.size", "gauge", "By", "Size of the queue database."),  # noqa: E501
    Metric("pause_reason", "per_buffer_paused", "per_buffer.delivery.paused", "gauge", "1", "1 while delivery is paused for this reason (auth: token refused).", label="reason", states=("auth", "rate_limited")),  # noqa: E501
    Metric("paused_until", "per_buffer_paused_until_timestamp_seconds", "per_buffer.delivery.paused_until", "gauge", "s", "Unix time delivery resumes while paused (0 when not paused)."),  # noqa: E501
    Metric("attempts", "per_buffer_delivery_attempts_total", "per_buffer.delivery.attempts", "counter", "{request}", "Delivery requests sent."),  # noqa: E501
    Metric("failures", "per_buffer_delivery_failures_total", "per_buffer.delivery.failures", "counter", "{request}", "Failed delivery attempts, by error class.", label="class"),  # noqa: E501
    Metric("flow.limit", "per_buffer_delivery_in_flight_limit", "per_buffer.delivery.in_flight_limit", "gauge", "{request}", "Requests the flow controller allows in flight now."),  # noqa: E501
    Metric("flow.rate", "per_buffer_delivery_rate_limit", "per_buffer.delivery.rate_limit", "gauge", "{request}/s", "Learned requests/s after a 429 (0 when no limit is known)."),  # noqa: E501
    Metric("flow.success_ratio", "per_buffer_delivery_success_ratio", "per_buffer.delivery.success_ratio", "gauge", "1", "Share of attempts Per answered over the last minute."),  # noqa: E501
    Metric("flow.probing", "per_buffer_delivery_probing", "per_buffer.delivery.probing", "gauge", "1", "1 while Per fails (nearly) everything: one request at a time."),  # noqa: E501
    Metric("commit_lag", "per_buffer_commit_lag_seconds", "per_buffer.commit.lag", "gauge", "s", "How long the oldest activity in memory has waited for the disk."),  # noqa: E501
    Metric("commit_lag_max", "per_buffer_commit_lag_max_seconds", "per_buffer.commit.lag_max", "gauge", "s", "The longest wait for the disk seen so far."),  # noqa: E501
    Metric("quarantined_entries", "per_buffer_activities_quarantined_total", "per_buffer.activities.quarantined", "counter", _ACT, "Entries of databases moved aside as unreadable (see per-buffer salvage)."),  # noqa: E501
    Metric("delivery", "per_buffer_delivery_mode", "per_buffer.delivery.mode", "gauge", "1", "1 for who delivers: a drainer process, a thread, or an external drainer.", label="mode", states=("process", "thread", "external")),  # noqa: E501
)
# fmt: on

#: RecorderStats fields deliberately left out of :data:`METRICS`: text, or a record
#: whose parts are rows of their own (``flow.limit``, ...).
NOT_EXPORTED: frozenset[str] = frozenset({"last_error", "flow"})


@dataclass(frozen=True)
class Point:
    """One sample: its labels (empty, or the row's ``label``) and its value."""

    labels: Mapping[str, str]
    value: float


def points(stats: object, metric: Metric) -> list[Point] | None:
    """The samples of ``metric`` in ``stats``; None when the field is absent or unusable.

    Never raises: a field the stats lack, or a value of an unexpected type, is skipped
    (logged at DEBUG).
    """
    value: object = stats
    for part in metric.field.split("."):  # "flow.limit": a part of a record field
        value = getattr(value, part, _MISSING) if value is not None else None
        if value is _MISSING:
            return None
    label = metric.label
    if label is not None and (value is None or isinstance(value, str)):
        states = dict.fromkeys(metric.states)
        if value is not None:
            states[value] = None
        return [Point({label: state}, 1.0 if state == value else 0.0) for state in states]
    if label is not None and isinstance(value, Mapping):
        try:
            return [Point({label: str(key)}, float(count)) for key, count in value.items()]
        except (TypeError, ValueError):
            pass
    elif value is None:
        return [Point({}, 0.0)]
    elif isinstance(value, int | float):
        return [Point({}, float(value))]
    logger.debug(
        "per_buffer: stats field %s=%r is not exportable as %s", metric.field, value, metric
    )
    return None


def rows(
    stats: object, metrics: tuple[Metric, ...] = METRICS
) -> Iterator[tuple[Metric, list[Point]]]:
    """Every exportable row of ``metrics`` with its samples in ``stats``."""
    for metric in metrics:
        found = points(stats, metric)
        if found is not None:
            yield metric, found
