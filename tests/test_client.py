"""PerClient and AsyncPerClient against the local Per server: every response class, both twins."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from per_buffer import (
    MAX_ID_LENGTH,
    AsyncPerClient,
    PerAPIError,
    PerAuthError,
    PerClient,
    PerError,
    PerRateLimitError,
    PerTransportError,
    Report,
    __version__,
)
from per_buffer.client import _report, parse_retry_after, resolve_base_url
from per_buffer.testing import DEFAULT_ACTIVITY_TOKEN, DEFAULT_REPORTING_TOKEN, PerServer

TOKEN = DEFAULT_ACTIVITY_TOKEN
REPORTING = DEFAULT_REPORTING_TOKEN


class AsyncFacade:
    """Drives an AsyncPerClient from synchronous test code on a private event loop."""

    def __init__(self, client: AsyncPerClient) -> None:
        self._client = client
        self._loop = asyncio.new_event_loop()

    def add_activity(self, *args: Any) -> str:
        return self._loop.run_until_complete(self._client.add_activity(*args))

    def get_report(self, *args: Any, **kwargs: Any) -> Report:
        return self._loop.run_until_complete(self._client.get_report(*args, **kwargs))

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


Factory = Callable[..., Any]
E = TypeVar("E", bound=BaseException)


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest) -> Iterator[Factory]:
    """Builds clients of the parametrised twin; closes them afterwards."""
    made: list[Any] = []

    def factory(*args: Any, **kwargs: Any) -> Any:
        if request.param == "sync":
            client: Any = PerClient(*args, **kwargs)
        else:
            client = AsyncFacade(AsyncPerClient(*args, **kwargs))
        made.append(client)
        return client

    yield factory
    for client in made:
        client.close()


@pytest.fixture
def client(server: PerServer, make_client: Factory) -> Any:
    """A client of ``server`` with its activity token (each twin in turn)."""
    return make_client(TOKEN, base_url=server.url)


# --------------------------------------------------------------------------- success


def test_add_activity_returns_transaction_id(server: PerServer, make_client: Factory) -> None:
    client = make_client(TOKEN, base_url=server.url)
    tid = client.add_activity("acme", "user-1", "login")
    assert isinstance(tid, str) and tid
    [got] = server.activities
    assert (got.billing_id, got.user_id, got.activity_type_id) == ("acme", "user-1", "login")
    assert got.transaction_id == tid


def test_tokens_and_base_url_come_from_environment(
    server: PerServer, make_client: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", TOKEN)
    monkeypatch.setenv("PER_REPORTING_TOKEN", REPORTING)
    monkeypatch.setenv("PER_BASE_URL", server.url)
    client = make_client()
    client.add_activity("acme", "u1", "login")
    report = client.get_report(datetime(2000, 1, 1, tzinfo=timezone.utc))
    assert report.unique("login", "acme") == 1


def test_for_reporting_uses_reporting_token(
    server: PerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PER_REPORTING_TOKEN", REPORTING)
    with PerClient(TOKEN, base_url=server.url) as writer:
        writer.add_activity("acme", "u1", "login")
    with PerClient.for_reporting(base_url=server.url) as reader:
        report = reader.get_report("2000-01-01T00:00:00Z")
    assert report.unique("login", "acme") == 1
    with PerClient.for_reporting(base_url=server.url) as reader, pytest.raises(PerAuthError):
        reader.add_activity("acme", "u1", "login")  # a reporting token has no activity scope


def test_async_twin_context_manager_and_concurrency(server: PerServer) -> None:
    async def main() -> list[str]:
        async with AsyncPerClient(TOKEN, base_url=server.url) as client:
            return await asyncio.gather(
                *(client.add_activity("acme", f"u{i}", "login") for i in range(20))
            )

    results = asyncio.run(main())
    assert len(set(results)) == 20
    assert server.unique_count() == 20


def test_missing_token_names_the_variable() -> None:
    with pytest.raises(ValueError, match="PER_ACTIVITY_TOKEN"):
        PerClient(base_url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="PER_REPORTING_TOKEN"):
        PerClient.for_reporting(base_url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="PER_ACTIVITY_TOKEN"):
        AsyncPerClient(base_url="http://127.0.0.1:9")


def test_user_agent_names_the_library() -> None:
    with PerClient(TOKEN, base_url="http://127.0.0.1:9") as client:
        assert client._http.headers["User-Agent"] == f"per-buffer/{__version__}"


# --------------------------------------------------------------------------- response classes


def test_401_is_auth_error(server: PerServer, make_client: Factory) -> None:
    client = make_client("wrong-token", base_url=server.url)
    with pytest.raises(PerAuthError) as info:
        client.add_activity("acme", "u1", "login")
    assert info.value.retryable is False
    assert info.value.status_code == 401
    assert info.value.message == "invalid_auth_token"
    assert "wrong-token" not in str(info.value) + repr(info.value)
    assert server.activities == []


def refusal(server: PerServer, client: Any, kind: str, expected: type[E], **fault: Any) -> E:
    """The error ``client.add_activity`` raises after ``server.inject(kind, count=1, **fault)``."""
    server.inject(kind, count=1, **fault)
    with pytest.raises(expected) as info:
        client.add_activity("acme", "u1", "login")
    return info.value


def test_ok_false_is_api_error_with_message(server: PerServer, client: Any) -> None:
    error = refusal(server, client, "ok_false", PerAPIError, message="activity_type_not_found")
    assert error.message == "activity_type_not_found"
    assert error.retryable is False
    assert not isinstance(error, PerAuthError)


def test_ok_false_invalid_auth_token_with_200_is_auth_error(server: PerServer, client: Any) -> None:
    refusal(server, client, "ok_false", PerAuthError, message="invalid_auth_token")


@pytest.mark.parametrize(
    ("retry_after", "low", "high"),
    [("7", 7.0, 7.0), ("a date 120 s ahead", 100.0, 121.0), (None, None, None)],
)
def test_429_with_or_without_retry_after(
    server: PerServer, client: Any, retry_after: str | None, low: float | None, high: float | None
) -> None:
    if retry_after == "a date 120 s ahead":
        retry_after = email.utils.formatdate(time.time() + 120, usegmt=True)
    error = refusal(server, client, "429", PerRateLimitError, retry_after=retry_after)
    assert error.retryable is True
    assert error.status_code == 429
    if low is None or high is None:
        assert error.retry_after is None
    else:
        assert error.retry_after is not None
        assert low <= error.retry_after <= high


@pytest.mark.parametrize(("kind", "status"), [("503", 503), ("non_json", 200)])
def test_an_html_page_is_a_retryable_transport_error(
    server: PerServer, client: Any, kind: str, status: int
) -> None:
    """A 503 error page, or Per's 200 with an HTML body (a maintenance page)."""
    error = refusal(server, client, kind, PerTransportError)
    assert error.retryable is True
    assert error.status_code == status
    assert server.activities == []
    client.add_activity("acme", "u1", "login")  # the next request goes through
    assert len(server.activities) == 1


