"""Typed errors raised by per_buffer.

Every Per API failure is a :class:`PerError` whose ``retryable`` attribute says
whether trying the same call again later can succeed. The durable queue raises
:class:`QueueError` for storage faults. No message ever contains a token.
"""

from __future__ import annotations

__all__ = [
    "PerAPIError",
    "PerAuthError",
    "PerError",
    "PerRateLimitError",
    "PerTransportError",
    "QueueError",
]


class PerError(Exception):
    """Base class of every error from the Per API or the way to it.

    ``str(error)`` is one sentence saying what happened; it never holds a token.

    Attributes:
        retryable: True when the same request may succeed if sent again later.
        status_code: the HTTP status of the response, or None when there was none.
    """

    retryable: bool = False

    def __init__(self, text: str, *, status_code: int | None = None) -> None:
        super().__init__(text)
        self.status_code = status_code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, status_code={self.status_code!r})"


class PerAPIError(PerError):
    """Per answered ``ok: false``; not retryable.

    Attributes:
        message: Per's machine-readable code, e.g. ``"missing_parameter"``.
    """

    retryable = False

    def __init__(self, text: str, *, message: str, status_code: int | None = None) -> None:
        super().__init__(text, status_code=status_code)
        self.message = message


class PerAuthError(PerAPIError):
    """The token was refused (HTTP 401 or ``invalid_auth_token``); not retryable.

    A subclass of :class:`PerAPIError` whose ``message`` is ``"invalid_auth_token"``.
    """

    retryable = False

    def __init__(
        self, text: str, *, message: str = "invalid_auth_token", status_code: int | None = 401
    ) -> None:
        super().__init__(text, message=message, status_code=status_code)


class PerRateLimitError(PerError):
    """HTTP 429; retryable. ``retry_after`` is in seconds, or None when not given."""

    retryable = True

    def __init__(
        self, text: str, *, status_code: int | None = 429, retry_after: float | None = None
    ) -> None:
        super().__init__(text, status_code=status_code)
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self)!r}, status_code={self.status_code!r}, "
            f"retry_after={self.retry_after!r})"
        )


class PerTransportError(PerError):
    """The request did not get a usable answer (network fault, timeout, 5xx, non-JSON body).

    Retryable: the activity may or may not have been recorded by Per.
    """

    retryable = True


class QueueError(Exception):
    """The durable queue could not complete an operation (disk full, unwritable, locked).

    Items already stored are left intact. The recorder catches this and keeps
    activities in memory until the queue works again.
    """
