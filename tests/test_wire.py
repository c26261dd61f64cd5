"""The wire client (per_buffer._wire): HTTP/1.1 framing against raw responders, TLS, Per.

Each framing case runs against a raw TCP responder written here (an asyncio
server in the test's own loop that writes exact bytes, in the segments and with
the pauses the test chooses), on asyncio's default loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from per_buffer._wire import (
    MAX_BODY,
    Answer,
    Channel,
    RequestTarget,
    WireError,
    accelerator,
    new_event_loop,
    open_channel,
)
from per_buffer.testing import PerServer

T = TypeVar("T")
TOKEN = "tok-SECRET-123"
UA = "per-buffer-test/1"
OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


# --------------------------------------------------------------------------- harness


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    """Run a coroutine to completion on a fresh loop of the parametrised kind (15 s cap)."""
    if request.param == "uvloop" and accelerator() != "uvloop":
        if os.environ.get("CI"):
            pytest.fail("uvloop is missing: .ci/run installs the 'speedups' extra")
        pytest.skip("uvloop not installed (CI installs the 'speedups' extra)")

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        loop = new_event_loop(accelerate=request.param == "uvloop")
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, 15))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    yield runner


class Peer:
    """One accepted connection of a :class:`Responder`."""

    def __init__(
        self, responder: Responder, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.responder = responder
        self.reader = reader
        self.writer = writer
        self.index = responder.connections

    async def request(self) -> bytes | None:
        """Read one request head; ``None`` when the client closed first."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.responder.requests.append((self.index, head))
        return head

    async def send(self, *parts: bytes, pause: float = 0.0) -> None:
        """Write each part as its own segment, pausing between them."""
        for i, part in enumerate(parts):
            if i and pause:
                await asyncio.sleep(pause)
            self.writer.write(part)
            await self.writer.drain()


Script = Callable[[Peer], Awaitable[None]]