def test_dropped_connection_is_transport_error(server: PerServer, client: Any) -> None:
    refusal(server, client, "drop", PerTransportError)


def test_hanging_server_times_out(server: PerServer, make_client: Factory) -> None:
    server.inject("hang", count=1)
    client = make_client(TOKEN, base_url=server.url, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(PerTransportError, match="timed out"):
        client.add_activity("acme", "u1", "login")
    assert time.monotonic() - started < 5
    server.clear_faults()


def test_outage_then_recovery(server: PerServer, make_client: Factory) -> None:
    client = make_client(TOKEN, base_url=server.url)
    server.outage()
    with pytest.raises(PerTransportError) as info:
        client.add_activity("acme", "u1", "login")
    assert TOKEN not in str(info.value)
    server.recover()
    assert client.add_activity("acme", "u1", "login")


def test_other_4xx_is_non_retryable_error_naming_status(
    server: PerServer, make_client: Factory
) -> None:
    client = make_client(TOKEN, base_url=server.url + "/no-such-prefix")
    with pytest.raises(PerError) as info:
        client.add_activity("acme", "u1", "login")
    assert type(info.value) in (PerError, PerAPIError)
    assert info.value.retryable is False
    assert info.value.status_code == 404
    assert "404" in str(info.value)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("args", "exc", "name"),
    [
        ((1, "u", "t"), TypeError, "billing_id"),
        (("b", None, "t"), TypeError, "user_id"),
        (("b", "u", b"t"), TypeError, "activity_type_id"),
        (("", "u", "t"), ValueError, "billing_id"),
        (("b", "", "t"), ValueError, "user_id"),
        (("b", "u\n", "t"), ValueError, "user_id"),
        (("b", "u", "t\x00"), ValueError, "activity_type_id"),
        (("b" * (MAX_ID_LENGTH + 1), "u", "t"), ValueError, "billing_id"),
    ],
)
def test_bad_ids_fail_before_any_request(
    server: PerServer, make_client: Factory, args: tuple[Any, ...], exc: type[Exception], name: str
) -> None:
    client = make_client(TOKEN, base_url=server.url)
    with pytest.raises(exc, match=name):
        client.add_activity(*args)
    assert server.counters.get("requests", 0) == 0


