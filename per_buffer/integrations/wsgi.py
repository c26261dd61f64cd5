"""WSGI: record every request through a ``who(environ)`` hook.

WSGI has no shutdown event: the recorder is closed by per_buffer's exit handler, or
explicitly by a server hook (see :mod:`per_buffer.integrations.gunicorn`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..recorder import Recorder
from ._common import Identity, RequestRecorder

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["PerBufferMiddleware"]


class PerBufferMiddleware:
    """WSGI middleware calling ``who(environ)`` after each request and recording its answer.

    Args:
        app: the WSGI application to wrap.
        who: returns ``(billing_id, user_id)``, ``(billing_id, user_id, activity_type_id)``
            or None; called once the application returned its response (or raised), so
            middleware inside may have added to the environ. Its failures are logged and
            never fail a request.
        recorder: the recorder to use; None means the default one (``per_buffer.record``).

    Raises:
        TypeError: ``who`` is not callable.
    """

    def __init__(
        self,
        app: WSGIApplication,
        who: Callable[[WSGIEnvironment], Identity | None],
        *,
        recorder: Recorder | None = None,
    ) -> None:
        self.app = app
        self._record = RequestRecorder(who, recorder)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI entry point."""
        try:
            return self.app(environ, start_response)
        finally:
            self._record(environ)
