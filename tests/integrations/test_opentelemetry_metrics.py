"""The OpenTelemetry instruments, read through the SDK's InMemoryMetricReader."""

from __future__ import annotations

from typing import Any

import pytest
from integration_helpers import readme_example, require

import per_buffer
from per_buffer import Recorder
from per_buffer.integrations.opentelemetry import instrument
from per_buffer.metrics import METRICS, Metric
from per_buffer.testing import PerServer

require("opentelemetry.sdk")
from opentelemetry import metrics  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402

FUTURE = Metric(
    "future_lag", "per_buffer_future_lag_seconds", "per_buffer.future.lag", "gauge", "s", "Lag."
)  # a stats field that does not exist (yet)


def otel_metrics(reader: Any) -> dict[str, Any]:
    data = reader.get_metrics_data()
    return {
        m.name: m
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for m in scope.metrics
    }


def test_opentelemetry_instruments_read_stats(busy: Recorder) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        created = instrument(provider.get_meter("test"), busy, metrics=(*METRICS, FUTURE))
        assert len(created) == len(METRICS) + 1
        busy.close()
        busy.record("acme-corp", "late")  # dropped: closed
        found = otel_metrics(reader)
        assert "per_buffer.future.lag" not in found  # a field the stats lack: no points
        for metric in METRICS:
            assert found[metric.opentelemetry].unit == metric.unit
            assert found[metric.opentelemetry].description == metric.help
        delivered = found["per_buffer.activities.delivered"].data
        assert delivered.is_monotonic and [p.value for p in delivered.data_points] == [2]
        dropped = found["per_buffer.activities.dropped"].data.data_points
        assert [(dict(p.attributes), p.value) for p in dropped] == [({"reason": "closed"}, 1)]
        paused = found["per_buffer.delivery.paused"].data.data_points
        assert sorted((p.attributes["reason"], p.value) for p in paused) == [
            ("auth", 0),
            ("rate_limited", 0),
        ]
        age = found["per_buffer.queue.oldest_pending_age"]
        assert age.unit == "s" and [p.value for p in age.data.data_points] == [0]
    finally:
        provider.shutdown()


@pytest.mark.usefixtures("per_env")
def test_the_readme_opentelemetry_example(
    server: PerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PER_ACTIVITY_TYPE_ID", "login")
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics.set_meter_provider(provider)  # the "OpenTelemetry set-up" the example assumes
    try:
        exec(readme_example("metrics", "from opentelemetry import metrics"), {})
        per_buffer.record("acme-corp", "readme")
        assert per_buffer.flush(timeout=10)
        found = otel_metrics(reader)
        points = found["per_buffer.activities.delivered"].data.data_points
        assert [p.value for p in points] == [1]
    finally:
        provider.shutdown()
        per_buffer.shutdown(timeout=5)
