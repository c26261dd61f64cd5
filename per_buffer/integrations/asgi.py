"""ASGI: close the recorder at lifespan shutdown, and optionally record every request.

Wrap any ASGI application (FastAPI, Starlette, Django's ``get_asgi_application()``, a plain
callable)::

    app = PerBufferMiddleware(app, who=lambda scope: ("acme-corp", "user-42"))

or with Starlette/FastAPI ``app.add_middleware(PerBufferMiddleware, who=...)``.

At lifespan shutdown, after the application's own shutdown handlers, the recorder is
flushed and closed (up to ``shutdown_timeout``), so activities still in memory reach the
disk before the server exits. This matters under uvicorn: it re-raises SIGTERM after its
shutdown, so ``atexit`` handlers (per_buffer's included) never run. An application that does
not speak the lifespan protocol (Django's, a bare callable) gets it spoken for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..recorder import Recorder
from ._common import Identity, RequestRecorder, close_recorder

__all__ = ["ASGIApp", "PerBufferMiddleware", "Scope"]

logger = logging.getLogger("per_buffer.integrations.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SHUTDOWN_DONE = ("lifespan.shutdown.complete", "lifespan.shutdown.failed")


class PerBufferMiddleware:
    """ASGI middleware: closes the recorder at lifespan shutdown; records requests via ``who``.

    Args:
        app: the ASGI application to wrap.
        who: optional; called with the scope of every HTTP and WebSocket connection once
            the application has handled it (so middleware inside may have added to the
            scope, e.g. ``scope["user"]``); returns ``(billing_id, user_id)``,
            ``(billing_id, user_id, activity_type_id)`` or None. It runs on the event
            loop: keep it quick, no I/O. Its failures are logged and never fail a request.
        recorder: the recorder to record with and close; None means the default one
            (``per_buffer.record``), closed with ``per_buffer.shutdown``.
        shutdown_timeout: seconds to spend flushing at shutdown; None means the
            recorder's ``exit_timeout``. What is not delivered by then stays on disk.

    Raises:
        TypeError: ``who`` is given but not callable.
        ValueError: ``shutdown_timeout`` is negative.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        who: Callable[[Scope], Identity | None] | None = None,
        recorder: Recorder | None = None,
        shutdown_timeout: float | None = None,
    ) -> None:
        if shutdown_timeout is not None and not shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, not {shutdown_timeout!r}")
        self.app = app
        self.recorder = recorder
        self.shutdown_timeout = shutdown_timeout
        self._record = None if who is None else RequestRecorder(who, recorder)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point."""
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if self._record is None or kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._record(scope)

    async def _close(self) -> None:
        await asyncio.to_thread(close_recorder, self.recorder, self.shutdown_timeout)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        spoke = startup_received = False

        async def app_receive() -> Message:
            nonlocal startup_received
            message = await receive()
            if message["type"] == "lifespan.startup":
                startup_received = True
            return message

        async def app_send(message: Message) -> None:
            nonlocal spoke
            spoke = True
            if message["type"] in _SHUTDOWN_DONE:  # the app's own handlers have run
                await self._close()
            await send(message)

        try:
            await self.app(scope, app_receive, app_send)
        except Exception as exc:
            if spoke:
                raise
            # the ASGI spec's sign of an app without lifespan support: answer for it
            logger.debug("per_buffer: the app does not handle lifespan (%r)", exc)
        else:
            if spoke:
                return
        if not startup_received:
            await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self._close()
        await send({"type": "lifespan.shutdown.complete"})
