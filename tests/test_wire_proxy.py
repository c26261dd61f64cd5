"""Proxies for the wire client: the same choice as httpx, and real traffic through tinyproxy.

tinyproxy (Debian package, installed by .ci/run) runs as a child process of the
test on a loopback port; it adds ``Via: 1.1 per-wire-test`` to the requests it
forwards and logs every request and ``CONNECT`` on its standard output.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from subprocess_helpers import terminate
from test_wire import OK, TOKEN, UA, Peer, Responder, outcome, serve_forever
from token_echo import ECHOES, EchoServer, assert_clean
from token_echo import TOKEN as ECHO_TOKEN

from per_buffer._log_filter import held
from per_buffer._wire import (
    HttpxChannel,
    LeanChannel,
    RequestTarget,
    WireError,
    new_event_loop,
    open_channel,
    proxy_for,
)
from per_buffer._wire._proxy import redact

T = TypeVar("T")

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _run(coro: Coroutine[Any, Any, T], *, uvloop: bool = False) -> T:
    loop = new_event_loop(accelerate=uvloop)
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 20))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# --------------------------------------------------------------------------- the choice


ENVIRONMENTS: list[dict[str, str]] = [
    {},
    {"HTTP_PROXY": "http://p-http:3128"},
    {"HTTPS_PROXY": "http://p-https:3128"},
    {"ALL_PROXY": "http://p-all:1080"},
    {"HTTP_PROXY": "http://p-http:3128", "ALL_PROXY": "http://p-all:1080"},
    {"HTTPS_PROXY": "p-noscheme:3128"},
    {"HTTPS_PROXY": "https://p-tls:8443"},
    {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2"},
    {"HTTPS_PROXY": "http://upper:1", "https_proxy": ""},
    {"HTTP_PROXY": "http://p-http:3128", "REQUEST_METHOD": "GET"},
    {"http_proxy": "http://p-http:3128", "REQUEST_METHOD": "GET"},
    {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.useper.com"},
    {"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".useper.com"},
    {"HTTPS_PROXY": "http://p:1", "no_proxy": "useper.com"},
    {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*.useper.com"},
    {"ALL_PROXY": "http://p:1", "NO_PROXY": "*"},
    {"ALL_PROXY": "http://p:1", "NO_PROXY": "other.org, *"},
    {"ALL_PROXY": "http://p:1", "NO_PROXY": "localhost"},
    {"ALL_PROXY": "http://p:1", "NO_PROXY": "127.0.0.1,::1"},
    {"ALL_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"},
    {"ALL_PROXY": "http://p:1", "NO_PROXY": "per.example.com:8443"},
    {"ALL_PROXY": "http://p:1", "NO_PROXY": "http://internal.example"},
    {"ALL_PROXY": "http://p:1", "NO_PROXY": " ,Example.COM ,"},
    {"HTTP_PROXY": "http://a:1", "HTTPS_PROXY": "http://b:2", "NO_PROXY": "127.0.0.1"},
]
URLS = [
    "https://api.useper.com",
    "https://useper.com",
    "https://notuseper.com",
    "http://127.0.0.1:8000",
    "http://localhost:8000",
    "http://[::1]:8080",
    "https://10.0.0.1",
    "https://10.1.2.3",
    "https://per.example.com:8443",
    "https://per.example.com",
    "http://internal.example",
    "https://internal.example",
    "https://www.example.com",
]


def _httpx_choice(client: httpx.AsyncClient, url: str) -> tuple[bytes, bytes, int | None] | None:
    transport = client._transport_for_url(httpx.URL(url))
    if transport is client._transport:
        return None
    proxy_url = transport._pool._proxy_url  # type: ignore[attr-defined]
    return proxy_url.scheme, proxy_url.host, proxy_url.port


def _ours(proxy: str | None) -> tuple[bytes, bytes, int | None] | None:
    if proxy is None:
        return None
    url = httpx.URL(proxy)
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return url.raw_scheme, url.raw_host, port


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.lower() in _PROXY_VARS or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("environ", ENVIRONMENTS, ids=lambda env: ",".join(env) or "empty")
def test_proxy_for_makes_httpx_choice(
    environ: dict[str, str], clean_environment: pytest.MonkeyPatch
) -> None:
    for name, value in environ.items():
        clean_environment.setenv(name, value)
    client = httpx.AsyncClient()
    for url in URLS:
        expected = _httpx_choice(client, url)
        assert _ours(proxy_for(url)) == expected, (environ, url)  # the process environment
        assert _ours(proxy_for(url, environ=environ)) == expected, (environ, url)  # a mapping


def test_an_explicit_proxy_wins_over_the_environment(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    clean_environment.setenv("NO_PROXY", "*")
    clean_environment.setenv("HTTPS_PROXY", "http://env:1")
    client = httpx.AsyncClient(proxy="http://explicit:3128")
    for url in URLS:
        assert _ours(proxy_for(url, "http://explicit:3128")) == _httpx_choice(client, url)
    assert proxy_for("https://api.useper.com", environ={}) is None  # ignore the environment


def test_invalid_proxy_urls_are_clear_errors(clean_environment: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="proxy"):
        proxy_for("https://api.useper.com", "ftp://user:secret@proxy:21")
    try:
        proxy_for("https://api.useper.com", "ftp://user:secret@proxy:21")
    except ValueError as err:
        assert "secret" not in str(err)
    clean_environment.setenv("HTTPS_PROXY", "ftp://proxy:21")
    with pytest.raises(ValueError):
        httpx.AsyncClient()  # httpx refuses it too
    with pytest.raises(ValueError, match="proxy"):
        proxy_for("https://api.useper.com")


# --------------------------------------------------------------------------- a real proxy


class TinyProxy:
    """A tinyproxy child process on a loopback port, with its log lines."""

    def __init__(self, tmp_path: Path) -> None:
        binary = shutil.which("tinyproxy")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("tinyproxy is missing: .ci/run installs it with apt-get")
            pytest.skip("tinyproxy is not installed (.ci/run installs it with apt-get)")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = tmp_path / "tinyproxy.conf"
        config.write_text(
            f"Port {self.port}\nListen 127.0.0.1\nTimeout 30\nLogLevel Info\n"
            'MaxClients 20\nAllow 127.0.0.1\nViaProxyName "per-wire-test"\n'
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            [binary, "-d", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        self.wait_for("Accepting connections")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        """Block until a log line containing ``text`` arrives (earlier lines are kept)."""
        for line in self.log:
            if text in line:
                return line
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"tinyproxy never logged {text!r}: {self.log[-5:]}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.log.append(line)
            if text in line:
                return line

    def drain(self) -> list[str]:
        """The log lines that arrived since the last call."""
        while True:
            try:
                self.log.append(self.lines.get_nowait())
            except queue.Empty:
                return self.log

    def stop(self) -> None:
        terminate(self.proc)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[TinyProxy]:
    proxy = TinyProxy(tmp_path)
    yield proxy
    proxy.stop()


def _open(url: str, timeout: float = 5.0, **kwargs: Any) -> tuple[RequestTarget, Any]:
    target = RequestTarget(url, TOKEN, UA)
    return target, open_channel(asyncio.get_running_loop(), target, timeout=timeout, **kwargs)


@pytest.mark.parametrize("uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_plain_http_goes_through_the_proxy(tinyproxy: TinyProxy, uvloop: bool) -> None:
    if uvloop:
        pytest.importorskip("uvloop", reason="CI installs the 'speedups' extra")

    async def main() -> None:
        async with Responder(serve_forever) as server:
            environ: Mapping[str, str] = {"HTTP_PROXY": tinyproxy.url}
            target, channel = _open(server.url, environ=environ)
            assert isinstance(channel, HttpxChannel)
            assert TOKEN not in repr(channel)
            for user in ("u1", "u 2"):
                answer = await channel.request(target.activity("acme", user, "login"))
                assert (answer.status, answer.body) == (200, b'{"ok":true}')
                assert answer.header("content-type") == "application/json"
            assert len(server.requests) == 2
            for _, head in server.requests:
                assert b"\r\nVia: 1.1 per-wire-test" in head  # forwarded by the proxy
                assert b"\r\nAuthorization: Bearer " + TOKEN.encode() in head
            await channel.aclose()

    _run(main(), uvloop=uvloop)
    tinyproxy.wait_for("GET http://127.0.0.1:")


def test_no_proxy_bypasses_the_proxy(tinyproxy: TinyProxy) -> None:
    async def main() -> None:
        async with Responder(serve_forever) as server:
            environ = {"HTTP_PROXY": tinyproxy.url, "NO_PROXY": "localhost,127.0.0.1"}
            _, channel = _open(server.url, environ=environ)
            assert isinstance(channel, LeanChannel)
            assert (await channel.request(b"/direct")).status == 200
            assert b"\r\nVia:" not in server.requests[0][1]
            await channel.aclose()
            # the same server through the explicit proxy argument: via the proxy
            _, channel = _open(server.url, proxy=tinyproxy.url, environ=environ)
            assert isinstance(channel, HttpxChannel)
            assert (await channel.request(b"/proxied")).status == 200
            assert b"\r\nVia: 1.1 per-wire-test" in server.requests[1][1]
            await channel.aclose()

    _run(main())
    tinyproxy.wait_for("GET http://127.0.0.1:")
    assert not any("/direct" in line for line in tinyproxy.drain())


def test_https_through_connect(
    tinyproxy: TinyProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trustme = pytest.importorskip("trustme", reason="trustme comes with the dev extra")
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    async def main() -> None:
        async with Responder(serve_forever, tls=server_context) as server:
            target, channel = _open(server.url, environ={"HTTPS_PROXY": tinyproxy.url})
            assert isinstance(channel, HttpxChannel)
            for user in ("u1", "u2"):
                answer = await channel.request(target.activity("acme", user, "login"))
                assert (answer.status, answer.body) == (200, b'{"ok":true}')
            assert len(server.requests) == 2
            assert all(b"\r\nVia:" not in head for _, head in server.requests)  # a tunnel
            await channel.aclose()

    _run(main())
    port = tinyproxy.url.rsplit(":", 1)[1]
    assert port
    tinyproxy.wait_for("CONNECT 127.0.0.1:")


def test_proxy_channel_maps_faults(tinyproxy: TinyProxy) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]

    async def main() -> None:
        async def script(peer: Peer) -> None:
            request = await peer.request()
            if request is None:
                return
            if b"/stall" in request:
                await peer.responder.release.wait()
            elif b"/big" in request:
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
            else:
                await peer.send(OK)
            await serve_forever(peer)

        async with Responder(script) as server:
            environ = {"HTTP_PROXY": tinyproxy.url}
            _, channel = _open(server.url, timeout=0.5, environ=environ, max_body=1000)
            err = await outcome(channel, b"/stall")
            assert isinstance(err, WireError) and err.kind == "timeout"
            err = await outcome(channel, b"/big")
            assert isinstance(err, WireError) and err.kind == "too_large"
            assert (await channel.request(b"/ok")).status == 200
            results: list[Any] = []
            channel.send(b"/stall", results.append)
            await asyncio.sleep(0.05)
            channel.close()
            assert results == []  # never inside close()
            await channel.aclose()
            assert len(results) == 1 and results[0].kind == "closed"
            with pytest.raises(RuntimeError):
                channel.send(b"/x", results.append)

            # closed before the request even started
            _, channel = _open(server.url, environ=environ)
            results.clear()
            channel.send(b"/ok", results.append)
            channel.close()
            await channel.aclose()
            assert [r.kind for r in results] == ["closed"]

        # the proxy itself unreachable
        _, channel = _open("http://127.0.0.1:9", proxy=f"http://127.0.0.1:{dead_port}")
        err = await outcome(channel)
        assert isinstance(err, WireError) and err.kind == "connect"
        assert TOKEN not in str(err)
        await channel.aclose()

    _run(main())


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://proxyuser:Tr0ub4dor@3xYz9QkL@127.0.0.1:3128", "http://***@127.0.0.1:3128"),
        ("http://proxyuser:pa/ss@127.0.0.1:3128", "http://***@127.0.0.1:3128"),
        ("http://proxyuser:secret@proxy:3128", "http://***@proxy:3128"),
        ("http://proxy:3128", "http://proxy:3128"),
    ],
)
def test_redact_hides_the_whole_userinfo(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_a_bad_proxy_url_with_at_in_its_password_is_refused_without_it() -> None:
    with pytest.raises(ValueError, match="proxy") as info:
        proxy_for("https://api.useper.com", "ftp://user:Tr0ub4dor@3xYz9QkL@proxy:21")
    assert "3xYz9QkL" not in str(info.value) and "Tr0ub4dor" not in str(info.value)


def test_proxy_channel_errors_hold_no_password_and_no_echoed_token(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    """A dead proxy whose password holds '@'; a "proxy" echoing the Authorization header."""
    password = "Tr0ub4dor@3xYz9QkL"

    async def main() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]
        _, channel = _open("http://127.0.0.1:9", proxy=f"http://u:{password}@127.0.0.1:{dead}")
        err = await outcome(channel)
        assert isinstance(err, WireError) and err.kind == "connect"
        assert "***@127.0.0.1" in str(err) and "3xYz9QkL" not in str(err)
        await channel.aclose()

        with EchoServer(ECHOES["header_line"]) as echo:
            target = RequestTarget("http://127.0.0.1:9", ECHO_TOKEN, UA)
            channel = open_channel(asyncio.get_running_loop(), target, timeout=5.0, proxy=echo.url)
            assert ECHO_TOKEN in held()  # masked in httpx's logs while the channel is open
            err = await outcome(channel)
            assert isinstance(err, WireError) and err.kind == "protocol", err
            assert "Bearer <token>" in str(err)
            assert_clean(str(err) + repr(err), "the channel's error", ECHO_TOKEN)
            await channel.aclose()
            assert ECHO_TOKEN not in held()

    _run(main())
