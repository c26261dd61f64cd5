"""The local Per server (per_buffer.testing.PerServer): API semantics, faults, HTTP plumbing."""

from __future__ import annotations

import re
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest
from per_server_helpers import (
    ACT,
    REP,
    add,
    connect,
    get_report,
    raw_request,
    read_response,
    ts,
)

from per_buffer.testing import DEFAULT_ACTIVITY_TOKEN, PerServer, ReceivedActivity

# --------------------------------------------------------------------------- activities.add


def test_add_activity_success(server: PerServer, http: httpx.Client) -> None:
    response = add(http, server)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["ok"] is True
    tid = body["result"]["transactionId"]
    assert re.fullmatch(r"[a-z0-9]{18}", tid)
    [activity] = server.activities
    assert activity == ReceivedActivity("acme", "u1", "login", activity.timestamp, tid)
    assert abs(activity.timestamp - time.time()) < 60
    assert server.counters["ok"] == 1 and server.counters["requests"] == 1
    assert add(http, server).json()["result"]["transactionId"] != tid
    assert server.unique_count() == 1


def test_wrong_token_is_401(server: PerServer, http: httpx.Client) -> None:
    for headers in (
        {"Authorization": "Bearer nope"},
        {},
        {"Authorization": DEFAULT_ACTIVITY_TOKEN},
        REP,  # a reporting token has no activity scope
    ):
        response = add(http, server, headers=headers)
        assert response.status_code == 401
        assert response.json() == {"ok": False, "message": "invalid_auth_token"}
    assert server.activities == []
    assert server.counters["auth_error"] == 4


def test_set_tokens(server: PerServer, http: httpx.Client) -> None:
    server.set_tokens(activity_tokens=["a1", "a2"], reporting_tokens=["r1"])
    assert server.activity_token == "a1" and server.reporting_token == "r1"
    assert add(http, server).status_code == 401
    assert add(http, server, headers={"Authorization": "Bearer a2"}).status_code == 200
    response = http.get(f"{server.url}/reports.get", headers={"Authorization": "Bearer r1"})
    assert response.json()["ok"] is True
    assert get_report(http, server).status_code == 401


@pytest.mark.parametrize("missing", ["billingId", "userId", "activityTypeId"])
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_missing_parameter(server: PerServer, http: httpx.Client, missing: str, how: str) -> None:
    params = {"billingId": "b", "userId": "u", "activityTypeId": "t"}
    if how == "absent":
        del params[missing]
    else:
        params[missing] = ""
    response = http.get(f"{server.url}/activities.add", params=params, headers=ACT)
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is False and body["message"] == "missing_parameter"
    assert body["parameter"] == missing
    assert server.activities == [] and server.counters["api_error"] == 1


@pytest.mark.parametrize(
    "value",
    ["a b", "a&b=c", "#hash", "100%", "1+1", "é à ü", "北京", "😀🚀", "?/;:@,", "'\"<>", "x" * 500],
)
def test_percent_encoding_round_trip(server: PerServer, http: httpx.Client, value: str) -> None:
    assert add(http, server, billing=value, user=value, kind=value).json()["ok"] is True
    [activity] = server.activities
    assert (activity.billing_id, activity.user_id, activity.activity_type_id) == (value,) * 3


def test_plus_is_space_and_raw_utf8(server: PerServer) -> None:
    with connect(server) as sock:
        pending = bytearray()
        sock.sendall(raw_request("/activities.add?billingId=a+b&userId=%C3%A9%2B&activityTypeId=t"))
        assert b'"ok":true' in read_response(sock, pending)
        sock.sendall(raw_request("/activities.add?billingId=b&userId=é&activityTypeId=t"))
        assert b'"ok":true' in read_response(sock, pending)
    assert [(a.billing_id, a.user_id) for a in server.activities] == [("a b", "é+"), ("b", "é")]


# --------------------------------------------------------------------------- reports.get


