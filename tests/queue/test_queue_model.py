"""A model-based (hypothesis state machine) test of DurableQueue against an in-memory model.

The model keeps the documented order (retry groups by not_before then sequence, then the
main queue), the bounds and their drop accounting, both attempt counters, the totals,
the failure log, ``max_delay`` and ``settled_through``; every step compares the real
queue with it.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from queue_helpers import FakeClock, counters, ids

from per_buffer.models import Activity
from per_buffer.queue import Claim, DurableQueue

LEASE = 10.0


def payload(user: str) -> int:
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
        self.failures: dict[int, int] = {}
        self.error: dict[int, str | None] = {}
        self.seq = 0
        self.next_id = 1
        self.dropped: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()
        self.events: list[list[tuple[str, str, str]]] = []  # the failure log
        self.seen_seq = 0
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
            max_delay=self.max_delay,
        )

    def stored_ids(self) -> list[int]:
        out = self.unsettled_ids()
        for record in self.dead:
            out += record
        return out

    def unsettled_ids(self) -> list[int]:
        out = list(self.main)
        for group in self.groups:
            out += group[2]
        for _, lease_ids in self.leases.values():
            out += lease_ids
        return out

    def model_bytes(self) -> int:
        return sum(payload(self.user[i]) for i in self.stored_ids())

    def key(self, entry_id: int) -> tuple[str, str, str]:
        return ("b", self.user[entry_id], "t")

    def log(self, keys: list[tuple[str, str, str]]) -> None:
        if keys:
            self.events.append(list(dict.fromkeys(keys)))

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

    def evict(self, need_items: int, need_bytes: int) -> tuple[list[int], int]:
        victims: list[int] = []
        freed_bytes = 0
        while (len(victims) < need_items or freed_bytes < need_bytes) and self.main:
            victims.append(self.main.pop(0))
            freed_bytes += payload(self.user[victims[-1]])
        for group in self.ordered_groups():
            while (len(victims) < need_items or freed_bytes < need_bytes) and group[2]:
                victims.append(group[2].pop(0))
                freed_bytes += payload(self.user[victims[-1]])
        self.groups = [g for g in self.groups if g[2]]
        return victims, freed_bytes

    def cap_far_group(self, now_ms: float) -> bool:
        """The queue's max_delay: the last group, if due too far ahead, is ready now."""
        if self.max_delay is None or not self.groups:
            return False
        last = self.ordered_groups()[-1]
        if last[0] <= now_ms + self.max_delay * 1000:
            return False
        last[0] = math.floor(now_ms)
        return True

    def admit(self, sizes: list[int]) -> tuple[int, int, list[int]]:
        stored, total, count = len(self.stored_ids()), self.model_bytes(), len(sizes)
        if self.policy == "drop_newest":
            end = acc = 0
            while (
                end < count
                and end < self.max_items - stored
                and acc + sizes[end] <= self.max_bytes - total
            ):
                acc += sizes[end]
                end += 1
            return 0, end, []
        start, acc = count, 0
        while (
            start > 0
            and count - start < self.max_items
            and acc + sizes[start - 1] <= self.max_bytes
        ):
            start -= 1
            acc += sizes[start]
        need_items = stored + (count - start) - self.max_items
        need_bytes = total + acc - self.max_bytes
        victims: list[int] = []
        if need_items > 0 or need_bytes > 0:
            victims, freed_bytes = self.evict(need_items, need_bytes)
            need_items -= len(victims)
            need_bytes -= freed_bytes
        while start < count and (need_items > 0 or need_bytes > 0):
            need_items -= 1
            need_bytes -= sizes[start]
            start += 1
        return start, count, victims

    # ---------------------------------------------------------------- rules

    @initialize(
        policy=st.sampled_from(["drop_newest", "drop_oldest"]),
        max_items=st.integers(3, 25),
        max_bytes=st.sampled_from([250, 600, 10**9]),
        max_delay=st.sampled_from([None, 20.0]),
    )
    def start(self, policy: str, max_items: int, max_bytes: int, max_delay: float | None) -> None:
        self.policy, self.max_items, self.max_bytes = policy, max_items, max_bytes
        self.max_delay = max_delay
        self.queue = self.open()
        self.seen_seq = self.queue.failure_seq()

    @rule(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=8))
    def put(self, lengths: list[int]) -> None:
        assert self.queue is not None
        batch = []
        for length in lengths:
            self.counter += 1
            batch.append(f"{self.counter:x}".rjust(length, "u"))
        start, end, victims = self.admit([payload(user) for user in batch])
        refused = len(batch) - (end - start)
        self.dropped["evicted_oldest"] += len(victims)
        self.dropped["queue_full"] += refused
        victim_keys = [self.key(i) for i in victims]
        got = self.queue.put([(Activity("b", user, "t"), float(n)) for n, user in enumerate(batch)])
        assert got.stored == end - start
        assert dict(got.refused) == ({"queue_full": refused} if refused else {})
        if got.stored:
            assert (got.first_id, got.last_id) == (self.next_id, self.next_id + got.stored - 1)
        else:
            assert (got.first_id, got.last_id) == (None, None)
        lost = batch[:start] + batch[end:]
        self.log(victim_keys + [("b", user, "t") for user in lost])
        for user in batch[start:end]:
            self.user[self.next_id] = user
            self.attempts[self.next_id] = self.failures[self.next_id] = 0
            self.error[self.next_id] = None
            self.main.append(self.next_id)
            self.next_id += 1

    @rule(size=st.integers(1, 6), flush=st.booleans())
    def claim(self, size: int, flush: bool) -> None:
        self._claim(size, flush)

    @rule(size=st.integers(1, 6), delay=st.sampled_from([15.0, 30.0, 300.0]))
    def claim_and_fail(self, size: int, delay: float) -> None:
        """A worker's usual failure: claim, then hand everything back for a later retry."""
        assert self.queue is not None
        claim = self._claim(size, False)
        if claim is None:
            return
        not_before = self.clock.now + delay
        gone = self._take(claim.lease_id, self.leases[claim.lease_id][1], set(ids(claim)))
        assert self.queue.release(claim, ids(claim), not_before=not_before) == len(gone)
        self._count(gone, False, True)
        self.push_group(math.ceil(not_before * 1000), gone)
        self.log([self.key(i) for i in gone])

    def _claim(self, size: int, flush: bool) -> Claim | None:
        assert self.queue is not None
        self.expire()
        expected: list[int] = []
        now_ms = self.clock.now * 1000
        while len(expected) < size and self.groups:
            group = self.ordered_groups()[0]
            if not flush and group[0] > now_ms:
                if self.cap_far_group(now_ms):
                    continue
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
            return None
        assert claim is not None
        assert [e.id for e in claim.entries] == expected
        for entry in claim.entries:
            assert entry.activity.user_id == self.user[entry.id]
            assert (entry.attempts, entry.failures, entry.last_error) == (
                self.attempts[entry.id],
                self.failures[entry.id],
                self.error[entry.id],
            )
        assert claim.expires_at == self.clock.now + LEASE
        self.leases[claim.lease_id] = (claim, expected)
        return claim

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

    def _count(self, gone: list[int], refused: bool, failed: bool) -> None:
        for i in gone:
            self.attempts[i] += 1 if refused else 0
            self.failures[i] += 1 if failed else 0

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), coalesced=st.booleans())
    def ack(self, data: st.DataObject, coalesced: bool) -> None:
        assert self.queue is not None
        lease_id, claim, lease_ids, chosen = self._pick(data)
        gone = self._take(lease_id, lease_ids, chosen)
        assert self.queue.ack(claim, chosen, coalesced=coalesced) == len(gone)
        self.totals["delivered"] += len(gone)
        self.totals["coalesced"] += len(gone) if coalesced else 0

    @precondition(lambda self: self.leases)
    @rule(
        data=st.data(),
        delay=st.sampled_from([0.0, 0.0004, 0.5, 5.0, 30.0, 300.0]),
        error=st.sampled_from([None, "HTTP 503", "timeout"]),
        refused=st.booleans(),
        failed=st.booleans(),
    )
    def release(
        self, data: st.DataObject, delay: float, error: str | None, refused: bool, failed: bool
    ) -> None:
        assert self.queue is not None
        lease_id, claim, lease_ids, chosen = self._pick(data)
        not_before = self.clock.now + delay
        gone = self._take(lease_id, lease_ids, chosen)
        moved = self.queue.release(
            claim, chosen, not_before=not_before, error=error, refused=refused, failed=failed
        )
        assert moved == len(gone)
        self._count(gone, refused, failed)
        for i in gone:
            if error is not None:
                self.error[i] = error
        if gone:
            self.push_group(math.ceil(not_before * 1000), gone)
            if failed:
                self.log([self.key(i) for i in gone])

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), refused=st.booleans(), failed=st.booleans())
    def dead_letter(self, data: st.DataObject, refused: bool, failed: bool) -> None:
        assert self.queue is not None
        lease_id, claim, lease_ids, chosen = self._pick(data)
        gone = self._take(lease_id, lease_ids, chosen)
        moved = self.queue.dead_letter(claim, chosen, "bad", refused=refused, failed=failed)
        assert moved == len(gone)
        self._count(gone, refused, failed)
        if gone:
            self.dead.append(gone)
            self.totals["dead"] += len(gone)
            self.log([self.key(i) for i in gone])

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release_claim(self, data: st.DataObject) -> None:
        assert self.queue is not None
        lease_id = data.draw(st.sampled_from(list(self.leases)))
        claim, lease_ids = self.leases.pop(lease_id)
        self.stale.append(claim)
        assert self.queue.release_claim(claim) == len(lease_ids)
        self.push_group(0, lease_ids)

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def ack_stale_claim(self, data: st.DataObject) -> None:
        assert self.queue is not None
        claim = data.draw(st.sampled_from(self.stale))
        assert self.queue.ack(claim, [e.id for e in claim.entries]) == 0  # changes nothing

    @rule()
    def requeue(self) -> None:
        assert self.queue is not None
        expected = sum(len(record) for record in self.dead)
        for record in self.dead:
            for i in record:
                self.attempts[i] = self.failures[i] = 0
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

    @rule(seconds=st.sampled_from([0.001, 0.3, 2.0, 11.0, 400.0, -100.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(data=st.data())
    def settled_through(self, data: st.DataObject) -> None:
        assert self.queue is not None
        last_id = data.draw(st.integers(0, self.next_id))
        expected = all(i > last_id for i in self.unsettled_ids())
        assert self.queue.settled_through(last_id) is expected

    @rule()
    def failures_since(self) -> None:
        assert self.queue is not None
        seq, keys = self.queue.failures_since(self.seen_seq)
        new = self.events[: seq - self.seen_seq]
        assert seq - self.seen_seq == len(self.events)
        assert keys == list(dict.fromkeys(key for event in new for key in event))
        self.events, self.seen_seq = [], seq

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
        assert (stats.delivered, stats.coalesced, stats.dead_lettered_total) == (
            self.totals["delivered"],
            self.totals["coalesced"],
            self.totals["dead"],
        )
        assert stats.failure_seq == self.seen_seq + len(self.events)
        stored = len(self.stored_ids())
        assert stored <= self.max_items
        assert counters(self.queue).bytes == self.model_bytes() <= self.max_bytes
        self.check_next_ready(pending)

    def check_next_ready(self, pending: int) -> None:
        assert self.queue is not None
        ready = self.queue.next_ready_at()
        now = self.clock.now
        if pending == 0:
            assert ready is None
        elif self.main:
            assert ready == now
        else:
            first = min(g[0] for g in self.groups) / 1000
            last = max(g[0] for g in self.groups) / 1000
            if self.max_delay is not None and first > now and last > now + self.max_delay:
                assert ready == now
            else:
                assert ready == max(first, now) or abs(ready - max(first, now)) < 1e-6  # type: ignore[operator]

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