class Responder:
    """A raw TCP (or TLS) server in the running loop; each connection runs ``script``."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.connections = 0
        self.requests: list[tuple[int, bytes]] = []
        self.release = asyncio.Event()  # scripts that stall wait for this
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[Any]] = set()
        self.url = ""

    async def __aenter__(self) -> Responder:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.server is not None
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(self, reader, writer)
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            await self.script(peer)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self.handlers.discard(task)
            writer.close()

    def connection_of_requests(self) -> list[int]:
        """The connection index of each request received, in order."""
        return [index for index, _ in self.requests]


def channel_for(url: str, timeout: float = 5.0, **kwargs: Any) -> tuple[RequestTarget, Channel]:
    target = RequestTarget(url, TOKEN, UA)
    channel = open_channel(
        asyncio.get_running_loop(), target, timeout=timeout, environ={}, **kwargs
    )
    return target, channel


async def outcome(channel: Channel, target: bytes = b"/x") -> Answer | WireError:
    try:
        return await channel.request(target)
    except WireError as err:
        return err


async def serve_forever(peer: Peer, response: bytes = OK) -> None:
    """Answer every request on the connection with ``response``."""
    while await peer.request() is not None:
        await peer.send(response)


# --------------------------------------------------------------------------- the request


def test_request_head_is_preformatted_and_exact(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async with Responder(serve_forever) as server:
            target, channel = channel_for(server.url + "/base/")
            answer = await channel.request(target.activity("acme co", "u&1", "login"))
            assert answer.status == 200
            port = server.url.rsplit(":", 1)[1]
            assert server.requests[0][1] == (
                b"GET /base/activities.add?billingId=acme+co&userId=u%261&activityTypeId=login"
                b" HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() + b"\r\n"
                b"Authorization: Bearer tok-SECRET-123\r\nUser-Agent: per-buffer-test/1\r\n"
                b"Accept: application/json\r\n\r\n"
            )
            await channel.aclose()

    run(main())


# --------------------------------------------------------------------------- framing


def test_content_length_keep_alive_and_lazy_headers(run: Callable[..., Any]) -> None:
    async def main() -> None:
        response = (
            b"HTTP/1.1 429 Too Many\r\nRetry-After: 7\r\ncontent-type: text/plain\r\n"
            b"X-Dup: a\r\nX-Dup: b\r\nContent-Length: 5\r\n\r\nslow!"
        )

        async def script(peer: Peer) -> None:
            await serve_forever(peer, response)

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            first = await channel.request(b"/a")
            second = await channel.request(b"/b")
            assert (first.status, first.body) == (429, b"slow!")
            assert first.header("retry-after") == "7"
            assert first.header("Content-Type") == "text/plain"
            assert first.header("x-dup") == "a, b"
            assert first.header("date") is None
            assert second == first
            assert server.connection_of_requests() == [0, 0]  # one connection, reused
            await channel.aclose()

    run(main())


def test_content_length_split_across_segments(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            while await peer.request() is not None:
                await peer.send(
                    b"HTTP/1.1 200 OK\r\nContent-Le",
                    b"ngth: 10\r\n\r",
                    b"\n01234",
                    b"56789",
                    pause=0.02,
                )

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            for _ in range(2):
                answer = await channel.request(b"/x")
                assert (answer.status, answer.body) == (200, b"0123456789")
            assert server.connection_of_requests() == [0, 0]
            await channel.aclose()

    run(main())


def test_responses_split_at_random_points(run: Callable[..., Any]) -> None:
    responses = [
        (OK, b'{"ok":true}'),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;x=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\n",
            b"abc0123456789abcdef",
        ),
        (b"HTTP/1.1 200 OK\nContent-Length: 4\nX: bare-lf\n\nbare", b"bare"),
    ]
    rng = random.Random(11)

    async def main() -> None:
        async def script(peer: Peer) -> None:
            for response, _ in responses * 2:
                await peer.request()
                cuts = sorted(rng.sample(range(1, len(response)), 10))
                bounds = [0, *cuts, len(response)]
                parts = [response[a:b] for a, b in itertools.pairwise(bounds)]
                await peer.send(*parts, pause=0.002)
            await peer.request()

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            for _, body in responses * 2:
                assert (await channel.request(b"/x")).body == body
            assert set(server.connection_of_requests()) == {0}
            await channel.aclose()

    run(main())


def test_chunked_body_with_extensions_and_trailers(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            while await peer.request() is not None:
                await peer.send(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                    b"lo\r\n6;name=val",
                    b"ue\r\n wor",
                    b"ld\r",
                    b"\n1A\r\n" + b"z" * 26 + b"\r\n0\r\nX-Trailer: 1\r\n",
                    b"Another: 2\r\n\r\n",
                    pause=0.02,
                )

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            for _ in range(2):
                answer = await channel.request(b"/x")
                assert answer.body == b"hello world" + b"z" * 26
            assert server.connection_of_requests() == [0, 0]  # reused after a chunked body
            await channel.aclose()

    run(main())


def test_close_delimited_body_in_several_segments_is_read_to_eof(run: Callable[..., Any]) -> None:
    async def main() -> None:
        body = [b'{"ok":true,', b'"result":{"transactionId":', b'"abc"}}']

        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
                *body,
                pause=0.05,
            )

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            first = await channel.request(b"/x")
            second = await channel.request(b"/y")
            assert first.body == second.body == b"".join(body)
            assert server.connection_of_requests() == [0, 1]  # never reused
            await channel.aclose()

    run(main())


def test_http10_responses(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            if peer.index == 0:  # HTTP/1.0, close-delimited
                await peer.send(
                    b"HTTP/1.0 503 Unavailable\r\nContent-Type: text/html\r\n\r\n<h1>",
                    b"down</h1>",
                    pause=0.02,
                )
            elif peer.index == 1:  # HTTP/1.0 with a length and no keep-alive: not reused
                await peer.send(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await peer.request()  # a reuse would land here (and get no answer)
            else:  # HTTP/1.0 with keep-alive: reused
                keep_alive = (
                    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n"
                )
                await peer.send(keep_alive + b"ka")
                await serve_forever(peer, keep_alive + b"ka")

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            first = await channel.request(b"/1")
            assert (first.status, first.body) == (503, b"<h1>down</h1>")
            assert (await channel.request(b"/2")).body == b"ok"
            assert (await channel.request(b"/3")).body == b"ka"
            assert (await channel.request(b"/4")).body == b"ka"
            assert server.connection_of_requests() == [0, 1, 2, 2]
            await channel.aclose()

    run(main())


def test_connection_close_is_not_reused(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 2\r\n\r\nok")
            await peer.request()  # would swallow a reused request without answering

        async with Responder(script) as server:
            _, channel = channel_for(server.url, timeout=2)
            assert (await channel.request(b"/1")).body == b"ok"
            assert (await channel.request(b"/2")).body == b"ok"
            assert server.connection_of_requests() == [0, 1]
            await channel.aclose()

    run(main())


def test_204_and_304_have_no_body(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            for response in (
                b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\nETag: x\r\n\r\n",
                OK,
            ):
                await peer.request()
                await peer.send(response)
            await peer.request()

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            results = [await channel.request(b"/%d" % i) for i in range(3)]
            assert [(a.status, a.body) for a in results] == [
                (204, b""),
                (304, b""),
                (200, b'{"ok":true}'),
            ]
            assert server.connection_of_requests() == [0, 0, 0]
            await channel.aclose()

    run(main())


def test_interim_1xx_responses_are_skipped(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\n"
                b"Content-Length: 4\r\n\r\ndone",
                pause=0.02,
            )
            await serve_forever(peer, b"HTTP/1.1 102 Processing\r\n\r\n" + OK)

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            first = await channel.request(b"/1")
            assert (first.status, first.body, first.header("link")) == (200, b"done", None)
            second = await channel.request(b"/2")
            assert (second.status, second.body) == (200, b'{"ok":true}')
            assert server.connection_of_requests() == [0, 0]
            await channel.aclose()

    run(main())


def test_extra_bytes_after_a_response_discard_the_connection(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            # A second "response" nobody asked for, in the same segment.
            await peer.send(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
            await serve_forever(peer)

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            assert (await channel.request(b"/1")).body == b'{"ok":true}'
            assert (await channel.request(b"/2")).body == b'{"ok":true}'
            assert server.connection_of_requests() == [0, 1]  # the next one on a new connection
            await channel.aclose()

    run(main())


def test_bytes_arriving_while_idle_discard_the_connection(run: Callable[..., Any]) -> None:
    async def main() -> None:
        sent = asyncio.Event()

        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(OK)
            if peer.index == 0:
                await asyncio.sleep(0.05)
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
                sent.set()
            await serve_forever(peer)

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            assert (await channel.request(b"/1")).body == b'{"ok":true}'
            await sent.wait()
            while channel._conn is not None:  # type: ignore[attr-defined]  # until the client saw them
                await asyncio.sleep(0.005)
            assert (await channel.request(b"/2")).body == b'{"ok":true}'
            assert server.connection_of_requests() == [0, 1]
            await channel.aclose()

    run(main())


def test_truncated_content_length_body_is_closed_not_short(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(b'HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{"ok":tr')

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            err = await outcome(channel)
            assert isinstance(err, WireError) and err.kind == "closed"
            assert len(server.requests) == 1  # a fresh connection is never retried
            await channel.aclose()

    run(main())


def test_truncated_response_on_a_reused_connection_is_not_retried(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(OK)
            await peer.request()
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Len")  # then close

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            assert (await channel.request(b"/1")).status == 200
            err = await outcome(channel, b"/2")
            assert isinstance(err, WireError) and err.kind == "closed"
            assert len(server.requests) == 2  # response bytes had arrived: no retry
            await channel.aclose()

    run(main())


def test_oversized_bodies_are_too_large(run: Callable[..., Any]) -> None:
    async def main() -> None:
        big = b"x" * (MAX_BODY + 1)

        async def script(peer: Peer) -> None:
            await peer.request()
            if peer.index == 0:  # declared: refused before reading it
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big))
                await peer.request()
            elif peer.index == 1:  # chunked, growing past the cap
                await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(2):
                    await peer.send(
                        b"%x\r\n" % (MAX_BODY // 2 + 1) + b"y" * (MAX_BODY // 2 + 1) + b"\r\n"
                    )
            else:  # close-delimited, growing past the cap
                await peer.send(b"HTTP/1.1 200 OK\r\n\r\n", big)

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            kinds = [getattr(await outcome(channel), "kind", None) for _ in range(3)]
            assert kinds == ["too_large"] * 3
            assert server.connection_of_requests() == [0, 1, 2]
            await channel.aclose()

    run(main())


def test_oversized_head_is_too_large(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * 70_000 + b"\r\n")
            await peer.request()

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            err = await outcome(channel)
            assert isinstance(err, WireError) and err.kind == "too_large"
            await channel.aclose()

    run(main())


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: Bearer SECRETsecret42\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nBearer SECRETsecret42\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nBearer SECRETsecret42\r\n\r\n",
    ],
    ids=["content-length", "chunk-size", "trailer"],
)
def test_echoed_header_values_are_described_not_quoted(
    run: Callable[..., Any], response: bytes
) -> None:
    """A server that echoes the request's headers into a framing field must not get any
    of it into the error text (cut or lower-cased pieces escape exact masking)."""

    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(response)
            await peer.request()

        async with Responder(script) as server:
            _, channel = channel_for(server.url, timeout=3)
            err = await outcome(channel)
            assert isinstance(err, WireError) and err.kind == "protocol", err
            assert "secret" not in str(err).lower() and "bearer" not in str(err).lower()
            await channel.aclose()

    run(main())


@pytest.mark.parametrize(
    "response",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"HTTP/1.1 OK 200\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBroken header line\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    ],
    ids=[
        "not-http",
        "status-line",
        "http2",
        "header-without-colon",
        "space-before-colon",
        "conflicting-lengths",
        "negative-length",
        "bad-chunk-size",
        "chunk-overrun",
        "unrequested-101",
    ],
)
def test_malformed_responses_are_protocol_errors(run: Callable[..., Any], response: bytes) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(response)
            await peer.request()  # hold the connection open: the client must not wait for EOF

        async with Responder(script) as server:
            _, channel = channel_for(server.url, timeout=3)
            started = time.monotonic()
            err = await outcome(channel)
            assert isinstance(err, WireError) and err.kind == "protocol", err
            assert time.monotonic() - started < 2
            assert "\n" not in str(err)
            await channel.aclose()

    run(main())


def test_stall_mid_body_times_out_at_the_deadline(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n0123456789")
            await peer.responder.release.wait()

        async with Responder(script) as server:
            _, channel = channel_for(server.url, timeout=0.3)
            started = time.monotonic()
            err = await outcome(channel)
            elapsed = time.monotonic() - started
            assert isinstance(err, WireError) and err.kind == "timeout"
            assert 0.29 <= elapsed < 1.5
            assert not channel.busy
            await channel.aclose()

    run(main())


def test_a_timed_out_connection_is_not_reused(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            if peer.index == 0:
                await peer.responder.release.wait()
            else:
                await peer.send(OK)

        async with Responder(script) as server:
            _, channel = channel_for(server.url, timeout=0.2)
            assert getattr(await outcome(channel), "kind", None) == "timeout"
            assert (await channel.request(b"/2")).status == 200
            assert server.connection_of_requests() == [0, 1]
            await channel.aclose()

    run(main())


def test_idle_connection_closed_by_the_server_is_replaced(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(OK)  # then close the idle connection without saying so

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            assert (await channel.request(b"/1")).status == 200
            while channel._conn is not None:  # type: ignore[attr-defined]  # until it saw the FIN
                await asyncio.sleep(0.005)
            assert (await channel.request(b"/2")).status == 200
            assert server.connection_of_requests() == [0, 1]
            await channel.aclose()

    run(main())


def test_stale_keep_alive_is_retried_once_on_a_fresh_connection(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(OK)
            if peer.index == 0:
                await peer.request()  # read the next request, then close without a byte
                return
            await serve_forever(peer)

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            assert (await channel.request(b"/1")).status == 200
            assert (await channel.request(b"/2")).status == 200  # retried transparently
            paths = [head.split(b" ")[1] for _, head in server.requests]
            assert paths == [b"/1", b"/2", b"/2"]
            assert server.connection_of_requests() == [0, 0, 1]
            await channel.aclose()

    run(main())


def test_the_retry_happens_once_and_never_on_a_fresh_connection(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            if peer.index == 0:
                await peer.request()
                await peer.send(OK)
            await peer.request()  # then close without answering

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            assert (await channel.request(b"/1")).status == 200
            err = await outcome(channel, b"/2")
            assert isinstance(err, WireError) and err.kind == "closed"
            assert server.connection_of_requests() == [0, 0, 1]  # one retry, then give up
            err = await outcome(channel, b"/3")  # fresh connection: no retry at all
            assert isinstance(err, WireError) and err.kind == "closed"
            assert server.connection_of_requests() == [0, 0, 1, 2]
            await channel.aclose()

    run(main())


def test_connection_refused_is_connect(run: Callable[..., Any]) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()

    async def main() -> None:
        _, channel = channel_for(f"http://127.0.0.1:{port}")
        err = await outcome(channel)
        assert isinstance(err, WireError) and err.kind == "connect"
        assert f"127.0.0.1:{port}" in str(err) and TOKEN not in str(err) and TOKEN not in repr(err)
        await channel.aclose()

    run(main())


def test_a_host_name_with_several_addresses_connects(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async with Responder(serve_forever) as server:  # listens on 127.0.0.1 only
            target, channel = channel_for(server.url.replace("127.0.0.1", "localhost"))
            assert target.host_header.startswith(b"localhost:")
            assert (await channel.request(b"/x")).status == 200
            assert b"\r\nHost: localhost:" in server.requests[0][1]
            await channel.aclose()

    run(main())


# --------------------------------------------------------------------------- the callback contract


def test_done_runs_once_from_the_loop_never_inside_send(run: Callable[..., Any]) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    refused = sock.getsockname()[1]
    sock.close()

    async def check(url: str) -> None:
        _, channel = channel_for(url)
        state = {"inside": False}
        seen: list[tuple[bool, Answer | WireError]] = []
        finished = asyncio.Event()

        def done(result: Answer | WireError) -> None:
            seen.append((state["inside"], result))
            finished.set()

        for _ in range(2):  # the second time on a kept-alive connection (or a new attempt)
            finished.clear()
            state["inside"] = True
            channel.send(b"/x", done)
            state["inside"] = False
            assert channel.busy
            with pytest.raises(RuntimeError, match="busy"):
                channel.send(b"/y", done)
            await finished.wait()
            assert not channel.busy
        await asyncio.sleep(0.05)
        assert [inside for inside, _ in seen] == [False, False]  # twice, never inside send
        await channel.aclose()

    async def main() -> None:
        async with Responder(serve_forever) as server:
            await check(server.url)
        await check(f"http://127.0.0.1:{refused}")

    run(main())


def test_done_may_send_the_next_request_and_its_errors_are_logged(
    run: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with Responder(serve_forever) as server:
            _, channel = channel_for(server.url)
            statuses: list[int] = []
            finished = asyncio.Event()

            def done(result: Answer | WireError) -> None:
                assert isinstance(result, Answer)
                statuses.append(result.status)
                if len(statuses) < 5:
                    channel.send(b"/next", done)
                else:
                    finished.set()
                    raise KeyError("a bug in the caller")

            channel.send(b"/first", done)
            await finished.wait()
            assert statuses == [200] * 5
            assert (await channel.request(b"/after")).status == 200  # still usable
            await channel.aclose()

    run(main())
    assert "done callback raised" in caplog.text


def test_close_aborts_an_in_flight_request(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.responder.release.wait()

        async with Responder(script) as server:
            _, channel = channel_for(server.url)
            results: list[Answer | WireError] = []
            channel.send(b"/x", results.append)
            while not server.requests:
                await asyncio.sleep(0.005)
            channel.close()
            assert results == []  # not synchronously
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert len(results) == 1
            assert isinstance(results[0], WireError) and results[0].kind == "closed"
            assert channel.closed and not channel.busy
            with pytest.raises(RuntimeError, match="closed"):
                channel.send(b"/y", results.append)
            channel.close()  # idempotent
            await channel.aclose()
            # closed while still connecting
            _, channel = channel_for(server.url)
            results.clear()
            channel.send(b"/x", results.append)
            channel.close()
            await channel.aclose()
            assert [getattr(r, "kind", None) for r in results] == ["closed"]

    run(main())


# --------------------------------------------------------------------------- RequestTarget


_SPECIAL = list(" &=+%/#?;:@!$'()*,~-._\"<>[]{}|\\^`\t\n\x00é€😀")
_ids = st.text(
    alphabet=st.one_of(
        st.sampled_from(_SPECIAL),
        st.characters(blacklist_categories=("Cs",), max_codepoint=0x1FFFF),
    ),
    max_size=24,
)


_BASES = ("https://api.useper.com", "http://127.0.0.1:8000/pre fix", "http://[::1]:81/a/")


@pytest.fixture(scope="module")
def httpx_clients() -> Iterator[dict[str, httpx.Client]]:
    """One httpx client per base URL, to build the requests httpx would send."""
    clients = {base: httpx.Client(base_url=base) for base in _BASES}
    yield clients
    for client in clients.values():
        client.close()


@settings(max_examples=300, deadline=None)
@given(billing=_ids, user=_ids, kind=_ids)
def test_activity_target_matches_httpx_encoding(
    httpx_clients: dict[str, httpx.Client], billing: str, user: str, kind: str
) -> None:
    params = {"billingId": billing, "userId": user, "activityTypeId": kind}
    for base, client in httpx_clients.items():
        target = RequestTarget(base, TOKEN, UA)
        expected = httpx.URL(base.rstrip("/") + "/activities.add", params=params).raw_path
        assert target.activity(billing, user, kind) == expected
        request = client.build_request("GET", "/activities.add", params=params)
        assert target.activity(billing, user, kind) == request.url.raw_path  # cached type too
        assert target.host_header == request.headers["host"].encode()


def test_request_target_validates_and_hides_the_token() -> None:
    target = RequestTarget("https://api.useper.com/", TOKEN, UA)
    assert TOKEN not in repr(target) and "hidden" in repr(target)
    assert (target.connect_host, target.port, target.host_header) == (
        "api.useper.com",
        443,
        b"api.useper.com",
    )
    for bad_url in ("ftp://x", "https://", "https://h/?q=1", "https://u:p@h", "not a url"):
        with pytest.raises(ValueError):
            RequestTarget(bad_url, TOKEN, UA)
    for bad_token in ("", "a\r\nX-Injected: 1", "tøken"):
        with pytest.raises(ValueError) as info:
            RequestTarget("https://h", bad_token, UA)
        assert bad_token not in str(info.value) or not bad_token
    with pytest.raises(TypeError):
        RequestTarget("https://h", 42, UA)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RequestTarget("https://h", TOKEN, "ua\n")


def test_open_channel_validates_its_arguments() -> None:
    loop = asyncio.new_event_loop()
    try:
        target = RequestTarget("http://127.0.0.1:1", TOKEN, UA)
        with pytest.raises(ValueError):
            open_channel(loop, target, timeout=0)
        with pytest.raises(ValueError):
            open_channel(loop, target, timeout=1, max_body=0)
        with pytest.raises(ValueError, match="proxy"):
            open_channel(loop, target, timeout=1, proxy="ftp://proxy:21")
    finally:
        loop.close()


# --------------------------------------------------------------------------- TLS, the real server


@pytest.fixture
def tls_server_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server certificate for 127.0.0.1 from a test CA that SSL_CERT_FILE trusts."""
    trustme = pytest.importorskip("trustme", reason="trustme comes with the dev extra")
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


