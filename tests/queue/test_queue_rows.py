"""Stored formats: rows written by version 0.1 load and work; new rows stay 0.1-shaped."""

from __future__ import annotations

import json
from pathlib import Path

import diskcache
import pytest
from queue_helpers import FakeClock, ids, items

from per_buffer.queue import Claim, DurableQueue
from per_buffer.queue._rows import count_attempt, row_failures
from per_buffer.queue._storage import CACHE_SETTINGS

LEASE_A = "2e192a1be8bb445295a8f864b7331d0d"  # holds ids 4, 5
LEASE_B = "8598b231eb254d2887ba940c9847a92c"  # holds id 3

# Written by per_buffer 0.1 (commit b8d730e's queue.py): max_items=8, ten puts (two
# refused), a claim of 1..3 that released 1 (a retry group) and dead-lettered 2, and a
# claim of 4, 5. The lease owner's host is changed so that no liveness check reclaims it.
ROWS_0_1 = {
    "d-000000000000001": (
        '{"r":"invalid_parameter","t":1000.0,"e":[[2,"acme","u1","login",901.0,1,null]]}'
    ),
    f"lease:{LEASE_A}": (
        '{"o":"elsewhere:23360:1c4e7ddc","h":"elsewhere","p":23360,"s":236794,"x":1300.0,'
        '"e":[[4,"acme","u3","login",903.0,0,null],[5,"acme","u4","login",904.0,0,null]]}'
    ),
    f"lease:{LEASE_B}": (
        '{"o":"elsewhere:23360:1c4e7ddc","h":"elsewhere","p":23360,"s":236794,"x":1300.0,'
        '"e":[[3,"acme","u2","login",902.0,0,null]]}'
    ),
    "meta:counters": (
        '{"pending":4,"inflight":3,"dead":1,"bytes":344,"next_id":9,"seq":2,"dfirst":1,'
        '"dnext":2,"dropped":{"queue_full":2}}'
    ),
    "meta:leases": (
        f'{{"{LEASE_B}":[1300.0,"elsewhere",23360,236794,900.0],'
        f'"{LEASE_A}":[1300.0,"elsewhere",23360,236794,903.0]}}'
    ),
    "q-000000000000001": (
        '[[6,"acme","u5","login",905.0,0,null],[7,"acme","u6","login",906.0,0,null],'
        '[8,"acme","u7","login",907.0,0,null]]'
    ),
    "r-000000002000000-000000000000001": '[[1,"acme","u0","login",900.0,1,"HTTP 503"]]',
}


def write_0_1(qdir: Path) -> None:
    """A queue directory as version 0.1 left it."""
    gen = qdir / "db-0001"
    gen.mkdir(parents=True, mode=0o700)
    with diskcache.Cache(str(gen), **CACHE_SETTINGS) as cache:
        for key, value in ROWS_0_1.items():
            cache.set(key, value)


def stored(qdir: Path, key: str) -> object:
    with diskcache.Cache(str(qdir / "db-0001"), **CACHE_SETTINGS) as cache:
        return json.loads(cache.get(key))


def test_a_0_1_directory_opens_with_its_counters(qdir: Path) -> None:
    write_0_1(qdir)
    clock = FakeClock(1000.0)
    with DurableQueue(qdir, clock=clock, max_items=8) as queue:
        assert queue.counts() == (4, 3)
        stats = queue.stats()
        assert (stats.dead_lettered, dict(stats.dropped)) == (1, {"queue_full": 2})
        assert (stats.delivered, stats.coalesced, stats.dead_lettered_total) == (0, 0, 1)
        assert stats.failure_seq == 8 and queue.failures_since(8) == (8, [])
        (letter,) = queue.dead_letters()
        assert (letter.entry.attempts, letter.entry.failures) == (1, 1)


def test_0_1_retry_groups_leases_and_rows_work(qdir: Path) -> None:
    write_0_1(qdir)
    clock = FakeClock(1000.0)
    with DurableQueue(qdir, clock=clock, max_items=8) as queue:
        # a 0.1 retry key has no smallest id and a 0.1 lease index entry neither: read
        assert not queue.settled_through(1)
        assert queue.settled_through(0)
        lease_a = Claim(LEASE_A, (), 1300.0)
        assert queue.ack(lease_a, [4, 5]) == 2
        assert not queue.settled_through(3)  # 3 is still in lease B
        assert queue.release_claim(Claim(LEASE_B, (), 1300.0)) == 1
        clock.advance(1000.1)  # the 0.1 retry group is due
        got = queue.claim(10)
        assert ids(got) == [3, 1, 6, 7, 8]
        first = got.entries[1]  # type: ignore[union-attr]
        assert (first.attempts, first.failures, first.last_error) == (1, 1, "HTTP 503")
        queue.release(got, [1], not_before=0, error="timeout")  # type: ignore[arg-type]
        queue.ack(got, [3, 6, 7, 8])  # type: ignore[arg-type]
        again = queue.claim(1)
        assert (again.entries[0].attempts, again.entries[0].failures) == (1, 2)  # type: ignore[union-attr]
        assert queue.failures_since(8) == (9, [("acme", "u0", "login")])
        assert queue.put(items(1)).first_id == 9


