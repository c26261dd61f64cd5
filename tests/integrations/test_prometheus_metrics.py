"""The Prometheus collector, scraped from a real prometheus_client registry and parsed back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from integration_helpers import readme_example, refused_recorder, require

import per_buffer
from per_buffer import Recorder
from per_buffer.integrations.prometheus import PerBufferCollector
from per_buffer.metrics import METRICS, Metric
from per_buffer.testing import PerServer

prometheus_client = require("prometheus_client")
from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

FUTURE = Metric(
    "future_lag", "per_buffer_future_lag_seconds", "per_buffer.future.lag", "gauge", "s", "Lag."
)  # a stats field that does not exist (yet)


def scrape(registry: Any) -> dict[str, Any]:
    """Families by name, parsed by prometheus_client's own parser from the exposition text."""
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    family = families[name.removesuffix("_total")]
    values = [s.value for s in family.samples if s.name == name and s.labels == labels]
    assert len(values) == 1, (name, labels, family.samples)
    return float(values[0])


def test_prometheus_scrape_has_every_metric_with_its_value(busy: Recorder) -> None:
    registry = prometheus_client.CollectorRegistry()
    registry.register(PerBufferCollector(busy))
    families = scrape(registry)
    for metric in METRICS:
        family = families[metric.prometheus.removesuffix("_total")]
        assert family.type == metric.kind and family.documentation == metric.help
    assert sample(families, "per_buffer_activities_recorded_total") == 3
    assert sample(families, "per_buffer_activities_coalesced_total") == 1
    assert sample(families, "per_buffer_activities_delivered_total") == 2
    assert sample(families, "per_buffer_queue_pending") == 0
    assert sample(families, "per_buffer_oldest_pending_age_seconds") == 0
    assert sample(families, "per_buffer_queue_bytes") > 0
    assert sample(families, "per_buffer_paused", reason="auth") == 0
    assert sample(families, "per_buffer_paused", reason="rate_limited") == 0
    busy.close()
    busy.record("acme-corp", "u3")  # after close: dropped, reason "closed"
    families = scrape(registry)
    assert sample(families, "per_buffer_activities_dropped_total", reason="closed") == 1
    # a call after close counts as recorded and as dropped: the counters still add up
    assert sample(families, "per_buffer_activities_recorded_total") == 4


def test_prometheus_pause_reason_and_units_in_openmetrics(tmp_path: Path) -> None:
    with refused_recorder(tmp_path) as rec:
        registry = prometheus_client.CollectorRegistry()
        registry.register(PerBufferCollector(rec))
        families = scrape(registry)
        assert sample(families, "per_buffer_paused", reason="auth") == 1
        assert sample(families, "per_buffer_paused", reason="rate_limited") == 0
        assert sample(families, "per_buffer_paused_until_timestamp_seconds") > time.time()
        assert sample(families, "per_buffer_queue_pending") == 1
        text = openmetrics(registry).decode()
        assert "# UNIT per_buffer_oldest_pending_age_seconds seconds" in text
        assert "# UNIT per_buffer_queue_bytes bytes" in text


def test_prometheus_skips_a_row_the_stats_lack_and_survives_a_failing_recorder(
    busy: Recorder, tmp_path: Path, per_logs: pytest.LogCaptureFixture
) -> None:
    registry = prometheus_client.CollectorRegistry(auto_describe=True)
    registry.register(PerBufferCollector(busy, metrics=(*METRICS, FUTURE)))
    families = scrape(registry)
    assert "per_buffer_future_lag_seconds" not in families
    assert sample(families, "per_buffer_activities_delivered_total") == 2

    class Broken:
        def stats(self) -> None:
            raise RuntimeError("stats broke")

    other = prometheus_client.CollectorRegistry()
    other.register(PerBufferCollector(Broken()))  # type: ignore[arg-type]
    assert not any(name.startswith("per_buffer") for name in scrape(other))
    assert any("stats() failed" in r.getMessage() for r in per_logs.records)


@pytest.mark.usefixtures("per_env")
def test_the_readme_prometheus_example(server: PerServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PER_ACTIVITY_TYPE_ID", "login")
    code = readme_example("metrics", "from prometheus_client import REGISTRY")
    code = code.replace("start_http_server(9464)", "port = start_http_server(0)")
    namespace: dict[str, Any] = {}
    collector = None
    try:
        exec(code, namespace)
        collector = next(
            c
            for c in list(prometheus_client.REGISTRY._collector_to_names)
            if type(c).__name__ == "PerBufferCollector"
        )
        per_buffer.record("acme-corp", "readme")
        assert per_buffer.flush(timeout=10)
        http_server, _thread = namespace["port"]
        url = f"http://127.0.0.1:{http_server.server_port}/metrics"
        body = httpx.get(url, trust_env=False).text
        assert "per_buffer_activities_delivered_total 1.0" in body
    finally:
        if collector is not None:
            prometheus_client.REGISTRY.unregister(collector)
        if "port" in namespace:
            namespace["port"][0].shutdown()
        per_buffer.shutdown(timeout=5)
