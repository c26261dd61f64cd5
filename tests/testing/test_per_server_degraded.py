"""PerServer as a degraded Per: server clock and Date, rate limiter, faults, framing, spikes."""

from __future__ import annotations

import time
from email.utils import formatdate, parsedate_to_datetime

import httpx
import pytest
from per_server_helpers import add, ts

from per_buffer.testing import PerServer

# --------------------------------------------------------------------------- clock and Date


def test_date_header_follows_the_server_clock(http: httpx.Client) -> None:
    now = [1_700_000_000.75]
    with PerServer(clock=lambda: now[0]) as server:
        response = add(http, server)
        assert response.headers["date"] == formatdate(1_700_000_000, usegmt=True)
        assert response.headers["date"] == "Tue, 14 Nov 2023 22:13:20 GMT"
        now[0] += 1.0  # the per-second cache moves on
        assert add(http, server).headers["date"] == formatdate(1_700_000_001, usegmt=True)
        # error answers carry it too
        response = http.get(f"{server.url}/nowhere")
        assert response.status_code == 404
        assert response.headers["date"] == formatdate(1_700_000_001, usegmt=True)
        server.inject("503")
        assert add(http, server).headers["date"] == formatdate(1_700_000_001, usegmt=True)

        server.set_clock_offset(-3600.5)
        assert server.now() == now[0] - 3600.5
        response = add(http, server, user="late")
        assert response.headers["date"] == formatdate(1_700_000_001 - 3600, usegmt=True)
        assert server.activities[-1].timestamp == now[0] - 3600.5  # stamps use the same time
        with pytest.raises(ValueError, match="finite"):
            server.set_clock_offset(float("nan"))


def test_clock_offset_shifts_stamps_and_the_default_report(http: httpx.Client) -> None:
    with PerServer(clock_offset=-86_400.0) as server:
        response = add(http, server)
        host = time.time()
        date = parsedate_to_datetime(response.headers["date"]).timestamp()
        assert host - 86_400 - 5 < date <= host - 86_400 + 1
        [activity] = server.activities
        assert host - 86_400 - 5 < activity.timestamp <= host - 86_400
    now = [ts(2024, 3, 1, 12)]  # the server is a day behind: still February for it
    with PerServer(clock=lambda: now[0], clock_offset=-86_400.0) as server:
        report = server.report()
        assert (report["start"], report["end"]) == (
            "2024-01-01T00:00:00.000Z",
            "2024-01-31T23:59:59.999Z",
        )
    with pytest.raises(ValueError, match="finite"):
        PerServer(clock_offset=float("inf"))


# --------------------------------------------------------------------------- rate limiter


def test_rate_limiter_serves_about_rate_requests_a_second(
    server: PerServer, http: httpx.Client
) -> None:
    rate, burst = 50.0, 5
    server.set_rate_limit(rate, burst=burst)
    statuses: list[int] = []
    retry_afters: set[str] = set()
    started = time.monotonic()
    while time.monotonic() - started < 2.0:
        response = add(http, server, user=f"u{len(statuses)}")
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.json() == {"ok": False, "message": "rate_limited"}
            retry_afters.add(response.headers["retry-after"])
    elapsed = time.monotonic() - started
    ok = statuses.count(200)
    expected = burst + rate * elapsed
    assert expected * 0.9 - 1 <= ok <= expected * 1.05 + 1, (ok, expected, len(statuses))
    assert statuses.count(429) == len(statuses) - ok > 0
    assert retry_afters == {"1"}  # a token is never more than 1/50 s away
    counters = server.counters
    assert counters["rate_limited"] == statuses.count(429) and counters["ok"] == ok
    assert len(server.activities) == ok

    server.set_rate_limit(None)
    assert {add(http, server).status_code for _ in range(20)} == {200}


def test_retry_after_seconds_is_the_wait_rounded_up(server: PerServer, http: httpx.Client) -> None:
    # one token every 2.5 s: the second request waits 2.5 s minus a few ms -> 3
    server.set_rate_limit(0.4)
    assert add(http, server).status_code == 200
    server.inject("503", count=1)
    response = add(http, server)
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    assert add(http, server).headers["retry-after"] == "3"  # refused requests take nothing
    server.set_rate_limit(None)
    assert add(http, server).status_code == 503  # the limiter came first: the fault waited

    server.set_rate_limit(0.5, burst=3)  # a new bucket starts full
    assert [add(http, server).status_code for _ in range(3)] == [200, 200, 200]
    assert add(http, server).headers["retry-after"] == "2"
    server.set_rate_limit(4.0, burst=1)  # 0.25 s away: at least 1
    assert add(http, server).status_code == 200
    assert add(http, server).headers["retry-after"] == "1"
    server.set_rate_limit(0.25, retry_after="none")
    assert add(http, server).status_code == 200
    response = add(http, server)
    assert response.status_code == 429 and "retry-after" not in response.headers
    assert response.json() == {"ok": False, "message": "rate_limited"}
    server.reset()  # refills the bucket, keeps the limit
    assert add(http, server).status_code == 200
    assert add(http, server).status_code == 429


def test_retry_after_date_is_on_the_server_clock(http: httpx.Client) -> None:
    now = [1_700_000_000.25]
    with PerServer(clock=lambda: now[0], clock_offset=-100.0) as server:
        server.set_rate_limit(0.4, retry_after="date")
        assert add(http, server).status_code == 200
        response = add(http, server)
        assert response.status_code == 429
        # server time 1_699_999_900.25, next token 2.5 s later (less a few ms) -> ..903
        assert response.headers["date"] == formatdate(1_699_999_900, usegmt=True)
        assert response.headers["retry-after"] == formatdate(1_699_999_903, usegmt=True)
        now[0] = 1_700_000_000.95
        server.set_rate_limit(20.0, burst=1, retry_after="date")  # 0.05 s away
        assert add(http, server).status_code == 200
        response = add(http, server)
        assert response.headers["retry-after"] == formatdate(1_699_999_901, usegmt=True)
        assert parsedate_to_datetime(response.headers["retry-after"]) > parsedate_to_datetime(
            response.headers["date"]
        )


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((0,), {}, "positive"),
        ((-1.0,), {}, "positive"),
        ((float("nan"),), {}, "positive"),
        ((float("inf"),), {}, "positive"),
        ((5.0,), {"burst": 0}, "burst"),
        ((5.0,), {"burst": 1.5}, "burst"),
        ((5.0,), {"retry_after": "minutes"}, "retry_after"),
        ((None,), {"burst": 3}, "burst needs a rate"),
    ],
)
def test_set_rate_limit_validates(
    server: PerServer, args: tuple[object, ...], kwargs: dict[str, object], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        server.set_rate_limit(*args, **kwargs)  # type: ignore[arg-type]
