"""A fast, real Per-compatible HTTP server for tests, benchmarks and demos.

:class:`PerServer` listens on loopback and speaks enough HTTP/1.1 (keep-alive,
pipelining, ``Connection: close``) to stand in for ``https://api.useper.com``:
``GET /activities.add`` and ``GET /reports.get`` behave as Per documents them
(see the project's notes on the API), and every failure a real deployment can
show is injectable on demand: 503 pages, 429 with or without ``Retry-After``,
``ok: false``, 401, any status with an HTML, empty, text or Per-shaped body (for
N requests, a fraction of them, or S seconds), hanging requests, dropped
connections, full outages (connection refused), a token-bucket rate limit with an
exact ``Retry-After``, latency spikes, chunked or close-delimited framing and a
server clock that differs from the host's. It runs its own asyncio event loop in
a daemon thread and uses the standard library only::

    from per_buffer.testing import PerServer

    with PerServer() as server:
        client = PerClient(server.activity_token, base_url=server.url)
        client.add_activity("acme", "u1", "login")
        assert server.wait_for_activities(1, timeout=5)
        server.inject("503", count=2)          # the next two requests fail

Run it as its own process with ``python -m per_buffer.testing`` (see
:func:`main`); :class:`PerServerProcess` starts such a process and drives it
through its control port, which keeps answering during an :meth:`PerServer.outage`.

Layout: ``_server`` holds the server and its protocol, ``_process`` the child
process and the command line (it imports ``_server``, never the reverse),
``pytest_plugin`` the ``per_server`` and ``per_recorder`` fixtures.
"""

from ._process import PerServerProcess, main
from ._server import (
    DEFAULT_ACTIVITY_TOKEN,
    DEFAULT_REPORTING_TOKEN,
    FAULT_KINDS,
    PerServer,
    ReceivedActivity,
)

__all__ = [
    "DEFAULT_ACTIVITY_TOKEN",
    "DEFAULT_REPORTING_TOKEN",
    "FAULT_KINDS",
    "PerServer",
    "PerServerProcess",
    "ReceivedActivity",
    "main",
]