def test_report_counts_distinct_users_in_inclusive_range(http: httpx.Client) -> None:
    now = [ts(2024, 3, 10, 12)]
    with PerServer(clock=lambda: now[0]) as server:
        for user in ("u1", "u2", "u1"):
            add(http, server, user=user)
        add(http, server, billing="globex", user="u1")
        add(http, server, kind="upload", user="u9")
        now[0] = ts(2024, 3, 10, 13)
        add(http, server, user="u3")  # exactly on the end bound
        now[0] = ts(2024, 3, 10, 13) + 0.5
        add(http, server, user="late")  # after it
        now[0] = ts(2024, 3, 10, 11, 59, 59)
        add(http, server, user="early")  # before the start

        response = get_report(
            http, server, start="2024-03-10T12:00:00Z", end="2024-03-10T13:00:00Z"
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["ok"] is True
        assert body["result"] == {
            "start": "2024-03-10T12:00:00.000Z",
            "end": "2024-03-10T13:00:00.000Z",
            "activityTypes": {
                "login": {"billingIds": {"acme": {"unique": 3}, "globex": {"unique": 1}}},
                "upload": {"billingIds": {"acme": {"unique": 1}}},
            },
        }
        assert server.report("2024-03-10T12:00:00Z", "2024-03-10T13:00:00Z") == body["result"]
        assert server.counters["reports"] == 1
        # datetimes, offsets and fractions are understood too
        same = server.report(
            datetime(2024, 3, 10, 12, tzinfo=timezone.utc), "2024-03-10T14:00:00.000+01:00"
        )
        assert same["activityTypes"] == body["result"]["activityTypes"]
        assert same["end"] == "2024-03-10T13:00:00.000Z"
        only_early = server.report("2024-03-10T11:59:59.000Z", "2024-03-10T11:59:59.5Z")
        assert only_early["activityTypes"] == {"login": {"billingIds": {"acme": {"unique": 1}}}}
        empty = server.report("2030-01-01T00:00:00Z", "2030-02-01T00:00:00Z")
        assert empty["activityTypes"] == {}


def test_start_only_is_unbounded(http: httpx.Client) -> None:
    now = [ts(2024, 1, 1)]
    with PerServer(clock=lambda: now[0]) as server:
        add(http, server, user="old")
        now[0] = ts(2031, 6, 1)
        add(http, server, user="future")
        result = get_report(http, server, start="2024-01-01T00:00:01Z").json()["result"]
    assert result["end"] is None
    assert result["start"] == "2024-01-01T00:00:01.000Z"
    assert result["activityTypes"] == {"login": {"billingIds": {"acme": {"unique": 1}}}}


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        ((2024, 2, 14, 9, 30), "2024-01-01T00:00:00.000Z", "2024-01-31T23:59:59.999Z"),
        ((2024, 1, 1, 0, 0), "2023-12-01T00:00:00.000Z", "2023-12-31T23:59:59.999Z"),
        ((2024, 1, 31, 23, 59), "2023-12-01T00:00:00.000Z", "2023-12-31T23:59:59.999Z"),
        ((2024, 3, 1, 0, 0), "2024-02-01T00:00:00.000Z", "2024-02-29T23:59:59.999Z"),
    ],
)
def test_default_report_is_prior_calendar_month(
    http: httpx.Client, now: tuple[int, ...], start: str, end: str
) -> None:
    clock = [ts(*now)]
    with PerServer(clock=lambda: clock[0]) as server:
        previous_month = datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp()
        clock[0] = previous_month
        add(http, server, user="first-instant")
        clock[0] = datetime.fromisoformat(end.replace("Z", "+00:00")).timestamp() + 0.0009
        add(http, server, user="last-instant")
        clock[0] = previous_month - 0.001
        add(http, server, user="too-early")
        clock[0] = ts(*now)
        add(http, server, user="this-month")
        result = get_report(http, server).json()["result"]
        assert server.report() == result
    assert (result["start"], result["end"]) == (start, end)
    assert result["activityTypes"] == {"login": {"billingIds": {"acme": {"unique": 2}}}}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"end": "2024-01-01T00:00:00Z"}, "end_without_start"),
        ({"start": "yesterday"}, "invalid_date"),
        ({"start": "2024-13-01T00:00:00Z"}, "invalid_date"),
        ({"start": "2024-01-01T00:00:00Z", "end": "soon"}, "invalid_date"),
        ({"start": "2024-02-30T00:00:00Z"}, "invalid_date"),
    ],
)
def test_report_errors(
    server: PerServer, http: httpx.Client, params: dict[str, str], message: str
) -> None:
    response = get_report(http, server, **params)
    assert response.status_code == 200
    assert response.json() == {"ok": False, "message": message}
    with pytest.raises(ValueError, match=message):
        server.report(params.get("start"), params.get("end"))
    assert server.counters["api_error"] == 1


def test_report_needs_reporting_scope(server: PerServer, http: httpx.Client) -> None:
    response = http.get(f"{server.url}/reports.get", headers=ACT)
    assert response.status_code == 401
    assert response.json() == {"ok": False, "message": "invalid_auth_token"}


