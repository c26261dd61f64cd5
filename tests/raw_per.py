"""A raw-socket Per responder for delivery tests (not the project's own PerServer).

:class:`RawPer` is an asyncio TCP server on 127.0.0.1 in a thread of its own. Every
``GET /activities.add?...`` is recorded as a :class:`Hit` and answered as the test's
*script* (a callable ``Hit -> Reply``, run on the server's loop, free to keep state)
says: status, headers, body, framing (Content-Length, chunked or close-delimited),
delay, body split into segments with pauses, a body truncated by closing early, or
no answer at all. Users whose request got Per's success answer in full are recorded
as *accepted*. Tests wait for conditions with :meth:`RawPer.wait_for`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "OK_BODY",
    "Hit",
    "RawPer",
    "Reply",
    "empty",
    "html",
    "http_date",
    "ok",
    "per_refusal",
]

#: Per's documented success answer to ``activities.add``.
OK_BODY = b'{"ok":true,"result":{"transactionId":"35434hjgghf46h34jh"}}'


@dataclass(frozen=True)
class Hit:
    """One request as the server saw it.

    Attributes:
        index: 0-based arrival order over the server's lifetime.
        at: ``time.monotonic()`` when the request head was complete.
        wall: ``time.time()`` at the same moment.
        path: the request target's path.
        params: the query parameters.
        head: the raw request head.
        connection: index of the TCP connection it came on.
    """

    index: int
    at: float
    wall: float
    path: str
    params: dict[str, str]
    head: bytes
    connection: int

    @property
    def user(self) -> str:
        """The ``userId`` parameter ("" when absent)."""
        return self.params.get("userId", "")

    def header(self, name: str) -> str | None:
        """A request header's value (case-insensitive), or None."""
        wanted = name.lower().encode("latin-1")
        for line in self.head.split(b"\r\n")[1:]:
            key, sep, value = line.partition(b":")
            if sep and key.strip().lower() == wanted:
                return value.strip().decode("latin-1")
        return None


@dataclass(frozen=True)
class Reply:
    """How to answer one request.

    Attributes:
        status: the HTTP status code.
        body: the body bytes.
        content_type: the ``Content-Type`` (None: no such header).
        headers: more header fields, in order.
        framing: ``length`` (Content-Length), ``chunked`` or ``close`` (no length,
            ``Connection: close``, the body runs to EOF).
        delay: seconds before the first byte of the answer.
        segments: the body is written in this many TCP segments (chunks when chunked).
        gap: seconds between segments.
        truncate: write only this many body bytes, then close (Content-Length still
            announces the whole body).
        hang: never answer (the connection stays open until the server stops).
        close: close the connection after this answer.
    """

    status: int = 200
    body: bytes = OK_BODY
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    framing: Literal["length", "chunked", "close"] = "length"
    delay: float = 0.0
    segments: int = 1
    gap: float = 0.0
    truncate: int | None = None
    hang: bool = False
    close: bool = False

    @property
    def is_per_success(self) -> bool:
        """True when this answer, written in full, is Per's ``ok: true``."""
        if not 200 <= self.status < 300 or self.hang or self.truncate is not None:
            return False
        try:
            value = json.loads(self.body)
        except ValueError:
            return False
        return isinstance(value, dict) and value.get("ok") is True


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def ok(**changes: object) -> Reply:
    """Per's success answer (``changes`` override fields of :class:`Reply`)."""
    return Reply(**changes)  # type: ignore[arg-type]


def per_refusal(message: str, status: int = 200, **changes: object) -> Reply:
    """Per's own refusal: ``{"ok": false, "message": ...}``."""
    body = json.dumps({"ok": False, "message": message}).encode()
    return Reply(status=status, body=body, **changes)  # type: ignore[arg-type]


