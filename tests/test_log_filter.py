"""The log filter: tokens in use are masked in httpx's and httpcore's records, every logger.

Records go through the real loggers httpx and httpcore use (a logger's filters do not
apply to its children's records, so each child needs the filter), and through a real
exchange with a raw loopback server that echoes the ``Authorization`` header in a
redirect's ``Location``. The end-to-end cases (real nginx, delivery through tinyproxy)
are in tests/delivery/test_delivery_token_echo.py.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterator

import httpx
import pytest
from token_echo import ECHOES, TOKEN, EchoServer, assert_clean

from per_buffer import PerClient
from per_buffer._log_filter import LOGGERS, SecretFilter, held, hold, install, masked

OTHER = "sk_test_9aF3kL0pQ7zX2mN5vB8cD1eR4tY6uI0o"


def mine() -> set[str]:
    """This file's secrets among those held (another test's unclosed client may hold its own)."""
    return set(held()) & {TOKEN, OTHER}


@pytest.fixture(autouse=True)
def _nothing_held() -> Iterator[None]:
    assert mine() == set(), "a previous test left a secret held"
    yield
    assert mine() == set(), "this test left a secret held"


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def _filters(name: str) -> list[SecretFilter]:
    return [f for f in logging.getLogger(name).filters if isinstance(f, SecretFilter)]


def test_the_filter_is_on_every_httpx_and_httpcore_logger_once() -> None:
    install()
    install()
    hold().release()
    for name in LOGGERS:
        assert len(_filters(name)) == 1, name
    # every logger httpx and httpcore made so far, whatever its name
    made = [n for n in logging.root.manager.loggerDict if n.startswith(("httpx.", "httpcore."))]
    assert all(len(_filters(name)) == 1 for name in made)
    assert "httpcore.http11" in LOGGERS and "httpcore.connection" in LOGGERS


@pytest.mark.parametrize("name", ["httpx", "httpcore.http11", "httpcore.connection"])
def test_a_held_token_is_masked_in_a_record_of_each_logger(
    name: str, debug_logs: pytest.LogCaptureFixture
) -> None:
    claim = hold(TOKEN)
    try:
        logging.getLogger(name).debug(
            "headers=%r", [(b"Location", f"https://x/?h=Bearer {TOKEN.lower()[:30]}".encode())]
        )
        try:
            raise ValueError(f"echo {TOKEN}")
        except ValueError:
            logging.getLogger(name).debug("failed", exc_info=True, stack_info=True)
    finally:
        claim.release()
    assert_clean(debug_logs.text, "the log")
    assert "Bearer <token>" in debug_logs.text and "echo <token>" in debug_logs.text
    logging.getLogger(name).debug("after release: %s", TOKEN)
    assert TOKEN in debug_logs.text  # no longer held: no longer masked


def test_records_without_a_secret_are_left_as_they_are(
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    claim = hold(TOKEN)
    try:
        logging.getLogger("httpcore.http11").debug("plain %s %d", "words", 3)
    finally:
        claim.release()
    (record,) = [r for r in debug_logs.records if r.name == "httpcore.http11"]
    assert record.msg == "plain %s %d" and record.args == ("words", 3)


def test_holds_are_counted_and_released_once() -> None:
    first, second = hold(TOKEN, OTHER), hold(TOKEN)
    assert mine() == {TOKEN, OTHER}
    first.release()
    first.release()  # idempotent: does not release the second holder's claim
    assert mine() == {TOKEN}
    assert masked(f"x {TOKEN} y") == "x <token> y"
    second.release()
    assert mine() == set()
    assert masked(f"x {TOKEN} y") == f"x {TOKEN} y"
    hold("", None).release()  # nothing to hold


def test_a_hold_ends_with_its_owner() -> None:
    class Owner:
        pass

    owner = Owner()
    hold(TOKEN, owner=owner)
    assert mine() == {TOKEN}
    del owner
    gc.collect()
    assert mine() == set()


def test_a_client_nobody_closed_releases_its_token_when_collected() -> None:
    client = PerClient(TOKEN, base_url="http://127.0.0.1:9")  # never used: no connection
    assert mine() == {TOKEN}
    del client
    gc.collect()
    assert mine() == set()


def test_concurrent_holds_and_releases_keep_the_count() -> None:
    start = threading.Barrier(8)

    def churn() -> None:
        start.wait()
        for _ in range(300):
            hold(TOKEN, OTHER).release()

    keeper = hold(OTHER)
    threads = [threading.Thread(target=churn) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mine() == {OTHER}
    keeper.release()


def test_a_per_client_debug_log_of_an_echoing_redirect_holds_no_token(
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    with EchoServer(ECHOES["location"]) as server, PerClient(TOKEN, base_url=server.url) as per:
        with pytest.raises(Exception, match="HTTP 302"):
            per.add_activity("acme", "u1", "login")
    headers = [r.getMessage() for r in debug_logs.records if r.name == "httpcore.http11"]
    assert any("Location" in text and "Bearer <token>" in text for text in headers), headers
    assert_clean(debug_logs.text, "the log")


def test_without_a_hold_httpcore_would_log_the_echo(
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    """The control: plain httpx with the same server logs the token at DEBUG."""
    with EchoServer(ECHOES["location"]) as server, httpx.Client() as client:
        client.get(server.url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert TOKEN in debug_logs.text
