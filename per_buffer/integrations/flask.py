"""Flask: ``PerBuffer(app)`` builds the default recorder from ``app.config``.

Settings use the environment variables' names (``PER_ACTIVITY_TOKEN``,
``PER_ACTIVITY_TYPE_ID``, ``PER_BUFFER_DIR``, ``PER_BUFFER_ENABLED``, ...); a name missing
from ``app.config`` falls back to the environment, then to the default. Flask itself is
imported only when a request is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..recorder import Recorder, configure
from ._common import Identity, RequestRecorder, recorder_options

if TYPE_CHECKING:
    from flask import Flask, Request

__all__ = ["PerBuffer"]

EXTENSION_KEY = "per_buffer"


class PerBuffer:
    """The Flask extension: ``PerBuffer(app)`` or ``ext = PerBuffer(); ext.init_app(app)``.

    ``init_app`` makes a recorder from ``app.config`` the default one, so that
    ``per_buffer.record()`` anywhere in the application uses it, and stores this extension
    in ``app.extensions["per_buffer"]``. A configuration error (no token, a bad value)
    raises there, at start-up, naming the setting.

    Args:
        app: the application, or None to call :meth:`init_app` later.
        who: optional; called as ``who(flask.request)`` when each request ends (in
            ``teardown_request``, also after an error); returns ``(billing_id, user_id)``,
            ``(billing_id, user_id, activity_type_id)`` or None. Its failures are logged
            and never fail a request.
        **options: Recorder keyword arguments; they win over ``app.config``.

    Attributes:
        recorder: the recorder made by the last :meth:`init_app`.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        who: Callable[[Request], Identity | None] | None = None,
        **options: Any,
    ) -> None:
        if who is not None and not callable(who):
            raise TypeError(f"who must be callable, not {type(who).__name__}")
        self.who = who
        self.options = options
        self.recorder: Recorder | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Build the recorder from ``app.config``, make it the default, hook ``who`` in.

        Raises:
            ValueError, TypeError: a bad or missing setting, naming it.
        """
        recorder = configure(**recorder_options(app.config, **self.options))
        self.recorder = recorder
        app.extensions[EXTENSION_KEY] = self
        if self.who is not None:
            record = RequestRecorder(self.who, recorder)

            def record_request(_exc: BaseException | None) -> None:
                from flask import request  # noqa: PLC0415

                record(request)

            app.teardown_request(record_request)