def test_keep_activities_false_still_reports(http: httpx.Client) -> None:
    with PerServer(keep_activities=False) as server:
        for i in range(30):
            add(http, server, user=f"u{i % 10}")
        assert server.activities == []
        assert server.unique_count() == 10
        assert server.wait_for_activities(30, timeout=1)
        result = server.report("2000-01-01T00:00:00Z")
    assert result["activityTypes"] == {"login": {"billingIds": {"acme": {"unique": 10}}}}


# --------------------------------------------------------------------------- faults


def test_fault_503_is_an_html_page(server: PerServer, http: httpx.Client) -> None:
    server.inject("503")
    response = add(http, server)
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("text/html")
    assert "<html>" in response.text
    assert server.activities == []
    assert add(http, server).status_code == 200  # count defaults to 1
    assert server.counters["fault_503"] == 1 and server.counters["ok"] == 1


def test_fault_429_with_and_without_retry_after(server: PerServer, http: httpx.Client) -> None:
    server.inject("429", retry_after="2")
    response = add(http, server)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json() == {"ok": False, "message": "rate_limited"}
    date = "Wed, 21 Oct 2037 07:28:00 GMT"
    server.inject("429", retry_after=date)
    assert add(http, server).headers["retry-after"] == date
    server.inject("429")
    response = add(http, server)
    assert response.status_code == 429 and "retry-after" not in response.headers
    assert server.activities == [] and server.counters["fault_429"] == 3


def test_fault_ok_false_and_401(server: PerServer, http: httpx.Client) -> None:
    server.inject("ok_false", message="activity_type_not_found")
    response = add(http, server)
    assert response.status_code == 200
    assert response.json() == {"ok": False, "message": "activity_type_not_found"}
    server.inject("ok_false")
    assert add(http, server).json() == {"ok": False, "message": "injected_failure"}
    server.inject("401")
    response = add(http, server)
    assert response.status_code == 401
    assert response.json() == {"ok": False, "message": "invalid_auth_token"}
    assert server.activities == []
    assert server.counters["fault_ok_false"] == 2 and server.counters["fault_401"] == 1


def test_fault_non_json(server: PerServer, http: httpx.Client) -> None:
    server.inject("non_json")
    response = add(http, server)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    with pytest.raises(ValueError):
        response.json()
    assert server.activities == []


def test_fault_hang_times_out_then_clear_releases(server: PerServer) -> None:
    server.inject("hang")
    with httpx.Client(trust_env=False, timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        add(client, server)
    assert server.counters["fault_hang"] == 1
    # a hanging raw connection is closed by clear_faults
    server.inject("hang", rate=1.0)
    with connect(server) as sock:
        sock.sendall(raw_request("/activities.add?billingId=b&userId=u&activityTypeId=t"))
        assert server.wait_for_requests(2, timeout=5)
        server.clear_faults()
        assert sock.recv(1024) == b""
    assert server.activities == []
    with httpx.Client(trust_env=False, timeout=5) as client:
        assert add(client, server).status_code == 200


def test_fault_drop_closes_without_response(server: PerServer, http: httpx.Client) -> None:
    server.inject("drop")
    with pytest.raises(httpx.TransportError):
        add(http, server)
    assert server.activities == [] and server.counters["fault_drop"] == 1
    assert add(http, server).status_code == 200


def test_count_faults_hit_exactly_the_next_n_requests(
    server: PerServer, http: httpx.Client
) -> None:
    server.inject("503", count=2)
    assert [add(http, server).status_code for _ in range(3)] == [503, 503, 200]
    server.inject("503", count=5)
    server.inject("429", count=1)  # replaces the pending counted fault
    assert [add(http, server).status_code for _ in range(2)] == [429, 200]
    server.inject("503", count=3)
    server.clear_faults()
    assert add(http, server).status_code == 200


def test_rate_faults_last_until_cleared(http: httpx.Client) -> None:
    with PerServer(seed=1234) as server:
        server.inject("503", rate=1.0)
        assert {add(http, server).status_code for _ in range(10)} == {503}
        server.clear_faults()
        server.inject("503", rate=0.5)
        codes = [add(http, server, user=f"u{i}").status_code for i in range(200)]
        failed = codes.count(503)
        assert 50 <= failed <= 150 and codes.count(200) == 200 - failed
        assert len(server.activities) == 200 - failed
        assert server.counters["fault_503"] == 10 + failed
        server.clear_faults()
        server.inject("drop", rate=0.0)
        assert {add(http, server).status_code for _ in range(5)} == {200}


def test_faults_come_before_auth_and_apply_to_reports(
    server: PerServer, http: httpx.Client
) -> None:
    server.inject("503", count=2)
    assert add(http, server, headers={"Authorization": "Bearer wrong"}).status_code == 503
    assert get_report(http, server).status_code == 503
    assert server.counters["auth_error"] == 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"kind": "500"}, "unknown fault kind"),
        ({"kind": "503", "count": 1, "rate": 0.5}, "not several"),
        ({"kind": "503", "count": 1, "seconds": 1.0}, "not several"),
        ({"kind": "503", "rate": 0.5, "seconds": 1.0}, "not several"),
        ({"kind": "503", "seconds": 0}, "seconds"),
        ({"kind": "503", "seconds": float("nan")}, "seconds"),
        ({"kind": "http"}, "needs an int status"),
        ({"kind": "http", "status": 199}, "200..599"),
        ({"kind": "http", "status": 600}, "200..599"),
        ({"kind": "http", "status": 403, "body": "xml"}, "body must be one of"),
        ({"kind": "503", "status": 403}, "go with kind"),
        ({"kind": "503", "body": "html"}, "go with kind"),
        ({"kind": "503", "rate": 1.5}, "rate"),
        ({"kind": "503", "count": -1}, "count"),
        ({"kind": "429", "retry_after": "1\r\nX-Evil: 1"}, "single header line"),
    ],
)
def test_inject_validates(server: PerServer, kwargs: dict[str, Any], error: str) -> None:
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError, match=error):
        server.inject(kind, **kwargs)