def test_rows_keep_the_0_1_shape_until_the_counts_differ(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(2))
        assert stored(qdir, "q-000000000000001") == [
            [1, "billing", "u0", "api_call", 1000.0, 0, None],
            [2, "billing", "u1", "api_call", 1001.0, 0, None],
        ]
        claim = queue.claim(2)
        queue.release(claim, [1], not_before=0, refused=True)  # type: ignore[arg-type]
        queue.release(claim, [2], not_before=0)  # type: ignore[arg-type]
    with diskcache.Cache(str(qdir / "db-0001"), **CACHE_SETTINGS) as cache:
        keys = sorted(key for key in cache.iterkeys() if key.startswith("r-"))
        rows = [json.loads(cache.get(key))[0] for key in keys]
    assert [len(key) for key in keys] == [49, 49]  # not_before, sequence, smallest id
    assert [int(key[34:]) for key in keys] == [1, 2]
    assert rows[0][5:] == [1, None]  # refused and failed: 7 fields, failures == attempts
    assert rows[1][5:] == [0, None, 1]  # failed only: the 8th field


def test_count_attempt_on_rows() -> None:
    row = [1, "b", "u", "t", 1.0, 0, None]
    count_attempt(row, refused=False, failed=True)
    assert row[5:] == [0, None, 1] and row_failures(row) == 1
    count_attempt(row, refused=True, failed=False)
    assert row[5:] == [1, None] and row_failures(row) == 1  # equal again: 7 fields
    count_attempt(row, refused=True, failed=True)
    assert row[5:] == [2, None]
    count_attempt(row, refused=False, failed=True)
    assert row[5:] == [2, None, 3]
    count_attempt(row, refused=False, failed=False)
    assert row[5:] == [2, None, 3]


def test_a_producers_coalescing_travels_with_its_entries(qdir: Path) -> None:
    """put(coalescing=) is stored as a 9th field and survives retries, dead letters and
    salvage, so whoever delivers judges each entry under its recorder's rule."""
    with DurableQueue(qdir) as queue:
        queue.put(items(2), coalescing=(2.0, 0.25))
        queue.put(items(1, prefix="plain"))
        assert stored(qdir, "q-000000000000001")[0] == [
            1, "billing", "u0", "api_call", 1000.0, 0, None, 0, [2.0, 0.25]
        ]  # fmt: skip
        claim = queue.claim(3)
        assert claim is not None
        assert [entry.coalescing for entry in claim.entries] == [(2.0, 0.25), (2.0, 0.25), None]
        queue.release(claim, [1], not_before=0, refused=True, failed=True)
        queue.dead_letter(claim, [2], "refused")
        queue.ack(claim, [3])
        again = queue.claim(3)
        assert again is not None and [e.coalescing for e in again.entries] == [(2.0, 0.25)]
        assert again.entries[0].attempts == 1 and again.entries[0].failures == 1
        assert [letter.entry.coalescing for letter in queue.dead_letters()] == [(2.0, 0.25)]
        queue.release_claim(again)
        restored = queue.restore([again.entries[0]])
        assert restored.stored == 1


def test_a_requeued_dead_letter_keeps_its_coalescing(qdir: Path) -> None:
    """Regression: requeueing cut the row after its 7th field, so an entry of a recorder
    with coalescing off could be acknowledged without a request under another's rule."""
    with DurableQueue(qdir) as queue:
        queue.put(items(1), coalescing=(0.0, 30.0))
        claim = queue.claim(1)
        assert claim is not None
        queue.dead_letter(claim, [claim.entries[0].id], "refused")
        assert queue.requeue_dead_letters() == 1
        again = queue.claim(1)
        assert again is not None
        entry = again.entries[0]
        assert entry.coalescing == (0.0, 30.0)
        assert entry.attempts == 0 and entry.failures == 0


def test_count_attempt_keeps_the_coalescing_field() -> None:
    row = [1, "b", "u", "t", 1.0, 0, None, 0, [900.0, 30.0]]
    count_attempt(row, refused=True, failed=True)
    assert row[5:] == [1, None, 1, [900.0, 30.0]]
    count_attempt(row, refused=False, failed=True)
    assert row[5:] == [1, None, 2, [900.0, 30.0]]


def test_a_bad_coalescing_is_refused_at_put(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        for bad in ((-1.0, 0.0), (1.0, float("nan")), (float("inf"), 0.0)):
            with pytest.raises(ValueError, match="coalescing"):
                queue.put(items(1), coalescing=bad)
        assert queue.counts() == (0, 0)
