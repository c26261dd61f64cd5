"""The worker's lean HTTP/1.1 transport, against scripted raw servers and the local Per server."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest

from per_buffer._transport import LeanTransport, use_lean_transport
from per_buffer.client import AsyncPerClient
from per_buffer.errors import PerTransportError
from per_buffer.testing import PerServer

Script = Callable[[socket.socket, int], None]


@pytest.fixture
def raw_server() -> Iterator[Callable[[Script], str]]:
    """A one-thread TCP server that answers each connection with a scripted function."""
    servers: list[socket.socket] = []

    def start(script: Script) -> str:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        servers.append(listener)

        def loop() -> None:
            n = 0
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    script(conn, n)
                n += 1

        threading.Thread(target=loop, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for listener in servers:
        listener.close()


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return data
        data += chunk
    return data


def get(url: str, transport: LeanTransport | None = None, timeout: float = 5.0) -> httpx.Response:
    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport or LeanTransport(), timeout=timeout) as c:
            return await c.get(url + "/x?a=b%20c")

    return asyncio.run(main())


def test_chunked_body_and_headers(raw_server: Callable[[Script], str]) -> None:
    def script(conn: socket.socket, _: int) -> None:
        request = _read_request(conn)
        assert request.startswith(b"GET /x?a=b%20c HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:" in request
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Test: yes\r\n\r\n"
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
        )

    response = get(raw_server(script))
    assert response.status_code == 200
    assert response.text == "hello world"
    assert response.headers["x-test"] == "yes"


def test_body_until_close_without_length(raw_server: Callable[[Script], str]) -> None:
    def script(conn: socket.socket, _: int) -> None:
        _read_request(conn)
        conn.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/html\r\n\r\n<h1>down")

    response = get(raw_server(script))
    assert response.status_code == 503
    assert response.text == "<h1>down"


def test_stale_keep_alive_is_retried_once_on_a_fresh_connection(
    raw_server: Callable[[Script], str],
) -> None:
    def script(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if n == 0:
            return  # closes the connection after one answer, without saying so

    url = raw_server(script)
    transport = LeanTransport()

    async def main() -> list[int]:
        async with httpx.AsyncClient(transport=transport) as client:
            return [(await client.get(url + "/x")).status_code for _ in range(3)]

    assert asyncio.run(main()) == [200, 200, 200]


def test_read_timeout(raw_server: Callable[[Script], str]) -> None:
    release = threading.Event()

    def script(conn: socket.socket, _: int) -> None:
        _read_request(conn)
        release.wait(5)

    url = raw_server(script)
    with pytest.raises(httpx.ReadTimeout):
        get(url, timeout=0.2)
    release.set()


def test_connection_refused() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(httpx.ConnectError):
        get(f"http://127.0.0.1:{port}")


def test_garbage_status_line_is_protocol_error(raw_server: Callable[[Script], str]) -> None:
    def script(conn: socket.socket, _: int) -> None:
        _read_request(conn)
        conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")

    with pytest.raises(httpx.RemoteProtocolError):
        get(raw_server(script))


def test_per_client_over_lean_transport_maps_faults(server: PerServer) -> None:
    async def main() -> list[str]:
        out = []
        async with AsyncPerClient(
            server.activity_token, base_url=server.url, transport=LeanTransport(), timeout=0.5
        ) as client:
            out.append(await client.add_activity("b", "u1", "t"))
            for kind in ("503", "non_json", "hang"):
                server.inject(kind, count=1)
                with pytest.raises(PerTransportError):
                    await client.add_activity("b", "u2", "t")
            server.clear_faults()
            # a drop on a reused connection looks like a stale keep-alive: retried once
            out.append(await client.add_activity("b", "u3", "t"))
            server.inject("drop", count=1)
            out.append(await client.add_activity("b", "u4", "t"))
            server.inject("drop", count=2)
            with pytest.raises(PerTransportError):
                await client.add_activity("b", "u2", "t")
            out.append(await client.add_activity("b", "u3", "t"))
        return out

    results = asyncio.run(main())
    assert all(results)
    assert {a.user_id for a in server.activities} == {"u1", "u3", "u4"}


def test_https_verifies_certificates() -> None:
    context = httpx.create_ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_proxy_environment_falls_back_to_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    assert use_lean_transport()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert not use_lean_transport()
