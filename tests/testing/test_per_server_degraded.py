"""PerServer as a degraded Per: server clock and Date, rate limiter, faults, framing, spikes."""

from __future__ import annotations

import socket
import time
from email.utils import formatdate, parsedate_to_datetime

import httpx
import pytest
from per_server_helpers import add, raw_request, ts

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


# --------------------------------------------------------------------------- any status, any body


def test_http_fault_any_status_and_body_shape(server: PerServer, http: httpx.Client) -> None:
    server.inject("http", status=403)  # the default body: an nginx-like page
    response = add(http, server)
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("text/html")
    assert "<title>403 Forbidden</title>" in response.text and "nginx" in response.text
    assert int(response.headers["content-length"]) == len(response.content)

    server.inject("http", status=404, body="html", count=2)
    for _ in range(2):
        response = add(http, server)
        assert response.status_code == 404 and "<h1>404 Not Found</h1>" in response.text

    server.inject("http", status=502, body="text")
    response = add(http, server)
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "502 Bad Gateway\n"

    server.inject("http", status=500, body="empty")
    response = add(http, server)
    assert response.status_code == 500 and response.content == b""
    assert response.headers["content-length"] == "0" and "content-type" not in response.headers

    server.inject("http", status=400, body="per_ok_false", message="invalid_parameter")
    response = add(http, server)
    assert response.status_code == 400
    assert response.json() == {"ok": False, "message": "invalid_parameter"}

    server.inject("http", status=403, body="per_auth")
    response = add(http, server)
    assert response.status_code == 403
    assert response.json() == {"ok": False, "message": "invalid_auth_token"}

    server.inject("http", status=429, body="html", retry_after="7")
    response = add(http, server)
    assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert "429 Too Many Requests" in response.text

    server.inject("http", status=599)  # a code without a reason phrase
    assert add(http, server).status_code == 599

    assert server.activities == []
    assert server.counters["fault_http"] == 9
    assert add(http, server).status_code == 200  # the keep-alive connection is still good


def test_http_fault_204_has_no_body_and_keeps_the_connection(server: PerServer) -> None:
    server.inject("http", status=204, count=1)
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(raw_request("/activities.add?billingId=b&userId=u&activityTypeId=t") * 2)
        received = b""
        while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}}"):
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
    first, second = received.split(b"HTTP/1.1 200 ")
    assert first.startswith(b"HTTP/1.1 204 No Content\r\n") and first.endswith(b"\r\n\r\n")
    assert b"content-length" not in first.lower() and b"content-type" not in first.lower()
    assert b'"ok":true' in second
    assert len(server.activities) == 1


# --------------------------------------------------------------------------- timed faults


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("503", {}),
        ("429", {"retry_after": "1"}),
        ("ok_false", {}),
        ("401", {}),
        ("non_json", {}),
        ("drop", {}),
        ("hang", {}),
        ("http", {"status": 403, "body": "html"}),
    ],
)
def test_timed_fault_hits_every_request_then_ends_by_itself(
    server: PerServer, kind: str, kwargs: dict[str, object]
) -> None:
    window = 0.25
    started = time.monotonic()
    server.inject(kind, seconds=window, **kwargs)  # type: ignore[arg-type]
    faulted = 0
    # a hanging request gives up after 50 ms; every request until the first success is faulted
    with httpx.Client(trust_env=False, timeout=0.05 if kind == "hang" else 5) as client:
        while True:
            try:
                response = add(client, server, user=f"u{faulted}")
            except httpx.TransportError:
                assert kind in ("drop", "hang")
                faulted += 1
                continue
            if response.status_code == 200 and response.content.startswith(b'{"ok":true'):
                break
            faulted += 1
    ended = time.monotonic() - started
    assert ended >= window  # no request inside the window got through
    assert ended < window + 2.0  # and the window closed by itself
    assert faulted >= 1 and server.counters[f"fault_{kind}"] == faulted
    assert len(server.activities) == 1
    server.clear_faults()  # releases the hanging connections


def test_fault_order_counted_then_timed_then_rate(server: PerServer, http: httpx.Client) -> None:
    server.inject("503", rate=1.0)
    server.inject("http", status=404, seconds=30)
    server.inject("401", count=1)
    assert [add(http, server).status_code for _ in range(3)] == [401, 404, 404]
    server.inject("http", status=403, seconds=0.01)  # replaces the 30 s window
    assert server.wait_for_requests(3, timeout=1)
    deadline = time.monotonic() + 5
    while (status := add(http, server).status_code) == 403:  # a few ms at most
        assert time.monotonic() < deadline
    assert status == 503  # the rate fault again
    server.clear_faults()
    assert add(http, server).status_code == 200


# --------------------------------------------------------------------------- framing


