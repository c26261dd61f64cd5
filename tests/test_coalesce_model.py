"""A model-based proof that coalescing never hides a user from an aligned report.

Simulated time in ticks. Each tick: ``record()`` calls of a few users; the committer
writes the memory batch (or every call, in sync mode) to a model queue, unless the
schedule says the queue refuses it (full) this tick; the worker attempts every ready
entry, unless the schedule says it is starved this tick; Per answers each attempt as
the fault schedule says for (tick, user): ok, 503, 429 (with a Retry-After), ok:false
(dead-lettered at the second refusal) or a timeout (Per may or may not have recorded
it); failed entries wait for a backoff. A quarantine loses everything queued; a
restart loses the recorder's memory. Per stamps each accepted copy with its own
clock, ``skew`` seconds off the host's (|skew| <= coalesce_margin).

The same schedule runs twice: with the real :class:`per_buffer.coalesce.Coalescer`
and with coalescing off (every call enqueued). For every aligned window X of Per's
clock:

* every user the coalescing run counts in X is counted in X without coalescing
  (coalescing invents nothing), and
* every user counted in X without coalescing from a copy that arrived in the window
  its ``record()`` call fell in (by Per's clock) is counted in X with coalescing
  (coalescing hides nothing that was delivered on time).

A copy that arrives late (an outage across a boundary) is counted in a later window
with or without coalescing; the uncoalesced run may count it there from several
late copies, which is the documented caveat of Per's arrival timestamps, not a loss.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from per_buffer.coalesce import Coalescer

USERS = ("u0", "u1", "u2", "u3")
OUTCOMES = ("ok", "ok", "ok", "ok", "503", "429", "ok_false", "timeout")


@dataclass
class Copy:
    user: str
    recorded_at: float
    failures: int = 0
    refusals: int = 0
    ready_at: float = 0.0


@dataclass
class Schedule:
    ticks: int
    window: int
    margin: float
    skew: float
    sync: bool
    records: list[list[str]]  # per tick, users recording (in order)
    outcome: dict[tuple[int, str], str]  # (tick, user) -> answer; "ok" when absent
    timeout_recorded: dict[tuple[int, str], bool]
    retry_after: dict[tuple[int, str], int]
    full: set[int]  # ticks where the queue refuses writes
    starved: set[int]  # ticks where the worker does not run
    quarantine: set[int]
    restart: set[int]


@dataclass
class Run:
    counted: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    timely: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    requests: int = 0


def per_window(local: float, schedule: Schedule) -> int:
    return math.floor((local + schedule.skew) / schedule.window)


def run(schedule: Schedule, coalesce: bool, factory: type[Coalescer] = Coalescer) -> Run:
    window = schedule.window if coalesce else 0
    coalescer = factory(window, schedule.margin)
    result = Run()
    queue: list[Copy] = []
    for tick in range(schedule.ticks):
        if tick in schedule.restart:
            coalescer = factory(window, schedule.margin)
        if tick in schedule.quarantine:
            queue.clear()
            coalescer.forget()
        batch: list[Copy] = []
        for index, user in enumerate(schedule.records[tick]):
            at = tick + 0.01 * (index + 1)  # calls within a tick, in order
            if not coalescer.admit(user, at, batched=not schedule.sync):
                continue
            copy = Copy(user, at, ready_at=at)
            if schedule.sync:  # written before record() returns
                if tick in schedule.full:
                    coalescer.failed(user)
                else:
                    queue.append(copy)
                    coalescer.committed([user], at)
            else:
                batch.append(copy)
        commit_at = tick + 0.25
        if batch:
            if tick in schedule.full:
                for copy in batch:
                    coalescer.failed(copy.user)
            else:
                queue.extend(batch)
                coalescer.committed([c.user for c in batch], commit_at)
        if tick in schedule.starved:
            continue
        sent_at = tick + 0.5
        waiting: list[Copy] = []
        for copy in queue:
            if copy.ready_at > sent_at:
                waiting.append(copy)
                continue
            result.requests += 1
            answer = schedule.outcome.get((tick, copy.user), "ok")
            recorded = answer == "ok" or (
                answer == "timeout" and schedule.timeout_recorded.get((tick, copy.user), False)
            )
            if recorded:
                stamp_window = per_window(sent_at, schedule)
                result.counted[stamp_window].add(copy.user)
                if stamp_window == per_window(copy.recorded_at, schedule):
                    result.timely[stamp_window].add(copy.user)
            if answer == "ok":
                coalescer.acknowledged(copy.user, sent_at)
                continue
            coalescer.failed(copy.user)
            copy.failures += 1
            if answer == "ok_false":
                copy.refusals += 1
                if copy.refusals >= 2:
                    continue  # dead-lettered
            delay = schedule.retry_after.get((tick, copy.user), 1) if answer == "429" else 0
            copy.ready_at = sent_at + max(delay, 2 ** min(copy.failures, 4) - 1)
            waiting.append(copy)
        queue = waiting
    return result


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    ticks = draw(st.integers(20, 90))
    window = draw(st.sampled_from([6, 10, 20]))
    margin = draw(st.sampled_from([0.0, 1.0, 2.0]))
    skew = draw(st.floats(-margin, margin)) if margin else 0.0
    sync = draw(st.booleans())
    active = st.lists(st.sampled_from(USERS), max_size=4)
    records = [draw(active) for _ in range(ticks)]
    cells = st.tuples(st.integers(0, ticks - 1), st.sampled_from(USERS))
    outcome = draw(st.dictionaries(cells, st.sampled_from(OUTCOMES), max_size=ticks))
    timeout_recorded = draw(st.dictionaries(cells, st.booleans(), max_size=ticks // 2))
    retry_after = draw(st.dictionaries(cells, st.integers(1, 8), max_size=ticks // 3))
    tick_sets = st.sets(st.integers(0, ticks - 1), max_size=max(1, ticks // 8))
    return Schedule(
        ticks,
        window,
        margin,
        skew,
        sync,
        records,
        outcome,
        timeout_recorded,
        retry_after,
        draw(tick_sets),
        draw(tick_sets),
        draw(st.sets(st.integers(0, ticks - 1), max_size=2)),
        draw(st.sets(st.integers(0, ticks - 1), max_size=2)),
    )


EXPLORED = {"examples": 0, "ticks": 0, "calls": 0, "suppressed": 0}


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules())
def test_coalescing_hides_no_user_and_invents_none(schedule: Schedule) -> None:
    with_coalescing = run(schedule, coalesce=True)
    without = run(schedule, coalesce=False)
    windows = set(with_coalescing.counted) | set(without.counted)
    for x in windows:
        assert with_coalescing.counted[x] <= without.counted[x], f"invented in window {x}"
        assert without.timely[x] <= with_coalescing.counted[x], f"hidden in window {x}"
    calls = sum(len(users) for users in schedule.records)
    EXPLORED["examples"] += 1
    EXPLORED["ticks"] += schedule.ticks
    EXPLORED["calls"] += calls
    EXPLORED["suppressed"] += without.requests - with_coalescing.requests
    event(f"requests saved: {'some' if without.requests > with_coalescing.requests else 'none'}")


def quiet(ticks: int, records: list[list[str]], **changes: object) -> Schedule:
    schedule = Schedule(
        ticks=ticks,
        window=10,
        margin=0.0,
        skew=0.0,
        sync=False,
        records=records,
        outcome={},
        timeout_recorded={},
        retry_after={},
        full=set(),
        starved=set(),
        quarantine=set(),
        restart=set(),
    )
    for name, value in changes.items():
        setattr(schedule, name, value)
    return schedule


def test_the_model_catches_a_coalescer_that_trusts_record() -> None:
    """The 0.1 rule (a key counts as sent once record() accepted it) fails the model."""

    class Trusting(Coalescer):
        def failed(self, key: object) -> None:  # never forgets a failed copy
            return

    # u0 is active through window 0; its first copy gets a 429 asking for 10 s
    schedule = quiet(
        20,
        [["u0"]] * 10 + [[]] * 10,
        outcome={(0, "u0"): "429"},
        retry_after={(0, "u0"): 10},
    )
    without = run(schedule, coalesce=False)
    assert "u0" in without.timely[0]
    assert "u0" in run(schedule, coalesce=True).counted[0]
    assert "u0" not in run(schedule, coalesce=True, factory=Trusting).counted[0]


def test_the_model_catches_a_missing_margin() -> None:
    """With the host's clock 1.5 s behind Per and no margin, a window is hidden."""
    schedule = quiet(25, [["u0"]] * 10 + [[]] * 15, skew=1.5)
    without = run(schedule, coalesce=False)
    assert "u0" in without.timely[1]  # the call at local 9.01 is Per's 10.51
    assert "u0" not in run(schedule, coalesce=True).counted[1]  # hidden without a margin
    schedule.margin = 2.0
    assert "u0" in run(schedule, coalesce=True).counted[1]


