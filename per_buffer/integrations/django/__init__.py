"""Django: an app for ``INSTALLED_APPS``, a middleware and two management commands.

``settings.py``::

    INSTALLED_APPS = [..., "per_buffer.integrations.django"]
    MIDDLEWARE = [..., "per_buffer.integrations.django.PerBufferMiddleware"]
    PER_BUFFER = {"directory": "/var/lib/myapp/per-buffer"}  # Recorder keyword arguments
    PER_BUFFER_WHO = "myapp.billing.who"  # who(request) -> (billing_id, user_id) | None

At start-up the app makes a recorder from ``PER_BUFFER`` (missing keys fall back to the
``PER_*`` environment variables) the default one, so ``per_buffer.record()`` uses it; a bad
setting raises ``ImproperlyConfigured``. ``manage.py per_buffer_status`` and
``manage.py per_buffer_drain`` run ``per-buffer status``/``drain`` on its directory.

Shutdown: Django has no process-shutdown signal. per_buffer's exit handler closes the
recorder when the process exits normally (runserver, management commands, gunicorn sync
workers); under an ASGI server wrap the application in
:class:`per_buffer.integrations.asgi.PerBufferMiddleware` (uvicorn skips exit handlers on
SIGTERM), under gunicorn use :func:`per_buffer.integrations.gunicorn.hooks`. Django is
imported only when the middleware or the app is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._common import Identity, RequestRecorder

__all__ = ["PerBufferMiddleware", "recorder_settings"]

WHO_SETTING = "PER_BUFFER_WHO"
SETTINGS = "PER_BUFFER"


def recorder_settings() -> dict[str, Any] | None:
    """``settings.PER_BUFFER`` as a dict of Recorder keyword arguments, or None when unset.

    Raises:
        django.core.exceptions.ImproperlyConfigured: it is not a dict.
    """
    from django.conf import settings  # noqa: PLC0415
    from django.core.exceptions import ImproperlyConfigured  # noqa: PLC0415

    options = getattr(settings, SETTINGS, None)
    if options is None:
        return None
    if not isinstance(options, dict):
        raise ImproperlyConfigured(
            f"settings.{SETTINGS} must be a dict of Recorder keyword arguments, "
            f"not {type(options).__name__}"
        )
    return dict(options)


class PerBufferMiddleware:
    """Records each request with the hook named by ``settings.PER_BUFFER_WHO``.

    The hook (a dotted path) is called as ``who(request)`` once the response is ready (so
    ``request.user`` is set); it returns ``(billing_id, user_id)``,
    ``(billing_id, user_id, activity_type_id)`` or None. Its failures are logged and never
    fail a request. The middleware is synchronous: under ASGI Django runs it in a thread,
    so the hook may touch the database (``request.user``).

    Raises:
        django.core.exceptions.ImproperlyConfigured: ``PER_BUFFER_WHO`` is unset or does
            not name a callable.
    """

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        from django.conf import settings  # noqa: PLC0415
        from django.core.exceptions import ImproperlyConfigured  # noqa: PLC0415
        from django.utils.module_loading import import_string  # noqa: PLC0415

        path = getattr(settings, WHO_SETTING, None)
        if not isinstance(path, str) or not path:
            raise ImproperlyConfigured(
                f"settings.{WHO_SETTING} must be the dotted path of a function "
                "who(request) -> (billing_id, user_id) | None"
            )
        try:
            who: Callable[[Any], Identity | None] = import_string(path)
            self._record: RequestRecorder[Any] = RequestRecorder(who)
        except (ImportError, TypeError) as exc:
            raise ImproperlyConfigured(f"settings.{WHO_SETTING}={path!r}: {exc}") from exc
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        """Handle the request, then record it."""
        try:
            return self.get_response(request)
        finally:
            self._record(request)
