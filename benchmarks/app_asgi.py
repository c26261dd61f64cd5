"""The ``app`` benchmark's minimal ASGI app (uvicorn workers).

``/r`` draws a user and records it with ``per_buffer.record()``; ``/p`` does the same work
without recording; ``/s`` answers this process's recorder figures. It is wrapped in
``per_buffer.integrations.asgi.PerBufferMiddleware``, as the README tells a uvicorn user
to, so the recorder is closed at lifespan shutdown.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from benchmarks._app_work import Work
from per_buffer.integrations.asgi import PerBufferMiddleware, Scope

__all__ = ["app"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

work = Work()
_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
_START: Message = {"type": "http.response.start", "status": 200, "headers": _HEADERS}
_BODY: Message = {"type": "http.response.body", "body": b"ok"}


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return  # lifespan: the middleware speaks it for this app
    path = scope["path"]
    if path == "/r":
        work.handle(True)
    elif path == "/p":
        work.handle(False)
    elif path == "/s":
        body = work.stats_json()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    else:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await send(dict(_START))
    await send(_BODY)


app = PerBufferMiddleware(_app)
