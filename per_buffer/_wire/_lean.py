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
        """Consume ``data`` (the buffered bytes plus what arrived) as far as possible."""
        pos = 0
        total = len(data)
        state = self.state
        scan = self.scan
        while True:
            if state == _HEAD_WAIT:
                found = _HEAD_END.search(data, scan)  # from where the last search stopped
                if found is None:
                    if total - pos >= 5 and data[pos : pos + 5] != b"HTTP/":
                        start = bytes(data[pos : pos + 40])
                        raise _Bad("protocol", f"not an HTTP response: {start!r}")
                    if total - pos > _MAX_HEAD:
                        raise _Bad("too_large", f"response head exceeds {_MAX_HEAD} bytes")
                    scan = max(pos, total - 2)
                    break
                end = found.end()
                match = _HEAD.fullmatch(data, pos, end)
                if match is None:
                    line = bytes(data[pos : data.find(b"\n", pos)])[:80]
                    raise _Bad("protocol", f"malformed response head (first line {line!r})")
                status = int(match.group(2))
                headers = match.group(3).lower()
                keep = match.group(1) == b"1"
                if b"\nconnection:" in headers:
                    tokens = _tokens(headers, b"\nconnection:")
                    if b"close" in tokens:
                        keep = False
                    elif b"keep-alive" in tokens:
                        keep = True
                if status < 200:
                    if status == 101:
                        raise _Bad("protocol", "unexpected 101 Switching Protocols")
                    pos = scan = end  # an interim response: the real one follows
                    continue
                self.status = status
                self.head = bytes(match.group(0))
                pos = end
                if status in (204, 304):
                    self.keep = keep
                    self._finish(data, pos, b"")
                    return
                if b"\ntransfer-encoding:" in headers:
                    codings = _tokens(headers, b"\ntransfer-encoding:")
                    if codings[-1] == b"chunked":
                        state = _CHUNK_SIZE
                        if b"\ncontent-length:" in headers:
                            keep = False  # RFC 9112 6.3: framing was ambiguous
                    else:
                        state = _TO_EOF
                        keep = False
                elif b"\ncontent-length:" in headers:
                    values = _tokens(headers, b"\ncontent-length:")
                    first = values[0]
                    if not first.isdigit() or any(value != first for value in values):
                        raise _Bad("protocol", f"bad Content-Length {bytes(first)[:40]!r}")
                    if len(first) > 15 or int(first) > self.ch._max_body:
                        raise _Bad("too_large", f"response body of {int(first[:30])} bytes")
                    self.remaining = int(first)
                    state = _LENGTH
                else:
                    state = _TO_EOF
                    keep = False
                self.keep = keep
                self.size = 0
                self.parts = []
                if state == _LENGTH:
                    remaining = self.remaining
                    if total - pos >= remaining:  # the common case: all in one segment
                        self._finish(data, pos + remaining, bytes(data[pos : pos + remaining]))
                        return
            elif state == _LENGTH:
                remaining = self.remaining
                avail = total - pos
                if avail >= remaining:
                    self.parts.append(bytes(data[pos : pos + remaining]))
                    self._finish(data, pos + remaining, b"".join(self.parts))
                    return
                self.parts.append(bytes(data[pos:]))
                self.remaining = remaining - avail
                pos = total
                break
            elif state == _TO_EOF:
                if pos < total:
                    self.size += total - pos
                    if self.size > self.ch._max_body:
                        raise _Bad("too_large", f"response body over {self.ch._max_body} bytes")
                    self.parts.append(bytes(data[pos:]))
                    pos = total
                break
            elif state == _CHUNK_SIZE:
                newline = data.find(b"\n", pos)
                if newline < 0:
                    if total - pos > _MAX_LINE:
                        raise _Bad("protocol", "chunk-size line too long")
                    break
                size_text = bytes(data[pos:newline]).split(b";", 1)[0].strip()
                if _HEX.fullmatch(size_text) is None:
                    raise _Bad("protocol", f"bad chunk size {size_text[:40]!r}")
                size = int(size_text, 16)
                pos = newline + 1
                if size == 0:
                    state = _TRAILERS
                    self.remaining = 0  # trailer bytes seen
                    continue
                if self.size + size > self.ch._max_body:
                    raise _Bad("too_large", f"response body over {self.ch._max_body} bytes")
                self.size += size
                self.remaining = size
                state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                remaining = self.remaining
                avail = total - pos
                if avail < remaining:
                    if avail:
                        self.parts.append(bytes(data[pos:]))
                    self.remaining = remaining - avail
                    pos = total
                    break
                self.parts.append(bytes(data[pos : pos + remaining]))
                pos += remaining
                state = _CHUNK_END
            elif state == _CHUNK_END:
                if pos >= total:
                    break
                if data[pos] == 10:
                    pos += 1
                elif data[pos] == 13:
                    if pos + 1 >= total:
                        break
                    if data[pos + 1] != 10:
                        raise _Bad("protocol", "chunk data not followed by CRLF")
                    pos += 2
                else:
                    raise _Bad("protocol", "chunk data longer than its size")
                state = _CHUNK_SIZE
            else:  # _TRAILERS
                newline = data.find(b"\n", pos)
                if newline < 0:
                    if total - pos > _MAX_LINE:
                        raise _Bad("protocol", "trailer line too long")
                    break
                trailer = data[pos:newline]
                self.remaining += newline + 1 - pos
                pos = newline + 1
                if trailer in (b"", b"\r"):
                    self._finish(data, pos, b"".join(self.parts))
                    return
                if b":" not in trailer:
                    raise _Bad("protocol", f"malformed trailer {bytes(trailer)[:40]!r}")
                if self.remaining > _MAX_HEAD:
                    raise _Bad("too_large", f"trailers exceed {_MAX_HEAD} bytes")
        # Wait for more bytes: keep what was not consumed.
        self.state = state
        if data is self.buf:
            del self.buf[:pos]
        elif pos < total:
            self.buf = bytearray(data[pos:])
        self.scan = scan - pos if scan > pos else 0

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
