"""The recorder against the local Per server: delivery, faults, flush, close, crash, fork."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import per_buffer
from per_buffer import DeliveryFailure, PerAPIError, Recorder
from per_buffer.config import RecorderConfig
from per_buffer.queue import DurableQueue
from per_buffer.testing import PerServer

pytestmark = pytest.mark.usefixtures("counters_add_up")

CHILD = str(Path(__file__).with_name("recorder_child.py"))
FAST = {
    "backoff_initial": 0.02,
    "backoff_max": 0.2,
    "poll_interval": 0.05,
    "auth_probe_interval": 0.2,
}


def make(server: PerServer, directory: Path, **options: Any) -> Recorder:
    settings = {**FAST, "coalesce_window": 0, **options}
    return Recorder(
        server.activity_token, "login", directory=directory, base_url=server.url, **settings
    )


def delivered_users(server: PerServer) -> set[str]:
    return {a.user_id for a in server.activities}


def run_child(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, CHILD, *args], check=False, capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------- basics


def test_record_flush_delivers_everything(server: PerServer, tmp_path: Path) -> None:
    with make(server, tmp_path / "q") as rec:
        for i in range(300):
            rec.record("acme", f"u{i}")
        assert rec.flush(timeout=20)
        stats = rec.stats()
    assert delivered_users(server) == {f"u{i}" for i in range(300)}
    assert stats.recorded == stats.enqueued == stats.delivered == 300
    assert stats.pending == 0 and stats.in_flight == 0
    assert stats.dropped == {}


def test_record_validates_arguments_at_call_site(server: PerServer, tmp_path: Path) -> None:
    with make(server, tmp_path / "q") as rec:
        with pytest.raises(TypeError, match="billing_id"):
            rec.record(42, "u")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="user_id"):
            rec.record("acme", "")
        with pytest.raises(ValueError, match="activity_type_id"):
            rec.record("acme", "u", "bad\ttype")
        assert rec.stats().recorded == 0


def test_activity_type_override(server: PerServer, tmp_path: Path) -> None:
    with make(server, tmp_path / "q") as rec:
        rec.record("acme", "u1")
        rec.record("acme", "u1", "upload")
        assert rec.flush(timeout=10)
    assert sorted(a.activity_type_id for a in server.activities) == ["login", "upload"]


def test_sync_mode_is_on_disk_when_record_returns(server: PerServer, tmp_path: Path) -> None:
    server.outage()
    with make(server, tmp_path / "q", durability="sync") as rec:
        rec.record("acme", "u1")
        with DurableQueue(tmp_path / "q") as other:
            pending, in_flight = other.counts()
        assert pending + in_flight == 1
        server.recover()
        assert rec.flush(timeout=10)


def test_disabled_recorder_counts_but_sends_nothing(server: PerServer, tmp_path: Path) -> None:
    rec = Recorder(enabled=False, directory=tmp_path / "q", coalesce_window=900)
    rec.record("acme", "u1")
    rec.record("acme", "u1")
    with pytest.raises(ValueError):
        rec.record("acme", "")
    assert rec.flush(timeout=1)
    stats = rec.stats()
    rec.close()
    assert (stats.recorded, stats.coalesced, stats.enqueued) == (2, 1, 0)
    assert not (tmp_path / "q").exists()
    assert server.counters.get("requests", 0) == 0


def test_disabled_through_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PER_BUFFER_ENABLED", "0")
    rec = Recorder(directory=tmp_path / "q")
    rec.record("acme", "u1")
    assert rec.stats().recorded == 1
    rec.close()


def test_missing_settings_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PER_ACTIVITY_TOKEN"):
        Recorder(activity_type_id="login", directory=tmp_path)
    with pytest.raises(ValueError, match="PER_ACTIVITY_TYPE_ID"):
        Recorder("tok", directory=tmp_path)
    with pytest.raises(ValueError, match="concurrency"):
        Recorder("tok", "login", directory=tmp_path, concurrency=0)
    with pytest.raises(ValueError, match="durability"):
        Recorder("tok", "login", directory=tmp_path, durability="later")
    with pytest.raises(TypeError, match="unknown"):
        Recorder("tok", "login", directory=tmp_path, concurency=3)


def test_environment_configuration(
    server: PerServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", server.activity_token)
    monkeypatch.setenv("ACTIVITY_TYPE_ID", "from-quickstart-name")
    monkeypatch.setenv("PER_BASE_URL", server.url)
    monkeypatch.setenv("PER_BUFFER_DIR", str(tmp_path / "envq"))
    monkeypatch.setenv("PER_BUFFER_CONCURRENCY", "3")
    with Recorder() as rec:
        assert rec.config.concurrency == 3
        assert rec.directory == tmp_path / "envq"
        rec.record("acme", "u1")
        assert rec.flush(timeout=10)
    assert server.activities[0].activity_type_id == "from-quickstart-name"
    monkeypatch.setenv("PER_BUFFER_CONCURRENCY", "many")
    with pytest.raises(ValueError, match="PER_BUFFER_CONCURRENCY"):
        Recorder()


def test_a_queue_directory_that_is_a_file_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("PER_BUFFER_DIR", str(blocker))
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", "secret-token-123")
    monkeypatch.setenv("PER_ACTIVITY_TYPE_ID", "login")
    with pytest.raises(per_buffer.ConfigurationError) as info:
        Recorder()
    message = str(info.value)
    assert str(blocker) in message and "PER_BUFFER_DIR" in message
    assert "secret-token-123" not in message
    with pytest.raises(ValueError):  # a ConfigurationError is a ValueError
        per_buffer.record("acme", "u1")  # the default recorder: raised on first use
    per_buffer.shutdown(timeout=0)


def test_default_directory_does_not_reveal_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rec = Recorder("sk-secret-token-value", "login", enabled=False)
    assert rec.directory.parent == tmp_path / "per-buffer"
    assert "sk-secret" not in str(rec.directory)
    other = Recorder("another-token", "login", enabled=False)
    assert other.directory != rec.directory
    rec.close()
    other.close()


def test_record_after_close_is_counted_not_raised(
    server: PerServer, tmp_path: Path, per_logs: pytest.LogCaptureFixture
) -> None:
    rec = make(server, tmp_path / "q")
    rec.close()
    rec.record("acme", "u1")
    rec.record("acme", "u2")
    assert rec.stats().dropped == {"closed": 2}
    warnings = [r for r in per_logs.records if "after close" in r.getMessage()]
    assert len(warnings) == 1


# --------------------------------------------------------------------------- coalescing


def test_coalescing_sends_each_key_once_per_window(server: PerServer, tmp_path: Path) -> None:
    now = [1_700_000_000.0 - 1_700_000_000.0 % 900]
    with make(server, tmp_path / "q", coalesce_window=900, clock=lambda: now[0]) as rec:
        for _ in range(5):
            rec.record("acme", "u1")
            rec.record("acme", "u2")
        now[0] += 899
        rec.record("acme", "u1")
        now[0] += 1  # next window
        rec.record("acme", "u1")
        assert rec.flush(timeout=10)
        stats = rec.stats()
    assert stats.recorded == 12
    assert stats.coalesced == 9
    assert stats.delivered == 3


def test_coalescing_preserves_every_aligned_report(tmp_path: Path) -> None:
    """The issue's proof: same reports on every window-aligned range, fewer requests."""
    window = 900
    start = 1_700_000_000 - 1_700_000_000 % 86400
    rng = random.Random(7)
    users = [f"user-{i}" for i in range(10)]
    billing = [f"org-{i}" for i in range(3)]
    types = ["login", "upload"]
    events: list[tuple[float, str, str, str]] = []
    t = float(start)
    for _ in range(1500):
        t += rng.expovariate(1 / 6.0)  # ~2.5 hours of traffic
        events.append((t, rng.choice(billing), rng.choice(users), rng.choice(types)))
    distinct = {(b, u, k, int(ts // window)) for ts, b, u, k in events}

    reports = []
    for coalesce in (window, 0):
        clock = [float(start)]
        with PerServer(clock=lambda c=clock: c[0]) as srv:  # type: ignore[misc]
            rec = make(
                srv,
                tmp_path / f"q{coalesce}",
                coalesce_window=coalesce,
                coalesce_margin=0,  # the server and the recorder share one clock
                clock=lambda c=clock: c[0],
            )
            for ts, b, u, k in events:
                if int(ts // 60) != int(clock[0] // 60):
                    assert rec.flush(timeout=20)  # deliver at the (frozen) minute it was recorded
                clock[0] = ts
                rec.record(b, u, k)
            assert rec.flush(timeout=20)
            requests = rec.stats().delivered
            rec.close()
            bounds = range(start, int(t) + window, window)
            table = {}
            for i, a in enumerate(bounds):
                for b_ in list(bounds)[i + 1 :]:
                    table[(a, b_)] = srv.report(_iso(a), _iso(b_))
            reports.append((requests, table))
    (coalesced_requests, coalesced_reports), (plain_requests, plain_reports) = reports
    assert plain_requests == len(events)
    assert coalesced_requests == len(distinct)
    assert coalesced_requests < plain_requests / 2
    assert coalesced_reports == plain_reports


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# --------------------------------------------------------------------------- faults


def test_outage_then_recovery_loses_nothing(server: PerServer, tmp_path: Path) -> None:
    server.outage()
    with make(server, tmp_path / "q", concurrency=4) as rec:
        for i in range(200):
            rec.record("acme", f"u{i}")
        assert rec.flush(timeout=0.5) is False
        assert _eventually(lambda: rec.stats().retried >= 1)  # a drainer publishes each second
        server.recover()
        assert rec.flush(timeout=20)
        assert rec.stats().pending == 0
    assert delivered_users(server) == {f"u{i}" for i in range(200)}


def test_503_storm(server: PerServer, tmp_path: Path) -> None:
    server.inject("503", rate=0.5)
    with make(server, tmp_path / "q", concurrency=8) as rec:
        for i in range(150):
            rec.record("acme", f"u{i}")
        assert rec.flush(timeout=30)
        stats = rec.stats()
        assert _eventually(lambda: rec.stats().retried > 0)  # a drainer reports within a tick
    assert delivered_users(server) == {f"u{i}" for i in range(150)}
    assert stats.dead_lettered == 0


def test_429_retry_after_is_honoured(server: PerServer, tmp_path: Path) -> None:
    server.inject("429", count=1, retry_after="1")
    with make(server, tmp_path / "q", concurrency=1, backoff_max=5.0) as rec:
        rec.record("acme", "u0")
        assert server.wait_for_requests(1, timeout=5)
        refused_at = time.time()
        for i in range(1, 5):
            rec.record("acme", f"u{i}")
        assert rec.flush(timeout=10)
        assert rec.stats().retried >= 1
    # nothing reached Per before Retry-After ran out
    assert min(a.timestamp for a in server.activities) >= refused_at + 0.9
    assert len(server.activities) == 5


@pytest.mark.shared_directory
def test_401_pauses_keeps_everything_then_new_token_delivers(
    server: PerServer, tmp_path: Path, per_logs: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "q"
    # in this process, so that the ERROR line is caught here
    bad = Recorder(
        "revoked-token",
        "login",
        directory=directory,
        base_url=server.url,
        delivery="thread",
        **FAST,
    )
    for i in range(50):
        bad.record("acme", f"u{i}")
    assert bad.flush(timeout=1.0) is False
    stats = bad.stats()
    assert stats.pause_reason == "auth"
    assert stats.paused_until is not None
    assert stats.dead_lettered == 0 and stats.dead_letters == 0
    assert stats.pending + stats.in_flight == 50
    auth_errors = [
        r for r in per_logs.records if r.levelno == logging.ERROR and "refused" in r.getMessage()
    ]
    assert len(auth_errors) == 1  # once per pause, although it probed several times
    assert server.counters.get("auth_error", 0) >= 2
    bad.close(timeout=0.2)
    assert server.activities == []

    with Recorder(
        server.activity_token, "login", directory=directory, base_url=server.url, **FAST
    ) as good:
        assert good.flush(timeout=1)  # it recorded nothing itself ...
        assert good.drain(timeout=10)  # ... and hands the backlog it found to Per
    assert delivered_users(server) == {f"u{i}" for i in range(50)}
    assert "revoked-token" not in per_logs.text


def test_ok_false_is_dead_lettered_while_others_flow(server: PerServer, tmp_path: Path) -> None:
    failures: list[DeliveryFailure] = []
    server.inject("ok_false", rate=1.0, message="activity_type_archived")
    with make(
        server, tmp_path / "q", concurrency=2, max_attempts=3, on_error=failures.append
    ) as rec:
        rec.record("acme", "doomed")
        assert rec.flush(timeout=20)  # a dead letter counts as done
        assert [f.dead_lettered for f in failures] == [False, False, True]
        assert all(isinstance(f.error, PerAPIError) for f in failures)
        server.clear_faults()
        for i in range(20):
            rec.record("acme", f"u{i}")
        assert rec.flush(timeout=20)
        stats = rec.stats()
        letters = DurableQueue(tmp_path / "q").dead_letters()
    assert stats.dead_lettered == 1 and stats.dead_letters == 1
    assert letters[0].entry.activity.user_id == "doomed"
    assert letters[0].entry.attempts == 3
    assert "activity_type_archived" in letters[0].reason
    assert delivered_users(server) == {f"u{i}" for i in range(20)}


def test_on_error_exceptions_are_logged_not_raised(
    server: PerServer, tmp_path: Path, per_logs: pytest.LogCaptureFixture
) -> None:
    def explode(_: DeliveryFailure) -> None:
        raise RuntimeError("callback bug")

    server.inject("503", count=2)
    with make(server, tmp_path / "q", concurrency=1, on_error=explode) as rec:
        rec.record("acme", "u1")
        assert rec.flush(timeout=10)
    assert "on_error callback raised" in per_logs.text
    assert delivered_users(server) == {"u1"}


def test_flush_returns_on_time_when_server_hangs(server: PerServer, tmp_path: Path) -> None:
    server.inject("hang", rate=1.0)
    rec = make(server, tmp_path / "q", timeout=30)
    rec.record("acme", "u1")
    assert server.wait_for_requests(1, timeout=5)
    started = time.monotonic()
    assert rec.flush(timeout=0.5) is False
    assert time.monotonic() - started < 1.5
    started = time.monotonic()
    rec.close(timeout=0.5)
    assert time.monotonic() - started < 3.0
    with DurableQueue(tmp_path / "q") as queue:
        pending, in_flight = queue.counts()
    server.clear_faults()
    # kept on disk (a drainer process may still hold its lease, and deliver it later)
    assert pending + in_flight == 1


def test_record_does_not_block_while_server_is_down(server: PerServer, tmp_path: Path) -> None:
    server.inject("hang", rate=1.0)
    with make(server, tmp_path / "q") as rec:
        started = time.monotonic()
        for i in range(20_000):
            rec.record("acme", f"u{i}")
        elapsed = time.monotonic() - started
        # a generous bound: 20,000 calls would take hours if any waited on the network
        assert elapsed < 10
        assert rec.stats().recorded == 20_000
        server.clear_faults()
        server.inject("drop", rate=1.0)
        rec.close(timeout=0.2)
    server.clear_faults()


# ------------------------------------------------------------- crash, exit, fork, processes


@pytest.mark.shared_directory
@pytest.mark.parametrize("durability", ["sync", "batched"])
def test_sigkill_then_new_recorder_delivers_everything(
    server: PerServer, tmp_path: Path, durability: str
) -> None:
    server.outage()  # the child cannot deliver anything: all of it must survive on disk
    log_path = tmp_path / "recorded.log"
    directory = tmp_path / "q"
    interval = RecorderConfig.commit_interval  # the batched window the README promises
    child = subprocess.Popen(
        [
            sys.executable,
            CHILD,
            "until-killed",
            server.url,
            str(directory),
            durability,
            str(log_path),
        ]
    )
    try:
        # wait until well over 500 calls are older than the batched window
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if log_path.exists() and log_path.stat().st_size > 20_000:
                first = log_path.read_text().split("\n", 1)[0].split()
                if len(first) == 2 and time.time() > float(first[1]) + 2 * interval + 0.5:
                    break
            time.sleep(0.02)
        killed_at = time.time()
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(10)
    lines = [ln.split() for ln in log_path.read_text().splitlines() if ln.count(" ") == 1]
    must = {
        f"user-{i}" for i, ts in lines if durability == "sync" or float(ts) < killed_at - interval
    }
    assert len(must) > 500
    server.recover()
    with make(server, directory, concurrency=16) as rec:
        assert rec.drain(timeout=60)
    missing = must - delivered_users(server)
    assert not missing, f"{len(missing)} recorded activities lost, e.g. {sorted(missing)[:5]}"


@pytest.mark.parametrize("delivery", ["process", "thread"])
def test_atexit_flush_in_subprocess(server: PerServer, tmp_path: Path, delivery: str) -> None:
    """The exit handler delivers (thread) or hands over to a drainer (process), although
    Python 3.12 starts no new thread there: a script that records and exits at once."""
    done = subprocess.run(
        [sys.executable, CHILD, "exit", server.url, str(tmp_path / "q"), "120", "exiting"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PER_BUFFER_DELIVERY": delivery},
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    # the exit handler wrote the batch; the drainer it started delivers after the exit
    assert server.wait_for_activities(120, timeout=30)
    assert delivered_users(server) == {f"exiting-{i}" for i in range(120)}


@pytest.mark.shared_directory
def test_four_processes_share_one_directory(server: PerServer, tmp_path: Path) -> None:
    directory = str(tmp_path / "shared")
    procs = [
        subprocess.Popen(
            [sys.executable, CHILD, "flush", server.url, directory, "300", f"p{n}"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
    expected = {f"p{n}-{i}" for n in range(4) for i in range(300)}
    assert delivered_users(server) == expected


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.shared_directory
def test_fork_child_gets_fresh_worker(server: PerServer, tmp_path: Path) -> None:
    rec = make(server, tmp_path / "q")
    rec.record("acme", "parent-before")
    assert rec.flush(timeout=10)
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        faulthandler.dump_traceback_later(30, exit=True)  # a hung child must not hang CI
        try:
            for i in range(30):
                rec.record("acme", f"child-{i}")
            code = 0 if rec.flush(timeout=20) else 2
            rec.close()
        finally:
            os._exit(code)
    rec.record("acme", "parent-after")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert rec.flush(timeout=10)
    rec.close()
    expected = {"parent-before", "parent-after"} | {f"child-{i}" for i in range(30)}
    assert delivered_users(server) == expected


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.shared_directory
def test_preload_style_fork_works_in_every_child(server: PerServer, tmp_path: Path) -> None:
    rec = make(server, tmp_path / "q")  # made in the "master" before forking workers
    rec.record("acme", "master")  # threads running in the master at fork time
    children = []
    for n in range(3):
        pid = os.fork()
        if pid == 0:
            code = 1
            faulthandler.dump_traceback_later(30, exit=True)  # a hung child must not hang CI
            try:
                for i in range(40):
                    rec.record("acme", f"w{n}-{i}")
                code = 0 if rec.flush(timeout=20) else 2
                if code:
                    print(f"child {n}: {rec.stats()}")
            finally:
                os._exit(code)
        children.append(pid)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert rec.flush(timeout=10)
    rec.close()
    expected = {"master"} | {f"w{n}-{i}" for n in range(3) for i in range(40)}
    assert delivered_users(server) == expected


# ------------------------------------------------------------- asyncio, module API, secrets


def test_async_flush_and_close_do_not_block_the_loop(server: PerServer, tmp_path: Path) -> None:
    server.set_latency(0.2)
    rec = make(server, tmp_path / "q", concurrency=2)

    async def main() -> tuple[bool, int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        for i in range(4):
            rec.record("acme", f"u{i}")
        ok = await rec.aflush(timeout=10)
        await rec.aclose()
        stop.set()
        await task
        return ok, ticks

    ok, ticks = asyncio.run(main())
    assert ok
    assert ticks >= 10  # the loop kept running during ~0.4 s of flushing


def test_module_level_api(
    server: PerServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", server.activity_token)
    monkeypatch.setenv("PER_ACTIVITY_TYPE_ID", "login")
    monkeypatch.setenv("PER_BASE_URL", server.url)
    monkeypatch.setenv("PER_BUFFER_DIR", str(tmp_path / "default"))
    try:
        per_buffer.record("acme", "from-env")
        assert per_buffer.flush(timeout=10)
        per_buffer.configure(directory=tmp_path / "configured", **FAST)
        per_buffer.record("acme", "configured")
        assert per_buffer.flush(timeout=10)
    finally:
        per_buffer.shutdown(timeout=5)
    assert per_buffer.flush() is True  # nothing configured any more
    assert delivered_users(server) == {"from-env", "configured"}


def test_no_token_in_logs_reprs_errors_or_files(
    server: PerServer, tmp_path: Path, per_logs: pytest.LogCaptureFixture
) -> None:
    secret = "sk-live-TOPSECRET-4242"
    per_logs.set_level(logging.DEBUG)
    server.set_tokens(activity_tokens=["something-else"])
    rec = Recorder(secret, "login", directory=tmp_path / "q", base_url=server.url, **FAST)
    for i in range(20):
        rec.record("acme", f"u{i}")
    assert rec.flush(timeout=0.5) is False
    server.set_tokens(activity_tokens=[secret])
    server.inject("503", count=3)
    assert rec.flush(timeout=10)
    stats = rec.stats()
    texts = [repr(rec), repr(rec.config), str(stats), per_logs.text]
    rec.close()
    for text in texts:
        assert secret not in text
    for path in (tmp_path / "q").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_concurrent_record_from_many_threads(server: PerServer, tmp_path: Path) -> None:
    with make(server, tmp_path / "q", coalesce_window=900) as rec:

        def worker(n: int) -> None:
            for i in range(500):
                rec.record("acme", f"t{n}-{i % 100}")

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert rec.flush(timeout=20)
        stats = rec.stats()
    assert stats.recorded == 4000
    assert stats.coalesced == 4000 - 800
    assert len(delivered_users(server)) == 800


def test_pid_check_rebuilds_after_a_fork_without_python_hooks(
    server: PerServer, tmp_path: Path
) -> None:
    """uWSGI forks in C without running os.register_at_fork hooks: record() notices the new
    pid itself. Simulated here: a pid that is not ours, and a lock left held by a thread
    that did not survive the fork (the classic post-fork deadlock)."""
    rec = make(server, tmp_path / "q")
    rec._lock.acquire()  # held by a "parent thread" that does not exist in the child
    rec._pid = -1  # as if this object was made before a fork in another process
    rec.record("acme", "after-c-fork")  # must neither deadlock nor lose the activity
    assert rec._pid == os.getpid()
    assert rec.flush(timeout=10)
    rec.close()
    assert delivered_users(server) == {"after-c-fork"}


def test_committer_keeps_waking_after_an_inline_commit(server: PerServer, tmp_path: Path) -> None:
    """Regression: a call that both claimed the wake-up and committed inline (because the
    committer was late) left the committer asleep, so later activities stayed in memory."""
    server.outage()
    rec = make(server, tmp_path / "q")
    rec.record("acme", "u0")
    assert _eventually(lambda: rec.stats().buffered == 0)
    with rec._commit_lock:  # the committer is stuck behind this, as if starved
        rec.record("acme", "u1")
        time.sleep(0.05)  # let u1 become overdue (> commit_interval in memory)
        late = threading.Thread(target=rec.record, args=("acme", "u2"))
        late.start()  # claims the wake-up and, being overdue, commits inline (blocks here)
        time.sleep(0.05)
    late.join(5)
    rec.record("acme", "u3")  # arrives after the inline commit
    assert _eventually(lambda: rec.stats().buffered == 0), "u3 stayed in memory"
    rec.close(timeout=0.1)


def _eventually(condition: Any, timeout: float = 5.0) -> bool:
    """Poll a condition that has no event of its own (the committer's progress)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


def test_flush_after_close_starts_nothing(server: PerServer, tmp_path: Path) -> None:
    rec = make(server, tmp_path / "q", delivery="thread")
    rec.close()
    assert rec.flush(timeout=0.2) is False
    assert not any(t.name == "per-buffer-delivery" for t in threading.enumerate())


def test_retry_after_holds_although_requests_in_flight_succeed(
    server: PerServer, tmp_path: Path
) -> None:
    server.set_latency(0.05)
    with make(server, tmp_path / "q", concurrency=8, backoff_max=5.0) as rec:
        for i in range(40):
            rec.record("acme", f"warm-{i}")
        assert rec.flush(timeout=10)
        server.inject("429", count=1, retry_after="2")
        for i in range(200):
            rec.record("acme", f"u{i}")
        assert server.wait_for_requests(server.counters["requests"] + 1, timeout=5)
        assert _eventually(lambda: rec.stats().pause_reason == "rate_limited", timeout=5)
        refused_at = time.time()
        assert rec.flush(timeout=20)
    late = [a for a in server.activities if a.user_id.startswith("u")]
    # only requests already in flight when the 429 came (at most concurrency), and those
    # that answers read in the same loop turn just before it replaced, land early
    early = [a for a in late if a.timestamp < refused_at + 1.8]
    assert len(early) <= 2 * 8
    assert len(late) == 200
