"""A raw-socket server that echoes the request's ``Authorization`` header into its answer,
and the checks that a token (or any piece of it) appears nowhere it must not.

:class:`EchoServer` answers each request with the bytes ``respond(head)`` returns (then
closes the connection): the answer may be malformed HTTP on purpose. :data:`ECHOES` are
the ways a broken proxy, WAF or server puts the header back: a malformed header line, the
reason phrase, ``Content-Type``, ``Content-Length``, the body, a redirect's ``Location``
or a header of its own; and Per's JSON with the header (lower-cased) as its code.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

#: A 64-character token, mixed case (echoes are checked in any case).
TOKEN = "pk_live_Q3vN8xZr5TgL2mWc7YhB4kDs9FjP6aReUoXi0SnVbMtHqwEyKdGfCzJ1"
#: The shortest piece of a token that must not appear anywhere.
PIECE = 8

Respond = Callable[[bytes], bytes]


def authorization(head: bytes) -> bytes:
    """The ``Authorization`` header's value in a request head (b"" when absent)."""
    found = re.search(rb"(?im)^authorization:[ \t]*(.*?)\r?$", head)
    return found.group(1) if found else b""


def _answer(status: bytes, headers: bytes, body: bytes = b"") -> bytes:
    """A response; Content-Length added unless ``headers`` has one."""
    if b"content-length" not in headers.lower():
        headers += b"Content-Length: %d\r\n" % len(body)
    return b"HTTP/1.1 " + status + b"\r\n" + headers + b"Connection: close\r\n\r\n" + body


#: name -> how the answer carries the echoed header value.
ECHOES: dict[str, Respond] = {
    "header_line": lambda head: _answer(b"400 Bad Request", authorization(head) + b"\r\n"),
    # the reason phrase, then a malformed line: the lean channel quotes the first line
    "reason": lambda head: _answer(b"400 " + authorization(head), b"bad line\r\n"),
    "content_type": lambda head: _answer(
        b"403 Forbidden", b"Content-Type: " + authorization(head) + b"\r\n", b"forbidden"
    ),
    "content_length": lambda head: _answer(
        b"400 Bad Request", b"Content-Length: " + authorization(head) + b"\r\n"
    ),
    "body": lambda head: _answer(
        b"403 Forbidden",
        b"Content-Type: text/html\r\n",
        b"<html><p>Rejected: " + authorization(head) + b"</p></html>",
    ),
    "location": lambda head: _answer(
        b"302 Found", b"Location: https://login.example/?h=" + authorization(head) + b"\r\n"
    ),
    "own_header": lambda head: _answer(
        b"403 Forbidden",
        b"X-Seen-Auth: " + authorization(head) + b"\r\nContent-Type: text/plain\r\n",
        b"forbidden",
    ),
    "per_json": lambda head: _answer(
        b"200 OK",
        b"Content-Type: application/json\r\n",
        b'{"ok":false,"message":"' + authorization(head).lower() + b'"}',
    ),
}


class EchoServer:
    """A raw HTTP responder on 127.0.0.1 (a context manager); one answer per connection."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(32)
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.heads: list[bytes] = []
        self._thread = threading.Thread(target=self._accept, name="echo-server", daemon=True)

    def __enter__(self) -> EchoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (Linux)
        self._sock.close()
        self._thread.join(5)
        assert not self._thread.is_alive(), "the echo server did not stop"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head = data.split(b"\r\n\r\n", 1)[0]
                self.heads.append(head)
                conn.sendall(self.respond(head))
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):  # let the client close first (no reset)
                    pass
            except OSError:
                pass


def pieces(token: str = TOKEN) -> set[str]:
    """Every run of :data:`PIECE` characters of ``token``, lower-cased."""
    lowered = token.lower()
    return {lowered[i : i + PIECE] for i in range(len(lowered) - PIECE + 1)}


def leaked(text: str | bytes, token: str = TOKEN) -> list[str]:
    """The pieces of ``token`` (any case) found in ``text`` (bytes read as Latin-1)."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    lowered = text.lower()
    return sorted(piece for piece in pieces(token) if piece in lowered)


def assert_clean(text: str | bytes, where: str, token: str = TOKEN) -> None:
    """Fail when ``text`` holds the token or a piece of 8+ characters of it."""
    found = leaked(text, token)
    assert not found, f"{where} holds pieces of the token: {found[:3]}"


def exception_texts(exc: BaseException) -> str:
    """``str``, ``repr`` and the whole formatted traceback (chained causes included)."""
    return "\n".join([str(exc), repr(exc), "".join(traceback.format_exception(exc))])


def assert_exception_clean(exc: BaseException, token: str = TOKEN) -> None:
    """No token in the exception's texts, and no exception chained to it at all."""
    assert_clean(exception_texts(exc), f"{type(exc).__name__}'s text", token)
    assert exc.__cause__ is None and exc.__context__ is None, "an exception is chained"


def directory_bytes(directory: Path) -> Iterable[tuple[Path, bytes]]:
    """Every file under ``directory`` with its bytes."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            yield path, path.read_bytes()


def assert_directory_clean(directory: Path, token: str = TOKEN) -> None:
    """No file under ``directory`` holds the token or a piece of it."""
    files = list(directory_bytes(directory))
    assert files, f"nothing under {directory}"
    for path, data in files:
        assert_clean(data, str(path), token)
