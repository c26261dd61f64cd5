"""The plain clients and the CLI never show a token a server echoes back.

A raw loopback server (tests/token_echo.py) puts the request's ``Authorization``
header into a malformed header line, the reason phrase, ``Content-Type``,
``Content-Length``, the body, a ``Location``, a header of its own or Per's JSON.
Whatever the client raises holds no piece of 8+ characters of the token, in any
case, in ``str``, ``repr`` or the formatted traceback, and chains no httpx exception;
nothing logged at DEBUG (httpx and httpcore included) holds one either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from token_echo import (
    ECHOES,
    TOKEN,
    EchoServer,
    assert_clean,
    assert_exception_clean,
    authorization,
)

from per_buffer import AsyncPerClient, PerClient
from per_buffer._log_filter import held
from per_buffer.cli import main
from per_buffer.errors import PerAPIError, PerError, PerTransportError

Call = Callable[[str], PerError]


def _sync_call(method: str, url: str) -> PerError:
    with PerClient(TOKEN, base_url=url, timeout=5) as client:
        with pytest.raises(PerError) as info:
            if method == "add":
                client.add_activity("acme", "u1", "login")
            else:
                client.get_report()
    return info.value


def _async_call(method: str, url: str) -> PerError:
    async def call() -> PerError:
        async with AsyncPerClient(TOKEN, base_url=url, timeout=5) as client:
            with pytest.raises(PerError) as info:
                if method == "add":
                    await client.add_activity("acme", "u1", "login")
                else:
                    await client.get_report()
        return info.value

    return asyncio.run(call())


@pytest.fixture(params=["sync", "async"])
def twin(request: pytest.FixtureRequest) -> Callable[[str, str], PerError]:
    return _sync_call if request.param == "sync" else _async_call


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Everything logged, by every logger, down to DEBUG."""
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    yield caplog


def assert_logs_clean(caplog: pytest.LogCaptureFixture) -> None:
    assert_clean(caplog.text, "the log")
    for record in caplog.records:
        assert_clean(record.getMessage(), f"a record of {record.name}")


@pytest.mark.parametrize("echo", sorted(ECHOES))
@pytest.mark.parametrize("method", ["add", "report"])
def test_an_echoed_token_is_in_no_error_and_no_log(
    echo: str,
    method: str,
    twin: Callable[[str, str], PerError],
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    with EchoServer(ECHOES[echo]) as server:
        error = twin(method, server.url)
    assert server.heads and TOKEN.encode() in authorization(server.heads[0])  # it was sent
    assert_exception_clean(error)
    assert_logs_clean(debug_logs)
    assert TOKEN not in held()  # the client is closed: nothing is kept to mask
    if echo == "per_json":
        assert isinstance(error, PerAPIError)
        assert error.message == "bearer <token>"
    else:
        assert isinstance(error, PerTransportError)


@pytest.mark.parametrize("echo", ["location", "own_header", "header_line"])
def test_the_echo_reaches_httpcore_logs_masked(
    echo: str, debug_logs: pytest.LogCaptureFixture
) -> None:
    """The control for the test above: the echo is logged, with ``<token>`` in its place."""
    with EchoServer(ECHOES[echo]) as server:
        _sync_call("add", server.url)
    httpcore = [r.getMessage() for r in debug_logs.records if r.name.startswith("httpcore.")]
    assert any("Bearer <token>" in message for message in httpcore), httpcore


def test_the_transport_error_keeps_the_httpx_name_and_says_what_happened() -> None:
    with EchoServer(ECHOES["header_line"]) as server:
        error = _sync_call("add", server.url)
    text = str(error)
    assert "RemoteProtocolError" in text and "<token>" in text and server.url in text
    assert error.retryable


def test_a_cut_lowercased_echo_in_a_malformed_report_is_masked() -> None:
    """Per's JSON whose report names an activity type after a piece of the token."""

    def respond(head: bytes) -> bytes:
        piece = authorization(head).lower()[10:50].decode()
        body = f'{{"ok":true,"result":{{"activityTypes":{{"{piece}":5}}}}}}'.encode()
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body) + body
        )

    with EchoServer(respond) as server:
        error = _sync_call("report", server.url)
    assert "could not be read" in str(error)
    assert_exception_clean(error)


