"""What delivery shows while Per partly fails: the flow state in stats(), the WARNING log,
and that no failure path writes the token anywhere (logs, reprs, errors, the queue files)."""

from __future__ import annotations

import logging
import random
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from delivery_helpers import TOKEN, record_users, wait_stats
from raw_per import Hit, RawPer, Reply, empty, html, ok, per_refusal
from test_wire_proxy import TinyProxy

from per_buffer import DeliveryFailure, Recorder, RecorderStats

MakeRecorder = Callable[..., Recorder]


def _dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and record.name.startswith("per_buffer")
    ]


# --------------------------------------------------------------------------- flow state


def test_flow_state_under_thirty_percent_503s(
    raw: RawPer, recorder: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    rng = random.Random(11)
    lock = threading.Lock()

    def script(hit: Hit) -> Reply:
        with lock:
            return html(503) if rng.random() < 0.3 else ok()

    raw.script = script
    rec = recorder(raw.url, concurrency=8)
    record_users(rec, 4000)
    snapshots: list[RecorderStats] = []

    def busy_enough(stats: RecorderStats) -> bool:
        if stats.attempts >= 600 and stats.pending > 0:
            snapshots.append(stats)
        return len(snapshots) >= 3 or stats.delivered == 4000

    assert wait_stats(rec, busy_enough, timeout=30) is not None
    assert snapshots, "delivery finished before a snapshot under load"
    for stats in snapshots:
        flow = stats.flow
        assert flow is not None
        assert flow.max_concurrency == 8
        assert flow.limit >= 7, flow  # a partly failing Per keeps (nearly) full concurrency
        assert not flow.probing and flow.pause_reason is None
        assert flow.success_ratio is not None and 0.6 <= flow.success_ratio <= 0.8, flow
    assert rec.flush(timeout=30)
    warnings = [text for text in _warnings(caplog) if "delivery failing" in text]
    assert warnings, "no WARNING while 30 % of requests fail"
    assert "server_error" in warnings[0] and "% of " in warnings[0]


def test_flow_state_during_a_total_outage(
    recorder: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    rec = recorder(f"http://127.0.0.1:{_dead_port()}", concurrency=8)
    record_users(rec, 50)
    probing = wait_stats(rec, lambda s: s.flow is not None and s.flow.probing, timeout=5)
    assert probing is not None and probing.flow is not None, rec.stats()
    assert probing.flow.limit == 1
    assert probing.failures["network_error"] >= 1
    assert probing.pending + probing.in_flight == 50 and probing.dead_lettered == 0
    (warning, *_) = [text for text in _warnings(caplog) if "delivery failing" in text]
    assert "network_error" in warning and "100% of" in warning


def test_the_first_warning_states_the_failing_ratio_fairly(
    raw: RawPer, recorder: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    raw.script = lambda hit: html(503) if hit.index % 10 < 3 else ok()  # 30 %, the first fails
    rec = recorder(raw.url, concurrency=1)
    record_users(rec, 300)
    assert rec.flush(timeout=20)
    (warning, *_) = [text for text in _warnings(caplog) if "delivery failing" in text]
    ratio = int(re.search(r"on (\d+)% of", warning).group(1))  # type: ignore[union-attr]
    assert 15 <= ratio <= 45, warning


# --------------------------------------------------------------------------- token safety


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    for name in ("per_buffer", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def assert_no_token(
    where: Path, rec: Recorder, failures: list[DeliveryFailure], caplog: pytest.LogCaptureFixture
) -> None:
    """The token appears in no log record, repr, error or file of the queue directory."""
    texts = [caplog.text, repr(rec), repr(rec.config), repr(rec.stats()), str(rec.stats())]
    for record in caplog.records:
        texts += [record.getMessage(), str(record.exc_text), repr(record.args)]
    for failure in failures:
        texts += [repr(failure), str(failure.error), repr(failure.error), repr(failure.error.args)]
    for text in texts:
        assert TOKEN not in text
    files = [path for path in where.rglob("*") if path.is_file()]
    assert files
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), path


FAULTS = [
    html(503),
    html(403),
    html(401),
    empty(200),
    ok(truncate=15),
    Reply(status=429, body=b"slow down", headers=(("Retry-After", "0"),)),
    Reply(hang=True),
    html(502, framing="close", segments=2),
]


def test_no_failure_path_writes_the_token(
    raw: RawPer, recorder: MakeRecorder, tmp_path: Path, debug_logs: pytest.LogCaptureFixture
) -> None:
    count = [0]

    def script(hit: Hit) -> Reply:
        if hit.user == "refused":
            return per_refusal("unknown_activity_type")
        if hit.user == "big":
            return html(413)
        count[0] += 1  # every other request fails, three rounds of every fault
        if count[0] % 2 and count[0] < 6 * len(FAULTS):
            return FAULTS[count[0] // 2 % len(FAULTS)]
        return ok()

    raw.script = script
    failures: list[DeliveryFailure] = []
    rec = recorder(raw.url, timeout=0.5, on_error=failures.append)
    users = record_users(rec, 30)
    rec.record("acme", "refused")
    rec.record("acme", "big")
    assert rec.flush(timeout=20)
    assert sorted(set(raw.accepted)) == sorted(users)
    # then the token is refused (a pause), and a recorder sends to nowhere
    raw.script = lambda hit: per_refusal("invalid_auth_token", status=401)
    record_users(rec, 5, prefix="late")
    assert wait_stats(rec, lambda s: s.pause_reason == "auth", timeout=5) is not None
    nowhere = recorder(f"http://127.0.0.1:{_dead_port()}", "q2", on_error=failures.append)
    record_users(nowhere, 5)
    assert not nowhere.flush(timeout=0.5)
    # the test saw what it means to check: the token went out, every class failed
    assert all(hit.header("Authorization") == f"Bearer {TOKEN}" for hit in raw.hits)
    kinds = {failure.error.kind for failure in failures}
    assert kinds >= {
        "server_error", "not_per_response", "network_error", "rate_limited",
        "refused_by_per", "too_large", "auth",
    }, kinds  # fmt: skip
    assert len(_warnings(debug_logs)) >= 3  # the failures were logged (and checked below)
    assert_no_token(tmp_path / "q", rec, failures, debug_logs)
    assert_no_token(tmp_path / "q2", nowhere, failures, debug_logs)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[TinyProxy]:
    proxy = TinyProxy(tmp_path)
    yield proxy
    proxy.stop()


def test_no_failure_path_through_a_proxy_writes_the_token(
    raw: RawPer,
    recorder: MakeRecorder,
    tmp_path: Path,
    tinyproxy: TinyProxy,
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    """The proxied channel is httpx: its DEBUG logs and exceptions must not carry it either."""
    count = [0]

    def script(hit: Hit) -> Reply:
        if hit.user == "refused":
            return per_refusal("unknown_activity_type")
        count[0] += 1
        if count[0] % 2 and count[0] < 4 * len(FAULTS):
            return FAULTS[count[0] // 2 % len(FAULTS)]
        return ok()

    raw.script = script
    failures: list[DeliveryFailure] = []
    rec = recorder(raw.url, proxy=tinyproxy.url, timeout=0.5, on_error=failures.append)
    users = record_users(rec, 20)
    rec.record("acme", "refused")
    assert rec.flush(timeout=20)
    assert sorted(set(raw.accepted)) == sorted(users)
    assert all(hit.header("Via") for hit in raw.hits)
    assert any(record.name.startswith(("httpx", "httpcore")) for record in debug_logs.records)
    assert {failure.error.kind for failure in failures} >= {"server_error", "refused_by_per"}
    assert_no_token(tmp_path / "q", rec, failures, debug_logs)


def test_a_server_echoing_the_token_does_not_put_it_on_disk_or_in_logs(
    raw: RawPer, recorder: MakeRecorder, tmp_path: Path, debug_logs: pytest.LogCaptureFixture
) -> None:
    def script(hit: Hit) -> Reply:
        if hit.user == "echo":
            auth = hit.header("Authorization") or ""
            return per_refusal(f"rejected:{auth.split(' ')[-1]}")
        return ok()

    raw.script = script
    failures: list[DeliveryFailure] = []
    rec = recorder(raw.url, on_error=failures.append)
    rec.record("acme", "echo")
    record_users(rec, 5)
    assert rec.flush(timeout=10)
    assert rec.stats().dead_lettered == 1
    assert_no_token(tmp_path / "q", rec, failures, debug_logs)