def read_to_eof(sock: socket.socket) -> list[bytes]:
    """Every recv() until the server closes, as received."""
    parts = []
    while chunk := sock.recv(65536):
        parts.append(chunk)
    return parts


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close", "http/1.0"])
def test_every_framing_parses_with_httpx(framing: str, http: httpx.Client) -> None:
    with PerServer(framing=framing) as server:  # type: ignore[arg-type]
        for latency in (0.0, 0.01):  # written at once, and from the latency timer
            server.set_latency(latency)
            response = add(http, server)
            assert response.json()["ok"] is True and "date" in response.headers
            server.inject("503")
            response = add(http, server)
            assert response.status_code == 503 and "503 Service" in response.text
            server.inject("http", status=500, body="empty")
            response = add(http, server)
            assert response.status_code == 500 and response.content == b""
            server.inject("http", status=204)
            assert add(http, server).status_code == 204
            response = add(http, server, headers={"Authorization": "Bearer wrong"})
            assert response.json() == {"ok": False, "message": "invalid_auth_token"}
            headers = response.headers
            if framing == "chunked":
                assert headers["transfer-encoding"] == "chunked"
                assert "content-length" not in headers
            elif framing == "close":
                assert headers["connection"] == "close" and "content-length" not in headers
            elif framing == "http/1.0":
                assert response.http_version == "HTTP/1.0"
            else:
                assert int(headers["content-length"]) == len(response.content)
        assert len(server.activities) == 2
        server.set_framing("content-length")
        assert add(http, server).headers["content-length"]


def test_chunked_sends_several_chunks_and_keeps_the_connection(server: PerServer) -> None:
    server.set_framing("chunked")
    request = raw_request("/activities.add?billingId=b&userId=u&activityTypeId=t")
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        for _ in range(2):  # the same connection serves a second request
            sock.sendall(request)
            received = b""
            while not received.endswith(b"\r\n0\r\n\r\n"):
                chunk = sock.recv(65536)
                assert chunk
                received += chunk
            head, _, rest = received.partition(b"\r\n\r\n")
            assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
            body, sizes = b"", []
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                sizes.append(size)
                if size == 0:
                    break
                body, rest = body + rest[:size], rest[size + 2 :]
            assert len(sizes) >= 4  # three data chunks and the last one
            assert body.startswith(b'{"ok":true,"result":{"transactionId":"')


def test_close_framing_writes_two_segments_then_closes(server: PerServer) -> None:
    server.set_framing("close")
    request = raw_request("/activities.add?billingId=b&userId=u&activityTypeId=t")
    split_seen = False
    for _ in range(5):  # the halves are 5 ms apart: a busy machine may read them at once
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.sendall(request + request)  # pipelined: only the first is answered
            parts = read_to_eof(sock)
        response = b"".join(parts)
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Connection: close" in head and b"Content-Length" not in head
        assert body.startswith(b'{"ok":true') and body.endswith(b'"}}')
        assert response.count(b"HTTP/1.1") == 1
        if len(parts) >= 2:  # the first read ended inside the body
            split_seen = True
            assert not parts[0].endswith(b'"}}')
            break
    assert split_seen


def test_http_1_0_framing_closes_after_one_response(server: PerServer) -> None:
    server.set_framing("http/1.0")
    request = raw_request("/activities.add?billingId=b&userId=u&activityTypeId=t")
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(request + request)
        response = b"".join(read_to_eof(sock))
    assert response.startswith(b"HTTP/1.0 200 OK\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
    assert len(server.activities) == 1


def test_set_framing_validates(server: PerServer) -> None:
    with pytest.raises(ValueError, match="framing"):
        server.set_framing("gzip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="framing"):
        PerServer(framing="chunky")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- latency spikes


def test_latency_spike_ends_by_itself(server: PerServer, http: httpx.Client) -> None:
    server.set_latency(0.002)
    started = time.monotonic()
    server.set_latency(0.3, duration=0.6)
    assert server.latency == 0.3
    durations: list[float] = []
    while True:  # each slow answer paces the loop; the first fast one ends it
        sent = time.monotonic()
        assert add(http, server, user=f"u{len(durations)}").status_code == 200
        durations.append(time.monotonic() - sent)
        if durations[-1] < 0.2:
            break
    ended = time.monotonic() - started
    assert durations[0] >= 0.3 and all(d >= 0.3 for d in durations[:-1])
    assert 0.6 <= ended < 0.6 + 0.3 + 1.5  # over after its duration, without a call
    assert durations[-1] >= 0.002
    assert server.latency == 0.002  # back to the value before the spike


def test_latency_spike_is_replaced_or_cancelled(server: PerServer) -> None:
    server.set_latency(0.01)
    server.set_latency(2.0, duration=60)
    server.set_latency(1.0, duration=60)  # a new spike, still returning to 0.01
    assert server.latency == 1.0
    server.set_latency(0.0)  # no duration: ends the spike
    assert server.latency == 0.0
    for bad in ({"seconds": 0.1, "duration": 0}, {"seconds": 0.1, "duration": float("nan")}):
        with pytest.raises(ValueError, match="duration"):
            server.set_latency(**bad)
    with pytest.raises(ValueError, match="finite"):
        server.set_latency(float("inf"))
