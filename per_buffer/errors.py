"""Typed errors raised by per_buffer.

Every Per API failure is a :class:`PerError` whose ``retryable`` attribute says
whether trying the same call again later can succeed. The durable queue raises
:class:`QueueError` for storage faults. No message ever contains a token.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "PerAPIError",
    "PerAuthError",
    "PerError",
    "PerRateLimitError",
    "PerRequestTooLargeError",
    "PerTransportError",
    "QueueError",
]


class PerError(Exception):
    """Base class of every error from the Per API or the way to it.

    ``str(error)`` is one sentence saying what happened; it never holds a token.

    Attributes:
        retryable: True when the same request may succeed if sent again later.
        status_code: the HTTP status of the response, or None when there was none.
        kind: the error class of :mod:`per_buffer.outcomes` (``"refused_by_per"``,
            ``"auth"``, ``"rate_limited"``, ``"too_large"``, ``"server_error"``,
            ``"network_error"``, ``"not_per_response"``), None when unknown.
    """

    retryable: bool = False

    def __init__(
        self, text: str, *, status_code: int | None = None, kind: str | None = None
    ) -> None:
        super().__init__(text)
        self.status_code = status_code
        #: the error class (see :mod:`per_buffer.outcomes`), e.g. ``"not_per_response"``
        self.kind = kind

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, status_code={self.status_code!r})"


class PerAPIError(PerError):
    """Per answered ``ok: false``; not retryable.

    Attributes:
        message: Per's machine-readable code, e.g. ``"missing_parameter"``.
    """

    retryable = False

    def __init__(
        self,
        text: str,
        *,
        message: str,
        status_code: int | None = None,
        kind: str | None = "refused_by_per",
    ) -> None:
        super().__init__(text, status_code=status_code, kind=kind)
        self.message = message


class PerAuthError(PerAPIError):
    """The token was refused (HTTP 401 or ``invalid_auth_token``); not retryable.

    A subclass of :class:`PerAPIError` whose ``message`` is ``"invalid_auth_token"``.
    """

    retryable = False

    def __init__(
        self, text: str, *, message: str = "invalid_auth_token", status_code: int | None = 401
    ) -> None:
        super().__init__(text, message=message, status_code=status_code, kind="auth")


class PerRateLimitError(PerError):
    """HTTP 429; retryable. ``retry_after`` is in seconds, or None when not given."""

    retryable = True

    def __init__(
        self, text: str, *, status_code: int | None = 429, retry_after: float | None = None
    ) -> None:
        super().__init__(text, status_code=status_code, kind="rate_limited")
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self)!r}, status_code={self.status_code!r}, "
            f"retry_after={self.retry_after!r})"
        )


class PerTransportError(PerError):
    """No answer from Per itself: a network fault, a timeout, a 5xx, or a body that is not
    Per's JSON (an HTML page from a proxy or WAF with any status, an empty or truncated body).

    Retryable: the activity may or may not have been recorded by Per. ``kind`` says which
    transport fault (``server_error``, ``network_error`` or ``not_per_response``).
    """

    retryable = True


class PerRequestTooLargeError(PerError):
    """HTTP 413 or 414: this request is too large for Per or a proxy; not retryable."""

    retryable = False

    def __init__(self, text: str, *, status_code: int | None = 413) -> None:
        super().__init__(text, status_code=status_code, kind="too_large")


class ConfigurationError(ValueError):
    """A setting cannot work on this machine, e.g. a queue directory that cannot be
    created, locked or written. Raised when the recorder is built, never later."""


class QueueError(Exception):
    """The durable queue could not complete an operation (disk full, unwritable, locked).

    Items already stored are left intact. The recorder catches this and keeps
    activities in memory until the queue works again.
    """