def test_longest_id_is_accepted(server: PerServer) -> None:
    with PerClient(TOKEN, base_url=server.url) as client:
        client.add_activity("b" * MAX_ID_LENGTH, "u", "t")
    assert server.activities[0].billing_id == "b" * MAX_ID_LENGTH


_ID_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(billing=_ID_TEXT, user=_ID_TEXT, kind=_ID_TEXT)
def test_ids_round_trip_through_url_encoding(
    server: PerServer, billing: str, user: str, kind: str
) -> None:
    server.reset()
    with PerClient(TOKEN, base_url=server.url) as client:
        client.add_activity(billing, user, kind)
    [got] = server.activities
    assert (got.billing_id, got.user_id, got.activity_type_id) == (billing, user, kind)


def test_special_characters_round_trip(server: PerServer) -> None:
    special = ["a b", "a&b=c", "#frag", "100%", "a+b", "zoë", "日本", "🙂", "?x=1", "/slash"]
    with PerClient(TOKEN, base_url=server.url) as client:
        for value in special:
            client.add_activity(value, value, value)
    assert [a.user_id for a in server.activities] == special


# --------------------------------------------------------------------------- security


@pytest.mark.parametrize(
    "url",
    [
        "http://api.useper.com",
        "http://10.0.0.1:8080",
        "ftp://127.0.0.1",
        "https://user:pw@api.useper.com",
        "https://api.useper.com/?x=1",
        "not a url",
        "https://",
    ],
)
def test_base_url_rejected(url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        PerClient(TOKEN, base_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.useper.com",
        "https://per.example.com:8443/",
        "http://127.0.0.1:8080",
        "http://127.9.9.9",
        "http://localhost:1234",
        "http://[::1]:8080",
    ],
)
def test_base_url_accepted(url: str) -> None:
    assert resolve_base_url(url) == url.rstrip("/")


def test_tls_verification_stays_on() -> None:
    with PerClient(TOKEN) as client:
        pool = client._http._transport._pool  # type: ignore[attr-defined]
        assert pool._ssl_context.verify_mode.name == "CERT_REQUIRED"


def test_token_never_in_repr_or_errors(server: PerServer, make_client: Factory) -> None:
    secret = "sk-very-secret-123"
    server.set_tokens(activity_tokens=[secret])
    client = make_client(secret, base_url=server.url)
    assert secret not in repr(client)
    server.inject("503", count=1)
    for kind in ("503", "429", "ok_false", "non_json", "drop"):
        server.inject(kind, count=1)
        with pytest.raises(PerError) as info:
            client.add_activity("acme", "u1", "login")
        assert secret not in str(info.value) and secret not in repr(info.value)
    server.set_tokens(activity_tokens=["other"])
    with pytest.raises(PerAuthError) as info:
        client.add_activity("acme", "u1", "login")
    assert secret not in str(info.value) and secret not in repr(info.value)


