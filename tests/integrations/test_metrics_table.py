"""The metric table: every stats field exported (or deliberately not), names by convention."""

from __future__ import annotations

import re
from dataclasses import fields, replace

from integration_helpers import CALM, readme_region

from per_buffer import RecorderStats
from per_buffer.metrics import METRICS, NOT_EXPORTED, Metric, Point, points, rows


def metrics_table() -> str:
    """The README's table of metric names, from METRICS."""
    lines = [
        "| `stats()` field | Prometheus | type | OpenTelemetry | unit | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for m in METRICS:
        label = f"{{{m.label}}}" if m.label else ""
        lines.append(
            f"| `{m.field}` | `{m.prometheus}{label}` | {m.kind} | `{m.opentelemetry}` "
            f"| `{m.unit}` | {m.help} |"
        )
    return "\n".join(lines)


def test_the_readme_lists_every_metric() -> None:
    assert metrics_table() in readme_region("metrics")


def test_every_stats_field_is_exported_or_deliberately_not() -> None:
    # a new RecorderStats field needs one row in per_buffer.metrics.METRICS (or NOT_EXPORTED)
    names = {f.name for f in fields(RecorderStats)}
    exported = {m.field for m in METRICS}
    assert names - exported - NOT_EXPORTED == set()
    assert not exported & NOT_EXPORTED


def test_names_follow_each_ecosystem() -> None:
    prometheus = [m.prometheus for m in METRICS]
    otel = [m.opentelemetry for m in METRICS]
    assert len(set(prometheus)) == len(prometheus) and len(set(otel)) == len(otel)
    for m in METRICS:
        assert re.fullmatch(r"per_buffer_[a-z_]+", m.prometheus), m
        assert m.prometheus.endswith("_total") == (m.kind == "counter"), m
        base = m.prometheus.removesuffix("_total")
        assert m.prometheus_unit == "" or base.endswith("_" + m.prometheus_unit), m
        assert re.fullmatch(r"per_buffer(\.[a-z_]+)+", m.opentelemetry), m
        assert not m.opentelemetry.endswith(("_total", "_seconds", "_bytes")), m
        assert (m.help and m.help[0].isupper()) or m.help[0].isdigit(), m


def test_points_of_each_kind_of_value() -> None:
    stats = replace(
        CALM,
        recorded=3,
        coalesced=1,
        enqueued=2,
        delivered=2,
        dropped={"closed": 4, "queue_full": 1},
        pause_reason="rate_limited",
    )
    found = {m.field: p for m, p in rows(stats)}
    assert found["recorded"] == [Point({}, 3.0)]
    assert found["oldest_pending_age"] == [Point({}, 0.0)]  # None: nothing pending
    assert found["dropped"] == [
        Point({"reason": "closed"}, 4.0),
        Point({"reason": "queue_full"}, 1.0),
    ]
    assert found["pause_reason"] == [
        Point({"reason": "auth"}, 0.0),
        Point({"reason": "rate_limited"}, 1.0),
    ]
    assert "last_error" not in found


def test_a_field_the_stats_lack_is_skipped_not_an_error() -> None:
    stats = RecorderStats(0, 0, 0, 0, 0, 0, {}, 0, 0, None, None, None, None)
    future = Metric("future_lag", "per_buffer_future_lag_seconds", "per_buffer.future.lag",
                    "gauge", "s", "A field RecorderStats does not have.")  # fmt: skip
    assert points(stats, future) is None
    assert [m.field for m, _ in rows(stats, (*METRICS, future))] == [m.field for m in METRICS]
    # a value of an unexpected type (text where a number belongs) is skipped too
    text = Metric("last_error", "per_buffer_x", "per_buffer.x", "gauge", "1", "X.")
    assert points(stats, text) == [Point({}, 0.0)]  # None reads 0
    assert points(RecorderStats(0, 0, 0, 0, 0, 0, {}, 0, 0, None, None, None, "boom"), text) is None


def test_a_new_state_value_is_exported_beside_the_known_ones() -> None:
    stats = RecorderStats(0, 0, 0, 0, 0, 0, {}, 0, 0, None, None, "maintenance", None)
    paused = next(m for m in METRICS if m.field == "pause_reason")
    assert points(stats, paused) == [
        Point({"reason": "auth"}, 0.0),
        Point({"reason": "rate_limited"}, 0.0),
        Point({"reason": "maintenance"}, 1.0),
    ]
