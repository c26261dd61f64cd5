"""Delivery never stores, logs or shows a token a server echoes back, whole or in pieces.

A raw loopback server (tests/token_echo.py) echoes the request's ``Authorization``
header into the reason phrase, ``Content-Length``, ``Content-Type``, a malformed header
line, the body, a ``Location`` or Per's JSON; the lean channel quotes such answers cut
short or lower-cased. No piece of 8+ characters of the token, in any case, may reach
``stats().last_error``, the logs, any file of the queue directory (the database, the
dead letters, ``drainer.log``) or ``per-buffer status --json``. Through a proxy
(tinyproxy), httpx's and httpcore's DEBUG records hold none either; nor when a real
nginx echoes the header in a redirect and a header of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from delivery_helpers import FAST, wait_stats
from nginx_helpers import Nginx
from test_wire_proxy import TinyProxy
from token_echo import (
    ECHOES,
    TOKEN,
    EchoServer,
    assert_clean,
    assert_directory_clean,
    assert_exception_clean,
)

from per_buffer import PerClient, Recorder
from per_buffer.cli import main


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Everything logged, by every logger, down to DEBUG."""
    caplog.set_level(logging.DEBUG)
    for name in ("per_buffer", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[TinyProxy]:
    proxy = TinyProxy(tmp_path)
    yield proxy
    proxy.stop()


def failing_delivery(url: str, directory: Path, **options: Any) -> str:
    """Record one activity, wait for a failed attempt, close; return the last error."""
    settings = {**FAST, "max_attempts": 1, "exit_timeout": 0.2, **options}
    rec = Recorder(TOKEN, "login", directory=directory, base_url=url, **settings)
    try:
        rec.record("acme", "u1")
        stats = wait_stats(rec, lambda s: s.last_error is not None, timeout=10)
        assert stats is not None and stats.last_error is not None, "no failed attempt"
        return stats.last_error
    finally:
        rec.close(timeout=0.1)  # what is left stays on disk


def assert_status_clean(directory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    main(["status", "--dir", str(directory), "--json"])
    out, err = capsys.readouterr()
    assert '"last_error"' in out or '"pending"' in out, out
    assert_clean(out + err, "per-buffer status --json")


@pytest.mark.parametrize(
    "echo",
    ["reason", "content_length", "content_type", "header_line", "body", "location", "per_json"],
)
def test_an_echoed_token_is_nowhere_in_thread_delivery(
    echo: str,
    tmp_path: Path,
    debug_logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory = tmp_path / "q"
    with EchoServer(ECHOES[echo]) as server:
        last_error = failing_delivery(server.url, directory, delivery="thread")
    assert server.heads, "nothing was sent"
    assert_clean(last_error, "stats().last_error")
    assert_clean(debug_logs.text, "the log")
    assert_directory_clean(directory)
    assert_status_clean(directory, capsys)


def test_an_echoed_token_is_nowhere_in_process_delivery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A drainer process: its drainer.log and what it publishes to the queue."""
    directory = tmp_path / "q"
    with EchoServer(ECHOES["reason"]) as server:
        last_error = failing_delivery(server.url, directory, delivery="process")
    assert "<token>" in last_error  # the lean channel quoted the cut echo, masked
    assert_clean(last_error, "stats().last_error")
    assert (directory / "drainer.log").exists()
    assert_directory_clean(directory)
    assert_status_clean(directory, capsys)


@pytest.mark.parametrize("echo", ["location", "own_header", "content_type"])
def test_delivery_through_a_proxy_logs_no_token(
    echo: str,
    tmp_path: Path,
    tinyproxy: TinyProxy,
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    directory = tmp_path / "q"
    with EchoServer(ECHOES[echo]) as server:
        last_error = failing_delivery(server.url, directory, delivery="thread", proxy=tinyproxy.url)
    assert any("Via" in head.decode("latin-1") for head in server.heads)  # through tinyproxy
    httpcore = [r.getMessage() for r in debug_logs.records if r.name.startswith("httpcore.")]
    assert httpcore, "httpcore logged nothing at DEBUG"
    if echo != "content_type":
        assert any("Bearer <token>" in text for text in httpcore)  # logged, masked
    assert_clean(last_error, "stats().last_error")
    assert_clean(debug_logs.text, "the log")
    assert_directory_clean(directory)


NGINX_ECHO = """
    add_header X-Seen-Auth "$http_authorization" always;
    return 302 "https://login.example/?h=$http_authorization";
"""


def test_a_real_nginx_echoing_the_header_puts_no_token_in_logs_or_errors(
    tmp_path: Path, tinyproxy: TinyProxy, debug_logs: pytest.LogCaptureFixture
) -> None:
    nginx = Nginx(tmp_path / "nginx", "", NGINX_ECHO)
    try:
        with PerClient(TOKEN, base_url=nginx.url) as per:
            with pytest.raises(Exception, match="HTTP 302") as info:
                per.add_activity("acme", "u1", "login")
        assert_exception_clean(info.value)
        last_error = failing_delivery(
            nginx.url, tmp_path / "q", delivery="thread", proxy=tinyproxy.url
        )
    finally:
        nginx.stop()
    assert "HTTP 302" in last_error
    headers = [r.getMessage() for r in debug_logs.records if r.name == "httpcore.http11"]
    assert sum("X-Seen-Auth" in text and "Bearer <token>" in text for text in headers) >= 2
    assert_clean(debug_logs.text, "the log")
    assert_directory_clean(tmp_path / "q")
