"""OpenTelemetry: ``stats()`` as observable instruments on a Meter.

::

    from per_buffer.integrations.opentelemetry import instrument

    instrument()  # on the global MeterProvider's meter "per_buffer"

Names, units and descriptions come from :data:`per_buffer.metrics.METRICS`: counters
become observable counters, the rest observable gauges. ``opentelemetry-api`` is imported
when :func:`instrument` is called.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .._version import __version__
from ..metrics import METRICS, Metric, points
from ..recorder import Recorder, get_recorder

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Instrument, Meter, Observation

__all__ = ["instrument"]

logger = logging.getLogger("per_buffer.integrations.opentelemetry")


def instrument(
    meter: Meter | None = None,
    recorder: Recorder | None = None,
    *,
    metrics: tuple[Metric, ...] = METRICS,
) -> list[Instrument]:
    """Create one observable instrument per row of ``metrics``, reading ``stats()``.

    Call it once per meter (instrument names must be unique in a meter). Each collection
    reads ``stats()`` once per instrument; a failing ``stats()`` is logged and observes
    nothing.

    Args:
        meter: where to create them; None means ``metrics.get_meter("per_buffer")`` of the
            global MeterProvider.
        recorder: the recorder to observe; None means the default one (built from the
            environment at the first collection if nothing has recorded yet).
        metrics: the rows to export (default: all of :data:`~per_buffer.metrics.METRICS`).

    Returns:
        The instruments created.
    """
    from opentelemetry import metrics as otel  # noqa: PLC0415

    if meter is None:
        meter = otel.get_meter("per_buffer", __version__)
    created: list[Instrument] = []
    for metric in metrics:
        callback = _callback(metric, recorder)
        create = (
            meter.create_observable_counter
            if metric.kind == "counter"
            else meter.create_observable_gauge
        )
        created.append(
            create(metric.opentelemetry, [callback], unit=metric.unit, description=metric.help)
        )
    return created


def _callback(
    metric: Metric, recorder: Recorder | None
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation  # noqa: PLC0415

        try:
            stats = (recorder if recorder is not None else get_recorder()).stats()
        except Exception:
            logger.exception(
                "per_buffer: stats() failed; %s observes nothing", metric.opentelemetry
            )
            return []
        found = points(stats, metric) or []
        return [Observation(point.value, dict(point.labels)) for point in found]

    return observe
