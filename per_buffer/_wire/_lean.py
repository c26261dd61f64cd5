"""The lean channel: HTTP/1.1 on asyncio's Protocol API, driven by callbacks only.

Per request on a kept-alive connection: one ``transport.write`` of the
preformatted head (only the target changes), one parse of the response as it
arrives in ``data_received``, one call of the caller's ``done``. No Task, no
Future, no httpx object. The deadline is one lazily re-armed timer per channel:
it fires at most about once per timeout period, not once per request.

Framing (RFC 9112 section 6): 1xx interim responses are skipped (101 is a
protocol error: nothing asked for an upgrade), 204 and 304 have no body,
``Transfer-Encoding`` ending in ``chunked`` is de-chunked (extensions and
trailers are read and dropped), another transfer coding or no length at all
means the body runs to EOF, otherwise ``Content-Length`` (duplicates must agree).
Every body is capped. A connection is reused only after a complete response
that allows it (HTTP/1.1 without ``Connection: close``, or HTTP/1.0 with
``Connection: keep-alive``) and with no byte after the response; any byte that
arrives while no request is in flight discards it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Final, cast

from ._base import Answer, Channel, Done, RequestTarget, WireError, WireErrorKind

__all__ = ["LeanChannel"]

logger = logging.getLogger("per_buffer.wire")

_MAX_HEAD: Final = 64 * 1024
_MAX_LINE: Final = 4096

# A whole response head: status line, header fields, blank line (CRLF or bare LF).
_HEAD: Final = re.compile(
    rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?:[ \t][^\r\n]*)?"
    rb"(\r?\n(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*\r?\n)*)\r?\n"
)
_HEAD_END: Final = re.compile(rb"\n\r?\n")
_HEX: Final = re.compile(rb"[0-9A-Fa-f]{1,15}")

# Parser states of a connection.
_IDLE: Final = 0  # no request in flight
_HEAD_WAIT: Final = 1  # reading the response head
_LENGTH: Final = 2  # a Content-Length body
_CHUNK_SIZE: Final = 3  # a chunk-size line
_CHUNK_DATA: Final = 4  # chunk data
_CHUNK_END: Final = 5  # the CRLF after chunk data
_TRAILERS: Final = 6  # trailer fields up to the blank line
_TO_EOF: Final = 7  # a close-delimited body


class _Bad(Exception):
    """Internal: the response cannot be used (carries the WireError kind)."""

    def __init__(self, kind: WireErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: WireErrorKind = kind


def _tokens(headers: bytes, key: bytes) -> list[bytes]:
    """Comma-separated values of every ``key`` field in lower-cased ``headers``."""
    out: list[bytes] = []
    at = headers.find(key)
    while at >= 0:
        start = at + len(key)
        end = headers.find(b"\n", start)
        out.extend(part.strip() for part in headers[start:end].split(b","))
        at = headers.find(key, end)
    return out


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "EOF"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _line_end(data: bytes | bytearray, pos: int, what: str) -> int:
    """Where the line starting at ``pos`` ends (its LF), or -1 while it is incomplete.

    Raises:
        _Bad: the incomplete line is already longer than ``_MAX_LINE``.
    """
    newline = data.find(b"\n", pos)
    if newline < 0 and len(data) - pos > _MAX_LINE:
        raise _Bad("protocol", f"{what} line too long")
    return newline


def _keep_alive(minor: bytes, headers: bytes) -> bool:
    """May the connection be reused after this response (``minor``: HTTP/1.x's x)?"""
    if b"\nconnection:" in headers:
        tokens = _tokens(headers, b"\nconnection:")
        if b"close" in tokens:
            return False
        if b"keep-alive" in tokens:
            return True
    return minor == b"1"


def _framing(headers: bytes, keep: bool, max_body: int) -> tuple[int, int, bool]:
    """``(state, Content-Length, keep)``: how the body after lower-cased ``headers`` ends.

    Raises:
        _Bad: a bad or disagreeing ``Content-Length``, or one over ``max_body``.
    """
    if b"\ntransfer-encoding:" in headers:
        if _tokens(headers, b"\ntransfer-encoding:")[-1] != b"chunked":
            return _TO_EOF, 0, False
        # RFC 9112 6.3: with a Content-Length as well the framing was ambiguous: no reuse
        return _CHUNK_SIZE, 0, keep and b"\ncontent-length:" not in headers
    if b"\ncontent-length:" not in headers:
        return _TO_EOF, 0, False
    values = _tokens(headers, b"\ncontent-length:")
    first = values[0]
    if not first.isdigit() or any(value != first for value in values):
        # described, not quoted: a server may echo request headers (the token) here
        raise _Bad("protocol", f"bad Content-Length ({len(first)} bytes, not one number)")
    if len(first) > 15 or int(first) > max_body:
        raise _Bad("too_large", f"response body of {int(first[:30])} bytes")
    return _LENGTH, int(first), keep


class _Conn(asyncio.Protocol):
    """One TCP (or TLS) connection of a :class:`LeanChannel` and its response parser."""

    __slots__ = (
        "buf",
        "ch",
        "dead",
        "got",
        "head",
        "keep",
        "lost",
        "parts",
        "remaining",
        "scan",
        "served",
        "size",
        "state",
        "status",
        "transport",
        "waiter",
    )

    def __init__(self, channel: LeanChannel) -> None:
        self.ch = channel
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.scan = 0
        self.state = _IDLE
        self.remaining = 0
        self.parts: list[bytes] = []
        self.size = 0
        self.status = 0
        self.head = b""
        self.keep = True
        self.served = 0
        self.got = False
        self.dead = False
        self.lost = False
        self.waiter: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        """Parse what arrived; complete the request when its response is whole."""
        if self.state == _IDLE:
            self.drop(abort=True)  # bytes nobody asked for: never reuse this connection
            return
        self.got = True
        buf = self.buf
        if not buf and self.state == _HEAD_WAIT:
            # Fast path: one whole HTTP/1.1 response with one Content-Length, no
            # Transfer-Encoding, no "close" anywhere in its fields, nothing after it.
            # Anything else takes the general parser below, which decides the same.
            match = _HEAD.match(data)
            if match is not None:
                minor, status_text, fields = match.groups()
                headers = fields.lower()
                at = headers.find(b"\ncontent-length:") if minor == b"1" else -1
                if (
                    at >= 0
                    and b"\ntransfer-encoding:" not in headers
                    and b"close" not in headers
                    and headers.find(b"\ncontent-length:", at + 16) < 0
                ):
                    value = headers[at + 16 : headers.find(b"\n", at + 16)].strip()
                    status = int(status_text)
                    end = match.end()
                    if (
                        value.isdigit()
                        and len(value) < 16
                        and len(data) - end == int(value) <= self.ch._max_body
                        and status >= 200
                        and status not in (204, 304)
                    ):
                        self.served += 1
                        self.state = _IDLE
                        self.ch._complete(Answer(status, data[end:], match.group(0)))
                        return
        try:
            if buf:
                buf += data
                self._parse(buf)
            else:
                self._parse(data)
        except _Bad as bad:
            self.drop(abort=True)
            self.ch._complete(WireError(bad.kind, str(bad)))

    def eof_received(self) -> bool:
        """The peer closed its side: ends a close-delimited body, else the request fails."""
        self._ended(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone (by either side)."""
        self.lost = True
        self._ended(exc)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ used by the channel

    def start(self, request: bytes) -> None:
        """Write one request and expect its response."""
        self.state = _HEAD_WAIT
        self.got = False
        assert self.transport is not None
        self.transport.write(request)

    def drop(self, *, abort: bool) -> None:
        """Stop using this connection (idempotent); the channel forgets it."""
        if self.dead:
            return
        self.dead = True
        self.state = _IDLE
        self.parts = []
        ch = self.ch
        if ch._conn is self:
            ch._conn = None
        transport = self.transport
        if transport is not None:
            if abort:
                transport.abort()
            else:
                transport.close()

    # ------------------------------------------------------------------ internals

    def _ended(self, exc: BaseException | None) -> None:
        if self.dead:
            return
        state = self.state
        if state == _TO_EOF and exc is None:
            body = b"".join(self.parts)
            self.served += 1
            self.drop(abort=False)
            self.ch._complete(Answer(self.status, body, self.head))
            return
        retry = state != _IDLE and not self.got and self.served > 0  # a reused connection
        self.drop(abort=exc is not None)
        if state != _IDLE:
            self.ch._lost(retry, _describe(exc))

    def _parse(self, data: bytes | bytearray) -> None:
        """Consume ``data`` (the buffered bytes plus what arrived) as far as possible.

        One step a parser state (``_STEPS``). A step returns None once it handed the
        response over (the done callback may already have sent the next request on
        this connection: nothing more is touched), else ``(pos, go_on)``: where it
        stopped and whether the (new) state can go on or must wait for more bytes.
        """
        pos = 0
        steps = self._STEPS
        while True:
            outcome = steps[self.state](self, data, pos)
            if outcome is None:
                return
            pos, go_on = outcome
            if not go_on:
                break
        # Wait for more bytes: keep what was not consumed.
        if data is self.buf:
            del self.buf[:pos]
        elif pos < len(data):
            self.buf = bytearray(data[pos:])
        scan = self.scan
        self.scan = scan - pos if scan > pos else 0

    def _idle_step(self, data: bytes | bytearray, pos: int) -> tuple[int, bool] | None:
        """``_IDLE``: bytes nobody asked for (``data_received`` drops such a connection)."""
        raise _Bad("protocol", "bytes while no request is in flight")

    def _head_step(self, data: bytes | bytearray, pos: int) -> tuple[int, bool] | None:
        """``_HEAD_WAIT``: find and check the response head; skip interim (1xx) responses."""
        total = len(data)
        found = _HEAD_END.search(data, self.scan)  # from where the last search stopped
        if found is None:
            if total - pos >= 5 and data[pos : pos + 5] != b"HTTP/":
                start = bytes(data[pos : pos + 40])
                raise _Bad("protocol", f"not an HTTP response: {start!r}")
            if total - pos > _MAX_HEAD:
                raise _Bad("too_large", f"response head exceeds {_MAX_HEAD} bytes")
            self.scan = max(pos, total - 2)
            return pos, False
        end = found.end()
        match = _HEAD.fullmatch(data, pos, end)
        if match is None:
            line = bytes(data[pos : data.find(b"\n", pos)])[:80]
            raise _Bad("protocol", f"malformed response head (first line {line!r})")
        status = int(match.group(2))
        if status < 200:
            if status == 101:
                raise _Bad("protocol", "unexpected 101 Switching Protocols")
            self.scan = end  # an interim response: the real one follows
            return end, True
        headers = match.group(3).lower()
        keep = _keep_alive(match.group(1), headers)
        self.status = status
        self.head = bytes(match.group(0))
        if status in (204, 304):
            self.keep = keep
            self._finish(data, end, b"")
            return None
        self.state, self.remaining, self.keep = _framing(headers, keep, self.ch._max_body)
        self.size = 0
        self.parts = []
        return end, True

    def _length_step(self, data: bytes | bytearray, pos: int) -> tuple[int, bool] | None:
        """``_LENGTH``: a body of ``Content-Length`` bytes (often whole in this segment)."""
        remaining = self.remaining
        avail = len(data) - pos
        if avail >= remaining:
            body = bytes(data[pos : pos + remaining])
            if self.parts:
                self.parts.append(body)
                body = b"".join(self.parts)
            self._finish(data, pos + remaining, body)
            return None
        if avail:
            self.parts.append(bytes(data[pos:]))
        self.remaining = remaining - avail
        return len(data), False

    def _to_eof_step(self, data: bytes | bytearray, pos: int) -> tuple[int, bool] | None:
        """``_TO_EOF``: a close-delimited body (:meth:`_ended` hands it over)."""
        total = len(data)
        if pos < total:
            self.size += total - pos
            if self.size > self.ch._max_body:
                raise _Bad("too_large", f"response body over {self.ch._max_body} bytes")
            self.parts.append(bytes(data[pos:]))
        return total, False

    def _chunk_size_step(self, data: bytes | bytearray, pos: int) -> tuple[int, bool] | None:
        """``_CHUNK_SIZE``: a chunk-size line (extensions dropped); 0 starts the trailers."""
        newline = _line_end(data, pos, "chunk-size")
        if newline < 0:
            return pos, False
        size_text = bytes(data[pos:newline]).split(b";", 1)[0].strip()
        if _HEX.fullmatch(size_text) is None:
            raise _Bad("protocol", f"bad chunk size ({len(size_text)} bytes, not hex)")
        size = int(size_text, 16)
        if size == 0:
            self.state = _TRAILERS
            self.remaining = 0  # trailer bytes seen
            return newline + 1, True
        if self.size + size > self.ch._max_body:
            raise _Bad("too_large", f"response body over {self.ch._max_body} bytes")
        self.size += size
        self.remaining = size
        self.state = _CHUNK_DATA
        return newline + 1, True

    def _chunk_data_step(self, data: bytes | bytearray, pos: int) -> tuple[int, bool] | None:
        """``_CHUNK_DATA``: the ``remaining`` bytes of the current chunk."""
        remaining = self.remaining
        avail = len(data) - pos
        if avail < remaining:
            if avail:
                self.parts.append(bytes(data[pos:]))
            self.remaining = remaining - avail
            return len(data), False
        self.parts.append(bytes(data[pos : pos + remaining]))
        self.state = _CHUNK_END
        return pos + remaining, True

    def _chunk_end_step(self, data: bytes | bytearray, pos: int) -> tuple[int, bool] | None:
        """``_CHUNK_END``: the CRLF (or bare LF) after chunk data."""
        total = len(data)
        if pos >= total:
            return pos, False
        if data[pos] == 10:
            pos += 1
        elif data[pos] == 13:
            if pos + 1 >= total:
                return pos, False
            if data[pos + 1] != 10:
                raise _Bad("protocol", "chunk data not followed by CRLF")
            pos += 2
        else:
            raise _Bad("protocol", "chunk data longer than its size")
        self.state = _CHUNK_SIZE
        return pos, True

    def _trailers_step(self, data: bytes | bytearray, pos: int) -> tuple[int, bool] | None:
        """``_TRAILERS``: trailer fields, read and dropped, up to the blank line."""
        newline = _line_end(data, pos, "trailer")
        if newline < 0:
            return pos, False
        trailer = data[pos:newline]
        self.remaining += newline + 1 - pos
        pos = newline + 1
        if trailer in (b"", b"\r"):
            self._finish(data, pos, b"".join(self.parts))
            return None
        if b":" not in trailer:
            raise _Bad("protocol", f"malformed trailer ({len(trailer)} bytes, no colon)")
        if self.remaining > _MAX_HEAD:
            raise _Bad("too_large", f"trailers exceed {_MAX_HEAD} bytes")
        return pos, True

    # The step of each parser state, indexed by the state's number.
    _STEPS: Final = (
        _idle_step,
        _head_step,
        _length_step,
        _chunk_size_step,
        _chunk_data_step,
        _chunk_end_step,
        _trailers_step,
        _to_eof_step,
    )

    def _finish(self, data: bytes | bytearray, pos: int, body: bytes) -> None:
        """A complete response ends at ``pos``: hand it over, keep or drop the connection."""
        self.served += 1
        self.state = _IDLE
        self.parts = []
        self.scan = 0
        if data is self.buf:
            self.buf = bytearray()
        if pos < len(data) or not self.keep:
            self.drop(abort=False)  # extra bytes, or the server will close: never reuse
        self.ch._complete(Answer(self.status, body, self.head))


class LeanChannel(Channel):
    """The callback-driven HTTP/1.1 channel over one connection (see the module docstring)."""

    __slots__ = (
        "_conn",
        "_connecting",
        "_deadline",
        "_done",
        "_is_closed",
        "_loop",
        "_max_body",
        "_request",
        "_retried",
        "_suffix",
        "_target",
        "_timeout",
        "_timer",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        target: RequestTarget,
        *,
        timeout: float,
        max_body: int,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._target = target
        self._suffix = target.head_suffix
        self._timeout = timeout
        self._max_body = max_body
        self._conn: _Conn | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._done: Done | None = None
        self._request = b""
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._retried = False
        self._is_closed = False

    def __repr__(self) -> str:
        state = "closed" if self._is_closed else "busy" if self.busy else "idle"
        return f"<LeanChannel {self._target.origin} {state}>"

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._is_closed

    def send(self, target: bytes, done: Done) -> None:
        """Send ``GET target``; ``done`` gets the outcome from the loop (see :class:`Channel`)."""
        if self.busy or self._is_closed:
            raise RuntimeError("channel is closed" if self._is_closed else "channel is busy")
        self.busy = True
        self._done = done
        self._request = request = b"GET " + target + self._suffix
        self._retried = False
        loop = self._loop
        self._deadline = deadline = loop.time() + self._timeout
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._on_timer)
        conn = self._conn
        if conn is not None:
            conn.state = _HEAD_WAIT  # conn.start(request), inlined
            conn.got = False
            conn.transport.write(request)  # type: ignore[union-attr]
        else:
            self._connect()

    def close(self) -> None:
        """Abort the connection and any in-flight request (its ``done`` gets "closed")."""
        if self._is_closed:
            return
        self._is_closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._connecting is not None:
            self._connecting.cancel()
        conn = self._conn
        if conn is not None:
            conn.drop(abort=self.busy)
        if self.busy:
            done = self._done
            self._done = None
            self.busy = False
            assert done is not None
            self._loop.call_soon(_call, done, WireError("closed", "the channel was closed"))

    async def aclose(self) -> None:
        """Close, then wait (up to 1 s) until the connection is released."""
        conn = self._conn
        connecting = self._connecting
        self.close()
        waits: set[asyncio.Future[None]] = set()
        if connecting is not None:
            waits.add(connecting)
        if conn is not None and not conn.lost and conn.transport is not None:
            conn.waiter = self._loop.create_future()
            waits.add(conn.waiter)
        if waits:
            await asyncio.wait(waits, timeout=1.0)

    # ------------------------------------------------------------------ internals

    def _complete(self, result: Answer | WireError) -> None:
        if not self.busy:
            return
        done = self._done
        self._done = None
        self.busy = False
        assert done is not None
        try:
            done(result)
        except Exception:
            logger.exception("per_buffer wire: a done callback raised")

    def _lost(self, retry: bool, why: str) -> None:
        """The connection ended before a complete response."""
        if retry and not self._retried and not self._is_closed:
            self._retried = True  # a reused connection the server had closed: once, fresh
            self._connect()
            return
        self._complete(
            WireError("closed", f"{self._target.origin} closed the connection before a "
                      f"complete response ({why})")
        )  # fmt: skip

    def _on_timer(self) -> None:
        self._timer = None
        if not self.busy:
            return
        loop = self._loop
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._on_timer)
            return
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        conn = self._conn
        if conn is not None:
            conn.drop(abort=True)
        self._complete(
            WireError("timeout", f"no complete response from {self._target.origin} "
                      f"within {self._timeout:g} s")
        )  # fmt: skip

    def _connect(self) -> None:
        self._connecting = self._loop.create_task(self._open())

    async def _open(self) -> None:
        target = self._target
        made: list[_Conn] = []

        def factory() -> _Conn:
            conn = _Conn(self)
            made.append(conn)
            return conn

        https = target.scheme == "https"
        # asyncio's own loop tries a host's addresses with RFC 8305 "happy eyeballs"
        # (as httpx's anyio does); uvloop has no such option and tries them in turn.
        extra: dict[str, Any] = (
            {"happy_eyeballs_delay": 0.25} if isinstance(self._loop, asyncio.BaseEventLoop) else {}
        )
        try:
            await self._loop.create_connection(
                factory,
                target.connect_host,
                target.port,
                ssl=target.ssl_context() if https else None,
                server_hostname=target.connect_host if https else None,
                **extra,
            )
        except asyncio.CancelledError:
            for conn in made:
                conn.drop(abort=True)
            raise
        except Exception as exc:
            for conn in made:
                conn.drop(abort=True)
            if self._connecting is asyncio.current_task():
                self._connecting = None
                self._complete(
                    WireError("connect", f"cannot connect to {target.origin} ({_describe(exc)})")
                )
            return
        conn = made[-1]
        if self._connecting is not asyncio.current_task() or self._is_closed:
            conn.drop(abort=False)
            return
        self._connecting = None
        if conn.dead:  # lost during the handshake
            if self.busy:
                self._complete(WireError("closed", f"{target.origin} closed the connection"))
            return
        self._conn = conn
        if self.busy:
            conn.start(self._request)


def _call(done: Done, result: Answer | WireError) -> None:
    try:
        done(result)
    except Exception:
        logger.exception("per_buffer wire: a done callback raised")
