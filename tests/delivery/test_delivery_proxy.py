"""The background worker through a real forward proxy (tinyproxy, as tests/test_wire_proxy.py).

tinyproxy adds ``Via: 1.1 per-wire-test`` to what it forwards and logs every request:
a delivery that went through it shows both; one that bypassed it shows neither.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from delivery_helpers import hanging_bounds_flush_and_close, record_users
from raw_per import Hit, RawPer, Reply, html, ok, per_refusal
from test_wire_proxy import TinyProxy

from per_buffer import Recorder

MakeRecorder = Callable[..., Recorder]
VIA = "1.1 per-wire-test"


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[TinyProxy]:
    proxy = TinyProxy(tmp_path)
    yield proxy
    proxy.stop()


def via(hit: Hit) -> bool:
    """True when tinyproxy forwarded this request (it adds its Via header)."""
    return (hit.header("Via") or "").startswith(VIA)


def proxied_lines(proxy: TinyProxy, raw: RawPer) -> list[str]:
    """tinyproxy's log lines of requests forwarded to the raw responder."""
    return [line for line in proxy.drain() if f"GET {raw.url}/activities.add" in line]


def deliver(rec: Recorder, raw: RawPer, count: int = 20) -> None:
    users = record_users(rec, count)
    assert rec.flush(timeout=15)
    assert sorted(raw.accepted) == sorted(users)


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_environment_proxy_is_honoured_by_the_worker(
    raw: RawPer,
    recorder: MakeRecorder,
    tinyproxy: TinyProxy,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    monkeypatch.setenv(variable, tinyproxy.url)
    deliver(recorder(raw.url), raw)
    assert all(via(hit) for hit in raw.hits)
    tinyproxy.wait_for(f"GET {raw.url}/activities.add")
    assert len(proxied_lines(tinyproxy, raw)) == 20


@pytest.mark.parametrize("how", ["keyword", "PER_BUFFER_PROXY"])
def test_proxy_setting_is_honoured_and_wins_over_no_proxy(
    raw: RawPer,
    recorder: MakeRecorder,
    tinyproxy: TinyProxy,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # the explicit setting still wins
    if how == "keyword":
        rec = recorder(raw.url, proxy=tinyproxy.url)
    else:
        monkeypatch.setenv("PER_BUFFER_PROXY", tinyproxy.url)
        rec = recorder(raw.url)
    deliver(rec, raw)
    assert all(via(hit) for hit in raw.hits)
    tinyproxy.wait_for(f"GET {raw.url}/activities.add")
    assert len(proxied_lines(tinyproxy, raw)) == 20


def test_no_proxy_bypasses_the_environment_proxy(
    raw: RawPer, recorder: MakeRecorder, tinyproxy: TinyProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", tinyproxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    deliver(recorder(raw.url), raw)
    assert not any(via(hit) for hit in raw.hits)
    assert proxied_lines(tinyproxy, raw) == []


def test_failures_through_the_proxy_keep_their_classes(
    raw: RawPer, recorder: MakeRecorder, tinyproxy: TinyProxy
) -> None:
    """The proxied channel judges answers like the direct one: 503s, HTML 403s, Per's own
    refusal and a refused token arrive through tinyproxy with their classes."""

    def script(hit: Hit) -> Reply:
        if hit.user == "refused":
            return per_refusal("unknown_activity_type")
        if hit.index % 4 == 1:
            return html(503)
        if hit.index % 4 == 2:
            return html(403)
        return ok()

    raw.script = script
    rec = recorder(raw.url, proxy=tinyproxy.url)
    users = record_users(rec, 40)
    rec.record("acme", "refused")
    assert rec.flush(timeout=20)
    stats = rec.stats()
    assert sorted(raw.accepted) == sorted(users)
    assert stats.dead_lettered == 1  # only Per's own refusal, after max_attempts
    assert stats.failures["refused_by_per"] == 3
    assert stats.failures["server_error"] > 0 and stats.failures["not_per_response"] > 0


def test_an_unreachable_proxy_is_a_network_error_and_loses_nothing(
    raw: RawPer, recorder: MakeRecorder, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    rec = recorder(raw.url, proxy=f"http://proxyuser:proxysecret@127.0.0.1:{dead}")
    record_users(rec, 20)
    assert not rec.flush(timeout=1)
    stats = rec.stats()
    assert raw.hits == []
    assert stats.failures["network_error"] > 0 and stats.dead_lettered == 0
    assert stats.pending + stats.in_flight == 20
    assert stats.last_error is not None and "proxysecret" not in stats.last_error
    assert "proxysecret" not in repr(rec) + repr(rec.config)


def test_a_hanging_origin_behind_the_proxy_bounds_flush_and_close(
    raw: RawPer, recorder: MakeRecorder, tinyproxy: TinyProxy
) -> None:
    users, _ = hanging_bounds_flush_and_close(raw, recorder, 20, proxy=tinyproxy.url)
    raw.script = lambda hit: ok()
    again = recorder(raw.url, proxy=tinyproxy.url)
    assert again.drain(timeout=10)
    assert sorted(set(raw.accepted)) == sorted(users)