def test_a_network_failure_has_no_chained_httpx_exception() -> None:
    with EchoServer(ECHOES["header_line"]) as server:
        url = server.url
    error = _sync_call("add", url)  # nothing listens any more: connection refused
    assert isinstance(error, PerTransportError) and "ConnectError" in str(error)
    assert error.__cause__ is None and error.__context__ is None


def test_the_client_holds_its_tokens_for_the_log_filter_until_closed() -> None:
    client = PerClient(TOKEN, reporting_token=TOKEN[::-1], base_url="http://127.0.0.1:9")
    assert {TOKEN, TOKEN[::-1]} <= set(held())
    client.close()
    assert not {TOKEN, TOKEN[::-1]} & set(held())


RECORD_DIRECT = ["record", "--billing-id", "acme", "--user-id", "u1", "--direct"]


@pytest.mark.parametrize(
    ("echo", "argv"),
    [
        ("header_line", ["report"]),
        ("header_line", ["report", "--verbose"]),
        ("header_line", RECORD_DIRECT),
        ("content_length", ["report", "--verbose"]),
        ("content_length", RECORD_DIRECT),
        ("location", ["report", "--verbose"]),  # an answer: retried twice (1.5 s)
    ],
)
def test_the_cli_shows_no_echoed_token(
    echo: str,
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    with EchoServer(ECHOES[echo]) as server:
        for name in ("PER_ACTIVITY_TOKEN", "PER_REPORTING_TOKEN"):
            monkeypatch.setenv(name, TOKEN)
        monkeypatch.setenv("PER_BASE_URL", server.url)
        monkeypatch.setenv("PER_ACTIVITY_TYPE_ID", "login")
        status = main(argv)
    out, err = capsys.readouterr()
    assert status != 0 and "per-buffer: error:" in err
    assert_clean(out + err, "the CLI's output")
    assert_logs_clean(debug_logs)


# --------------------------------------------------------------------------- token form

NON_ASCII = "per_live_secret\u2019value_0123456789"
BAD_TOKENS = [NON_ASCII, "per_live_tab\tinside", "per_live_nul\x00inside", "per live space"]


@pytest.mark.parametrize("token", BAD_TOKENS)
@pytest.mark.parametrize("make", [PerClient, AsyncPerClient, PerClient.for_reporting])
def test_a_token_that_is_not_printable_ascii_is_refused_at_once(
    make: Callable[..., Any], token: str
) -> None:
    with pytest.raises(ValueError, match="printable ASCII") as info:
        make(token, base_url="http://127.0.0.1:9")
    assert token not in str(info.value) and "secret" not in str(info.value)
    assert token not in held()


def test_a_reporting_token_is_checked_too() -> None:
    with pytest.raises(ValueError, match="reporting_token must be printable ASCII"):
        PerClient("fine-token", reporting_token=NON_ASCII, base_url="http://127.0.0.1:9")


@pytest.mark.parametrize(
    ("variable", "argv"),
    [
        ("PER_REPORTING_TOKEN", ["report"]),
        ("PER_ACTIVITY_TOKEN", ["record", "--billing-id", "b", "--user-id", "u", "--direct"]),
        ("PER_ACTIVITY_TOKEN", ["record", "--billing-id", "b", "--user-id", "u"]),
    ],
)
def test_the_cli_refuses_a_non_ascii_token_naming_the_variable(
    variable: str,
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
) -> None:
    monkeypatch.setenv(variable, NON_ASCII)
    monkeypatch.setenv("PER_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("PER_ACTIVITY_TYPE_ID", "login")
    monkeypatch.setenv("PER_BUFFER_DIR", str(tmp_path / "q"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{variable} must be printable ASCII" in err
    assert "secret" not in err and "\u2019" not in err
    assert not (tmp_path / "q").exists()


def test_httpx_errors_are_what_the_client_catches() -> None:
    """The clients catch ``httpx.HTTPError``: h11's complaint arrives as one of those."""
    with EchoServer(ECHOES["header_line"]) as server, httpx.Client() as raw:
        with pytest.raises(httpx.HTTPError) as info:
            raw.get(server.url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert TOKEN in str(info.value)  # the unmasked text the clients must not pass on