def test_the_model_catches_a_lost_copy_that_is_not_forgotten() -> None:
    """A full queue drops the first copy; the next repeat must be enqueued."""
    schedule = quiet(10, [["u0"]] * 10, full={0})

    class Stubborn(Coalescer):
        def failed(self, key: object) -> None:
            return

    assert "u0" in run(schedule, coalesce=True).counted[0]
    assert "u0" not in run(schedule, coalesce=True, factory=Stubborn).counted[0]


def test_the_model_catches_a_margin_at_the_end_only() -> None:
    """With the host's clock ahead of Per, the start of a window needs its margin too."""

    class EndMarginOnly(Coalescer):
        def admit(self, key: object, now: float, *, batched: bool = True) -> bool:
            admitted = super().admit(key, now, batched=batched)
            self._w.safe_start = self._w.start  # no margin after the window starts
            return admitted

    # host 1.5 s ahead: the copy sent at local 10.5 is Per's 9.0 (window 0); the calls at
    # local 12.01 and 13.01 are Per's window 1
    schedule = quiet(20, [[]] * 10 + [["u0"]] * 4 + [[]] * 6, skew=-1.5, margin=2.0)
    without = run(schedule, coalesce=False)
    assert "u0" in without.timely[1]
    assert "u0" in run(schedule, coalesce=True).counted[1]
    assert "u0" not in run(schedule, coalesce=True, factory=EndMarginOnly).counted[1]
