"""A model-based proof that coalescing never hides a user from an aligned report.

The promise (``per_buffer.coalesce``): for every window aligned to a recorder's
``coalesce_window`` on Per's clock, every user that sending every call would have
counted there from an activity recorded there is counted there.

``tests/coalesce_model.py`` simulates recorders, the delivery worker and Per, with
requests in flight for a while (Per stamps a request some time after it is sent and
answers later still, possibly after the stamp crossed a window boundary), an outcome
for every request (ok, 503, 429 with a Retry-After, ok:false dead-lettered at the
second refusal, a timeout Per may or may not have counted), worker stalls, disk
refusals and faults, restarts, quarantines, sync and batched recorders, several
recorders with different (window, margin), 0 included, feeding one worker (in a
recorder's process, which then hears the acknowledgements, or in a drainer), and a
host clock ``skew`` off Per's (|skew| <= every coalescing recorder's margin).

The same schedule runs twice: with the real :class:`~per_buffer.coalesce.Coalescer`
and :class:`~per_buffer.coalesce.DeliveredKeys` and the worker's rider rule, and as
the reference, with coalescing off (every call enqueued, every entry sent on a
request of its own: no riders, nothing covered). Then, for every recorder and every
window X of its length (for a recorder that does not coalesce: of every length in the
schedule) on Per's clock:

* hidden: every user the reference counts in X from a call of that recorder recorded
  in X (by Per's clock) is counted in X with coalescing;
* invented: every user counted in X with coalescing is counted in X by the reference,
  unless the coalescing run sent that very attempt earlier than the reference did.

Pairing the outcomes (the assumption). Every request the coalescing run sends gets
the fate drawn for its copy's attempt; a copy that exists in both runs meets, at each
attempt, the same answer in both runs: its own request's, or the answer of the
request that answered for it in the coalescing run (one it rode on, or, for a call
suppressed while an unsent copy of its key stood for it, that copy's request), *if it
was recorded by the time that request was sent*. The assumption is that a call
recorded by the time a request for its key is sent, whose own request would be in
flight at the same moment, meets the same answer (the same outage, rate limit,
refusal or network fault), with the same delays counted from its own sending. A
call recorded after that request was sent, and every call the coalescing run never
sent (suppressed by an acknowledgement, covered), gets an independent fate of its
own: Per may have stamped the other copy before it was recorded, and that copy may
fail where its own request would not.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from per_buffer.coalesce import Coalescer, DeliveredKeys, _Window
from tests.coalesce_model import (
    GRID,
    TIMEOUT,
    Entry,
    Fate,
    Policy,
    RecorderSpec,
    Request,
    Schedule,
    problems,
    simulate,
)

USERS = ("u0", "u1", "u2")

EXPLORED = {
    "examples": 0,
    "simulated seconds": 0.0,
    "calls": 0,
    "requests (reference)": 0,
    "requests (coalescing)": 0,
    "suppressed at record": 0,
    "covered by the worker": 0,
    "riders": 0,
    "timely reference counts checked": 0,
}


def grid(low: float, high: float) -> st.SearchStrategy[float]:
    """Multiples of 1/16 s between ``low`` and ``high``."""
    return st.integers(round(low / GRID), round(high / GRID)).map(lambda n: n * GRID)


@st.composite
def fates(draw: st.DrawFn) -> Fate:
    outcome = draw(st.sampled_from(("ok", "ok", "503", "503", "429", "ok_false", "timeout")))
    stamp = draw(grid(0, 2))
    if outcome == "timeout":
        return Fate("timeout", min(stamp, TIMEOUT), TIMEOUT, recorded=draw(st.booleans()))
    answer = stamp + draw(grid(0, 2))
    return Fate(outcome, stamp, answer, retry_after=draw(grid(0.25, 3)))


recorder_specs = st.builds(
    RecorderSpec,
    window=st.sampled_from((2.0, 2.0, 4.0, 8.0, 0.0)),
    margin=st.sampled_from((0.0, 0.25, 0.5, 1.0)),
    sync=st.sampled_from((False, False, False, True)),
    memory=st.sampled_from((1000, 1000, 2)),
    commit_every=st.sampled_from((GRID, 0.25, 0.5, 1.0, 1.0)),
)


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    recorders = draw(st.lists(recorder_specs, min_size=1, max_size=3))
    bound = min((spec.margin for spec in recorders if spec.window > 0), default=1.0)
    skew = draw(st.one_of(st.sampled_from((-bound, bound)), grid(-bound, bound)))
    users = USERS[: draw(st.sampled_from((1, 1, 2, 3)))]
    # bursts: mostly short gaps between calls, so that repeats meet copies in memory,
    # on disk and in flight
    steps = st.tuples(
        st.one_of(grid(0, 0.25), grid(0, 0.5), grid(0, 3)),
        st.integers(0, len(recorders) - 1),
        st.sampled_from(users),
    )
    at = draw(grid(0, 2))
    calls = []
    for gap, index, user in draw(st.lists(steps, min_size=2, max_size=30)):
        at += gap
        calls.append((at, index, user))
    horizon = at + 1
    interval = st.tuples(grid(0, horizon), grid(GRID, 1.5))
    return Schedule(
        recorders=recorders,
        calls=calls,
        fates=[draw(st.lists(fates(), min_size=1, max_size=3)) for _ in calls],
        skew=skew,
        thread_mode=draw(st.booleans()),
        drainer=draw(st.sampled_from(((0.0, 0.0), (8.0, 0.0), (4.0, 1.0)))),
        stalls=[(start, start + length) for start, length in draw(st.lists(interval, max_size=3))],
        disk=[
            (start, start + length, kind)
            for start, length, kind in draw(
                st.lists(
                    st.tuples(grid(0, horizon), grid(GRID, 1), st.sampled_from(("full", "fault"))),
                    max_size=2,
                )
            )
        ],
        restarts=draw(
            st.lists(st.tuples(grid(0, horizon), st.integers(-1, len(recorders) - 1)), max_size=1)
        ),
        quarantines=draw(st.lists(grid(0, horizon), max_size=1)),
    )


def found(schedule: Schedule, policy: Policy | None = None) -> list[str]:
    """Every problem the comparison finds in ``schedule`` under ``policy``."""
    coalesced, reference = simulate(schedule, policy)
    return problems(schedule, coalesced, reference)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(schedules())
def check_the_rule(schedule: Schedule) -> None:
    coalesced, reference = simulate(schedule)
    assert problems(schedule, coalesced, reference) == []
    EXPLORED["examples"] += 1
    EXPLORED["simulated seconds"] += max((at for at, _, _ in schedule.calls), default=0.0)
    EXPLORED["calls"] += len(schedule.calls)
    EXPLORED["requests (reference)"] += reference.requests
    EXPLORED["requests (coalescing)"] += coalesced.requests
    EXPLORED["suppressed at record"] += coalesced.suppressed
    EXPLORED["covered by the worker"] += coalesced.covered
    EXPLORED["riders"] += coalesced.rides
    EXPLORED["timely reference counts checked"] += len(reference.stamps)
    event(f"requests saved: {'some' if reference.requests > coalesced.requests else 'none'}")


def test_coalescing_hides_no_user_and_invents_none(request: pytest.FixtureRequest) -> None:
    check_the_rule()
    assert EXPLORED["examples"] >= 300
    for name in ("suppressed at record", "covered by the worker", "riders"):
        assert EXPLORED[name] > 0, f"the model never exercised: {name}"
    reporter: Any = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        figures = ", ".join(f"{name} {value:g}" for name, value in EXPLORED.items())
        reporter.write_line(f"\ncoalescing model explored: {figures}")


# ---------------------------------------------------------------------- mutants
# Each breaks one part of the rule; the comparison must catch every one, which shows
# that it can fail and that the schedules reach the case.


class _KeepsTakenCopies(Coalescer):
    """0.1's rule: a copy on disk or in flight keeps suppressing repeats."""

    def take(self) -> dict[Any, float]:
        stood, self._stood = self._stood, {}
        return stood


