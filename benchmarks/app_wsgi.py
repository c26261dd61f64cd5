"""The ``app`` benchmark's minimal WSGI app (gunicorn, sync workers).

``/r`` draws a user and records it with ``per_buffer.record()``; ``/p`` does the same work
without recording; ``/s`` answers this process's recorder figures. Settings come from the
environment (``PER_*`` for per_buffer, ``PER_BENCH_APP_*`` for the work, see
:mod:`benchmarks._app_work`); the recorder is closed by the gunicorn hooks of the
configuration the benchmark writes (``per_buffer.integrations.gunicorn.hooks``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from benchmarks._app_work import Work

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["app"]

work = Work()
_OK = [b"ok"]
_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", "2")]


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI entry point."""
    path = environ.get("PATH_INFO", "")
    if path == "/r":
        work.handle(True)
    elif path == "/p":
        work.handle(False)
    elif path == "/s":
        body = work.stats_json()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]
    else:
        start_response("404 Not Found", [("Content-Length", "0")])
        return []
    start_response("200 OK", _HEADERS)
    return _OK
