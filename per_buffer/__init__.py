"""per_buffer: durable, non-blocking usage reporting to the Per metering API.

Two layers:

* :class:`PerClient` / :class:`AsyncPerClient`: one request per call, typed errors;
* :class:`Recorder` and the module-level :func:`record`: a durable disk queue
  drained to Per by a background worker, so hot paths never wait on the network.

Quick start::

    import per_buffer
    per_buffer.record("acme-corp", "user-42")   # reads PER_ACTIVITY_TOKEN, PER_ACTIVITY_TYPE_ID
"""

import logging as _logging

from ._version import __version__
from .client import AsyncPerClient, PerClient
from .config import RecorderConfig
from .delivery import DeliveryFailure
from .errors import (
    ConfigurationError,
    PerAPIError,
    PerAuthError,
    PerError,
    PerRateLimitError,
    PerRequestTooLargeError,
    PerTransportError,
    QueueError,
)
from .models import MAX_ID_LENGTH, Activity, Report, ReportRow
from .recorder import (
    Recorder,
    RecorderStats,
    configure,
    flush,
    get_recorder,
    record,
    shutdown,
)

# A library adds no handler of its own: the application decides where logs go.
_logging.getLogger("per_buffer").addHandler(_logging.NullHandler())

__all__ = [
    "MAX_ID_LENGTH",
    "Activity",
    "AsyncPerClient",
    "ConfigurationError",
    "DeliveryFailure",
    "PerAPIError",
    "PerAuthError",
    "PerClient",
    "PerError",
    "PerRateLimitError",
    "PerRequestTooLargeError",
    "PerTransportError",
    "QueueError",
    "Recorder",
    "RecorderConfig",
    "RecorderStats",
    "Report",
    "ReportRow",
    "__version__",
    "configure",
    "flush",
    "get_recorder",
    "record",
    "shutdown",
]
