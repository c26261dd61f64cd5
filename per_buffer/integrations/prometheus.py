"""Prometheus: a ``prometheus_client`` collector exporting ``stats()`` at every scrape.

::

    from prometheus_client import REGISTRY
    from per_buffer.integrations.prometheus import PerBufferCollector

    REGISTRY.register(PerBufferCollector())

Names, types and help come from :data:`per_buffer.metrics.METRICS`. ``prometheus_client``
is imported at the first scrape (or ``describe``), not with this module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import fields
from typing import TYPE_CHECKING

from ..metrics import METRICS, Metric, rows
from ..recorder import Recorder, RecorderStats, get_recorder

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    Family = CounterMetricFamily | GaugeMetricFamily

__all__ = ["PerBufferCollector"]

logger = logging.getLogger("per_buffer.integrations.prometheus")


class PerBufferCollector:
    """Exports a recorder's ``stats()`` to Prometheus (a ``prometheus_client`` collector).

    Register one per registry. A failing ``stats()`` is logged and the scrape goes on
    without these metrics.

    Args:
        recorder: the recorder to export; None means the default one (built from the
            environment at the first scrape if nothing has recorded yet).
        metrics: the rows to export (default: all of :data:`~per_buffer.metrics.METRICS`).
    """

    def __init__(
        self, recorder: Recorder | None = None, *, metrics: tuple[Metric, ...] = METRICS
    ) -> None:
        self.recorder = recorder
        self.metrics = metrics

    def describe(self) -> Iterator[Family]:
        """The metric families without samples (rows whose field RecorderStats has)."""
        known = {f.name for f in fields(RecorderStats)}
        for metric in self.metrics:
            if metric.field in known:
                yield _family(metric)

    def collect(self) -> Iterator[Family]:
        """The metric families with the current samples."""
        try:
            recorder = self.recorder if self.recorder is not None else get_recorder()
            stats = recorder.stats()
        except Exception:
            logger.exception("per_buffer: stats() failed; the scrape has no per_buffer metrics")
            return
        for metric, points in rows(stats, self.metrics):
            family = _family(metric)
            for point in points:
                family.add_metric(list(point.labels.values()), point.value)
            yield family


def _family(metric: Metric) -> Family:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415

    labels = [] if metric.label is None else [metric.label]
    kind = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
    return kind(metric.prometheus, metric.help, labels=labels, unit=metric.prometheus_unit)
