"""DurableQueue operations: put, claim, ack, release, dead letters, bounds, stats, lifecycle."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import pytest
from queue_helpers import FakeClock, counters, drain, ids, items, run_helper, users

from per_buffer.errors import QueueError
from per_buffer.models import Activity
from per_buffer.queue import DurableQueue, Entry, QueueStats

# --------------------------------------------------------------------------- basics


def test_put_claim_ack_roundtrip(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        assert queue.put(items(3)).stored == 3
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
        assert queue.put([]).stored == 0
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
        leases = json.loads(queue._storage.cache.get("meta:leases"))
        owners = [json.loads(queue._storage.cache.get("lease:" + lid))["o"] for lid in leases]
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
        # a plain failure drives the backoff (failures) but is no refusal by Per (attempts)
        assert [(e.attempts, e.failures, e.last_error) for e in retried.entries] == [  # type: ignore[union-attr]
            (0, 1, "HTTP 503")
        ] * 2


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


def test_release_counts_refusals_and_failures_apart(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        queue.put(items(1))
        claim = queue.claim(1)
        assert queue.release(claim, [1], not_before=0, error="timeout") == 1  # type: ignore[arg-type]
        claim = queue.claim(1)
        queue.release(claim, [1], not_before=0, refused=True, error="invalid_parameter")  # type: ignore[arg-type]
        claim = queue.claim(1)
        queue.release(claim, [1], not_before=0, failed=False)  # type: ignore[arg-type]  # a hold
        entry = queue.claim(1).entries[0]  # type: ignore[union-attr]
        assert (entry.attempts, entry.failures, entry.last_error) == (1, 2, "invalid_parameter")


def test_count_attempt_is_a_deprecated_alias(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        queue.put(items(1))
        claim = queue.claim(1)
        with pytest.deprecated_call():
            queue.release(claim, [1], not_before=0, count_attempt=True)  # type: ignore[arg-type]
        claim = queue.claim(1)
        with pytest.deprecated_call():
            queue.release(claim, [1], not_before=0, count_attempt=False)  # type: ignore[arg-type]
        claim = queue.claim(1)
        entry = claim.entries[0]  # type: ignore[union-attr]
        assert (entry.attempts, entry.failures) == (1, 1)
        with pytest.deprecated_call():
            queue.dead_letter(claim, [1], "bad", count_attempt=False)  # type: ignore[arg-type]
        (letter,) = queue.dead_letters()
        assert (letter.entry.attempts, letter.entry.failures) == (1, 1)


def test_moves_return_what_they_moved(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock, lease_seconds=10) as queue:
        queue.put(items(6))
        claim = queue.claim(6)
        assert claim is not None
        assert queue.ack(claim, [1, 2, 99]) == 2  # 99 was never in it
        assert queue.ack(claim, [1]) == 0  # already gone
        assert queue.release(claim, [3], not_before=0) == 1
        assert queue.dead_letter(claim, [4, 3], "bad") == 1  # 3 is no longer held
        assert queue.release_claim(claim) == 2  # 5, 6
        assert queue.release_claim(claim) == 0
        again = queue.claim(10)
        assert sorted(ids(again)) == [3, 5, 6]
        clock.advance(11)  # the lease expires and another claim takes its entries
        other = queue.claim(10)
        assert sorted(ids(other)) == [3, 5, 6]
        assert queue.ack(again, ids(again)) == 0  # type: ignore[arg-type]
        assert queue.release(again, ids(again), not_before=0) == 0  # type: ignore[arg-type]
        assert queue.dead_letter(again, ids(again), "x") == 0  # type: ignore[arg-type]
        assert queue.release_claim(again) == 0  # type: ignore[arg-type]
        assert queue.counts() == (0, 3)


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
        queue.release(claim, [1], not_before=0, refused=True)
        again = queue.claim(1)
        queue.dead_letter(again, [1], "invalid_parameter")  # type: ignore[arg-type]
        queue.dead_letter(claim, [3, 2], "x" * 5000)
        letters = queue.dead_letters()
        assert [d.entry.id for d in letters] == [1, 2, 3]
        assert letters[0].reason == "invalid_parameter" and letters[0].dead_at == clock.now
        assert [d.entry.attempts for d in letters] == [2, 1, 1]  # the last attempt counts
        assert [d.entry.failures for d in letters] == [2, 1, 1]
        assert len(letters[1].reason) == 1000
        assert [d.entry.id for d in queue.dead_letters(limit=2)] == [1, 2]
        stats = queue.stats()
        assert (stats.pending, stats.in_flight, stats.dead_lettered) == (0, 3, 3)

        assert queue.requeue_dead_letters() == 3
        assert queue.dead_letters() == []
        back = queue.claim(10)
        assert ids(back) == [1, 2, 3]  # ahead of nothing else pending; counts reset
        assert all((e.attempts, e.failures) == (0, 0) for e in back.entries)  # type: ignore[union-attr]
        queue.dead_letter(back, ids(back), "again")  # type: ignore[arg-type]
        assert queue.purge_dead_letters() == 3
        stats = queue.stats()
        assert stats.dead_lettered == 0 and stats.dropped == {"dead_letters_purged": 3}
        assert stats.dead_lettered_total == 6


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
        assert queue.put(items(7, "a")).stored == 7
        assert queue.put(items(5, "b")).stored == 3
        claim = queue.claim(2)
        assert queue.put(items(1, "c")).stored == 0  # leased entries still count
        queue.ack(claim, ids(claim))  # type: ignore[arg-type]
        assert queue.put(items(5, "d")).stored == 2
        assert queue.stats().dropped == {"queue_full": 2 + 1 + 3}
        got = [e.activity.user_id for e in drain(queue)]
        assert got == [f"a{i}" for i in range(2, 7)] + ["b0", "b1", "b2", "d0", "d1"]


def test_bounds_drop_oldest(qdir: Path) -> None:
    with DurableQueue(qdir, max_items=10, full_policy="drop_oldest") as queue:
        assert queue.put(items(8, "a")).stored == 8
        assert queue.put(items(5, "b")).stored == 5  # evicts a0..a2
        assert queue.stats().dropped == {"evicted_oldest": 3}
        leased = queue.claim(4)
        assert users(leased) == ["a3", "a4", "a5", "a6"]
        # 12 new: c0, c1 can never fit (10 max); the 6 pending (a7, b0..b4) are evicted;
        # the 4 leased ones are never evicted, so the oldest 4 left (c2..c5) are refused.
        result = queue.put(items(12, "c"))
        assert (result.stored, result.first_id, result.last_id) == (6, 14, 19)
        assert result.refused == {"queue_full": 2 + 4}  # this batch's items: counted once
        assert queue.counts() == (6, 4)
        # evicted_oldest counts only older stored entries (issue 10: no double count)
        assert queue.stats().dropped == {"evicted_oldest": 3 + 6, "queue_full": 2 + 4}
        assert [e.activity.user_id for e in drain(queue)] == [f"c{i}" for i in range(6, 12)]
        queue.ack(leased, ids(leased))  # type: ignore[arg-type]


def test_drop_oldest_evicts_waiting_retries_after_the_main_queue(
    qdir: Path, clock: FakeClock
) -> None:
    with DurableQueue(qdir, max_items=4, full_policy="drop_oldest", clock=clock) as queue:
        queue.put(items(4, "a"))
        claim = queue.claim(2)
        queue.release(claim, ids(claim), not_before=clock.now + 100)  # type: ignore[arg-type]
        assert queue.put(items(3, "b")).stored == 3  # evicts a2, a3, then a0 (retry space)
        assert queue.stats().dropped == {"evicted_oldest": 3}
        assert [e.activity.user_id for e in drain(queue)] == ["a1", "b0", "b1", "b2"]


def test_drop_oldest_refuses_when_only_leased_entries_remain(qdir: Path) -> None:
    with DurableQueue(qdir, max_items=4, full_policy="drop_oldest") as queue:
        queue.put(items(4, "a"))
        claim = queue.claim(4)
        assert queue.put(items(2, "b")).stored == 0
        assert queue.stats().dropped == {"queue_full": 2}
        queue.ack(claim, ids(claim))  # type: ignore[arg-type]
        assert queue.put(items(2, "b")).stored == 2


def test_bounds_max_bytes(qdir: Path) -> None:
    size = 32 + len("billing") + len("u0") + len("api_call")  # payload bytes per entry
    with DurableQueue(qdir, max_bytes=size * 5) as queue:
        assert queue.put(items(8)).stored == 5
        meta = counters(queue)
        assert meta.bytes == size * 5
        claim = queue.claim(5)
        queue.release(claim, [1], not_before=0, error="e" * 10)  # type: ignore[arg-type]
        # the error text is stored but not counted: a release can never exceed max_bytes
        assert counters(queue).bytes == size * 5
        assert queue.claim(1).entries[0].last_error == "e" * 10  # type: ignore[union-attr]
        queue.ack(claim, [2, 3, 4, 5])  # type: ignore[arg-type]
        assert counters(queue).bytes == size
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
        cache = queue._storage.cache
        assert cache.eviction_policy == "none"
        assert cache.cull_limit == 0
        assert cache.size_limit >= 2**60
        assert cache.disk_min_file_size >= 4 * 1024 * 1024


# --------------------------------------------------------------------------- stats


def test_stats(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        empty = queue.stats()
        assert empty == QueueStats(
            0, 0, 0, None, empty.bytes_on_disk, {}, 0, generation=1, failure_seq=0
        )
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
    assert queue.put(items(200, "z")).stored == 90  # 10 stored before, 110 refused
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
        assert again.put(items(1, "new")).stored == 1
        got = drain(again)  # waiting retries first (flush), then the main queue in order
        assert [e.id for e in got] == [3, 4, *range(6, 101), 101]
        assert got[-1].activity.user_id == "new0"
        assert [(e.failures, e.last_error) for e in got[:3]] == [(1, "e"), (1, "e"), (0, None)]


# --------------------------------------------------------------------------- put results


def test_put_result_ids_are_contiguous_and_refusals_counted_once(qdir: Path) -> None:
    with DurableQueue(qdir, max_items=5) as queue:
        first = queue.put(items(3, "a"))
        assert (first.stored, first.first_id, first.last_id, dict(first.refused)) == (3, 1, 3, {})
        second = queue.put(items(4, "b"))
        assert (second.stored, second.first_id, second.last_id) == (2, 4, 5)
        assert second.refused == {"queue_full": 2}
        assert second.failure_seq == first.failure_seq + 1  # the refused keys were logged
        none = queue.put(items(2, "c"))
        assert (none.stored, none.first_id, none.last_id) == (0, None, None)
        assert queue.stats().dropped == {"queue_full": 4}
        empty = queue.put([])
        assert (empty.stored, empty.refused, empty.failure_seq) == (0, {}, none.failure_seq)
        got = drain(queue)
        assert [e.id for e in got] == [1, 2, 3, 4, 5]
        assert [e.activity.user_id for e in got][3:] == ["b0", "b1"]


def test_drop_oldest_counts_evictions_apart_from_refusals(qdir: Path) -> None:
    """Issue 10: two activities lost must count two, not four."""
    with DurableQueue(qdir, max_items=3, full_policy="drop_oldest") as queue:
        queue.put(items(3, "a"))
        result = queue.put(items(2, "b"))
        assert (result.stored, dict(result.refused)) == (2, {})
        assert queue.stats().dropped == {"evicted_oldest": 2}
        assert sum(queue.stats().dropped.values()) == 2


# --------------------------------------------------------------------------- totals


def test_delivered_coalesced_and_dead_lettered_totals_persist(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(10))
        claim = queue.claim(10)
        assert queue.ack(claim, [1, 2, 3]) == 3  # type: ignore[arg-type]
        assert queue.ack(claim, [4, 5], coalesced=True) == 2  # type: ignore[arg-type]
        queue.dead_letter(claim, [6, 7], "bad")  # type: ignore[arg-type]
        queue.requeue_dead_letters()
        again = queue.claim(10, ignore_not_before=True)
        queue.dead_letter(again, [6], "bad")  # type: ignore[arg-type]
    with DurableQueue(qdir) as queue:
        stats = queue.stats()
        assert (stats.delivered, stats.coalesced, stats.dead_lettered_total) == (5, 2, 3)
        # our own live lease survives the reopen
        assert (stats.pending, stats.in_flight, stats.dead_lettered) == (0, 4, 1)


# --------------------------------------------------------------------------- max_delay


def test_a_retry_stored_a_day_ahead_is_ready_after_a_restart_with_max_delay(
    qdir: Path, clock: FakeClock
) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        queue.put(items(3))
        claim = queue.claim(2)
        queue.release(claim, ids(claim), not_before=clock.now + 86400, error="Retry-After")  # type: ignore[arg-type]
        queue.release_claim(queue.claim(1))  # type: ignore[arg-type]  # ready at once
    with DurableQueue(qdir, clock=clock) as uncapped:
        assert ids(uncapped.claim(10)) == [3]
        assert uncapped.claim(10) is None  # stranded for a day
        assert uncapped.next_ready_at() == pytest.approx(clock.now + 86400)
    clock.advance(301)  # the lease on 3 expires
    with DurableQueue(qdir, clock=clock, max_delay=300) as queue:
        assert queue.next_ready_at() == clock.now
        got = queue.claim(10)
        # the expired lease comes back at not_before 0, then the capped group
        assert ids(got) == [3, 1, 2]
        assert [e.failures for e in got.entries] == [0, 1, 1]  # type: ignore[union-attr]


def test_max_delay_leaves_near_retries_alone_and_survives_a_clock_stepped_back(
    qdir: Path, clock: FakeClock
) -> None:
    with DurableQueue(qdir, clock=clock, max_delay=60) as queue:
        queue.put(items(2))
        claim = queue.claim(2)
        queue.release(claim, [1], not_before=clock.now + 30)  # type: ignore[arg-type]
        queue.release(claim, [2], not_before=clock.now + 50)  # type: ignore[arg-type]
        assert queue.claim(10) is None
        assert queue.next_ready_at() == pytest.approx(clock.now + 30)
        clock.advance(-3600)  # NTP or a VM restore steps the clock an hour back
        assert queue.next_ready_at() == clock.now
        assert ids(queue.claim(10)) == [2, 1]  # both far: the back group is capped first
    with pytest.raises(ValueError, match="max_delay"):
        DurableQueue(qdir, max_delay=0)


# --------------------------------------------------------------------------- settled_through


def test_settled_through_main_queue_leases_and_retries(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        first = queue.put(items(4, "a")).last_id
        assert first == 4
        second = queue.put(items(600, "b")).last_id  # more than one chunk
        assert queue.settled_through(0)
        assert not queue.settled_through(first)
        early = queue.claim(3)  # 1..3 leased, 4 pending
        assert not queue.settled_through(3)
        queue.ack(early, [1, 2])  # type: ignore[arg-type]
        assert queue.settled_through(2)
        assert not queue.settled_through(3)  # 3 is still leased
        queue.release(early, [3], not_before=clock.now + 99)  # type: ignore[arg-type]
        rest = queue.claim(1)  # 4
        queue.ack(rest, ids(rest))  # type: ignore[arg-type]
        assert not queue.settled_through(first)  # 3 waits in a retry group
        assert queue.settled_through(2)
        retry = queue.claim(1, ignore_not_before=True)
        queue.dead_letter(retry, ids(retry), "bad")  # type: ignore[arg-type]
        assert queue.settled_through(first)  # dead letters are settled
        assert not queue.settled_through(first + 1)
        assert not queue.settled_through(second)  # type: ignore[arg-type]
        drain(queue)
        assert queue.settled_through(second)  # type: ignore[arg-type]
        assert queue.settled_through(10**15)


def test_settled_through_reads_a_partly_acked_lease(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(5))
        claim = queue.claim(5)
        queue.ack(claim, [1, 2])  # type: ignore[arg-type]
        # the lease index still says its smallest id is 1: the lease row is read
        assert queue.settled_through(2)
        assert not queue.settled_through(3)


def test_settled_through_counts_refused_and_evicted_as_settled(qdir: Path) -> None:
    with DurableQueue(qdir, max_items=2, full_policy="drop_oldest") as queue:
        queue.put(items(2, "a"))
        result = queue.put(items(2, "b"))  # evicts a0, a1
        assert queue.settled_through(2)
        assert not queue.settled_through(result.last_id)  # type: ignore[arg-type]


def test_settled_through_stays_cheap_with_many_retry_groups(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        queue.put(items(600))
        claim = queue.claim(600)
        assert claim is not None
        for n, entry in enumerate(claim.entries):
            queue.release(claim, [entry.id], not_before=clock.now + 10 + n)
        assert len(claim.entries) == 600
        start = time.perf_counter()
        assert not queue.settled_through(600)  # found in the key of the last group
        assert queue.settled_through(0)  # every group's key read, no row decoded
        assert time.perf_counter() - start < 0.2


# --------------------------------------------------------------------------- failure log


def test_failure_log_records_every_way_a_copy_can_fail(qdir: Path, clock: FakeClock) -> None:
    key = ("billing", "u{}", "api_call")
    with DurableQueue(qdir, clock=clock, max_items=6, full_policy="drop_oldest") as queue:
        seq = queue.failure_seq()
        queue.put(items(6))
        claim = queue.claim(3)
        queue.release(claim, [1], not_before=0, failed=False)  # type: ignore[arg-type]  # a hold
        assert queue.failure_seq() == seq
        queue.release(claim, [2], not_before=0, error="HTTP 503")  # type: ignore[arg-type]
        queue.dead_letter(claim, [3], "bad")  # type: ignore[arg-type]
        result = queue.put(items(2, "new"))  # evicts the oldest of the main queue
        assert result.failure_seq == seq + 3
        current, keys = queue.failures_since(seq)
        assert current == seq + 3
        # u1 failed, u2 was dead-lettered, u3 and u4 (ids 4, 5) were evicted
        assert keys == [(key[0], f"u{n}", key[2]) for n in (1, 2, 3, 4)]
        assert queue.failures_since(current) == (current, [])
        assert queue.failures_since(seq + 2) == (current, keys[2:])


def test_failure_log_is_shared_between_processes_and_deduplicated(qdir: Path) -> None:
    with DurableQueue(qdir) as writer, DurableQueue(qdir) as reader:
        seq = reader.failure_seq()
        writer.put([(Activity("b", "same", "t"), 1.0)] * 3)
        claim = writer.claim(3)
        writer.release(claim, ids(claim), not_before=0)  # type: ignore[arg-type]
        assert reader.failure_seq() == seq + 1
        assert reader.failures_since(seq) == (seq + 1, [("b", "same", "t")])


def test_failure_log_trimming_makes_the_caller_forget(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(1))
        start = queue.failure_seq()
        for _ in range(2001):
            claim = queue.claim(1, ignore_not_before=True)
            queue.release(claim, ids(claim), not_before=0)  # type: ignore[arg-type]
        current, keys = queue.failures_since(start)
        assert current == start + 2001 and keys is None  # the first event was trimmed
        assert queue.failures_since(start + 1)[1] == [("billing", "u0", "api_call")]
        assert queue.failures_since(current + 5) == (current, None)  # not one of ours


def test_failure_log_forgets_everything_for_a_huge_event(qdir: Path) -> None:
    with DurableQueue(qdir, max_items=1) as queue:
        queue.put(items(1))
        seq = queue.failure_seq()
        result = queue.put(items(10_001, "x"))  # every one refused, more than a row holds
        assert result.refused == {"queue_full": 10_001}
        assert queue.failures_since(seq) == (seq + 1, None)


def test_failure_seq_of_a_replaced_database_means_forget_everything(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(2))
        claim = queue.claim(2)
        queue.release(claim, [1], not_before=0)  # type: ignore[arg-type]
        old = queue.failure_seq()
        before = queue.generation
        queue._storage.quarantine("simulated damage")
        assert queue.put(items(1)).first_id == 10**12 + 1
        assert queue.generation == before + 1
        current, keys = queue.failures_since(old)
        assert keys is None and current == 10**12


# --------------------------------------------------------------------------- delivery state


def test_delivery_state_round_trip_between_objects(qdir: Path) -> None:
    state = {"pause_reason": "rate_limited", "paused_until": 1.7e9, "pid": os.getpid()}
    with DurableQueue(qdir) as worker, DurableQueue(qdir) as status:
        assert status.delivery_state() is None
        worker.set_delivery_state(state)
        assert status.delivery_state() == state
        assert status.stats().delivery_state == state
        worker.set_delivery_state({"pause_reason": None})
        assert status.delivery_state() == {"pause_reason": None}
        with pytest.raises(TypeError):
            worker.set_delivery_state({"when": object()})
        with pytest.raises(TypeError):
            worker.set_delivery_state({1: "x"})  # type: ignore[dict-item]
        with pytest.raises(ValueError):
            worker.set_delivery_state({"ratio": math.nan})
        with pytest.raises(ValueError):
            worker.set_delivery_state({"big": "x" * 70_000})
        assert status.delivery_state() == {"pause_reason": None}
        start = time.perf_counter()
        for n in range(50):
            worker.set_delivery_state({"n": n})
        assert (time.perf_counter() - start) / 50 < 0.01


def test_max_delay_is_a_sharp_bound(qdir: Path, clock: FakeClock) -> None:
    with DurableQueue(qdir, clock=clock, max_delay=60) as queue:
        queue.put(items(2))
        claim = queue.claim(2)
        queue.release(claim, [1], not_before=clock.now + 59.9)  # type: ignore[arg-type]
        queue.release(claim, [2], not_before=clock.now + 60.1)  # type: ignore[arg-type]
        assert ids(queue.claim(10)) == [2]
        assert queue.claim(10) is None
        assert queue.next_ready_at() == pytest.approx(clock.now + 59.9)
