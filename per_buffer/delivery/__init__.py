"""Delivery: the worker that drains the durable queue to Per.

:class:`DeliveryWorker` keeps the mechanics (claims, sends, acknowledgements); the
policies live apart: :mod:`per_buffer.flow`, :mod:`per_buffer.outcomes`,
:mod:`per_buffer.backoff`. :class:`DeliverySettings` is the frozen slice of the
recorder's settings it runs with; :class:`DeliveryFailure` is what ``on_error``
receives.
"""

from ._report import DeliveryFailure, DeliveryStats
from ._settings import DeliverySettings
from ._worker import DeliveryWorker, Feedback

__all__ = ["DeliveryFailure", "DeliverySettings", "DeliveryStats", "DeliveryWorker", "Feedback"]