def test_https_verifies_against_ssl_cert_file(
    run: Callable[..., Any], tls_server_context: ssl.SSLContext
) -> None:
    async def main() -> None:
        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"tls-", b"body", pause=0.02
            )

        async with Responder(script, tls=tls_server_context) as server:
            target, channel = channel_for(server.url)
            for _ in range(2):
                answer = await channel.request(b"/x")  # close-delimited over TLS, twice
                assert (answer.status, answer.body) == (200, b"tls-body")
            assert target.ssl_context().verify_mode == ssl.CERT_REQUIRED
            assert server.connection_of_requests() == [0, 1]
            await channel.aclose()

    run(main())


def test_https_refuses_an_untrusted_certificate(
    run: Callable[..., Any], tls_server_context: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")  # back to certifi's roots: the test CA is unknown

    async def main() -> None:
        async with Responder(serve_forever, tls=tls_server_context) as server:
            _, channel = channel_for(server.url)
            err = await outcome(channel)
            assert isinstance(err, WireError) and err.kind == "connect"
            assert "CERTIFICATE_VERIFY_FAILED" in str(err) or "certificate" in str(err).lower()
            assert not server.requests
            await channel.aclose()

    run(main())


def test_against_the_per_server(run: Callable[..., Any], server: PerServer) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        target = RequestTarget(server.url, server.activity_token, UA)
        channels = [open_channel(loop, target, timeout=2, environ={}) for _ in range(4)]
        users = [f"user {i}/é&" for i in range(60)]

        async def sender(channel: Channel, mine: list[str]) -> list[int]:
            return [
                (await channel.request(target.activity("acme", user, "login"))).status
                for user in mine
            ]

        statuses = await asyncio.gather(
            *(sender(channel, users[i::4]) for i, channel in enumerate(channels))
        )
        assert all(status == 200 for batch in statuses for status in batch)
        server.inject("drop", count=1)  # a reused connection dropped: retried once
        answer = await channels[0].request(target.activity("acme", "dropped", "login"))
        assert answer.status == 200
        wrong = RequestTarget(server.url, "not-the-token", UA)
        refused = open_channel(loop, wrong, timeout=2, environ={})
        answer = await refused.request(wrong.activity("acme", "x", "login"))
        assert answer.status == 401 and b"invalid_auth_token" in answer.body
        assert answer.header("content-type") == "application/json"
        for each in [*channels, refused]:
            await each.aclose()

    run(main())
    received = {(a.billing_id, a.user_id, a.activity_type_id) for a in server.activities}
    assert received >= {("acme", f"user {i}/é&", "login") for i in range(60)}
    assert ("acme", "dropped", "login") in received