def test_latency_is_added(http: httpx.Client) -> None:
    with PerServer(latency=0.05) as server:
        started = time.perf_counter()
        assert add(http, server).status_code == 200
        assert time.perf_counter() - started >= 0.05
        server.set_latency(0.0)
        server.set_latency(0.08)
        server.inject("503")
        started = time.perf_counter()
        assert add(http, server).status_code == 503  # faults are delayed too
        assert time.perf_counter() - started >= 0.08
    with pytest.raises(ValueError):
        PerServer(latency=-1)


def test_latency_keeps_pipelined_responses_in_order(server: PerServer) -> None:
    server.set_latency(0.02)
    with connect(server) as sock:
        sock.sendall(
            b"".join(
                raw_request(f"/activities.add?billingId=b&userId=u{i}&activityTypeId=t")
                for i in range(5)
            )
        )
        pending = bytearray()
        ids = [
            re.search(rb'"transactionId":"(\w+)"', read_response(sock, pending)) for _ in range(5)
        ]
    expected = [a.transaction_id.encode() for a in server.activities]
    assert [m.group(1) for m in ids if m] == expected
    assert [a.user_id for a in server.activities] == [f"u{i}" for i in range(5)]


# --------------------------------------------------------------------------- outage


def test_outage_refuses_connections_and_recover_uses_same_port(
    server: PerServer, http: httpx.Client
) -> None:
    port = server.port
    assert add(http, server).status_code == 200
    idle = connect(server)
    server.outage()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, port), timeout=5)
    with pytest.raises(httpx.ConnectError):
        add(http, server)
    try:
        assert idle.recv(1024) == b""  # open connections were closed too
    except ConnectionResetError:
        pass
    finally:
        idle.close()
    server.recover()
    assert server.port == port
    assert add(http, server).status_code == 200
    server.recover()  # idempotent
    assert len(server.activities) == 2


def test_outage_closes_hanging_requests(server: PerServer) -> None:
    server.inject("hang", rate=1.0)
    with connect(server) as sock:
        sock.sendall(raw_request("/activities.add?billingId=b&userId=u&activityTypeId=t"))
        assert server.wait_for_requests(1, timeout=5)
        server.outage()
        try:
            assert sock.recv(1024) == b""
        except ConnectionResetError:
            pass
    server.recover()
    server.clear_faults()


# --------------------------------------------------------------------------- HTTP plumbing


def test_keep_alive_serves_many_requests_on_one_connection(server: PerServer) -> None:
    with connect(server) as sock:
        pending = bytearray()
        for i in range(5):
            sock.sendall(raw_request(f"/activities.add?billingId=b&userId=u{i}&activityTypeId=t"))
            response = read_response(sock, pending)
            assert response.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"connection: close" not in response.lower()
        # pipelined: all at once, answered in order
        sock.sendall(
            b"".join(
                raw_request(f"/reports.get?start=200{i}-01-01T00:00:00Z", "x") for i in range(3)
            )
        )
        assert all(read_response(sock, pending).startswith(b"HTTP/1.1 401 ") for _ in range(3))
    assert len(server.activities) == 5