class _UnstampedCopies(Coalescer):
    """A taken copy keeps the time of its own call, not of the latest it stood for."""

    def take(self) -> dict[Any, float]:
        super().take()
        return {}


class _EndOnlyWindow(_Window):
    def move(self, now: float) -> None:
        super().move(now)
        self.safe_start = self.start


class _EndOnlyMargin(Coalescer):
    """The margin guards the end of a window only."""

    def __init__(self, window: float, margin: float) -> None:
        super().__init__(window, margin)
        self._w = _EndOnlyWindow(window, margin)


class _EndOnlyDelivered(DeliveredKeys):
    def covered(self, key: Any, now: float, window: float, margin: float) -> bool:
        if window <= 0.0 or key not in self._sent:
            return False
        start = (now // window) * window
        return start <= self._sent[key] < start + window and now < start + window - margin


class _Mutant(Policy):
    def __init__(self, coalescer: type[Coalescer] = Coalescer) -> None:
        self._type = coalescer

    def coalescer(self, spec: RecorderSpec) -> Coalescer:
        return self._type(spec.window, spec.margin)


class _NoMargin(_Mutant):
    def coalescer(self, spec: RecorderSpec) -> Coalescer:
        return Coalescer(spec.window, 0.0)

    def judging(self, entry: Entry, drainer: tuple[float, float]) -> tuple[float, float]:
        return (entry.coalescing[0], 0.0)


class _EndOnly(_Mutant):
    def delivered(self) -> DeliveredKeys:
        return _EndOnlyDelivered()


class _DrainerWindow(_Mutant):
    """The worker judges every entry under its own (window, margin), not the entry's."""

    def judging(self, entry: Entry, drainer: tuple[float, float]) -> tuple[float, float]:
        return drainer


class _AnyRide(_Mutant):
    """A queued entry rides on any request of its key in flight."""

    def rides(self, entry: Entry, request: Request) -> bool:
        return True


def _ok() -> list[Fate]:
    return [Fate("ok", 0.0, 0.0)]


def _spec(margin: float = 0.0, commit_every: float = GRID) -> RecorderSpec:
    return RecorderSpec(window=2.0, margin=margin, commit_every=commit_every)


# name -> (the mutant, a schedule where it hides a user and the rule does not)
MUTANTS: dict[str, tuple[Policy, Schedule]] = {
    "copies on disk suppress (0.1)": (
        _Mutant(_KeepsTakenCopies),
        Schedule(
            [_spec()],
            [(0.0, 0, "u0"), (0.0, 0, "u0"), (0.0, 0, "u1"), (GRID, 0, "u1")],
            [_ok(), _ok(), [Fate("503", 0.0, 1.6875)], _ok()],
            thread_mode=False,
        ),
    ),
    "taken copies unstamped": (  # the stand-in rode a request sent before the repeat
        _Mutant(_UnstampedCopies),
        Schedule(
            [_spec(), _spec(commit_every=0.25)],
            [(GRID, 1, "u0"), (GRID, 0, "u0"), (2 * GRID, 1, "u0")],
            [_ok(), [Fate("timeout", 0.0, TIMEOUT, recorded=False)], _ok()],
            thread_mode=False,
        ),
    ),
    "no margin": (
        _NoMargin(),
        Schedule(
            [_spec(0.25, 1.0)],
            [(1.0625, 0, "u0"), (2.25, 0, "u0")],
            [_ok(), _ok()],
            skew=-0.25,
            thread_mode=False,
        ),
    ),
    "margin at the end only": (
        _EndOnly(_EndOnlyMargin),
        Schedule([_spec(0.25)], [(0.0, 0, "u0"), (0.25, 0, "u0")], [_ok(), _ok()], skew=-0.25),
    ),
    "the drainer's window": (
        _DrainerWindow(),
        Schedule(
            [_spec()],
            [(0.0, 0, "u0")] * 5 + [(0.5, 0, "u0"), (2.0, 0, "u0")],
            [_ok()] * 7,
            thread_mode=False,
            drainer=(8.0, 0.0),
        ),
    ),
    "riders on any request": (
        _AnyRide(),
        Schedule(
            [_spec()],
            [(0.0, 0, "u0"), (GRID, 0, "u0")],
            [[Fate("429", 0.0, 2 * GRID, retry_after=1.8125)], _ok()],
            thread_mode=False,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_the_model_catches_a_broken_rule(name: str) -> None:
    """Each mutant breaks one part of the rule on a schedule found (and shrunk) by
    searching the strategy above; the rule itself holds there."""
    policy, schedule = MUTANTS[name]
    assert any(problem.startswith("hidden:") for problem in found(schedule, policy))
    assert found(schedule) == []
