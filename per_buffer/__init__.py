"""per_buffer: durable, non-blocking usage reporting to the Per metering API."""

from ._version import __version__
from .errors import (
    PerAPIError,
    PerAuthError,
    PerError,
    PerRateLimitError,
    PerTransportError,
    QueueError,
)
from .models import MAX_ID_LENGTH, Activity, Report, ReportRow

__all__ = [
    "MAX_ID_LENGTH",
    "Activity",
    "PerAPIError",
    "PerAuthError",
    "PerError",
    "PerRateLimitError",
    "PerTransportError",
    "QueueError",
    "Report",
    "ReportRow",
    "__version__",
]
