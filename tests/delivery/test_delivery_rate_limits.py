"""Rate limits: Retry-After in both forms against a raw responder, and stock nginx's limiter."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from delivery_helpers import make, record_users, wait_stats
from nginx_helpers import Nginx
from raw_per import Hit, RawPer, Reply, http_date, ok

from per_buffer import Recorder

MakeRecorder = Callable[..., Recorder]

IN_FLIGHT_SLACK = 0.1  # requests sent before the 429 arrived reach the server within this


class BelowTarget(AssertionError):
    """A measured figure missed the issue's target (what the goodput xfails expect)."""


class Gate:
    """Per's success until request ``trigger``; from then on a 429 with ``Retry-After`` for
    every request that arrives within the window the first 429 announced.

    ``form`` is ``delta`` (``Retry-After: <seconds>``) or ``http-date`` (a whole-second
    date at least ``seconds`` ahead of the first 429); ``window`` (default: what the
    header says) is how long the server keeps answering 429.
    """

    def __init__(self, trigger: int, form: str, seconds: int, window: float | None = None) -> None:
        self.trigger = trigger
        self.form = form
        self.seconds = seconds
        self.window = window
        self.header = ""
        self.first: Hit | None = None
        self.pause = 0.0  # what the first 429 announced, in seconds from its arrival
        self.lock = threading.Lock()

    @property
    def end(self) -> float:
        """Monotonic time the announced pause ends."""
        assert self.first is not None
        return self.first.at + self.pause

    def __call__(self, hit: Hit) -> Reply:
        with self.lock:
            if self.first is None and hit.index >= self.trigger:
                self.first = hit
                if self.form == "delta":
                    self.header, self.pause = str(self.seconds), float(self.seconds)
                else:
                    date = math.ceil(hit.wall) + self.seconds
                    self.header, self.pause = http_date(date), date - hit.wall
            first = self.first
            window = self.pause if self.window is None else self.window
            if first is not None and hit.at < first.at + window:
                return Reply(
                    status=429,
                    body=b"Too Many Requests",
                    content_type="text/plain",
                    headers=(("Retry-After", self.header),),
                )
            return ok()


def delivered_through(
    gate: Gate, raw: RawPer, recorder: MakeRecorder, count: int, timeout: float, **options: Any
) -> tuple[Recorder, list[Hit]]:
    """Record ``count`` users while ``gate`` answers (4 connections); all are delivered.

    Asserts they all arrive within ``timeout`` seconds and that the gate's 429 came.
    Returns the recorder and every request the server saw.
    """
    raw.script = gate
    rec = recorder(raw.url, concurrency=4, **options)
    users = record_users(rec, count)
    assert rec.flush(timeout=timeout)
    assert sorted(raw.accepted) == sorted(users)
    assert gate.first is not None
    return rec, raw.hits


def requests_during(hits: list[Hit], start: float, end: float) -> list[Hit]:
    """Requests that arrived after ``start`` + in-flight slack and before ``end``."""
    return [hit for hit in hits if start + IN_FLIGHT_SLACK < hit.at < end - 0.02]


@pytest.mark.parametrize("form", ["delta", "http-date"])
def test_retry_after_is_honoured_exactly(raw: RawPer, recorder: MakeRecorder, form: str) -> None:
    gate = Gate(10, form, 2)
    rec, hits = delivered_through(gate, raw, recorder, 60, timeout=15, backoff_max=10.0)
    assert gate.first is not None
    early = requests_during(hits, gate.first.at, gate.end)
    assert early == [], f"{len(early)} requests during the pause"
    resumed = min(hit.at for hit in hits if hit.at >= gate.end - 0.02)
    print(f"{form}: pause {gate.pause:.2f} s, resumed {resumed - gate.end:+.3f} s after it")
    assert resumed - gate.end < 0.5  # not lengthened by a backoff
    stats = rec.stats()
    assert stats.failures["rate_limited"] >= 1 and stats.dead_lettered == 0


def test_a_day_long_retry_after_is_capped_at_backoff_max(
    raw: RawPer, recorder: MakeRecorder
) -> None:
    gate = Gate(5, "delta", 86400, window=IN_FLIGHT_SLACK)  # then healthy again
    _, hits = delivered_through(gate, raw, recorder, 40, timeout=10, backoff_max=2.0)
    assert gate.first is not None
    t429 = gate.first.at
    resumed = min(hit.at for hit in hits if hit.at > t429 + IN_FLIGHT_SLACK)
    print(f"Retry-After 86400, backoff_max 2: resumed {resumed - t429:.2f} s after the 429")
    assert 1.9 <= resumed - t429 < 2.6


def test_a_restart_during_a_day_long_pause_waits_at_most_backoff_max(
    raw: RawPer, tmp_path: Path
) -> None:
    """Entries handed back during a pause carry a not-before no further than backoff_max."""
    raw.script = Gate(0, "delta", 86400)  # every request refused for a day
    first = make(raw.url, tmp_path / "q", concurrency=4, backoff_max=2.0)
    users = record_users(first, 30)
    assert raw.wait_for(lambda server: len(server.hits) >= 1, timeout=5)
    first.close(timeout=0.5)
    assert first.stats().delivered == 0
    raw.script = lambda hit: ok()
    restarted = time.monotonic()
    second = make(raw.url, tmp_path / "q", concurrency=4, backoff_max=2.0)
    try:
        # no flush: a flush ignores not-before times; the worker's own pace is under test
        assert raw.wait_for(lambda server: len(set(server.accepted)) == len(users), timeout=6)
        print(f"restart during a day-long pause: delivered {time.monotonic() - restarted:.2f} s")
        assert time.monotonic() - restarted < 3.5
    finally:
        second.close(timeout=1)
    assert sorted(raw.accepted) == sorted(users)


