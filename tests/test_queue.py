"""Tests of per_buffer.queue.DurableQueue on real diskcache directories and processes."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import math
import multiprocessing
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from queue_helpers import mp_worker

from per_buffer.errors import QueueError
from per_buffer.models import Activity
from per_buffer.queue import Claim, DurableQueue, Entry, QueueStats, _Meta

if sys.platform != "win32":
    import fcntl

HELPERS = Path(__file__).with_name("queue_helpers.py")
ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """An injectable unix clock."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def items(n: int, prefix: str = "u", stamp: float = 1_000.0) -> list[tuple[Activity, float]]:
    return [(Activity("billing", f"{prefix}{i}", "api_call"), stamp + i) for i in range(n)]


def users(claim: Claim | None) -> list[str]:
    assert claim is not None
    return [entry.activity.user_id for entry in claim.entries]


def ids(claim: Claim | None) -> list[int]:
    assert claim is not None
    return [entry.id for entry in claim.entries]


def run_helper(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(HELPERS), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result


def drain(queue: DurableQueue, size: int = 500) -> list[Entry]:
    out: list[Entry] = []
    while (claim := queue.claim(size, ignore_not_before=True)) is not None:
        out.extend(claim.entries)
        queue.ack(claim, [entry.id for entry in claim.entries])
    return out


def generation(directory: Path) -> Path:
    (gen,) = sorted(directory.glob("db-*"))
    return gen


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    return tmp_path / "queue"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --------------------------------------------------------------------------- basics


def test_put_claim_ack_roundtrip(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        assert queue.put(items(3)) == 3
        claim = queue.claim(10)
        assert claim is not None
        assert [e.id for e in claim.entries] == [1, 2, 3]
        first = claim.entries[0]
        assert first == Entry(1, Activity("billing", "u0", "api_call"), 1_000.0, 0, None)
        assert queue.counts() == (0, 3)
        queue.ack(claim, [1, 2, 3])
        assert queue.counts() == (0, 0)
        assert queue.claim(10) is None
        assert queue.directory == qdir.absolute()


def test_put_empty_and_invalid_items(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        assert queue.put([]) == 0
        with pytest.raises(TypeError):
            queue.put([(Activity("b", 5, "t"), 1.0)])  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            queue.put([(Activity("b", "u", "t"), math.nan)])
        with pytest.raises(ValueError):
            queue.claim(0)
        assert queue.counts() == (0, 0)


def test_put_is_one_batch_with_monotonic_ids(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(1200, "a"))  # more than one stored chunk
        queue.put(items(7, "b"))
        got: list[int] = []
        for size in (5, 600, 1, 598, 3):
            got += ids(queue.claim(size))
        assert got == list(range(1, 1208))
        assert queue.claim(1) is None


def test_order_main_queue_in_put_order_across_partial_claims(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(10, "x"))
        first = queue.claim(4)
        queue.put(items(3, "y"))
        second = queue.claim(100)
        assert users(first) == [f"x{i}" for i in range(4)]
        assert users(second) == [f"x{i}" for i in range(4, 10)] + ["y0", "y1", "y2"]


def test_leases_are_exclusive_between_instances(qdir: Path) -> None:
    a = DurableQueue(qdir)
    b = DurableQueue(qdir)
    try:
        a.put(items(10))
        ca = a.claim(6)
        cb = b.claim(6)
        assert set(ids(ca)).isdisjoint(ids(cb))
        assert len(ids(cb)) == 4
        assert a.claim(1) is None and b.claim(1) is None
        assert a.counts() == (0, 10)
    finally:
        a.close()
        b.close()


def test_lease_expiry_with_injected_clock(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock, lease_seconds=10) as queue:
        queue.put(items(5))
        old = queue.claim(2)
        assert old is not None and old.expires_at == clock.now + 10
        clock.advance(9.9)
        assert ids(queue.claim(10)) == [3, 4, 5]
        clock.advance(0.1)  # the first lease has expired: it comes back first
        new = queue.claim(10)
        assert ids(new) == [1, 2]
        assert [e.attempts for e in new.entries] == [0, 0]  # type: ignore[union-attr]
        queue.ack(old, [1, 2])  # no longer held by `old`: a harmless no-op
        assert queue.counts() == (0, 5)
        queue.ack(new, [1, 2])  # type: ignore[arg-type]
        assert queue.counts() == (0, 3)


def test_reclaim_returns_expired_leases_to_the_front(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        queue.put(items(6))
        queue.claim(2, lease_seconds=5)
        live = queue.claim(2, lease_seconds=500)
        assert queue.reclaim() == 0
        clock.advance(6)
        assert queue.reclaim() == 2
        assert queue.counts() == (4, 2)
        assert ids(queue.claim(10)) == [1, 2, 5, 6]
        queue.release_claim(live)  # type: ignore[arg-type]
        assert queue.counts() == (2, 4)


def test_dead_owner_lease_reclaimed_at_open(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(10))
    claimed = json.loads(run_helper("claim_and_exit", str(qdir), "4").stdout)
    assert claimed == [1, 2, 3, 4]
    with DurableQueue(qdir) as queue:  # the owner process is gone (and reaped)
        assert queue.counts() == (10, 0)
        assert ids(queue.claim(4)) == [1, 2, 3, 4]


def test_live_owner_lease_survives_open(qdir: Path) -> None:
    with DurableQueue(qdir) as first:
        first.put(items(3))
        claim = first.claim(2)
        with DurableQueue(qdir) as second:
            assert second.counts() == (1, 2)
            assert second.reclaim() == 0
        first.ack(claim, ids(claim))
        assert first.counts() == (1, 0)


def test_default_owner_and_custom_owner(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(2))
        queue.claim(1)
        queue.claim(1, owner="sender-7")
        leases = json.loads(queue._cache.get("meta:leases"))
        owners = [json.loads(queue._cache.get("lease:" + lid))["o"] for lid in leases]
        host, pid, nonce = owners[0].split(":")
        assert pid == str(os.getpid()) and len(nonce) == 8 and host
        assert owners[1] == "sender-7"


# --------------------------------------------------------------------------- retries


def test_release_does_not_block_later_items(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        queue.put(items(5))
        claim = queue.claim(2)
        queue.release(claim, [1, 2], not_before=clock.now + 60, error="HTTP 503")  # type: ignore[arg-type]
        assert ids(queue.claim(10)) == [3, 4, 5]
        assert queue.claim(10) is None
        assert queue.next_ready_at() == pytest.approx(clock.now + 60)
        clock.advance(60)
        retried = queue.claim(10)
        assert ids(retried) == [1, 2]
        assert [(e.attempts, e.last_error) for e in retried.entries] == [(1, "HTTP 503")] * 2  # type: ignore[union-attr]


def test_ready_retries_come_first_by_not_before(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        queue.put(items(6))
        claim = queue.claim(3)
        assert claim is not None
        queue.release(claim, [1], not_before=clock.now + 30)
        queue.release(claim, [2], not_before=clock.now + 10)
        queue.release(claim, [3], not_before=clock.now + 20)
        clock.advance(25)
        assert ids(queue.claim(10)) == [2, 3, 4, 5, 6]
        assert queue.claim(10) is None
        flushed = queue.claim(10, ignore_not_before=True)
        assert ids(flushed) == [1]


def test_release_without_counting_attempt_and_error_kept(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        queue.put(items(1))
        claim = queue.claim(1)
        queue.release(claim, [1], not_before=0, error="timeout")  # type: ignore[arg-type]
        claim = queue.claim(1)
        queue.release(claim, [1], not_before=0, count_attempt=False)  # type: ignore[arg-type]
        entry = queue.claim(1).entries[0]  # type: ignore[union-attr]
        assert (entry.attempts, entry.last_error) == (1, "timeout")


def test_release_claim_returns_everything_to_the_front(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        queue.put(items(5))
        claim = queue.claim(3)
        queue.ack(claim, [2])  # type: ignore[arg-type]
        queue.release_claim(claim)  # type: ignore[arg-type]
        queue.release_claim(claim)  # type: ignore[arg-type]  # twice: no-op
        again = queue.claim(10)
        assert ids(again) == [1, 3, 4, 5]
        assert all(e.attempts == 0 for e in again.entries)  # type: ignore[union-attr]


def test_next_ready_at(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        assert queue.next_ready_at() is None
        queue.put(items(2))
        assert queue.next_ready_at() == clock.now
        claim = queue.claim(2)
        assert queue.next_ready_at() is None  # only in flight
        queue.release(claim, [1], not_before=clock.now + 5)  # type: ignore[arg-type]
        assert queue.next_ready_at() == pytest.approx(clock.now + 5)
        clock.advance(7)
        assert queue.next_ready_at() == clock.now


# --------------------------------------------------------------------------- dead letters


def test_dead_letters_list_requeue_purge(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        queue.put(items(6))
        claim = queue.claim(6)
        assert claim is not None
        queue.release(claim, [1], not_before=0)
        again = queue.claim(1)
        queue.dead_letter(again, [1], "invalid_parameter")  # type: ignore[arg-type]
        queue.dead_letter(claim, [3, 2], "x" * 5000)
        letters = queue.dead_letters()
        assert [d.entry.id for d in letters] == [1, 2, 3]
        assert letters[0].reason == "invalid_parameter" and letters[0].dead_at == clock.now
        assert [d.entry.attempts for d in letters] == [2, 1, 1]  # the last attempt counts
        assert len(letters[1].reason) == 1000
        assert [d.entry.id for d in queue.dead_letters(limit=2)] == [1, 2]
        stats = queue.stats()
        assert (stats.pending, stats.in_flight, stats.dead_lettered) == (0, 3, 3)

        assert queue.requeue_dead_letters() == 3
        assert queue.dead_letters() == []
        back = queue.claim(10)
        assert ids(back) == [1, 2, 3]  # ahead of nothing else pending; attempts reset
        assert all(e.attempts == 0 for e in back.entries)  # type: ignore[union-attr]
        queue.dead_letter(back, ids(back), "again")  # type: ignore[arg-type]
        assert queue.purge_dead_letters() == 3
        stats = queue.stats()
        assert stats.dead_lettered == 0 and stats.dropped == {"dead_letters_purged": 3}


def test_many_dead_letter_records_requeue_in_batches(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(150))
        for _ in range(150):
            claim = queue.claim(1)
            queue.dead_letter(claim, ids(claim), "r")  # type: ignore[arg-type]
        assert len(queue.dead_letters()) == 150
        assert queue.requeue_dead_letters() == 150
        assert [e.id for e in drain(queue)] == list(range(1, 151))


# --------------------------------------------------------------------------- bounds


def test_bounds_drop_newest(qdir: Path) -> None:
    with DurableQueue(qdir, max_items=10) as queue:
        assert queue.put(items(7, "a")) == 7
        assert queue.put(items(5, "b")) == 3
        claim = queue.claim(2)
        assert queue.put(items(1, "c")) == 0  # leased entries still count
        queue.ack(claim, ids(claim))  # type: ignore[arg-type]
        assert queue.put(items(5, "d")) == 2
        assert queue.stats().dropped == {"queue_full": 2 + 1 + 3}
        got = [e.activity.user_id for e in drain(queue)]
        assert got == [f"a{i}" for i in range(2, 7)] + ["b0", "b1", "b2", "d0", "d1"]


def test_bounds_drop_oldest(qdir: Path) -> None:
    with DurableQueue(qdir, max_items=10, full_policy="drop_oldest") as queue:
        assert queue.put(items(8, "a")) == 8
        assert queue.put(items(5, "b")) == 5  # evicts a0..a2
        assert queue.stats().dropped == {"evicted_oldest": 3}
        leased = queue.claim(4)
        assert users(leased) == ["a3", "a4", "a5", "a6"]
        # 12 new: c0, c1 can never fit (10 max); the 6 pending (a7, b0..b4) are evicted;
        # the 4 leased ones are never evicted, so the oldest 4 left (c2..c5) are refused.
        assert queue.put(items(12, "c")) == 6
        assert queue.counts() == (6, 4)
        assert queue.stats().dropped == {"evicted_oldest": 3 + 2 + 6, "queue_full": 4}
        assert [e.activity.user_id for e in drain(queue)] == [f"c{i}" for i in range(6, 12)]
        queue.ack(leased, ids(leased))  # type: ignore[arg-type]


def test_drop_oldest_evicts_waiting_retries_after_the_main_queue(
    qdir: Path, clock: FakeClock
) -> None:
    with DurableQueue(qdir, max_items=4, full_policy="drop_oldest", clock=clock) as queue:
        queue.put(items(4, "a"))
        claim = queue.claim(2)
        queue.release(claim, ids(claim), not_before=clock.now + 100)  # type: ignore[arg-type]
        assert queue.put(items(3, "b")) == 3  # evicts a2, a3, then a0 (retry space)
        assert queue.stats().dropped == {"evicted_oldest": 3}
        assert [e.activity.user_id for e in drain(queue)] == ["a1", "b0", "b1", "b2"]


def test_drop_oldest_refuses_when_only_leased_entries_remain(qdir: Path) -> None:
    with DurableQueue(qdir, max_items=4, full_policy="drop_oldest") as queue:
        queue.put(items(4, "a"))
        claim = queue.claim(4)
        assert queue.put(items(2, "b")) == 0
        assert queue.stats().dropped == {"queue_full": 2}
        queue.ack(claim, ids(claim))  # type: ignore[arg-type]
        assert queue.put(items(2, "b")) == 2


def test_bounds_max_bytes(qdir: Path) -> None:
    size = 32 + len("billing") + len("u0") + len("api_call")  # payload bytes per entry
    with DurableQueue(qdir, max_bytes=size * 5) as queue:
        assert queue.put(items(8)) == 5
        meta = _Meta.load(queue._cache)
        assert meta.bytes == size * 5
        claim = queue.claim(5)
        queue.release(claim, [1], not_before=0, error="e" * 10)  # type: ignore[arg-type]
        # the error text is stored but not counted: a release can never exceed max_bytes
        assert _Meta.load(queue._cache).bytes == size * 5
        assert queue.claim(1).entries[0].last_error == "e" * 10  # type: ignore[union-attr]
        queue.ack(claim, [2, 3, 4, 5])  # type: ignore[arg-type]
        assert _Meta.load(queue._cache).bytes == size
        assert queue.stats().dropped == {"queue_full": 3}


def test_dropped_counters_persist_across_reopen(qdir: Path) -> None:
    with DurableQueue(qdir, max_items=2) as queue:
        queue.put(items(5))
    with DurableQueue(qdir, max_items=2) as queue:
        assert queue.stats().dropped == {"queue_full": 3}


def test_full_queue_logs_a_warning(qdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="per_buffer")
    with DurableQueue(qdir, max_items=1) as queue:
        queue.put(items(3))
        queue.put(items(3))
    warnings = [r for r in caplog.records if "is full" in r.getMessage()]
    assert len(warnings) == 1 and "2 queue_full" in warnings[0].getMessage()


def test_diskcache_never_evicts(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        cache = queue._cache
        assert cache.eviction_policy == "none"
        assert cache.cull_limit == 0
        assert cache.size_limit >= 2**60
        assert cache.disk_min_file_size >= 4 * 1024 * 1024


# --------------------------------------------------------------------------- stats


def test_stats(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        empty = queue.stats()
        assert empty == QueueStats(0, 0, 0, None, empty.bytes_on_disk, {}, 0)
        assert empty.bytes_on_disk > 0
        queue.put([(Activity("b", "u", "t"), clock.now - 100)])
        queue.put([(Activity("b", "v", "t"), clock.now - 50)])
        assert queue.stats().oldest_pending_age == pytest.approx(100)
        claim = queue.claim(1)
        stats = queue.stats()
        assert (stats.pending, stats.in_flight) == (1, 1)
        assert stats.oldest_pending_age == pytest.approx(100)  # in flight counts
        queue.ack(claim, ids(claim))  # type: ignore[arg-type]
        clock.advance(10)
        assert queue.stats().oldest_pending_age == pytest.approx(60)
        claim = queue.claim(1)
        queue.release(claim, ids(claim), not_before=clock.now + 100)  # type: ignore[arg-type]
        assert queue.stats().oldest_pending_age == pytest.approx(60)  # waiting retry
        queue.dead_letter(queue.claim(1, ignore_not_before=True), [2], "r")  # type: ignore[arg-type]
        stats = queue.stats()
        assert (stats.pending, stats.in_flight, stats.dead_lettered) == (0, 0, 1)
        assert stats.oldest_pending_age is None


def test_counts_is_cheap_and_consistent(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(100))
        queue.claim(30)
        assert queue.counts() == (70, 30)
        start = time.perf_counter()
        for _ in range(200):
            queue.counts()
        assert (time.perf_counter() - start) / 200 < 0.005


# --------------------------------------------------------------------------- lifecycle


def test_reopen_after_close_keeps_everything(qdir: Path, clock: FakeClock) -> None:
    queue = DurableQueue(qdir, clock=clock, max_items=100)
    queue.put(items(10))
    leased = queue.claim(2)  # 1, 2
    retry = queue.claim(2)  # 3, 4
    queue.release(retry, ids(retry), not_before=clock.now + 50, error="e")  # type: ignore[arg-type]
    dead = queue.claim(1)  # 5
    queue.dead_letter(dead, ids(dead), "bad")  # type: ignore[arg-type]
    assert queue.put(items(200, "z")) == 90  # 10 stored before, 110 refused
    queue.close()
    with pytest.raises(QueueError, match="closed"):
        queue.put(items(1))
    queue.close()  # idempotent

    with DurableQueue(qdir, clock=clock, max_items=100) as again:
        stats = again.stats()
        assert (stats.pending, stats.in_flight, stats.dead_lettered) == (97, 2, 1)
        assert stats.dropped == {"queue_full": 110}
        again.ack(leased, ids(leased))  # type: ignore[arg-type]  # our process: lease still live
        assert again.counts() == (97, 0)
        assert [d.entry.id for d in again.dead_letters()] == [5]
        assert again.put(items(1, "new")) == 1
        got = drain(again)  # waiting retries first (flush), then the main queue in order
        assert [e.id for e in got] == [3, 4, *range(6, 101), 101]
        assert got[-1].activity.user_id == "new0"
        assert [(e.attempts, e.last_error) for e in got[:3]] == [(1, "e"), (1, "e"), (0, None)]


def test_directory_is_private(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    DurableQueue(fresh).close()
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    DurableQueue(existing).close()
    assert stat.S_IMODE(os.stat(existing).st_mode) == 0o700


def test_lock_timeout_raises_queue_error(qdir: Path) -> None:
    with DurableQueue(qdir, lock_timeout=0.4) as queue:
        queue.put(items(3))
        holder = sqlite3.connect(generation(qdir) / "cache.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            start = time.monotonic()
            with pytest.raises(QueueError, match="locked"):
                queue.put(items(1))
            assert 0.3 < time.monotonic() - start < 5
            with pytest.raises(QueueError):
                queue.claim(1)
            assert queue.counts() == (3, 0)  # reads do not need the write lock
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert queue.put(items(1)) == 1
        assert len(drain(queue)) == 4


def test_fork_child_reopens_and_parent_keeps_working(qdir: Path) -> None:
    queue = DurableQueue(qdir)
    queue.put(items(10, "parent"))
    parent_cache = queue._cache
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            queue.put(items(5, "child"))
            claim = queue.claim(4)
            assert queue._cache is not parent_cache
            assert users(claim) == ["parent0", "parent1", "parent2", "parent3"]
            queue.ack(claim, ids(claim))
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert queue._cache is parent_cache
    assert queue.counts() == (11, 0)
    got = [e.activity.user_id for e in drain(queue)]
    assert got == [f"parent{i}" for i in range(4, 10)] + [f"child{i}" for i in range(5)]
    queue.close()


def test_forked_workers_claim_disjoint_sets(qdir: Path, tmp_path: Path) -> None:
    queue = DurableQueue(qdir)  # opened before fork, like gunicorn --preload
    queue.put(items(600))
    children = []
    for n in range(3):
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                got = []
                while (claim := queue.claim(7)) is not None:
                    got += ids(claim)
                    queue.ack(claim, ids(claim))
                (tmp_path / f"child{n}.json").write_text(json.dumps(got))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        children.append(pid)
    for pid in children:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    seen = Counter(
        i for n in range(3) for i in json.loads((tmp_path / f"child{n}.json").read_text())
    )
    assert sorted(seen) == list(range(1, 601)) and max(seen.values()) == 1
    assert queue.counts() == (0, 0)
    queue.close()


def test_another_process_quarantine_is_followed(qdir: Path) -> None:
    a = DurableQueue(qdir)
    b = DurableQueue(qdir)
    try:
        a.put(items(3, "old"))
        old_gen = generation(qdir)
        b._quarantine("simulated damage")  # what a process finding corruption does
        assert not old_gen.exists()
        a.put(items(2, "new"))  # a notices the new database and writes there
        fresh = drain(b)
        assert [e.activity.user_id for e in fresh] == ["new0", "new1"]
        assert [e.id for e in fresh] == [10**12 + 1, 10**12 + 2]  # unique in the directory
        assert b.stats().quarantined == 1 and a.stats().quarantined == 0
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- corruption


def _crashed_queue(qdir: Path, batches: int = 20, close: bool = False) -> Path:
    run_helper("fill", str(qdir), str(batches), "100", "close" if close else "crash")
    return generation(qdir)


def _assert_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture, queue: DurableQueue) -> None:
    stats = queue.stats()
    assert stats.quarantined == 1
    moved = sorted(qdir.glob("quarantine-*-db-0001"))
    assert len(moved) == 1 and (moved[0] / "cache.db").exists()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors, "no ERROR logged"
    message = errors[-1].getMessage()
    assert str(qdir / "db-0001" / "cache.db") in message and str(moved[0]) in message
    assert queue.put(items(3, "fresh")) == 3
    assert [e.activity.user_id for e in drain(queue)] == ["fresh0", "fresh1", "fresh2"]


def test_truncated_database_is_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir, batches=100, close=True)
    db = gen / "cache.db"
    os.truncate(db, db.stat().st_size // 2)
    with DurableQueue(qdir) as queue:
        _assert_quarantined(qdir, caplog, queue)


def test_garbage_database_is_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir, close=True)
    db = gen / "cache.db"
    db.write_bytes(os.urandom(db.stat().st_size))
    with DurableQueue(qdir) as queue:
        _assert_quarantined(qdir, caplog, queue)


def test_deleted_wal_is_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A killed writer left a WAL; deleting it loses committed transactions.

    The -shm index still says which frames had not been copied into the database, so
    the loss is detected, logged and the database moved aside (not silently rolled back).
    """
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir)
    (gen / "cache.db-wal").unlink()
    with DurableQueue(qdir) as queue:
        _assert_quarantined(qdir, caplog, queue)


def test_deleted_wal_and_shm_falls_back_to_last_checkpoint(qdir: Path) -> None:
    """With the -shm gone as well nothing tells what was lost: the database opens at
    its last checkpoint (uncheckpointed items are lost, acked ones may come back)."""
    gen = _crashed_queue(qdir)
    (gen / "cache.db-wal").unlink()
    (gen / "cache.db-shm").unlink()
    with DurableQueue(qdir) as queue:
        pending, in_flight = queue.counts()
        assert 0 <= pending <= 2000 and in_flight == 0
        assert len(drain(queue)) == pending
        assert queue.put(items(2)) == 2 and len(drain(queue)) == 2
        assert queue.stats().quarantined == 0


def test_garbage_wal_is_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir)
    wal = gen / "cache.db-wal"
    with open(wal, "r+b") as handle:
        handle.write(os.urandom(4096))
    with DurableQueue(qdir) as queue:
        _assert_quarantined(qdir, caplog, queue)


def test_garbage_wal_tail_is_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir)
    wal = gen / "cache.db-wal"
    with open(wal, "r+b") as handle:
        handle.seek(wal.stat().st_size - 3000)
        handle.write(os.urandom(3000))
    with DurableQueue(qdir) as queue:
        _assert_quarantined(qdir, caplog, queue)


def test_garbage_inside_wal_is_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Garbage in the middle of the WAL: SQLite's recovery would silently drop every
    commit from the first bad checksum on; the frame count it keeps is compared with the
    count the -shm index promised, so the damage is detected."""
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir)
    wal = gen / "cache.db-wal"
    with open(wal, "r+b") as handle:
        handle.seek(wal.stat().st_size // 2)
        handle.write(os.urandom(8192))
    with DurableQueue(qdir) as queue:
        _assert_quarantined(qdir, caplog, queue)


def test_corruption_found_during_operation_is_quarantined(
    qdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir, batches=200, close=True)
    db = gen / "cache.db"
    size = db.stat().st_size
    with open(db, "r+b") as handle:  # the header and the first pages stay intact
        handle.seek(size // 4)
        handle.write(os.urandom(size // 2))
    with DurableQueue(qdir) as queue:
        delivered = drain(queue)  # no exception escapes: quarantine + fresh database
        assert len(delivered) < 20000
        _assert_quarantined(qdir, caplog, queue)


# --------------------------------------------------------------------------- processes


def test_four_processes_start_together_on_a_fresh_directory(tmp_path: Path) -> None:
    directory = tmp_path / "fresh"  # does not exist: every process races to create it
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    outs = [tmp_path / f"worker{n}.json" for n in range(4)]
    procs = [
        context.Process(target=mp_worker, args=(str(directory), n, barrier, str(outs[n]), 2000, 40))
        for n in range(4)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    results = [json.loads(out.read_text()) for out in outs]
    for result in results:
        assert "error" not in result, result["error"]
    put = [user for result in results for user in result["put"]]
    assert len(put) == len(set(put)) == 8000
    with DurableQueue(directory) as queue:
        leftover = [e.activity.user_id for e in drain(queue)]
    claims = [claim for result in results for claim in result["claims"]]
    acked = Counter(user for claim in claims for user in claim[2]) + Counter(leftover)
    assert set(acked) == set(put)
    assert max(acked.values()) == 1  # no failures here, so no duplicate either
    # no entry was ever held by two live leases: claim intervals of one user never overlap
    spans: dict[str, list[tuple[float, float]]] = {}
    for claimed, acking, claim_users in claims:
        for user in claim_users:
            spans.setdefault(user, []).append((claimed, acking))
    for intervals in spans.values():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert end <= start


# --------------------------------------------------------------------------- storage failures


@pytest.fixture
def tmpfs(mount_tmpfs: Callable[[str], Path]) -> Path:
    return mount_tmpfs("8m")


@pytest.mark.root
def test_full_disk(tmpfs: Path) -> None:
    qdir = tmpfs / "queue"
    queue = DurableQueue(qdir, reserve_bytes=1024 * 1024)
    queue.put(items(500, "a"))
    stored = [f"a{i}" for i in range(500)]
    filler = tmpfs / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for block in (65536, 512):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * block)
    with pytest.raises(QueueError, match="no space"):
        for n in range(500):
            batch = items(100, f"b{n}.")
            queue.put(batch)
            stored += [activity.user_id for activity, _ in batch]
    # everything stored is still claimable, with the disk still full
    delivered = [e.activity.user_id for e in drain(queue, 100)]
    assert sorted(delivered) == sorted(stored)
    filler.unlink()
    assert queue.put(items(10, "c")) == 10
    assert len(drain(queue)) == 10
    queue.close()


@pytest.mark.root
def test_read_only_filesystem(tmpfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    qdir = tmpfs / "queue"
    with DurableQueue(qdir) as queue:
        queue.put(items(20))
        queue.claim(5)
    # Linux refuses remount,ro while files are open for writing: closed first.
    result = subprocess.run(
        ["mount", "-o", "remount,ro", str(tmpfs)], check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot remount read-only: {result.stderr.strip()}")
    queue = DurableQueue(qdir)  # does not raise: logs and retries on every call
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    with pytest.raises(QueueError):
        queue.put(items(1, "x"))
    for call in (lambda: queue.claim(5), queue.counts, queue.stats, queue.reclaim):
        with contextlib.suppress(QueueError):
            call()
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert queue.put(items(1, "x")) == 1  # heals by itself
    assert queue.counts() == (16, 5)
    queue.close()


@pytest.mark.root
def test_filesystem_failing_under_an_open_queue(tmp_path: Path) -> None:
    """ext4 shut down (EXT4_IOC_SHUTDOWN) while the queue is open: every write fails."""
    if os.geteuid() != 0:
        pytest.skip("needs root: loop-mounts a small ext4 image")
    image, mount = tmp_path / "fs.img", tmp_path / "ext4"
    mount.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(32 * 1024 * 1024)
    made = subprocess.run(
        ["mkfs.ext4", "-q", "-F", str(image)], check=False, capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 unavailable: {made.stderr.strip()}")
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mount)], check=False, capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image: {mounted.stderr.strip()}")
    try:
        code = _run_shutdown_child(mount / "queue")
        assert code == 0
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def _run_shutdown_child(qdir: Path) -> int:
    # In a child process: after the shutdown its open descriptors are useless.
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            queue = DurableQueue(qdir)
            queue.put(items(50))
            claim = queue.claim(5)
            fd = os.open(qdir, os.O_RDONLY)
            fcntl.ioctl(fd, 0x8004587D, b"\x02\x00\x00\x00")  # EXT4_IOC_SHUTDOWN, NOLOGFLUSH
            os.close(fd)
            try:
                queue.put(items(1, "late"))
            except QueueError:
                pass
            else:
                raise AssertionError("put succeeded on a shut-down filesystem")
            for call in (
                lambda: queue.claim(5),
                lambda: queue.ack(claim, ids(claim)),  # type: ignore[arg-type]
                queue.counts,
                queue.stats,
            ):
                with contextlib.suppress(QueueError):
                    call()
            code = 0
        except OSError as exc:
            code = 5 if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP) else 4
            traceback.print_exc()
        except BaseException:
            traceback.print_exc()
            code = 4
        finally:
            os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code == 5:
        pytest.skip("EXT4_IOC_SHUTDOWN not supported by this kernel")
    return code


# --------------------------------------------------------------------------- model-based


LEASE = 10.0


def payload(user: str, error: str | None = None) -> int:
    """Bytes counted against max_bytes: the IDs only (a release's error text is not)."""
    return 32 + len("b") + len(user) + len("t")


class QueueMachine(RuleBasedStateMachine):
    """Drive a DurableQueue and an in-memory model with the documented order."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="queue-machine-")) / "queue"
        self.clock = FakeClock()
        self.queue: DurableQueue | None = None
        self.main: list[int] = []
        self.groups: list[list[Any]] = []  # [not_before_ms, seq, [ids]]
        self.leases: dict[str, tuple[Claim, list[int]]] = {}
        self.stale: list[Claim] = []
        self.dead: list[list[int]] = []
        self.user: dict[int, str] = {}
        self.attempts: dict[int, int] = {}
        self.error: dict[int, str | None] = {}
        self.seq = 0
        self.next_id = 1
        self.dropped: Counter[str] = Counter()
        self.counter = 0

    # ---------------------------------------------------------------- model helpers

    def open(self) -> DurableQueue:
        return DurableQueue(
            self.root,
            max_items=self.max_items,
            max_bytes=self.max_bytes,
            full_policy=self.policy,  # type: ignore[arg-type]
            lease_seconds=LEASE,
            clock=self.clock,
        )

    def stored_ids(self) -> list[int]:
        out = list(self.main)
        for group in self.groups:
            out += group[2]
        for _, lease_ids in self.leases.values():
            out += lease_ids
        for record in self.dead:
            out += record
        return out

    def model_bytes(self) -> int:
        return sum(payload(self.user[i], self.error[i]) for i in self.stored_ids())

    def push_group(self, ready_ms: int, group_ids: list[int]) -> None:
        self.seq += 1
        self.groups.append([ready_ms, self.seq, list(group_ids)])

    def expire(self) -> int:
        moved = 0
        for lease_id in [k for k, (c, _) in self.leases.items() if c.expires_at <= self.clock.now]:
            claim, lease_ids = self.leases.pop(lease_id)
            self.stale.append(claim)
            self.push_group(0, lease_ids)
            moved += len(lease_ids)
        return moved

    def ordered_groups(self) -> list[list[Any]]:
        return sorted(self.groups, key=lambda g: (g[0], g[1]))

    def evict(self, need_items: int, need_bytes: int) -> tuple[int, int]:
        freed = freed_bytes = 0
        while (freed < need_items or freed_bytes < need_bytes) and self.main:
            victim = self.main.pop(0)
            freed += 1
            freed_bytes += payload(self.user[victim], self.error[victim])
        for group in self.ordered_groups():
            while (freed < need_items or freed_bytes < need_bytes) and group[2]:
                victim = group[2].pop(0)
                freed += 1
                freed_bytes += payload(self.user[victim], self.error[victim])
        self.groups = [g for g in self.groups if g[2]]
        return freed, freed_bytes

    # ---------------------------------------------------------------- rules

    @initialize(
        policy=st.sampled_from(["drop_newest", "drop_oldest"]),
        max_items=st.integers(3, 25),
        max_bytes=st.sampled_from([250, 600, 10**9]),
    )
    def start(self, policy: str, max_items: int, max_bytes: int) -> None:
        self.policy, self.max_items, self.max_bytes = policy, max_items, max_bytes
        self.queue = self.open()

    @rule(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=8))
    def put(self, lengths: list[int]) -> None:
        assert self.queue is not None
        batch = []
        for length in lengths:
            self.counter += 1
            batch.append(f"{self.counter:x}".rjust(length, "u"))
        sizes = [payload(user) for user in batch]
        stored, total = len(self.stored_ids()), self.model_bytes()
        count = len(batch)
        if self.policy == "drop_newest":
            end = acc = 0
            while (
                end < count
                and end < self.max_items - stored
                and acc + sizes[end] <= self.max_bytes - total
            ):
                acc += sizes[end]
                end += 1
            start = 0
            self.dropped["queue_full"] += count - end
        else:
            start, acc = count, 0
            while (
                start > 0
                and count - start < self.max_items
                and acc + sizes[start - 1] <= self.max_bytes
            ):
                start -= 1
                acc += sizes[start]
            self.dropped["evicted_oldest"] += start
            need_items = stored + (count - start) - self.max_items
            need_bytes = total + acc - self.max_bytes
            if need_items > 0 or need_bytes > 0:
                freed, freed_bytes = self.evict(need_items, need_bytes)
                self.dropped["evicted_oldest"] += freed
                need_items -= freed
                need_bytes -= freed_bytes
            while start < count and (need_items > 0 or need_bytes > 0):
                need_items -= 1
                need_bytes -= sizes[start]
                start += 1
                self.dropped["queue_full"] += 1
            end = count
        got = self.queue.put([(Activity("b", user, "t"), float(n)) for n, user in enumerate(batch)])
        assert got == end - start
        for user in batch[start:end]:
            self.user[self.next_id] = user
            self.attempts[self.next_id] = 0
            self.error[self.next_id] = None
            self.main.append(self.next_id)
            self.next_id += 1

    @rule(size=st.integers(1, 6), flush=st.booleans())
    def claim(self, size: int, flush: bool) -> None:
        assert self.queue is not None
        self.expire()
        expected: list[int] = []
        now_ms = self.clock.now * 1000
        for group in self.ordered_groups():
            if len(expected) >= size or (not flush and group[0] > now_ms):
                break
            take = min(size - len(expected), len(group[2]))
            expected += group[2][:take]
            del group[2][:take]
        self.groups = [g for g in self.groups if g[2]]
        take = min(size - len(expected), len(self.main))
        expected += self.main[:take]
        del self.main[:take]
        claim = self.queue.claim(size, ignore_not_before=flush)
        if not expected:
            assert claim is None
            return
        assert claim is not None
        assert [e.id for e in claim.entries] == expected
        for entry in claim.entries:
            assert entry.activity.user_id == self.user[entry.id]
            assert (entry.attempts, entry.last_error) == (
                self.attempts[entry.id],
                self.error[entry.id],
            )
        assert claim.expires_at == self.clock.now + LEASE
        self.leases[claim.lease_id] = (claim, expected)

    def _pick(self, data: st.DataObject) -> tuple[str, Claim, list[int], set[int]]:
        lease_id = data.draw(st.sampled_from(list(self.leases)))
        claim, lease_ids = self.leases[lease_id]
        chosen = data.draw(st.sets(st.sampled_from([e.id for e in claim.entries] + [10**9])))
        return lease_id, claim, lease_ids, chosen

    def _take(self, lease_id: str, lease_ids: list[int], chosen: set[int]) -> list[int]:
        gone = [i for i in lease_ids if i in chosen]
        keep = [i for i in lease_ids if i not in chosen]
        if keep:
            self.leases[lease_id] = (self.leases[lease_id][0], keep)
        else:
            self.stale.append(self.leases.pop(lease_id)[0])
        return gone

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        assert self.queue is not None
        lease_id, claim, lease_ids, chosen = self._pick(data)
        self.queue.ack(claim, chosen)
        self._take(lease_id, lease_ids, chosen)

    @precondition(lambda self: self.leases)
    @rule(
        data=st.data(),
        delay=st.sampled_from([0.0, 0.0004, 0.5, 5.0, 30.0]),
        error=st.sampled_from([None, "HTTP 503", "timeout"]),
        count=st.booleans(),
    )
    def release(self, data: st.DataObject, delay: float, error: str | None, count: bool) -> None:
        assert self.queue is not None
        lease_id, claim, lease_ids, chosen = self._pick(data)
        not_before = self.clock.now + delay
        self.queue.release(claim, chosen, not_before=not_before, error=error, count_attempt=count)
        gone = self._take(lease_id, lease_ids, chosen)
        for i in gone:
            self.attempts[i] += 1 if count else 0
            if error is not None:
                self.error[i] = error
        if gone:
            self.push_group(math.ceil(not_before * 1000), gone)

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), count=st.booleans())
    def dead_letter(self, data: st.DataObject, count: bool) -> None:
        assert self.queue is not None
        lease_id, claim, lease_ids, chosen = self._pick(data)
        self.queue.dead_letter(claim, chosen, "bad", count_attempt=count)
        gone = self._take(lease_id, lease_ids, chosen)
        for i in gone:
            self.attempts[i] += 1 if count else 0
        if gone:
            self.dead.append(gone)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release_claim(self, data: st.DataObject) -> None:
        assert self.queue is not None
        lease_id = data.draw(st.sampled_from(list(self.leases)))
        claim, lease_ids = self.leases.pop(lease_id)
        self.stale.append(claim)
        self.queue.release_claim(claim)
        self.push_group(0, lease_ids)

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def ack_stale_claim(self, data: st.DataObject) -> None:
        assert self.queue is not None
        claim = data.draw(st.sampled_from(self.stale))
        self.queue.ack(claim, [e.id for e in claim.entries])  # must change nothing

    @rule()
    def requeue(self) -> None:
        assert self.queue is not None
        expected = sum(len(record) for record in self.dead)
        for record in self.dead:
            for i in record:
                self.attempts[i] = 0
            self.push_group(0, record)
        self.dead = []
        assert self.queue.requeue_dead_letters() == expected

    @rule()
    def purge(self) -> None:
        assert self.queue is not None
        expected = sum(len(record) for record in self.dead)
        self.dropped["dead_letters_purged"] += expected
        self.dead = []
        assert self.queue.purge_dead_letters() == expected

    @rule()
    def reclaim(self) -> None:
        assert self.queue is not None
        assert self.queue.reclaim() == self.expire()

    @rule()
    def reopen(self) -> None:
        assert self.queue is not None
        self.queue.close()
        self.queue = self.open()  # reclaims expired leases at open
        self.expire()

    @rule(seconds=st.sampled_from([0.001, 0.3, 2.0, 11.0, 400.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # ---------------------------------------------------------------- checks

    @invariant()
    def matches_model(self) -> None:
        if self.queue is None:
            return
        pending = len(self.main) + sum(len(g[2]) for g in self.groups)
        in_flight = sum(len(lease_ids) for _, lease_ids in self.leases.values())
        assert self.queue.counts() == (pending, in_flight)
        stats = self.queue.stats()
        assert stats.dead_lettered == sum(len(record) for record in self.dead)
        assert dict(stats.dropped) == {k: v for k, v in self.dropped.items() if v}
        stored = len(self.stored_ids())
        assert stored <= self.max_items
        assert _Meta.load(self.queue._cache).bytes == self.model_bytes() <= self.max_bytes
        ready = self.queue.next_ready_at()
        if pending == 0:
            assert ready is None
        elif self.main:
            assert ready == self.clock.now
        else:
            first = min(g[0] for g in self.groups) / 1000
            assert ready == pytest.approx(max(first, self.clock.now))

    def teardown(self) -> None:
        if self.queue is not None:
            self.queue.close()
        shutil.rmtree(self.root.parent, ignore_errors=True)


QueueMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_queue_state_machine = QueueMachine.TestCase
