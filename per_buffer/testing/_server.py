"""The Per-compatible HTTP server itself: :class:`PerServer` and its asyncio protocol.

Use it through :mod:`per_buffer.testing`, which re-exports the public names. This
module imports nothing from the rest of the package (:mod:`._process` imports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import random
import re
import socket
import string
import threading
import time
from array import array
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from types import TracebackType
from typing import Any, Final, Literal, TypeVar, cast
from urllib.parse import parse_qs

__all__ = [
    "DEFAULT_ACTIVITY_TOKEN",
    "DEFAULT_REPORTING_TOKEN",
    "FAULT_KINDS",
    "PerServer",
    "ReceivedActivity",
]

#: The activity-scoped token a :class:`PerServer` accepts unless told otherwise.
DEFAULT_ACTIVITY_TOKEN: Final = "test-activity-token"
#: The reporting-scoped token a :class:`PerServer` accepts unless told otherwise.
DEFAULT_REPORTING_TOKEN: Final = "test-reporting-token"
#: The fault kinds :meth:`PerServer.inject` understands.
FAULT_KINDS: Final = frozenset(
    {"503", "429", "ok_false", "401", "non_json", "hang", "drop", "http"}
)

_T = TypeVar("_T")
_RetryAfterForm = Literal["seconds", "date", "none"]
_RETRY_AFTER_FORMS: Final = ("seconds", "date", "none")
_Framing = Literal["content-length", "chunked", "close", "http/1.0"]
_FRAMINGS: Final = ("content-length", "chunked", "close", "http/1.0")
_FaultBody = Literal["html", "empty", "text", "per_ok_false", "per_auth"]
_FAULT_BODIES: Final = ("html", "empty", "text", "per_ok_false", "per_auth")

_ADD_PATH: Final = "/activities.add"
_REPORT_PATH: Final = "/reports.get"
_ID_ALPHABET: Final = string.ascii_lowercase + string.digits
_MAX_HEAD: Final = 64 * 1024
_MAX_BUFFERED: Final = 1024 * 1024
_UTC: Final = timezone.utc

_COUNTER_KEYS: Final = (
    "requests",
    "ok",
    "auth_error",
    "api_error",
    "fault_503",
    "fault_429",
    "fault_ok_false",
    "fault_401",
    "fault_non_json",
    "fault_hang",
    "fault_drop",
    "fault_http",
    "rate_limited",
    "not_found",
    "method_not_allowed",
    "bad_request",
    "reports",
)

# What the protocol does with a request once the server has decided.
_RESPOND: Final = 0
_HANG: Final = 1
_DROP: Final = 2

_REASONS: Final = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
_JSON: Final = b"application/json"
_HTML: Final = b"text/html; charset=utf-8"
_TEXT: Final = b"text/plain; charset=utf-8"

_HTML_503: Final = (
    b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n"
    b"<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n"
    b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
_HTML_200: Final = (
    b"<!DOCTYPE html>\n<html><head><title>Per</title></head>"
    b"<body><h1>We'll be right back</h1><p>Per is down for maintenance.</p></body></html>\n"
)
_BODY_401: Final = b'{"ok":false,"message":"invalid_auth_token"}'
_BODY_429: Final = b'{"ok":false,"message":"rate_limited"}'
_BODY_404: Final = b'{"ok":false,"message":"not_found"}'
_BODY_405: Final = b'{"ok":false,"message":"method_not_allowed"}'
_BODY_400: Final = b'{"ok":false,"message":"bad_request"}'
_OK_PREFIX: Final = b'{"ok":true,"result":{"transactionId":"'
_OK_SUFFIX: Final = b'"}}'
# Every success response has the same length, so its head is built once.
_OK_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(_OK_PREFIX) + 18 + len(_OK_SUFFIX)).encode()
    + b"\r\n\r\n"
)
_OK_HEAD_CLOSE: Final = _OK_HEAD[:-2] + b"Connection: close\r\n\r\n"


def _reason(status: int) -> bytes:
    """The reason phrase for ``status`` (``Unknown`` for a code Python does not know)."""
    known = _REASONS.get(status)
    if known is not None:
        return known
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


def _response(
    status: int, body: bytes, content_type: bytes | None = _JSON, extra_headers: bytes = b""
) -> bytes:
    """Return a complete HTTP/1.1 response without a ``Connection`` header.

    ``content_type=None`` sends none (for an empty body).
    """
    return b"HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\n%s\r\n%s" % (
        status,
        _reason(status),
        b"" if content_type is None else b"Content-Type: %s\r\n" % content_type,
        len(body),
        extra_headers,
        body,
    )


def _html_page(status: int) -> bytes:
    """An nginx-like error page naming ``status``."""
    title = b"%d %s" % (status, _reason(status))
    return (
        b"<html>\r\n<head><title>%s</title></head>\r\n<body>\r\n<center><h1>%s</h1></center>\r\n"
        b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n" % (title, title)
    )


_DAY_NAMES: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTH_NAMES: Final = (
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
)  # fmt: skip


def _http_date(second: int) -> str:
    """Format unix seconds as an IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``)."""
    t = time.gmtime(second)
    return (
        f"{_DAY_NAMES[t.tm_wday]}, {t.tm_mday:02d} {_MONTH_NAMES[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def _json_body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("ascii")


def _close_variant(response: bytes) -> bytes:
    """Insert ``Connection: close`` into a response built by :func:`_response`."""
    head, sep, body = response.partition(b"\r\n\r\n")
    return head + b"\r\nConnection: close" + sep + body


_CLOSE_GAP: Final = 0.005  # seconds between the two halves of a close-delimited response


def _reframe(response: bytes, framing: str, close: bool) -> tuple[list[bytes], bool]:
    """Split a Content-Length framed ``response`` into the writes ``framing`` asks for.

    Returns the byte strings to write in order and whether to close afterwards.
    ``"chunked"``: ``Transfer-Encoding: chunked`` with the body in three chunks;
    ``"close"``: no ``Content-Length``, ``Connection: close``, two halves (the
    body is read to EOF); ``"http/1.0"``: an HTTP/1.0 status line, then close.
    Responses that have no body (204, 304) keep their head as it is.
    """
    head, _, body = response.partition(b"\r\n\r\n")
    bodiless = head[9:12] in (b"204", b"304")
    if framing == "http/1.0":
        return [b"HTTP/1.0" + response[8:]], True
    if not bodiless:
        start = head.find(b"\r\nContent-Length: ")
        if start >= 0:
            end = head.find(b"\r\n", start + 2)
            head = head[:start] + (head[end:] if end >= 0 else b"")
    if framing == "chunked":
        if bodiless:
            return [response], close
        step = max(1, -(-len(body) // 3))
        chunks = [
            b"%x\r\n%s\r\n" % (len(body[i : i + step]), body[i : i + step])
            for i in range(0, len(body), step)
        ]
        head += b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        if not chunks:
            return [head + b"0\r\n\r\n"], close
        chunks[-1] += b"0\r\n\r\n"
        return [head, *chunks], close
    # "close": delimited by the end of the connection
    if b"\r\nConnection: close" not in head:
        head += b"\r\nConnection: close"
    data = head + b"\r\n\r\n" + body
    cut = len(head) + 4 + len(body) // 2 if len(body) >= 2 else len(data) // 2
    return [data[:cut], data[cut:]], True


_R_401: Final = _response(401, _BODY_401)
_R_404: Final = _response(404, _BODY_404)
_R_405: Final = _response(405, _BODY_405, extra_headers=b"Allow: GET\r\n")
_R_400: Final = _response(400, _BODY_400)
_R_503: Final = _response(503, _HTML_503, _HTML)
_R_NON_JSON: Final = _response(200, _HTML_200, _HTML)
_R_429_BARE: Final = _response(429, _BODY_429)


# --------------------------------------------------------------------------- dates

_ISO_RE: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?"
    r"\s*(Z|z|[+-]\d{2}(?::?\d{2})?)?"
)


def _parse_when(value: datetime | str) -> datetime:
    """Parse an ISO 8601 bound (``Z``, offsets, fractions; naive means UTC) to an aware UTC time.

    Raises:
        ValueError: with the message ``invalid_date``.
    """
    if isinstance(value, datetime):
        moment = value
    else:
        match = _ISO_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError("invalid_date")
        year, month, day, hour, minute, second, fraction, zone = match.groups()
        micro = int((fraction or "0")[:6].ljust(6, "0"))
        tz = _UTC
        if zone and zone not in ("Z", "z"):
            digits = zone[1:].replace(":", "")
            minutes = int(digits[:2]) * 60 + int(digits[2:4] or "0")
            if minutes >= 24 * 60:
                raise ValueError("invalid_date")
            tz = timezone(timedelta(minutes=minutes if zone[0] == "+" else -minutes))
        try:
            moment = datetime(
                int(year),
                int(month),
                int(day),
                int(hour or 0),
                int(minute or 0),
                int(second or 0),
                micro,
                tzinfo=tz,
            )
        except ValueError:
            raise ValueError("invalid_date") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_UTC)
    return moment.astimezone(_UTC)


def _format_when(moment: datetime) -> str:
    """Format like Per: ``2018-12-31T23:59:59.999Z`` (UTC, milliseconds)."""
    moment = moment.astimezone(_UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def _bounds(
    start: datetime | str | None, end: datetime | str | None, now: float
) -> tuple[float, float, bool, str, str | None]:
    """Return ``(low, high, high_inclusive, start_text, end_text)`` for a report request.

    Raises:
        ValueError: ``end_without_start`` or ``invalid_date``.
    """
    if start == "":
        start = None
    if end == "":
        end = None
    if start is None:
        if end is not None:
            raise ValueError("end_without_start")
        today = datetime.fromtimestamp(now, _UTC)
        this_month = today.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        last_month = (this_month - timedelta(days=1)).replace(day=1)
        shown_end = this_month - timedelta(milliseconds=1)
        # high is exclusive: nothing between 23:59:59.999 and midnight falls through the gap
        return (
            last_month.timestamp(),
            this_month.timestamp(),
            False,
            _format_when(last_month),
            _format_when(shown_end),
        )
    low = _parse_when(start)
    if end is None:
        return low.timestamp(), float("inf"), True, _format_when(low), None
    high = _parse_when(end)
    return low.timestamp(), high.timestamp(), True, _format_when(low), _format_when(high)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ReceivedActivity:
    """One activity a :class:`PerServer` accepted through ``activities.add``."""

    billing_id: str
    user_id: str
    activity_type_id: str
    #: Unix seconds from the server's clock at the moment it accepted the activity.
    timestamp: float
    transaction_id: str


@dataclass
class _Fault:
    kind: str
    retry_after: str | None
    message: str
    response: bytes  # prebuilt; empty for hang and drop


@dataclass
class _Bucket:
    """A token bucket on ``time.monotonic()``: ``rate`` tokens a second, at most ``burst``."""

    rate: float
    burst: int
    retry_after: _RetryAfterForm
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """Take one token: ``0.0`` if there was one, else the seconds until there is."""
        tokens = min(float(self.burst), self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens  # a refused request takes nothing
        return (1.0 - tokens) / self.rate


def _status_response(status: int, body: str, message: str, retry_after: str | None) -> bytes:
    """The answer of an ``"http"`` fault: ``status`` with a body of the ``body`` shape."""
    extra = b"" if retry_after is None else b"Retry-After: %s\r\n" % retry_after.encode()
    if status in (204, 304):  # never a body, so no framing headers either
        return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, _reason(status), extra)
    if body == "html":
        return _response(status, _html_page(status), _HTML, extra)
    if body == "empty":
        return _response(status, b"", None, extra)
    if body == "text":
        return _response(status, b"%d %s\n" % (status, _reason(status)), _TEXT, extra)
    if body == "per_ok_false":
        return _response(status, _json_body({"ok": False, "message": message}), _JSON, extra)
    return _response(status, _BODY_401, _JSON, extra)  # per_auth


def _fault_response(kind: str, retry_after: str | None, message: str) -> bytes:
    if kind == "503":
        return _R_503
    if kind == "429":
        extra = b"" if retry_after is None else b"Retry-After: %s\r\n" % retry_after.encode()
        return _response(429, _BODY_429, extra_headers=extra)
    if kind == "ok_false":
        return _response(200, _json_body({"ok": False, "message": message}))
    if kind == "401":
        return _R_401
    if kind == "non_json":
        return _R_NON_JSON
    return b""


def _head_fields(lines: list[bytes], keep_alive: bool) -> tuple[bytes | None, bool, int]:
    """``(authorization, keep_alive, body length)`` from a request's header lines.

    ``keep_alive`` is the HTTP version's default. A body the server will not parse
    (chunked, or a bad ``Content-Length``) counts as none and closes the connection.
    """
    authorization: bytes | None = None
    length = 0
    chunked = False
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"authorization":
            authorization = value.strip()
        elif name == b"connection":
            tokens = value.lower()
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = -1
        elif name == b"transfer-encoding":
            chunked = True
    if length < 0 or chunked:
        return authorization, False, 0  # a body we will not parse: answer, then close
    return authorization, keep_alive, length


def _new_fault(
    kind: str, retry_after: str | None, message: str, status: int | None, body: str | None
) -> tuple[_Fault, str]:
    """The fault :meth:`PerServer.inject` arms and its rate key (one per kind, per status).

    Raises:
        ValueError: ``status`` or ``body`` that do not fit ``kind``.
    """
    if kind != "http":
        if status is not None or body is not None:
            raise ValueError(f'status and body go with kind "http", not {kind!r}')
        return _Fault(kind, retry_after, message, _fault_response(kind, retry_after, message)), kind
    if isinstance(status, bool) or not isinstance(status, int):
        raise ValueError(f'kind "http" needs an int status, not {status!r}')
    if not 200 <= status <= 599:
        raise ValueError(f"status must be within 200..599, not {status!r}")
    shape = "html" if body is None else body
    if shape not in _FAULT_BODIES:
        raise ValueError(f"body must be one of {_FAULT_BODIES}, not {body!r}")
    response = _status_response(status, shape, message, retry_after)
    return _Fault(kind, retry_after, message, response), f"http {status}"


# --------------------------------------------------------------------------- protocol


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: a minimal parser with keep-alive and in-order pipelining."""

    __slots__ = (
        "_buf",
        "_busy",
        "_control",
        "_generation",
        "_paused",
        "_server",
        "_timer",
        "transport",
    )

    def __init__(self, server: PerServer, control: bool, generation: int = 0) -> None:
        self._server = server
        self._control = control
        self._generation = generation
        self._buf = b""
        self._busy = False  # a response is pending (latency, hang or a control task)
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    # asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self._control:
            self._server._control_conns.add(self)
        elif self._generation != self._server._generation:
            # accepted by a listener an outage has closed since: refuse it too
            transport.abort()
            self.transport = None
        else:
            self._server._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        server = self._server
        server._conns.discard(self)
        server._control_conns.discard(self)
        server._hanging.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport = None
        self._buf = b""

    def data_received(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data
        if self._busy:
            if len(self._buf) > _MAX_BUFFERED and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            return
        self._process()

    def eof_received(self) -> bool | None:
        # Half-close from the client: answer what is pending, then close.
        return True if self._busy else None

    # request handling ---------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (from the loop thread)."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close the connection at once, dropping anything unsent."""
        if self.transport is not None:
            self.transport.abort()

    def _process(self) -> None:
        """Serve the buffered requests in order until one must wait (or none is left)."""
        transport = self.transport
        while transport is not None and not self._busy and self._buf:
            request = self._next_request()
            if request is None:
                return
            method, target, authorization, keep_alive = request
            if self._control:
                self._start_control(method, target, keep_alive)
                return
            if not self._answer(transport, method, target, authorization, keep_alive):
                return

    def _next_request(self) -> tuple[bytes, bytes, bytes | None, bool] | None:
        """Take the next whole request off the buffer.

        Returns ``(method, target, authorization, keep_alive)``, or None while the
        request is incomplete or after answering a malformed one.
        """
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._bad_request(_close_variant(_response(431, _BODY_400)))
            return None
        lines = buf[:end].split(b"\r\n")
        request_line = lines[0].split(b" ")
        if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/1."):
            self._bad_request(_close_variant(_R_400))
            return None
        method, target, version = request_line
        authorization, keep_alive, length = _head_fields(lines[1:], version != b"HTTP/1.0")
        rest = end + 4 + length
        if len(buf) < rest:
            return None  # wait for the rest of the body
        self._buf = buf[rest:]
        return method, target, authorization, keep_alive

    def _start_control(self, method: bytes, target: bytes, keep_alive: bool) -> None:
        """Run a control request as a task; its response is written when it is done."""
        self._busy = True
        task = asyncio.ensure_future(self._server._control_request(method, target))
        self._server._keep(task)
        task.add_done_callback(functools.partial(self._control_done, keep_alive=keep_alive))

    def _answer(
        self,
        transport: asyncio.Transport,
        method: bytes,
        target: bytes,
        authorization: bytes | None,
        keep_alive: bool,
    ) -> bool:
        """Answer one API request (now, later, never or by closing); True: serve the next."""
        action, response, delay = self._server._api_request(method, target, authorization)
        if action == _DROP:
            transport.close()
            self._buf = b""
            return False
        if action == _HANG:
            self._busy = True
            self._server._hanging.add(self)
            return False
        if not keep_alive:
            response = (
                _OK_HEAD_CLOSE + response[len(_OK_HEAD) :]
                if response.startswith(_OK_HEAD)
                else _close_variant(response)
            )
        if delay > 0:
            self._busy = True
            self._timer = asyncio.get_running_loop().call_later(
                delay, self._finish, response, not keep_alive
            )
            return False
        if not self._write(response, not keep_alive):
            self._busy = True  # closed or closing: serve nothing more
            return False
        return True

    def _write(self, response: bytes, close: bool) -> bool:
        """Send ``response`` with the server's framing; ``False`` once the connection closes."""
        transport = self.transport
        assert transport is not None
        response = self._dated(response)
        framing = self._server._framing
        if framing == "content-length" or self._control:
            transport.write(response)
        else:
            parts, close = _reframe(response, framing, close)
            if framing == "close":  # the rest a few milliseconds later, then EOF
                transport.write(parts[0])
                self._timer = asyncio.get_running_loop().call_later(
                    _CLOSE_GAP, self._write_rest, parts[1]
                )
                return False
            for part in parts:
                transport.write(part)
        if close:
            transport.close()
            return False
        return True

    def _write_rest(self, rest: bytes) -> None:
        """The second half of a close-delimited response, then the end of the connection."""
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(rest)
        transport.close()

    def _dated(self, response: bytes) -> bytes:
        """Insert the server's ``Date`` header after the status line of ``response``."""
        cut = response.find(b"\r\n") + 2
        return response[:cut] + self._server._date_header() + response[cut:]

    def _bad_request(self, response: bytes) -> None:
        if not self._control:
            self._server._count("bad_request")
        self._busy = True
        self._finish(response, True)

    def _finish(self, response: bytes, close: bool) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self._write(response, close):
            return
        self._busy = False
        if self._paused:
            self._paused = False
            transport.resume_reading()
        self._process()

    def _control_done(self, task: asyncio.Future[bytes], *, keep_alive: bool) -> None:
        if task.cancelled():
            self.abort()
            return
        error = task.exception()
        if error is not None:
            body = _json_body({"ok": False, "message": f"{type(error).__name__}: {error}"})
            response = _response(500, body)
        else:
            response = task.result()
        if not keep_alive:
            response = _close_variant(response)
        self._finish(response, not keep_alive)


# --------------------------------------------------------------------------- server


_S = TypeVar("_S", bound="StartStop")


class StartStop:
    """Context manager of a server: ``start()`` on entry (its value is bound), ``stop()`` on exit.

    :class:`PerServer` (a thread of this process) and :class:`PerServerProcess`
    (a child process) share it.
    """

    def start(self: _S) -> _S:
        """Start; return ``self``."""
        raise NotImplementedError

    def stop(self) -> object:
        """Stop (idempotent)."""
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        """Start (see :meth:`start`)."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop (see :meth:`stop`)."""
        self.stop()


class PerServer(StartStop):
    """A real Per-compatible HTTP server on loopback, with injectable faults.

    Every method is thread-safe and may be called while the server runs. The
    server answers ``GET /activities.add`` (activity tokens) and
    ``GET /reports.get`` (reporting tokens) as Per documents them, ``404`` for
    other paths and ``405`` for other methods.

    Args:
        host: the address to listen on.
        port: the port; ``0`` picks a free one (see :attr:`port` after :meth:`start`).
        activity_tokens: bearer tokens with the ``activity`` scope.
        reporting_tokens: bearer tokens with the ``reporting`` scope.
        clock: returns "now" in unix seconds. The server's time is ``clock() +
            clock_offset`` (see :meth:`now`): it stamps activities, anchors the
            default report period (the prior calendar month, UTC), and is what
            the ``Date`` header and a ``Retry-After`` date say.
        clock_offset: seconds added to ``clock()``: a server whose clock is ahead
            of (positive) or behind (negative) the host's. See :meth:`set_clock_offset`.
        latency: seconds added to every API response (faults included, except
            ``hang`` and ``drop``); never blocks the event loop.
        seed: seeds the random generator behind rate-based faults.
        keep_activities: ``False`` keeps only counters and the per-user
            timestamps reports need, not the :attr:`activities` list (for long
            benchmarks).
        framing: how API responses are delimited (see :meth:`set_framing`).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        activity_tokens: Iterable[str] = (DEFAULT_ACTIVITY_TOKEN,),
        reporting_tokens: Iterable[str] = (DEFAULT_REPORTING_TOKEN,),
        clock: Callable[[], float] = time.time,
        clock_offset: float = 0.0,
        latency: float = 0.0,
        seed: int | None = None,
        keep_activities: bool = True,
        framing: _Framing = "content-length",
    ) -> None:
        self._host = host
        self._port = port
        self._activity_tokens = _token_list(activity_tokens, "activity_tokens")
        self._reporting_tokens = _token_list(reporting_tokens, "reporting_tokens")
        self._activity_auth = _auth_set(self._activity_tokens)
        self._reporting_auth = _auth_set(self._reporting_tokens)
        self._clock = clock
        self._clock_offset = _check_offset(clock_offset)
        self._date_cache: tuple[int, bytes] = (-1, b"")  # (unix second, Date header line)
        self._latency = _check_latency(latency)  # in force now (a spike's while one lasts)
        self._base_latency = self._latency  # what a spike returns to
        self._spike_until: float | None = None  # time.monotonic() at which the spike ends
        self._rng = random.Random(seed)
        self._id_rng = random.Random()
        self._keep_activities = keep_activities
        self._framing: _Framing = _check_framing(framing)

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._counters = dict.fromkeys(_COUNTER_KEYS, 0)
        self._activities: list[ReceivedActivity] = []
        self._accepted = 0
        # (activity type, billing id) -> user id -> timestamps it was seen at
        self._index: dict[tuple[str, str], dict[str, array[float]]] = {}
        self._count_fault: _Fault | None = None
        self._count_left = 0
        self._rate_faults: dict[str, tuple[float, _Fault]] = {}
        self._timed_fault: _Fault | None = None
        self._timed_until = 0.0  # time.monotonic() at which the timed fault ends
        self._bucket: _Bucket | None = None

        # owned by the event-loop thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None  # the API port (own accept loop)
        self._control_server: asyncio.Server | None = None
        self._control_port: int | None = None
        self._conns: set[_Connection] = set()
        self._control_conns: set[_Connection] = set()
        self._hanging: set[_Connection] = set()
        self._generation = 0  # bumped by every listen and outage
        self._tasks: set[asyncio.Task[Any]] = set()  # strong references while they run

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> PerServer:
        """Bind and start serving in a daemon thread; return ``self``.

        Raises:
            RuntimeError: already running.
            OSError: the port cannot be bound.
        """
        if self._thread is not None:
            raise RuntimeError("PerServer is already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run_loop, args=(loop,), name="per-test-server", daemon=True
        )
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            self._call(self._listen())
        except BaseException:
            self._halt()
            raise
        return self

    def stop(self) -> None:
        """Close every connection and listening socket and end the server thread.

        Idempotent. A stopped server may be started again (on the same port).
        """
        if self._thread is None:
            return
        try:
            self._call(self._shutdown())
        finally:
            self._halt()

    def __repr__(self) -> str:
        state = "running" if self._thread is not None else "stopped"
        return f"<PerServer {self.url} {state}>"

    # ------------------------------------------------------------------ addresses

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The listening port (the real one once started, even if ``0`` was asked for)."""
        return self._port

    @property
    def url(self) -> str:
        """The base URL to give a client, e.g. ``http://127.0.0.1:54321``."""
        return _http_url(self._host, self._port)

    @property
    def control_url(self) -> str | None:
        """The control channel's base URL once :meth:`serve_control` ran, else ``None``."""
        return None if self._control_port is None else _http_url(self._host, self._control_port)

    @property
    def activity_token(self) -> str:
        """The first accepted activity token."""
        with self._lock:
            return self._activity_tokens[0] if self._activity_tokens else ""

    @property
    def reporting_token(self) -> str:
        """The first accepted reporting token."""
        with self._lock:
            return self._reporting_tokens[0] if self._reporting_tokens else ""

    def set_tokens(
        self,
        *,
        activity_tokens: Iterable[str] | None = None,
        reporting_tokens: Iterable[str] | None = None,
    ) -> None:
        """Replace the accepted activity and/or reporting tokens (``None`` keeps them)."""
        with self._lock:
            if activity_tokens is not None:
                self._activity_tokens = _token_list(activity_tokens, "activity_tokens")
                self._activity_auth = _auth_set(self._activity_tokens)
            if reporting_tokens is not None:
                self._reporting_tokens = _token_list(reporting_tokens, "reporting_tokens")
                self._reporting_auth = _auth_set(self._reporting_tokens)

    # ------------------------------------------------------------------ what it received

    @property
    def activities(self) -> list[ReceivedActivity]:
        """A copy of every accepted activity, in arrival order (empty if not kept)."""
        with self._lock:
            return list(self._activities)

    @property
    def counters(self) -> dict[str, int]:
        """A copy of the outcome counters.

        ``requests`` counts every request on the API port; then each request
        lands in exactly one of: ``ok`` (activity accepted), ``reports`` (report
        served), ``auth_error`` (401 for a bad or wrongly scoped token),
        ``api_error`` (``ok: false`` for a missing parameter or bad dates),
        ``rate_limited`` (a 429 from :meth:`set_rate_limit`'s limiter),
        ``fault_<kind>`` (an injected fault), ``not_found``,
        ``method_not_allowed`` or ``bad_request``.
        """
        with self._lock:
            return dict(self._counters)

    def unique_count(self) -> int:
        """The number of distinct (billing id, user id, activity type) accepted so far."""
        with self._lock:
            return sum(len(users) for users in self._index.values())

    def report(
        self, start: datetime | str | None = None, end: datetime | str | None = None
    ) -> dict[str, Any]:
        """Return the ``result`` object ``reports.get`` would answer for these bounds.

        Bounds are ISO 8601 strings or datetimes (naive means UTC); neither
        means the prior calendar month relative to the server clock.

        Raises:
            ValueError: ``end_without_start`` or ``invalid_date`` (the API's messages).
        """
        low, high, inclusive, start_text, end_text = _bounds(start, end, self.now())
        types: dict[str, Any] = {}
        with self._lock:
            for (kind, billing), users in self._index.items():
                unique = 0
                for stamps in users.values():
                    for stamp in stamps:
                        if low <= stamp and (stamp <= high if inclusive else stamp < high):
                            unique += 1
                            break
                if unique:
                    billing_ids = types.setdefault(kind, {"billingIds": {}})["billingIds"]
                    billing_ids[billing] = {"unique": unique}
        return {"start": start_text, "end": end_text, "activityTypes": types}

    def reset(self) -> None:
        """Forget activities, counters and faults (hanging connections are closed).

        A rate limit stays (its bucket is full again); so do the latency, the
        framing, the tokens and the clock offset.
        """
        with self._changed:
            self._forget_everything()
        self._maybe_call(self._release())

    def _forget_faults(self) -> None:
        """Drop every injected fault (call with the lock held)."""
        self._count_fault, self._count_left = None, 0
        self._timed_fault = None
        self._rate_faults = {}

    def _forget_everything(self) -> None:
        """The state half of :meth:`reset` (call with the lock held)."""
        self._activities = []
        self._index = {}
        self._accepted = 0
        self._counters = dict.fromkeys(_COUNTER_KEYS, 0)
        self._forget_faults()
        bucket = self._bucket
        if bucket is not None:
            bucket.tokens, bucket.stamp = float(bucket.burst), time.monotonic()
        self._changed.notify_all()

    def wait_for_activities(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` activities were accepted; ``False`` on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._accepted >= n, timeout)

    def wait_for_requests(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` requests reached the API port; ``False`` on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._counters["requests"] >= n, timeout)

    # ------------------------------------------------------------------ the server's clock

    def now(self) -> float:
        """The server's time in unix seconds: ``clock() + clock_offset``."""
        return float(self._clock()) + self._clock_offset

    def set_clock_offset(self, seconds: float) -> None:
        """Set how far the server's clock is ahead of its ``clock`` (negative: behind).

        Applies from the next request on, to activity stamps, reports, ``Date`` and
        ``Retry-After`` dates alike.

        Raises:
            ValueError: ``seconds`` is not a finite number.
        """
        self._clock_offset = _check_offset(seconds)

    def _date_header(self) -> bytes:
        """The ``Date:`` header line for now, rebuilt once per second (loop thread)."""
        second = math.floor(float(self._clock()) + self._clock_offset)
        cached_second, line = self._date_cache
        if second != cached_second:
            line = b"Date: %s\r\n" % _http_date(second).encode("ascii")
            self._date_cache = (second, line)
        return line

    # ------------------------------------------------------------------ faults

    def set_rate_limit(
        self,
        rate: float | None,
        *,
        burst: int | None = None,
        retry_after: _RetryAfterForm = "seconds",
    ) -> None:
        """Limit the API port to ``rate`` requests a second (a token bucket; ``None``: no limit).

        The bucket holds ``burst`` tokens (default ``max(1, ceil(rate))``), starts
        full and refills continuously at ``rate`` tokens a second on the monotonic
        clock. Each request on the API port takes a token; a request that finds
        none is answered HTTP 429 ``{"ok":false,"message":"rate_limited"}`` (counted
        as ``rate_limited``) and takes nothing. Its ``Retry-After`` is the exact wait
        until a token is available rounded up to whole seconds: ``"seconds"`` sends
        delta-seconds (at least 1), ``"date"`` an IMF-fixdate on the server's clock
        (at least one second after its ``Date``), ``"none"`` no header. The limiter
        sits in front of everything else: a refused request consumes no injected
        fault. Setting a limit again starts a new, full bucket.

        Raises:
            ValueError: ``rate`` not a positive finite number, ``burst`` below 1, an
                unknown ``retry_after`` form, or a ``burst`` without a ``rate``.
        """
        if rate is None:
            if burst is not None:
                raise ValueError("burst needs a rate")
            with self._lock:
                self._bucket = None
            return
        limit = float(rate)
        if not (math.isfinite(limit) and limit > 0.0):
            raise ValueError(f"rate must be a positive number of requests a second, not {rate!r}")
        if burst is None:
            size = max(1, math.ceil(limit))
        elif isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an int >= 1, not {burst!r}")
        else:
            size = burst
        if retry_after not in _RETRY_AFTER_FORMS:
            raise ValueError(
                f"retry_after must be one of {_RETRY_AFTER_FORMS}, not {retry_after!r}"
            )
        bucket = _Bucket(limit, size, retry_after, float(size), time.monotonic())
        with self._lock:
            self._bucket = bucket

    def _rate_limited(self, bucket: _Bucket, wait: float) -> bytes:
        """The 429 answer of the limiter for a token ``wait`` seconds away."""
        form = bucket.retry_after
        if form == "none":
            return _R_429_BARE
        wait = max(0.0, wait - 1e-9)  # float noise must not add a whole second
        if form == "seconds":
            header = b"Retry-After: %d\r\n" % max(1, math.ceil(wait))
        else:
            now = self.now()
            moment = max(math.ceil(now + wait), math.floor(now) + 1)
            header = b"Retry-After: %s\r\n" % _http_date(moment).encode("ascii")
        return _response(429, _BODY_429, extra_headers=header)

    def set_framing(self, framing: _Framing) -> None:
        """Choose how later API responses are delimited (the control port is unaffected).

        ``"content-length"`` (the default): ``Content-Length``, keep-alive.
        ``"chunked"``: ``Transfer-Encoding: chunked``, the body in three chunks
        written one by one, keep-alive. ``"close"``: no ``Content-Length``,
        ``Connection: close``; the first half of the response is written, the
        rest 5 ms later in another TCP segment, then the connection is closed
        (the body ends at EOF). ``"http/1.0"``: an ``HTTP/1.0`` status line with
        ``Content-Length``, then the connection is closed. Bodiless answers (204,
        304) are never chunked or cut.

        Raises:
            ValueError: an unknown framing.
        """
        self._framing = _check_framing(framing)

    @property
    def latency(self) -> float:
        """The seconds added to each API response now (a spike's while it lasts)."""
        with self._lock:
            self._end_spike(time.monotonic())
            return self._latency

    def set_latency(self, seconds: float, duration: float | None = None) -> None:
        """Delay every later API response by ``seconds`` (``0`` for none).

        With ``duration``, this is a latency spike: it lasts ``duration`` seconds
        (on the monotonic clock) and then the latency returns by itself to the
        value set last without a duration. Without one, any spike ends now.

        Raises:
            ValueError: negative or non-finite ``seconds``, or ``duration`` not positive.
        """
        latency = _check_latency(seconds)
        if duration is None:
            with self._lock:
                self._latency = self._base_latency = latency
                self._spike_until = None
            return
        length = float(duration)
        if not (math.isfinite(length) and length > 0.0):
            raise ValueError(f"duration must be a positive number of seconds, not {duration!r}")
        with self._lock:
            self._latency = latency
            self._spike_until = time.monotonic() + length

    def _end_spike(self, now: float) -> None:
        """Return to the base latency once a spike is over (call with the lock held)."""
        until = self._spike_until
        if until is not None and now >= until:
            self._latency = self._base_latency
            self._spike_until = None

    def inject(
        self,
        kind: str,
        *,
        count: int | None = None,
        rate: float | None = None,
        seconds: float | None = None,
        retry_after: str | None = None,
        message: str = "injected_failure",
        status: int | None = None,
        body: _FaultBody | None = None,
    ) -> None:
        """Make API requests fail in the way ``kind`` says.

        Kinds: ``"503"`` (HTML error page), ``"429"`` (``Retry-After:
        retry_after`` when given), ``"ok_false"`` (HTTP 200 ``{"ok": false,
        "message": message}``), ``"401"`` (``invalid_auth_token``),
        ``"non_json"`` (HTTP 200 with an HTML body), ``"hang"`` (never answer
        until :meth:`clear_faults`, :meth:`reset`, :meth:`outage` or
        :meth:`stop`), ``"drop"`` (close the connection without a response) and
        ``"http"``: any ``status`` from 200 to 599 with a ``body`` of one shape:
        ``"html"`` (the default; an nginx-like error page naming the status, as
        a WAF, CDN or ingress sends), ``"empty"``, ``"text"`` (``text/plain``),
        ``"per_ok_false"`` (Per's ``{"ok": false, "message": message}``) or
        ``"per_auth"`` (Per's ``invalid_auth_token``); 204 and 304 have no body.
        ``retry_after`` adds that header to ``"429"`` and ``"http"`` answers.

        How long: ``count=N`` (the default is ``count=1``): the next ``N``
        requests get this fault; it replaces any earlier counted fault.
        ``seconds=S``: every request in the next ``S`` seconds (on the monotonic
        clock) gets it; it replaces any earlier timed fault and then ends by
        itself. ``rate=F``: from now on until :meth:`clear_faults`, each request
        gets this fault with probability ``F`` (one rate per kind, and per status
        for ``"http"``; several may be active). Counted faults are served first,
        then a timed one, then rate faults. Faults hit every request on the API
        port after the rate limiter and before authentication; a faulted
        ``activities.add`` records nothing. Each is counted as ``fault_<kind>``.

        Raises:
            ValueError: unknown kind or body, more than one of ``count``, ``rate``
                and ``seconds``, out-of-range values, ``"http"`` without a
                ``status``, or ``status``/``body`` with another kind.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if sum(x is not None for x in (count, rate, seconds)) > 1:
            raise ValueError("give one of count, rate or seconds, not several")
        if retry_after is not None and ("\r" in retry_after or "\n" in retry_after):
            raise ValueError("retry_after must be a single header line")
        fault, key = _new_fault(kind, retry_after, message, status, body)
        self._arm(fault, key, count, rate, seconds)

    def _arm(
        self, fault: _Fault, key: str, count: int | None, rate: float | None, seconds: float | None
    ) -> None:
        """Put ``fault`` in force for the ``count``, ``rate`` or ``seconds`` of :meth:`inject`."""
        if seconds is not None:
            window = float(seconds)
            if not (math.isfinite(window) and window > 0.0):
                raise ValueError(f"seconds must be a positive number, not {seconds!r}")
            with self._lock:
                self._timed_fault, self._timed_until = fault, time.monotonic() + window
        elif rate is not None:
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"rate must be within [0, 1], not {rate!r}")
            with self._lock:
                self._rate_faults[key] = (rate, fault)
        else:
            count = 1 if count is None else count
            if count < 0:
                raise ValueError(f"count must be >= 0, not {count!r}")
            with self._lock:
                self._count_fault, self._count_left = fault, count

    def clear_faults(self) -> None:
        """Remove every injected fault and close the connections of hanging requests.

        The rate limit, latency and framing are settings, not faults: they stay.
        """
        with self._lock:
            self._forget_faults()
        self._maybe_call(self._release())

    def outage(self) -> None:
        """Stop listening (new connections are refused) and close every open connection."""
        self._maybe_call(self._outage())

    def recover(self) -> None:
        """End an :meth:`outage`: listen again on the same port.

        Raises:
            OSError: the port was taken by someone else meanwhile.
        """
        if self._loop is not None:
            self._call(self._listen())

    def serve_control(self, port: int = 0) -> str:
        """Open the control channel (JSON over HTTP, survives :meth:`outage`); return its URL.

        Endpoints: ``/stats``, ``/report?start=&end=``, ``/inject?kind=&count=&rate=&
        seconds=&retry_after=&message=&status=&body=``, ``/clear``, ``/outage``, ``/recover``,
        ``/latency?seconds=&duration=``, ``/rate_limit?rate=&burst=&retry_after=`` (no
        ``rate``: no limit), ``/framing?mode=``, ``/clock?offset=``, ``/reset``,
        ``/tokens?activity=&reporting=``.
        """
        if self._loop is None:
            raise RuntimeError("start the server before its control channel")
        self._call(self._listen_control(port))
        url = self.control_url
        assert url is not None
        return url

    # ------------------------------------------------------------------ the hot path

    def _count(self, outcome: str) -> None:
        with self._changed:
            self._counters["requests"] += 1
            self._counters[outcome] += 1
            self._changed.notify_all()

    def _api_request(
        self, method: bytes, target: bytes, authorization: bytes | None
    ) -> tuple[int, bytes, float]:
        """Decide the fate of one API request (runs on the loop thread).

        In order: the rate limiter, injected faults, the method, the path, the token.
        """
        with self._changed:
            counters = self._counters
            counters["requests"] += 1
            self._changed.notify_all()
            if self._spike_until is not None:
                self._end_spike(time.monotonic())
            latency = self._latency
            refused = self._limited_or_faulted(latency)
            if refused is not None:
                return refused
            if method != b"GET":
                counters["method_not_allowed"] += 1
                return _RESPOND, _R_405, latency
            path, _, query = target.partition(b"?")
            if path == b"/activities.add":
                return self._add_activity(query, authorization, latency)
            if path != b"/reports.get":
                counters["not_found"] += 1
                return _RESPOND, _R_404, latency
            if authorization not in self._reporting_auth:
                counters["auth_error"] += 1
                return _RESPOND, _R_401, latency
        # reports.get with a valid token: computed outside the hot lock section
        return self._report_request(query, latency)

    def _limited_or_faulted(self, latency: float) -> tuple[int, bytes, float] | None:
        """The rate limiter's 429 or an injected fault's fate, else None (lock held)."""
        counters = self._counters
        bucket = self._bucket
        if bucket is not None:
            wait = bucket.take(time.monotonic())
            if wait > 0.0:
                counters["rate_limited"] += 1
                return _RESPOND, self._rate_limited(bucket, wait), latency
        fault = self._next_fault()
        if fault is None:
            return None
        counters["fault_" + fault.kind] += 1
        if fault.kind == "hang":
            return _HANG, b"", 0.0
        if fault.kind == "drop":
            return _DROP, b"", 0.0
        return _RESPOND, fault.response, latency

    def _next_fault(self) -> _Fault | None:
        """The fault this request gets: counted, then timed, then by rate (lock held)."""
        if self._count_left > 0:
            self._count_left -= 1
            return self._count_fault
        if self._timed_fault is not None:
            if time.monotonic() < self._timed_until:
                return self._timed_fault
            self._timed_fault = None
        for rate, candidate in self._rate_faults.values():
            if self._rng.random() < rate:
                return candidate
        return None

    def _add_activity(
        self, query: bytes, authorization: bytes | None, latency: float
    ) -> tuple[int, bytes, float]:
        """Answer ``activities.add``: check the token and parameters, store (lock held)."""
        counters = self._counters
        if authorization not in self._activity_auth:
            counters["auth_error"] += 1
            return _RESPOND, _R_401, latency
        params = _params(query)
        values: list[str] = []
        for name in ("billingId", "userId", "activityTypeId"):
            value = params.get(name)
            if not value:
                counters["api_error"] += 1
                body = _json_body({"ok": False, "message": "missing_parameter", "parameter": name})
                return _RESPOND, _response(200, body), latency
            values.append(value)
        billing, user, kind = values
        tid = self._store(billing, user, kind)
        counters["ok"] += 1
        return _RESPOND, _OK_HEAD + _OK_PREFIX + tid.encode() + _OK_SUFFIX, latency

    def _store(self, billing: str, user: str, kind: str) -> str:
        """Record one accepted activity at the server's time; return its transaction id."""
        stamp = float(self._clock()) + self._clock_offset
        tid = "".join(self._id_rng.choices(_ID_ALPHABET, k=18))
        users = self._index.get((kind, billing))
        if users is None:
            users = self._index[(kind, billing)] = {}
        stamps = users.get(user)
        if stamps is None:
            users[user] = array("d", (stamp,))
        elif stamps[-1] != stamp:
            stamps.append(stamp)
        if self._keep_activities:
            self._activities.append(ReceivedActivity(billing, user, kind, stamp, tid))
        self._accepted += 1
        return tid

    def _report_request(self, query: bytes, latency: float) -> tuple[int, bytes, float]:
        """Answer ``reports.get`` for an authorised request (without the lock held)."""
        params = _params(query)
        try:
            result = self.report(params.get("start"), params.get("end"))
        except ValueError as error:
            outcome, body = "api_error", _json_body({"ok": False, "message": str(error)})
        else:
            outcome, body = "reports", _json_body({"ok": True, "result": result})
        with self._lock:
            self._counters[outcome] += 1
        return _RESPOND, _response(200, body), latency

    # ------------------------------------------------------------------ control channel

    async def _control_request(self, method: bytes, target: bytes) -> bytes:
        path_bytes, _, query = target.partition(b"?")
        path = path_bytes.decode("latin-1")
        params = _params(query)
        if method != b"GET":
            return _R_405
        try:
            payload = await self._control_action(path, params)
        except (ValueError, OSError) as error:
            return _response(400, _json_body({"ok": False, "message": str(error)}))
        if payload is None:
            return _R_404
        return _response(200, _json_body(payload))

    async def _control_action(self, path: str, params: dict[str, str]) -> Any:
        """Run the control endpoint ``path``: its JSON payload, or None for an unknown path."""
        action = _CONTROL_ACTIONS.get(path)
        return None if action is None else await action(self, params)

    async def _ctl_stats(self, params: dict[str, str]) -> Any:
        with self._lock:
            counters = dict(self._counters)
            accepted = self._accepted
            unique = sum(len(users) for users in self._index.values())
        return {"counters": counters, "unique": unique, "activities": accepted}

    async def _ctl_report(self, params: dict[str, str]) -> Any:
        return self.report(params.get("start"), params.get("end"))

    async def _ctl_inject(self, params: dict[str, str]) -> Any:
        count = params.get("count")
        rate = params.get("rate")
        seconds = params.get("seconds")
        status = params.get("status")
        body = params.get("body") or None
        if body is not None and body not in _FAULT_BODIES:
            raise ValueError(f"body must be one of {_FAULT_BODIES}, not {body!r}")
        self.inject(
            params.get("kind", ""),
            count=int(count) if count else None,
            rate=float(rate) if rate else None,
            seconds=float(seconds) if seconds else None,
            retry_after=params.get("retry_after") or None,
            message=params.get("message") or "injected_failure",
            status=int(status) if status else None,
            body=cast(_FaultBody | None, body),
        )
        return _OK

    async def _ctl_clear(self, params: dict[str, str]) -> Any:
        return await self._forget_and_release(self._forget_faults)

    async def _ctl_rate_limit(self, params: dict[str, str]) -> Any:
        rate = params.get("rate")
        burst = params.get("burst")
        form = params.get("retry_after") or "seconds"
        if form not in _RETRY_AFTER_FORMS:
            raise ValueError(f"retry_after must be one of {_RETRY_AFTER_FORMS}, not {form!r}")
        self.set_rate_limit(
            float(rate) if rate else None,
            burst=int(burst) if burst else None,
            retry_after=cast(_RetryAfterForm, form),
        )
        return _OK

    async def _ctl_outage(self, params: dict[str, str]) -> Any:
        await self._outage()
        return _OK

    async def _ctl_recover(self, params: dict[str, str]) -> Any:
        await self._listen()
        return _OK

    async def _ctl_framing(self, params: dict[str, str]) -> Any:
        self.set_framing(_check_framing(params.get("mode", "")))
        return _OK

    async def _ctl_clock(self, params: dict[str, str]) -> Any:
        self.set_clock_offset(float(params.get("offset", "0") or "0"))
        return _OK

    async def _ctl_latency(self, params: dict[str, str]) -> Any:
        duration = params.get("duration")
        self.set_latency(
            float(params.get("seconds", "0") or "0"), float(duration) if duration else None
        )
        return _OK

    async def _ctl_reset(self, params: dict[str, str]) -> Any:
        return await self._forget_and_release(self._forget_everything)

    async def _forget_and_release(self, forget: Callable[[], None]) -> Any:
        """``forget()`` with the lock held, then close the connections of hanging requests."""
        with self._changed:
            forget()
        await self._release()
        return _OK

    async def _ctl_tokens(self, params: dict[str, str]) -> Any:
        activity = params.get("activity")
        reporting = params.get("reporting")
        self.set_tokens(
            activity_tokens=None if activity is None else activity.split(","),
            reporting_tokens=None if reporting is None else reporting.split(","),
        )
        return _OK

    # ------------------------------------------------------------------ loop plumbing

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the server loop and wait for its result."""
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("PerServer is not running")
        if self._in_loop_thread():
            coro.close()
            raise RuntimeError("this PerServer method cannot be called from its own loop thread")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)

    def _maybe_call(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` on the loop and wait for it; a no-op when the server is stopped."""
        loop = self._loop
        if loop is None:
            coro.close()
            return
        if self._in_loop_thread():
            self._keep(loop.create_task(coro))  # cannot wait for ourselves
            return
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop closed meanwhile
            coro.close()
            return
        future.result(timeout=30)

    def _halt(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        self._listener = None
        self._control_server = None
        self._control_port = None
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # already closed
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)

    async def _listen(self) -> None:
        """Open the API port. Its accept loop is hand-made so that an outage is clean.

        (With ``loop.create_server``, a connection accepted just before
        ``Server.close()`` can be left open, neither served nor closed.)
        """
        if self._listener is not None:
            return
        loop = asyncio.get_running_loop()
        family, kind, proto, _, address = socket.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(1024)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._generation += 1
        self._listener = listener
        self._port = listener.getsockname()[1]
        loop.add_reader(listener.fileno(), self._accept, listener, self._generation)

    def _accept(self, listener: socket.socket, generation: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(128):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNABORTED, EMFILE: try again on the next wake-up
                return
            conn.setblocking(False)
            self._keep(loop.create_task(self._adopt(conn, generation)))

    def _keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a strong reference to ``task`` until it is done."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt(self, conn: socket.socket, generation: int) -> None:
        if generation != self._generation:  # an outage began since the accept
            conn.close()
            return
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: _Connection(self, False, generation), sock=conn
            )
        except OSError:
            conn.close()

    async def _listen_control(self, port: int) -> None:
        if self._control_server is not None:
            return
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Connection(self, True), self._host, port, reuse_address=True
        )
        self._control_server = server
        self._control_port = server.sockets[0].getsockname()[1]

    def _go_dark(self) -> list[_Connection]:
        """Stop listening and abort every API connection; return them (loop thread)."""
        listener, self._listener = self._listener, None
        self._generation += 1
        if listener is not None:
            asyncio.get_running_loop().remove_reader(listener.fileno())
            listener.close()  # the kernel resets connections not accepted yet
        closing = list(self._conns)
        for conn in closing:
            conn.abort()
        self._hanging.clear()
        return closing

    def _release_hanging(self) -> list[_Connection]:
        """Close the connections of hanging requests; return them (loop thread)."""
        closing = list(self._hanging)
        for conn in closing:
            conn.close()
        self._hanging.clear()
        return closing

    async def _until_closed(self, conns: list[_Connection]) -> None:
        """Wait until asyncio has really closed ``conns``' sockets (it defers that a tick)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        spins = 0
        while any(c in self._conns or c in self._control_conns for c in conns):
            if loop.time() > deadline:
                return
            spins += 1
            await asyncio.sleep(0 if spins < 20 else 0.001)

    async def _outage(self) -> None:
        closing = self._go_dark()
        for _ in range(5):  # let accepts already under way reach connection_made (and abort)
            await asyncio.sleep(0)
        await self._until_closed(closing + list(self._conns))

    async def _release(self) -> None:
        await self._until_closed(self._release_hanging())

    async def _shutdown(self) -> None:
        closing = self._go_dark()
        server, self._control_server = self._control_server, None
        if server is not None:
            server.close()
        closing += list(self._control_conns)
        for conn in closing:
            conn.abort()
        await self._until_closed(closing)


_OK: Final = {"ok": True}  # the payload of a control action that has nothing to say

#: The control channel's endpoints (see :meth:`PerServer.serve_control`).
_CONTROL_ACTIONS: Final[
    dict[str, Callable[[PerServer, dict[str, str]], Coroutine[Any, Any, Any]]]
] = {
    "/stats": PerServer._ctl_stats,
    "/report": PerServer._ctl_report,
    "/inject": PerServer._ctl_inject,
    "/clear": PerServer._ctl_clear,
    "/rate_limit": PerServer._ctl_rate_limit,
    "/outage": PerServer._ctl_outage,
    "/recover": PerServer._ctl_recover,
    "/framing": PerServer._ctl_framing,
    "/clock": PerServer._ctl_clock,
    "/latency": PerServer._ctl_latency,
    "/reset": PerServer._ctl_reset,
    "/tokens": PerServer._ctl_tokens,
}


# --------------------------------------------------------------------------- helpers


def _http_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _token_list(tokens: Iterable[str], name: str) -> list[str]:
    if isinstance(tokens, str):
        raise TypeError(f"{name} must be an iterable of tokens, not a single str")
    return [str(token) for token in tokens]


def _auth_set(tokens: Iterable[str]) -> frozenset[bytes | None]:
    """Every ``Authorization`` header value that carries one of ``tokens``."""
    values: set[bytes | None] = set()
    for token in tokens:
        raw = token.encode("utf-8")
        values.update((b"Bearer " + raw, b"bearer " + raw, b"BEARER " + raw))
    return frozenset(values)


def _check_framing(framing: str) -> _Framing:
    if framing not in _FRAMINGS:
        raise ValueError(f"framing must be one of {_FRAMINGS}, not {framing!r}")
    return cast(_Framing, framing)


def _check_offset(seconds: float) -> float:
    offset = float(seconds)
    if not math.isfinite(offset):
        raise ValueError(f"clock_offset must be a finite number of seconds, not {seconds!r}")
    return offset


def _check_latency(seconds: float) -> float:
    latency = float(seconds)
    if not (latency >= 0.0 and math.isfinite(latency)):  # also rejects NaN
        raise ValueError(f"latency must be a finite number of seconds >= 0, not {seconds!r}")
    return latency


def _params(query: bytes) -> dict[str, str]:
    """Decode a query string (percent-encoding, ``+`` as space, UTF-8); first value wins."""
    if not query:
        return {}
    parsed = parse_qs(query.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in parsed.items()}