def test_an_http_date_retry_after_from_a_skewed_server_means_its_own_clock(
    raw: RawPer, recorder: MakeRecorder
) -> None:
    skew = 3600.0  # the server's clock runs an hour ahead; its Date header says so

    def script(hit: Hit) -> Reply:
        server_now = hit.wall + skew
        headers = (("Date", http_date(server_now)),)
        if hit.index == 3:
            retry = http_date(math.ceil(server_now) + 2)  # "in 2 to 3 s", on its clock
            return Reply(429, b"", None, (*headers, ("Retry-After", retry)))
        return ok(headers=headers)

    raw.script = script
    rec = recorder(raw.url, concurrency=1, backoff_max=60.0)
    record_users(rec, 20)
    paused = wait_stats(rec, lambda s: s.pause_reason == "rate_limited", timeout=5)
    assert paused is not None and paused.flow is not None
    assert paused.flow.paused_for is not None
    assert paused.flow.paused_for <= 3.5, f"paused for {paused.flow.paused_for:.0f} s"


def test_a_single_429_at_start_does_not_throttle_a_healthy_server(
    raw: RawPer, recorder: MakeRecorder
) -> None:
    def script(hit: Hit) -> Reply:
        if hit.index == 0:
            return Reply(status=429, body=b"", headers=(("Retry-After", "1"),))
        return ok()

    raw.script = script
    rec = recorder(raw.url, backoff_max=10.0)
    users = record_users(rec, 2000)
    # healthy, this server takes 2,000 in well under a second; allow the pause plus 2 s
    done = raw.wait_for(lambda server: len(server.accepted) >= len(users), timeout=3.0)
    delivered = len(raw.accepted)
    flow = rec.stats().flow
    print(f"one 429 at the start: {delivered} of 2000 delivered within 3 s; {flow}")
    assert rec.stats().dead_lettered == 0
    if not done:
        raise BelowTarget(f"{delivered} of 2000 delivered 3 s after one 429 (rate {flow})")


# --------------------------------------------------------------------------- stock nginx


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[Callable[[str, str], Nginx]]:
    started: list[Nginx] = []

    def start(http_directives: str, location: str) -> Nginx:
        server = Nginx(tmp_path / f"nginx{len(started)}", http_directives, location)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


RATE = 80.0


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=BelowTarget,
    reason="defect: behind nginx limit_req (80 r/s, burst 10 nodelay, Retry-After 1) goodput "
    "after the first 2 s is about 48/s, 60 % of the limit (target >= 80 %), with 1 % 429s: "
    "the first cut is from a burst (~550/s, less than a second of history, so half of "
    "what was sent), each cut costs a whole 1 s pause, and the learned rate then plateaus "
    "near the rate it was refused at instead of probing up to the limit (at 40 r/s: 74 %)",
)
def test_nginx_limit_req_is_met_at_its_rate_with_few_429s(
    nginx_factory: Callable[[str, str], Nginx], recorder: MakeRecorder
) -> None:
    nginx = nginx_factory(
        f"limit_req_zone $server_port zone=per:1m rate={RATE:g}r/s;",
        "limit_req zone=per burst=10 nodelay; limit_req_status 429; limit_req_log_level info;"
        " add_header Retry-After 1 always; try_files /nothing @per;",
    )
    rec = recorder(nginx.url, backoff_max=10.0)
    users = record_users(rec, 400)
    assert rec.flush(timeout=40)
    log = nginx.log()
    delivered = [line for line in log if line.status == 200]
    assert sorted(line.user for line in delivered) == sorted(users)
    assert {line.status for line in log} <= {200, 429}
    stats = rec.stats()
    assert stats.dead_lettered == 0
    assert stats.failures["rate_limited"] == len(log) - len(delivered)
    start = log[0].at + 2.0
    later = [line for line in log if line.at >= start]
    later_ok = [line for line in later if line.status == 200]
    share_429 = 1 - len(later_ok) / len(later)
    goodput = len(later_ok) / (later_ok[-1].at - start)
    print(
        f"nginx {RATE:g} r/s: {len(log)} requests, {len(log) - len(delivered)} 429s; after 2 s:"
        f" {share_429:.0%} 429s, goodput {goodput:.1f}/s ({goodput / RATE:.0%} of the limit)"
    )
    assert share_429 <= 0.20
    if goodput < 0.8 * RATE:
        raise BelowTarget(f"goodput {goodput:.1f}/s < 0.8 x {RATE:g}/s")


def test_nginx_split_clients_503s_lose_nothing(
    nginx_factory: Callable[[str, str], Nginx], recorder: MakeRecorder
) -> None:
    """nginx also closes each connection after 3 requests (keepalive_requests): the worker
    reconnects without counting a fault."""
    nginx = nginx_factory(
        'split_clients "${request_id}" $per_fails { 30% 1; * 0; }\n    keepalive_requests 3;',
        "if ($per_fails) { return 503; } try_files /nothing @per;",
    )
    rec = recorder(nginx.url)
    users = record_users(rec, 500)
    assert rec.flush(timeout=20)
    log = nginx.log()
    failed = [line for line in log if line.status == 503]
    assert sorted(line.user for line in log if line.status == 200) == sorted(users)
    assert 0.2 < len(failed) / len(log) < 0.4
    stats = rec.stats()
    assert stats.dead_lettered == 0 and stats.failures["server_error"] == len(failed)
    assert stats.failures["network_error"] == 0 and stats.attempts == len(log)