def html(status: int, **changes: object) -> Reply:
    """An HTML error page, as a load balancer, WAF or ingress sends it."""
    phrase = _phrase(status)
    body = (
        f"<html>\r\n<head><title>{status} {phrase}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {phrase}</h1></center>\r\n<hr><center>edge</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()
    return Reply(status=status, body=body, content_type="text/html", **changes)  # type: ignore[arg-type]


def empty(status: int = 200, **changes: object) -> Reply:
    """An answer with an empty body."""
    return Reply(status=status, body=b"", content_type=None, **changes)  # type: ignore[arg-type]


def http_date(unix: float) -> str:
    """``unix`` time as an RFC 9110 HTTP-date."""
    return email.utils.formatdate(unix, usegmt=True)


Script = Callable[[Hit], Reply]


@dataclass
class _Counts:
    hits: list[Hit] = field(default_factory=list)
    replies: list[tuple[Hit, Reply]] = field(default_factory=list)
    accepted: list[tuple[str, float]] = field(default_factory=list)


class RawPer:
    """A raw Per responder on 127.0.0.1 in its own thread (a context manager).

    Args:
        script: answers each request (see the module docstring); replace it at any
            time with :attr:`script`.
    """

    def __init__(self, script: Script = lambda hit: ok()) -> None:
        self.script = script
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._counts = _Counts()
        self._connections = 0
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, name="raw-per", daemon=True)
        self._ready = threading.Event()
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> RawPer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the raw Per responder did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL to give a Recorder."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Close every connection and end the thread (idempotent)."""
        if not self._thread.is_alive():
            return
        self._loop.call_soon_threadsafe(self._shutdown)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=256)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _shutdown(self) -> None:
        assert self._stop is not None
        self._stop.set()

    # ------------------------------------------------------------------ observation

    @property
    def hits(self) -> list[Hit]:
        """Every request so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._counts.hits)

    @property
    def replies(self) -> list[tuple[Hit, Reply]]:
        """Every (request, answer chosen for it) so far (a copy)."""
        with self._lock:
            return list(self._counts.replies)

    @property
    def accepted(self) -> list[str]:
        """Users whose request got Per's success answer in full, in order (with repeats)."""
        with self._lock:
            return [user for user, _ in self._counts.accepted]

    @property
    def accepted_at(self) -> list[tuple[str, float]]:
        """(user, monotonic time the success answer was written)."""
        with self._lock:
            return list(self._counts.accepted)

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        with self._lock:
            return self._connections

    def wait_for(self, predicate: Callable[[RawPer], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (checked at every request and answer)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._changed:  # a notification between the check and here: 50 ms late
                self._changed.wait(min(left, 0.05))

    # ------------------------------------------------------------------ serving

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self._stop is not None
        self._tasks.add(task)
        with self._lock:
            self._connections += 1
            connection = self._connections - 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                hit = self._note(head, connection)
                try:
                    reply = self.script(hit)
                except Exception as exc:  # a broken script must show in the test, not hang it
                    reply = Reply(status=599, body=repr(exc).encode(), content_type="text/plain")
                with self._lock:
                    self._counts.replies.append((hit, reply))
                if reply.hang:
                    await self._stop.wait()
                    return
                if reply.delay:
                    await asyncio.sleep(reply.delay)
                asked_close = (hit.header("Connection") or "").lower() == "close"
                if asked_close and not reply.close:  # as a real server does (tinyproxy asks)
                    reply = dataclasses.replace(reply, close=True)
                keep = await self._answer(writer, reply)
                if reply.is_per_success:
                    with self._changed:
                        self._counts.accepted.append((hit.user, time.monotonic()))
                        self._changed.notify_all()
                if not keep:
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    def _note(self, head: bytes, connection: int) -> Hit:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        target = parts[1] if len(parts) > 1 else "/"
        url = urlsplit(target)
        with self._changed:
            hit = Hit(
                index=len(self._counts.hits),
                at=time.monotonic(),
                wall=time.time(),
                path=url.path,
                params=dict(parse_qsl(url.query, keep_blank_values=True)),
                head=head,
                connection=connection,
            )
            self._counts.hits.append(hit)
            self._changed.notify_all()
        return hit

    @staticmethod
    def _pieces(body: bytes, segments: int) -> list[bytes]:
        if segments <= 1 or len(body) <= 1:
            return [body]
        size = -(-len(body) // segments)
        return [body[i : i + size] for i in range(0, len(body), size)]

    async def _answer(self, writer: asyncio.StreamWriter, reply: Reply) -> bool:
        """Write one answer; False when the connection must end."""
        phrase = _phrase(reply.status)
        lines = [f"HTTP/1.1 {reply.status} {phrase}"]
        if reply.content_type is not None:
            lines.append(f"Content-Type: {reply.content_type}")
        lines.extend(f"{name}: {value}" for name, value in reply.headers)
        body = reply.body
        keep = not reply.close and reply.truncate is None
        if reply.framing == "length":
            lines.append(f"Content-Length: {len(body)}")
        elif reply.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        else:
            keep = False
        if not keep:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        pieces = self._pieces(body, reply.segments)
        if reply.truncate is not None:
            pieces = [body[: reply.truncate]]
        for i, piece in enumerate(pieces):
            await writer.drain()
            if i and reply.gap:
                await asyncio.sleep(reply.gap)
            if reply.framing == "chunked" and reply.truncate is None:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if piece else b"")
            else:
                writer.write(piece)
        if reply.framing == "chunked" and reply.truncate is None:
            if reply.gap:
                await writer.drain()
                await asyncio.sleep(reply.gap)
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        if not keep:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return keep