def test_connection_close_is_honoured(server: PerServer) -> None:
    with connect(server) as sock:
        sock.sendall(
            raw_request(
                "/activities.add?billingId=b&userId=u&activityTypeId=t",
                extra="Connection: close\r\n",
            )
        )
        pending = bytearray()
        response = read_response(sock, pending)
        assert b"Connection: close" in response
        assert sock.recv(1024) == b""
    with connect(server) as sock:
        sock.sendall(b"GET /nowhere HTTP/1.0\r\n\r\n")
        response = read_response(sock, bytearray())
        assert response.startswith(b"HTTP/1.1 404 ")
        assert sock.recv(1024) == b""


def test_unknown_path_and_method(server: PerServer, http: httpx.Client) -> None:
    response = http.get(f"{server.url}/no-such-prefix/activities.add", headers=ACT)
    assert response.status_code == 404
    assert response.json() == {"ok": False, "message": "not_found"}
    response = http.post(f"{server.url}/activities.add", headers=ACT, content=b"billingId=b")
    assert response.status_code == 405
    assert add(http, server).status_code == 200  # the POST body did not confuse the connection
    counters = server.counters
    assert counters["not_found"] == 1 and counters["method_not_allowed"] == 1
    assert counters["requests"] == 3


def test_garbage_request_gets_400(server: PerServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"HELLO\r\n\r\n")
        assert read_response(sock, bytearray()).startswith(b"HTTP/1.1 400 ")
    assert server.counters["bad_request"] == 1


def test_concurrent_requests_are_all_counted(server: PerServer) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with httpx.Client(trust_env=False, timeout=10) as client:
                for i in range(10):
                    assert add(client, server, user=f"t{n}-{i}").status_code == 200
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert server.wait_for_activities(200, timeout=5)
    assert len(server.activities) == 200
    assert server.unique_count() == 200
    assert server.counters["ok"] == server.counters["requests"] == 200
    assert len({a.transaction_id for a in server.activities}) == 200


# --------------------------------------------------------------------------- state


def test_reset_forgets_everything(server: PerServer, http: httpx.Client) -> None:
    add(http, server)
    server.inject("503", rate=1.0)
    add(http, server)
    server.reset()
    assert server.activities == [] and server.unique_count() == 0
    assert set(server.counters.values()) == {0}
    assert add(http, server).status_code == 200
    assert server.report("2000-01-01T00:00:00Z")["activityTypes"] == {
        "login": {"billingIds": {"acme": {"unique": 1}}}
    }


def test_wait_for_returns_false_on_timeout(server: PerServer, http: httpx.Client) -> None:
    assert server.wait_for_activities(1, timeout=0.01) is False
    assert server.wait_for_requests(1, timeout=0.01) is False
    done = threading.Event()

    def later() -> None:
        done.wait(5)
        with httpx.Client(trust_env=False) as client:
            add(client, server)

    thread = threading.Thread(target=later)
    thread.start()
    done.set()
    assert server.wait_for_activities(1, timeout=5)
    assert server.wait_for_requests(1, timeout=5)
    thread.join()


def test_lifecycle(http: httpx.Client) -> None:
    server = PerServer()
    assert "stopped" in repr(server)
    server.start()
    with pytest.raises(RuntimeError):
        server.start()
    assert server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
    assert add(http, server).status_code == 200
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(httpx.ConnectError):
        add(http, server)
    assert len(server.activities) == 1  # still readable after stop


def test_in_process_control_channel(server: PerServer) -> None:
    control = server.serve_control()
    with httpx.Client(trust_env=False, timeout=5) as client:
        assert client.get(f"{control}/inject", params={"kind": "503", "count": 2}).json()["ok"]
        assert add(client, server).status_code == 503
        assert client.get(f"{control}/outage").json() == {"ok": True}
        with pytest.raises(httpx.ConnectError):
            add(client, server)
        assert client.get(f"{control}/stats").json()["counters"]["fault_503"] == 1
        assert client.get(f"{control}/recover").json() == {"ok": True}
        assert add(client, server).status_code == 503
        assert add(client, server).status_code == 200
        assert client.get(f"{control}/inject", params={"kind": "bogus"}).status_code == 400
        assert client.get(f"{control}/nothing").status_code == 404