def test_token_never_in_logs(
    server: PerServer, per_logs: pytest.LogCaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore too
    secret = "sk-log-secret-456"
    server.set_tokens(activity_tokens=[secret])
    with PerClient(secret, base_url=server.url) as client:
        client.add_activity("acme", "u1", "login")
        server.inject("503", count=1)
        with pytest.raises(PerTransportError):
            client.add_activity("acme", "u1", "login")
    assert caplog.records, "expected some debug logging from httpx"
    assert secret not in caplog.text


# --------------------------------------------------------------------------- reports


def test_report_bounds_validation(make_client: Factory) -> None:
    client = make_client(TOKEN, base_url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="naive"):
        client.get_report(datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="end"):
        client.get_report(None, datetime(2024, 1, 1, tzinfo=timezone.utc))
    with pytest.raises(ValueError, match="later"):
        client.get_report("2024-02-01T00:00:00Z", "2024-01-01T00:00:00Z")
    with pytest.raises(ValueError, match="ISO 8601"):
        client.get_report("yesterday")
    with pytest.raises(ValueError, match="time zone"):
        client.get_report("2024-01-01T00:00:00")


def test_report_counts_unique_users_in_utc_range(make_client: Factory) -> None:
    now = [datetime(2024, 3, 10, 12, 0, tzinfo=timezone.utc).timestamp()]
    with PerServer(clock=lambda: now[0]) as srv:
        client = make_client(TOKEN, reporting_token=REPORTING, base_url=srv.url)
        for user in ("u1", "u2", "u1"):
            client.add_activity("acme", user, "login")
        client.add_activity("globex", "u1", "login")
        client.add_activity("acme", "u1", "upload")
        now[0] += 3600
        client.add_activity("acme", "u3", "login")
        paris = timezone(timedelta(hours=1))
        report = client.get_report(
            datetime(2024, 3, 10, 13, 0, tzinfo=paris),  # 12:00 UTC
            "2024-03-10T12:30:00Z",
        )
    assert report.start == datetime(2024, 3, 10, 12, 0, tzinfo=timezone.utc)
    assert report.unique("login", "acme") == 2
    assert report.unique("login", "globex") == 1
    assert report.unique("upload", "acme") == 1
    assert report.unique("login", "nobody") == 0
    assert report.totals() == {"login": 3, "upload": 1}
    assert list(report) == [("login", "acme", 2), ("login", "globex", 1), ("upload", "acme", 1)]
    assert report.raw["activityTypes"]["login"]["billingIds"]["acme"] == {"unique": 2}


def test_default_report_is_prior_calendar_month(make_client: Factory) -> None:
    now = [datetime(2024, 1, 20, tzinfo=timezone.utc).timestamp()]
    with PerServer(clock=lambda: now[0]) as srv:
        client = make_client(TOKEN, reporting_token=REPORTING, base_url=srv.url)
        now[0] = datetime(2023, 12, 31, 23, 59, tzinfo=timezone.utc).timestamp()
        client.add_activity("acme", "december", "login")
        now[0] = datetime(2024, 1, 2, tzinfo=timezone.utc).timestamp()
        client.add_activity("acme", "january", "login")
        now[0] = datetime(2024, 1, 20, tzinfo=timezone.utc).timestamp()
        report = client.get_report()
    assert report.start == datetime(2023, 12, 1, tzinfo=timezone.utc)
    assert report.end is not None and report.end.month == 12 and report.end.day == 31
    assert report.unique("login", "acme") == 1


def test_report_needs_reporting_scope(server: PerServer, make_client: Factory) -> None:
    client = make_client(TOKEN, reporting_token=TOKEN, base_url=server.url)
    with pytest.raises(PerAuthError):
        client.get_report()


# --------------------------------------------------------------------------- pure parts


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") is None  # not a valid delay: the backoff decides
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    got = parse_retry_after(date, now=now)
    assert got is not None and 28 <= got <= 31


_IDS = st.text(alphabet="abcdefgh-_0123456789", min_size=1, max_size=8)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_IDS, st.dictionaries(_IDS, st.integers(0, 10**6), max_size=5), max_size=5))
def test_report_parsing_property(table: dict[str, dict[str, int]]) -> None:
    result = {
        "start": "2018-12-01T00:00:00.000Z",
        "end": "2018-12-31T23:59:59.999Z",
        "activityTypes": {
            t: {"billingIds": {b: {"unique": n} for b, n in billing.items()}}
            for t, billing in table.items()
        },
    }
    report = Report.from_result(result)
    for t, billing in table.items():
        for b, n in billing.items():
            assert report.unique(t, b) == n
        assert report.totals().get(t, 0) == sum(billing.values())
    assert len(list(report)) == sum(len(b) for b in table.values())
    assert report.raw is result
    assert report.end == datetime(2018, 12, 31, 23, 59, 59, 999000, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"activityTypes": []},
        {"activityTypes": {"t": {"billingIds": {"b": {"unique": -1}}}}},
        {"activityTypes": {"t": {"billingIds": {"b": {"unique": "3"}}}}},
        {"start": 5},
    ],
)
def test_malformed_report_is_transport_error_not_crash(bad: Any) -> None:
    with pytest.raises(PerTransportError):
        _report(bad)
