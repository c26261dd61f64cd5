"""The plain Per clients: :class:`PerClient` (blocking) and :class:`AsyncPerClient` (asyncio).

Both twins share one implementation of everything but the I/O: configuration,
argument validation, request building and the reading of responses into
results or typed :mod:`per_buffer.errors`. Each instance owns one pooled httpx
client; use it as a context manager or call ``close()`` / ``aclose()``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Final, TypeVar

import httpx

from . import _log_filter
from ._masking import mask
from ._version import __version__
from .config import DEFAULT_BASE_URL, check_token, env_names, resolve_base_url
from .errors import (
    PerAPIError,
    PerAuthError,
    PerError,
    PerRateLimitError,
    PerRequestTooLargeError,
    PerTransportError,
)
from .models import Report, format_timestamp, parse_timestamp, validate_id
from .outcomes import (
    AUTH,
    OK,
    RATE_LIMITED,
    REFUSED_BY_PER,
    TOO_LARGE,
    Verdict,
    judge,
    parse_retry_after,
    redact,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "USER_AGENT",
    "AsyncPerClient",
    "PerClient",
    "error_for",
    "interpret_response",
    "parse_retry_after",
]

logger = logging.getLogger("per_buffer.client")

#: Sent with every request.
USER_AGENT: Final = f"per-buffer/{__version__}"

ACTIVITY_TOKEN_ENV: Final = env_names("token")[0]
REPORTING_TOKEN_ENV: Final = env_names("reporting_token")[0]
BASE_URL_ENV: Final = env_names("base_url")[0]

_HEADERS: Final = {"User-Agent": USER_AGENT, "Accept": "application/json"}
_ADD_PATH: Final = "/activities.add"
_REPORT_PATH: Final = "/reports.get"


# --------------------------------------------------------------------------- configuration


def _env_token(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


# --------------------------------------------------------------------------- responses


def error_for(verdict: Verdict, endpoint: str) -> PerError:
    """The typed error for a verdict that is not a success (see :mod:`per_buffer.outcomes`)."""
    kind, status = verdict.kind, verdict.status
    if kind == AUTH:
        return PerAuthError(
            f"Per refused the token for {endpoint} ({verdict.detail}); check that it is valid "
            "and has the right scope.",
            status_code=status,
        )
    if kind == REFUSED_BY_PER:
        code = verdict.message or "unknown_error"
        return PerAPIError(
            f"Per rejected {endpoint} ({verdict.detail}).", message=code, status_code=status
        )
    if kind == RATE_LIMITED:
        return PerRateLimitError(
            f"Per rate-limited {endpoint} ({verdict.detail}).",
            status_code=status,
            retry_after=verdict.retry_after,
        )
    if kind == TOO_LARGE:
        return PerRequestTooLargeError(
            f"The request to {endpoint} is too large ({verdict.detail}).", status_code=status
        )
    return PerTransportError(
        f"No answer from Per for {endpoint}: {verdict.detail}; the request may be retried.",
        status_code=status,
        kind=kind,
    )


def interpret_response(
    endpoint: str,
    status: int,
    headers: Mapping[str, str],
    content: bytes,
    secrets: tuple[str, ...] = (),
) -> Any:
    """Turn one HTTP answer into Per's ``result`` or raise the matching :class:`PerError`.

    ``secrets`` (the tokens) are masked wherever a server echoed them back (in any
    letter case, or a piece of 8+ characters). The error is raised with no exception
    chained to it.
    """
    verdict = judge(status, content, headers.get)
    if verdict.kind != OK:
        raise error_for(redact(verdict, *secrets), endpoint)
    payload = verdict.payload
    if payload is None:
        try:
            payload = json.loads(content)
        except (ValueError, UnicodeDecodeError):  # pragma: no cover (judged as Per's JSON)
            payload = None
        if not isinstance(payload, dict):  # pragma: no cover (judged as Per's JSON)
            raise error_for(judge(0, b"", headers.get), endpoint)
    return payload.get("result")


def _transaction_id(result: Any) -> str:
    if isinstance(result, dict):
        tid = result.get("transactionId")
        if isinstance(tid, str):
            return tid
    # Per decides by "ok"; an answer without the documented transactionId still succeeded
    return ""


def _report(result: Any, secrets: tuple[str, ...] = ()) -> Report:
    try:
        return Report.from_result(result)
    except ValueError as exc:
        error = PerTransportError(f"Per's report could not be read: {mask(str(exc), secrets)}.")
    raise error  # outside the handler: nothing chained (the ValueError quotes the answer)


def transport_error(
    endpoint: str, base_url: str, exc: httpx.HTTPError, secrets: tuple[str, ...] = ()
) -> PerTransportError:
    """Wrap an httpx failure in a retryable :class:`PerTransportError`.

    The httpx message keeps its exception's name, with the ``secrets`` masked: it may
    quote bytes the server sent (h11 quotes a malformed header line, which a server
    echoing the request's ``Authorization`` header fills with the token). Raise the
    result outside the ``except`` block that caught ``exc``: chained, ``exc`` would
    show the bytes unmasked in a traceback.
    """
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    detail = " ".join(mask(str(exc), secrets).split()).rstrip(".")
    detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return PerTransportError(f"Request to {base_url}/{endpoint} {kind} ({detail}).")


def report_params(start: datetime | str | None, end: datetime | str | None) -> dict[str, str]:
    """Validate report bounds and return the query parameters Per expects."""
    if start is None:
        if end is not None:
            raise ValueError("end can only be given together with start")
        return {}
    start_dt = parse_timestamp(start, "start")
    params = {"start": format_timestamp(start_dt)}
    if end is not None:
        end_dt = parse_timestamp(end, "end")
        if start_dt > end_dt:
            raise ValueError("start must not be later than end")
        params["end"] = format_timestamp(end_dt)
    return params


def activity_params(
    billing_id: object, user_id: object, activity_type_id: object
) -> dict[str, str]:
    """Validate the three IDs and return the ``activities.add`` query parameters."""
    return {
        "billingId": validate_id(billing_id, "billing_id"),
        "userId": validate_id(user_id, "user_id"),
        "activityTypeId": validate_id(activity_type_id, "activity_type_id"),
    }


# --------------------------------------------------------------------------- the twins


class _ClientConfig:
    """Everything both twins share: tokens, base URL, headers, timeout."""

    __slots__ = ("_activity_token", "_reporting_token", "base_url", "timeout")

    def __init__(
        self,
        token: str | None,
        reporting_token: str | None,
        base_url: str | None,
        timeout: float,
        *,
        reporting: bool,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.timeout = float(timeout)
        if reporting:
            token = token if token is not None else _env_token(REPORTING_TOKEN_ENV)
            if token is None:
                raise ValueError(f"No reporting token: pass token= or set {REPORTING_TOKEN_ENV}.")
            reporting_token = token
        else:
            if token is None:
                token = _env_token(ACTIVITY_TOKEN_ENV)
            if reporting_token is None:
                reporting_token = _env_token(REPORTING_TOKEN_ENV) or token
            if token is None and reporting_token is None:
                raise ValueError(
                    f"No Per token: pass token= or set {ACTIVITY_TOKEN_ENV} "
                    f"(and {REPORTING_TOKEN_ENV} for reports)."
                )
        self._activity_token = None if token is None else check_token(token)
        self._reporting_token = (
            None if reporting_token is None else check_token(reporting_token, "reporting_token")
        )

    def secrets(self) -> tuple[str, ...]:
        """The tokens, to mask if a server echoes them."""
        return tuple(t for t in (self._activity_token, self._reporting_token) if t)

    def auth(self, reporting: bool) -> dict[str, str]:
        token = self._reporting_token if reporting else self._activity_token
        if token is None:
            which = REPORTING_TOKEN_ENV if reporting else ACTIVITY_TOKEN_ENV
            raise ValueError(f"This client has no token for that call: set {which}.")
        return {"Authorization": f"Bearer {token}"}


_Client = TypeVar("_Client", bound="_ClientBase")


class _ClientBase:
    """What the twins share besides I/O: the reporting constructor, base URL, repr."""

    _config: _ClientConfig

    @classmethod
    def for_reporting(cls: type[_Client], token: str | None = None, **kwargs: Any) -> _Client:
        """A client for ``get_report`` whose token defaults to ``PER_REPORTING_TOKEN``."""
        return cls(token, _reporting=True, **kwargs)  # type: ignore[call-arg]

    @property
    def base_url(self) -> str:
        """The Per endpoint this client talks to."""
        return self._config.base_url

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._config.base_url!r}, token=<hidden>)"


class PerClient(_ClientBase):
    """A blocking Per client with one pooled connection set.

    Args:
        token: the activity token; defaults to ``PER_ACTIVITY_TOKEN``.
        reporting_token: the token for :meth:`get_report`; defaults to
            ``PER_REPORTING_TOKEN``, then to ``token`` (a token may carry both scopes).
        base_url: defaults to ``PER_BASE_URL``, then ``https://api.useper.com``.
        timeout: seconds for connect, read and write of each request.
        transport: an httpx transport, for custom networking.

    Use :meth:`for_reporting` for a client that only reads reports.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        reporting_token: str | None = None,
        base_url: str | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        _reporting: bool = False,
    ) -> None:
        self._config = _ClientConfig(
            token, reporting_token, base_url, timeout, reporting=_reporting
        )
        self._http = httpx.Client(
            base_url=self._config.base_url,
            timeout=self._config.timeout,
            transport=transport,
            headers=_HEADERS,
            follow_redirects=False,
        )
        self._secrets_held = _log_filter.hold(*self._config.secrets(), owner=self)

    def add_activity(self, billing_id: str, user_id: str, activity_type_id: str) -> str:
        """Record one activity now and return Per's ``transactionId`` ("" if Per sent none).

        Raises:
            TypeError, ValueError: an ID is invalid (before any request).
            PerError: the matching subclass when the call did not succeed.
        """
        params = activity_params(billing_id, user_id, activity_type_id)
        return _transaction_id(self._get(_ADD_PATH, params, reporting=False))

    def get_report(
        self, start: datetime | str | None = None, end: datetime | str | None = None
    ) -> Report:
        """Fetch the unique-user report for ``[start, end]``.

        With neither bound Per reports the whole prior calendar month; with only
        ``start`` the end is unbounded. Bounds are aware datetimes or ISO 8601
        strings and are sent in UTC.

        Raises:
            ValueError: a naive datetime, ``end`` without ``start``, or ``start > end``.
            PerError: the matching subclass when the call did not succeed.
        """
        params = report_params(start, end)
        return _report(self._get(_REPORT_PATH, params, reporting=True), self._config.secrets())

    def _get(self, path: str, params: dict[str, str], *, reporting: bool) -> Any:
        headers = self._config.auth(reporting)
        endpoint = path.lstrip("/")
        secrets = self._config.secrets()
        try:
            response = self._http.get(path, params=params, headers=headers)
        except httpx.HTTPError as exc:
            error = transport_error(endpoint, self._config.base_url, exc, secrets)
        else:
            return interpret_response(
                endpoint, response.status_code, response.headers, response.content, secrets
            )
        raise error  # outside the handler: the httpx exception is not chained

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()
        self._secrets_held.release()

    def __enter__(self) -> PerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncPerClient(_ClientBase):
    """The asyncio twin of :class:`PerClient`: same arguments, awaitable methods."""

    def __init__(
        self,
        token: str | None = None,
        *,
        reporting_token: str | None = None,
        base_url: str | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        _reporting: bool = False,
    ) -> None:
        self._config = _ClientConfig(
            token, reporting_token, base_url, timeout, reporting=_reporting
        )
        self._http = httpx.AsyncClient(
            base_url=self._config.base_url,
            timeout=self._config.timeout,
            transport=transport,
            headers=_HEADERS,
            follow_redirects=False,
        )
        self._secrets_held = _log_filter.hold(*self._config.secrets(), owner=self)

    async def add_activity(self, billing_id: str, user_id: str, activity_type_id: str) -> str:
        """Record one activity now and return Per's ``transactionId`` (see :class:`PerClient`)."""
        params = activity_params(billing_id, user_id, activity_type_id)
        return _transaction_id(await self._get(_ADD_PATH, params, reporting=False))

    async def get_report(
        self, start: datetime | str | None = None, end: datetime | str | None = None
    ) -> Report:
        """Fetch the unique-user report for ``[start, end]`` (see :meth:`PerClient.get_report`)."""
        params = report_params(start, end)
        result = await self._get(_REPORT_PATH, params, reporting=True)
        return _report(result, self._config.secrets())

    async def _get(self, path: str, params: dict[str, str], *, reporting: bool) -> Any:
        headers = self._config.auth(reporting)
        endpoint = path.lstrip("/")
        secrets = self._config.secrets()
        try:
            response = await self._http.get(path, params=params, headers=headers)
        except httpx.HTTPError as exc:
            error = transport_error(endpoint, self._config.base_url, exc, secrets)
        else:
            return interpret_response(
                endpoint, response.status_code, response.headers, response.content, secrets
            )
        raise error  # outside the handler: the httpx exception is not chained

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()
        self._secrets_held.release()

    async def __aenter__(self) -> AsyncPerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
