"""A discrete-event model of recording and delivery, to check the coalescing rule.

It drives the real :class:`per_buffer.coalesce.Coalescer` (one per recorder process)
and the real :class:`per_buffer.coalesce.DeliveredKeys` (the worker's) through the
calls the recorder and the delivery worker make, against a model of Per that stamps
each request with its own clock. ``tests/test_coalesce_model.py`` explains what is
compared; this module only simulates.

Time is local seconds on a 1/16 s grid (exact in binary floating point); Per's
clock is ``local + skew``. The pieces mirror the real ones:

* recorder (``per_buffer.recorder``): ``record()`` asks ``admit``; a batched recorder
  keeps admitted copies in a memory batch (at most ``memory`` copies, held batches
  included: beyond it the copy is dropped and ``failed`` called) which a committer
  writes at every multiple of ``commit_every`` (a grid shared by both runs, so that
  suppression never moves a commit); a sync recorder writes each copy at once. Each
  write takes the batch (``take``: its copies stop suppressing repeats, and each is
  stored with the time of the latest call it stood for). A write the disk refuses
  (``full``) drops the batch (``failed`` for each key); a storage fault (``fault``)
  holds it in memory until the next commit (``held``: a batched recorder's copies
  stand for repeats again). A quarantine is noticed (``forget``) at the next write.
* worker (``per_buffer.delivery._worker``): claims every ready entry (not leased,
  ``not_before`` reached) in id order and judges each at once (``_pump``): covered
  by ``DeliveredKeys.covered`` under the entry's own (window, margin) -> acknowledged
  without a request; a request of its key in flight (the latest one) sent at or after
  the entry was recorded -> it rides on that request; otherwise it is sent on a
  request of its own (``_send``). An answer (``_done``) acknowledges or fails the
  request's entry and its riders: ok -> ``DeliveredKeys.note`` and, in thread mode,
  the host recorder's ``Coalescer.acknowledged``; a failure -> the host's ``failed``
  and a release with a backoff (``429``: its Retry-After; ``ok_false``: dead-lettered
  at the ``MAX_REFUSALS``-th refusal). The worker's loop may stall (a busy host): a
  stalled loop neither sends nor reads answers until the stall ends. A restart of
  the worker abandons its requests in flight (Per may still stamp them) and its
  claims, which come back after ``LEASE`` seconds, and forgets ``DeliveredKeys``.
* Per: a request's :class:`Fate` says whether it is counted, when Per stamps it and
  when its answer reaches the worker.

Concurrency is not bounded (every judged entry is sent at once); stalls delay
sends instead. A bound shared by the two runs would compare schedules rather than
rules: with one channel, taking one request away can make another copy's retry jump
the queue and delay a third copy (a list-scheduling anomaly), which no coalescing
rule can prevent and which says nothing about it.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from per_buffer.coalesce import Coalescer, DeliveredKeys

GRID = 1 / 16
LEASE = 1.0
MAX_REFUSALS = 2
TIMEOUT = 3.0

OUTCOMES = ("ok", "503", "429", "ok_false", "timeout")


def backoff(failures: int) -> float:
    """The model's retry delay after ``failures`` failed attempts (no jitter)."""
    return min(0.25 * 2 ** (failures - 1), 2.0)


@dataclass(frozen=True)
class Fate:
    """Per's answer to one request.

    ``stamp``: seconds from sending to Per's stamp (when Per counts it);
    ``answer``: seconds from sending to the answer reaching the worker (>= stamp);
    ``recorded``: for a timeout, whether Per counted it all the same.
    """

    outcome: str = "ok"
    stamp: float = GRID
    answer: float = 2 * GRID
    recorded: bool = True
    retry_after: float = 1.0

    @property
    def counted(self) -> bool:
        return self.outcome == "ok" or (self.outcome == "timeout" and self.recorded)


QUICK = Fate()  # every attempt beyond a copy's drawn fates


@dataclass(frozen=True)
class RecorderSpec:
    """One recorder process: its coalescing settings and how it writes."""

    window: float = 10.0
    margin: float = 0.0
    sync: bool = False
    memory: int = 1000
    commit_every: float = 0.25


@dataclass
class Schedule:
    """Everything both runs share. ``calls[i]`` is ``(local time, recorder, user)``,
    sorted by time; ``fates[i]`` are the fates of copy ``i``'s attempts 1, 2, ...
    (then :data:`QUICK`)."""

    recorders: list[RecorderSpec]
    calls: list[tuple[float, int, str]]
    fates: list[list[Fate]]
    skew: float = 0.0
    thread_mode: bool = True  # the worker runs in recorder 0's process
    drainer: tuple[float, float] = (0.0, 0.0)  # the worker's own (window, margin)
    stalls: list[tuple[float, float]] = field(default_factory=list)  # [start, end)
    disk: list[tuple[float, float, str]] = field(default_factory=list)  # "full" | "fault"
    restarts: list[tuple[float, int]] = field(default_factory=list)  # -1: the drainer
    quarantines: list[float] = field(default_factory=list)

    def fate(self, copy: int, attempt: int) -> Fate:
        fates = self.fates[copy]
        return fates[attempt - 1] if attempt <= len(fates) else QUICK

    def stall_end(self, t: float) -> float | None:
        """When the worker's loop runs again, if it is stalled at ``t``."""
        end = None
        moved = True
        while moved:
            moved = False
            for start, stop in self.stalls:
                if start <= (t if end is None else end) < stop:
                    end, moved = stop, True
        return end

    def disk_state(self, t: float) -> str:
        for start, stop, kind in self.disk:
            if start <= t < stop:
                return kind
        return "ok"


class Policy:
    """The rules under test; the mutants in the tests override one method each."""

    waits = False  # a later entry waits for the answer in flight instead of being sent

    def coalescer(self, spec: RecorderSpec) -> Coalescer:
        return Coalescer(spec.window, spec.margin)

    def delivered(self) -> DeliveredKeys:
        return DeliveredKeys()

    def take(self, coalescer: Coalescer) -> dict[str, float]:
        """The batch leaves memory: the latest call each copy stood for."""
        return coalescer.take()  # type: ignore[return-value]

    def judging(self, entry: Entry, drainer: tuple[float, float]) -> tuple[float, float]:
        return entry.coalescing

    def rides(self, entry: Entry, request: Request) -> bool:
        return entry.recorded_at <= request.sent


@dataclass(eq=False)
class Entry:
    id: int
    copy: int
    user: str
    recorded_at: float
    coalescing: tuple[float, float]
    written_at: float
    not_before: float = 0.0
    leased: bool = False
    refusals: int = 0
    failures: int = 0
    attempts: int = 0  # requests sent for it or ridden (indexes its fates)


@dataclass(eq=False)
class Request:
    entry: Entry
    sent: float
    fate: Fate
    epoch: int
    riders: list[Entry] = field(default_factory=list)


@dataclass(frozen=True)
class Stamp:
    """Per counted ``user`` at ``per`` (its clock) from ``copy``'s ``attempt``-th request."""

    user: str
    per: float
    copy: int
    attempt: int
    sent: float


@dataclass
class Result:
    stamps: list[Stamp] = field(default_factory=list)
    sent_at: dict[tuple[int, int], float] = field(default_factory=dict)
    # the requests that answered for each copy that reached the queue, in order
    answered_by: dict[int, list[Request]] = field(default_factory=dict)
    # a call suppressed while an unsent copy of its key stood for it (None: an ack)
    stand_in: dict[int, int | None] = field(default_factory=dict)
    requests: int = 0
    suppressed: int = 0
    covered: int = 0
    rides: int = 0


class _Recorder:
    def __init__(self, spec: RecorderSpec, coalescer: Coalescer) -> None:
        self.spec = spec
        self.coalescer = coalescer
        self.buffer: list[tuple[int, str, float]] = []
        self.held: list[tuple[int, str, float]] = []
        self.unsent: dict[str, int] = {}  # user -> its latest admitted copy in memory
        self.commit_at: float | None = None
        self.quarantined = False


_CONTROL, _ANSWER, _CALL, _COMMIT, _RUN = range(5)  # order of events at the same instant


class Simulation:
    """One run of a schedule. ``coalesce=False`` is the reference: every call is
    enqueued, every entry sent on a request of its own (no riders, nothing covered).
    ``fate(copy, attempt)`` gives each request's fate."""

    def __init__(
        self,
        schedule: Schedule,
        policy: Policy,
        *,
        coalesce: bool,
        fate: Callable[[int, int], Fate],
    ) -> None:
        self.s = schedule
        self.policy = policy
        self.coalesce = coalesce
        self.fate = fate
        self.result = Result()
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._queue: dict[int, Entry] = {}  # insertion order is id order
        self._next_id = 1
        self._ready: deque[Entry] = deque()
        self._flying: dict[str, Request] = {}
        self._waiting: dict[str, list[Entry]] = {}
        self._delivered = policy.delivered()
        self._epoch = 0
        self._runs: set[float] = set()
        self._recorders = [_Recorder(spec, self._coalescer(spec)) for spec in schedule.recorders]

    def _coalescer(self, spec: RecorderSpec) -> Coalescer:
        return self.policy.coalescer(spec) if self.coalesce else Coalescer(0)

    # ------------------------------------------------------------------ events

    def _push(self, at: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, kind, self._seq, payload))

    def run(self) -> Result:
        for index, (at, _, _) in enumerate(self.s.calls):
            self._push(at, _CALL, index)
        for at, who in self.s.restarts:
            self._push(at, _CONTROL, ("restart", who))
        for at in self.s.quarantines:
            self._push(at, _CONTROL, ("quarantine", 0))
        handled = 0
        while self._events:
            handled += 1
            assert handled < 100_000, "the model does not settle"
            at, kind, _, payload = heapq.heappop(self._events)
            if kind == _CALL:
                assert isinstance(payload, int)
                self._call(at, payload)
            elif kind == _COMMIT:
                assert isinstance(payload, _Recorder)
                self._commit(at, payload)
            elif kind == _RUN:
                self._runs.discard(at)
                self._pump(at)
            elif kind == _ANSWER:
                assert isinstance(payload, Request)
                self._answer(at, payload)
            else:
                assert isinstance(payload, tuple)
                self._control(at, *payload)
        return self.result

    def _control(self, at: float, what: str, who: int) -> None:
        if what == "quarantine":  # the queue is lost; requests in flight still answer
            self._queue.clear()
            self._ready.clear()
            self._waiting.clear()
            for recorder in self._recorders:
                recorder.quarantined = True
            return
        if who >= 0:  # the recorder's process restarts: its memory is lost
            recorder = self._recorders[who]
            recorder.buffer.clear()
            recorder.held.clear()
            recorder.unsent.clear()
            recorder.coalescer = self._coalescer(recorder.spec)
        if who == -1 or (who == 0 and self.s.thread_mode):
            self._restart_worker(at)

    # ------------------------------------------------------------------ recorder

    def _call(self, at: float, copy: int) -> None:
        _, index, user = self.s.calls[copy]
        recorder = self._recorders[index]
        spec = recorder.spec
        if not recorder.coalescer.admit(user, at, batched=not spec.sync):
            self.result.suppressed += 1
            self.result.stand_in[copy] = recorder.unsent.get(user)
            return
        item = (copy, user, at)
        if spec.sync:  # written before record() returns (after any batch the disk held)
            batch, recorder.held = [*recorder.held, item], []
            self._write(recorder, batch, at)
            return
        if len(recorder.buffer) + len(recorder.held) >= spec.memory:
            recorder.coalescer.failed(user)  # dropped: memory full
            return
        recorder.buffer.append(item)
        recorder.unsent[user] = copy
        if recorder.commit_at is None:
            every = spec.commit_every
            recorder.commit_at = math.ceil(at / every) * every
            self._push(recorder.commit_at, _COMMIT, recorder)

    def _commit(self, at: float, recorder: _Recorder) -> None:
        recorder.commit_at = None
        batch = recorder.held + recorder.buffer
        recorder.held, recorder.buffer = [], []
        if batch:
            self._write(recorder, batch, at)

    def _write(self, recorder: _Recorder, batch: list[tuple[int, str, float]], at: float) -> None:
        spec = recorder.spec
        stood = self.policy.take(recorder.coalescer)
        batch = [(copy, user, max(t, stood.get(user, t))) for copy, user, t in batch]
        for copy, user, _ in batch:
            if recorder.unsent.get(user) == copy:
                del recorder.unsent[user]
        state = self.s.disk_state(at)
        if state == "fault":  # held in memory, written at the next commit
            recorder.held = batch
            if not spec.sync:  # a sync repeat writes again instead
                recorder.coalescer.held([user for _, user, _ in batch])
                for copy, user, _ in batch:
                    recorder.unsent[user] = copy
            if recorder.commit_at is None:
                recorder.commit_at = at + spec.commit_every
                self._push(recorder.commit_at, _COMMIT, recorder)
            return
        if state == "full":
            for _, user, _ in batch:
                recorder.coalescer.failed(user)
            return
        for copy, user, recorded_at in batch:
            coalescing = (spec.window, spec.margin)
            entry = Entry(self._next_id, copy, user, recorded_at, coalescing, at)
            self._next_id += 1
            self._queue[entry.id] = entry
            self.result.answered_by[copy] = []
        if recorder.quarantined:
            recorder.quarantined = False
            recorder.coalescer.forget()
        self._schedule_run(at)

    # ------------------------------------------------------------------ worker

    def _schedule_run(self, at: float) -> None:
        if at not in self._runs:
            self._runs.add(at)
            self._push(at, _RUN, None)

    def _pump(self, now: float) -> None:
        stall = self.s.stall_end(now)
        if stall is not None:
            self._schedule_run(stall)
            return
        for entry in self._queue.values():
            if not entry.leased and entry.not_before <= now:
                entry.leased = True
                self._ready.append(entry)
        while self._ready:
            self._judge(self._ready.popleft(), now)

    def _judge(self, entry: Entry, now: float) -> None:
        if self._queue.get(entry.id) is not entry:
            return  # lost to a quarantine
        if self.coalesce:
            window, margin = self.policy.judging(entry, self.s.drainer)
            if self._delivered.covered(entry.user, now, window, margin):
                self.result.covered += 1
                del self._queue[entry.id]
                return
            request = self._flying.get(entry.user)
            if request is not None:
                if self.policy.rides(entry, request):
                    self.result.rides += 1
                    entry.attempts += 1
                    request.riders.append(entry)
                    self.result.answered_by[entry.copy].append(request)
                    return
                if self.policy.waits:
                    self._waiting.setdefault(entry.user, []).append(entry)
                    return
        self._send(entry, now)

    def _send(self, entry: Entry, now: float) -> None:
        entry.attempts += 1
        fate = self.fate(entry.copy, entry.attempts)
        request = Request(entry, now, fate, self._epoch)
        self.result.requests += 1
        self.result.sent_at[(entry.copy, entry.attempts)] = now
        self.result.answered_by[entry.copy].append(request)
        if fate.counted:
            per = now + fate.stamp + self.s.skew
            self.result.stamps.append(Stamp(entry.user, per, entry.copy, entry.attempts, now))
        if self.coalesce:
            self._flying[entry.user] = request
        self._push(now + fate.answer, _ANSWER, request)

    def _answer(self, at: float, request: Request) -> None:
        stall = self.s.stall_end(at)
        if stall is not None:
            self._push(stall, _ANSWER, request)
            return
        if request.epoch != self._epoch:
            return  # abandoned by a restart: its entries come back after their lease
        user = request.entry.user
        if self._flying.get(user) is request:
            del self._flying[user]
        waiting = self._waiting.pop(user, None)
        if waiting:
            self._ready.extendleft(reversed(waiting))
        host = self._recorders[0].coalescer if self.s.thread_mode else None
        items = [request.entry, *request.riders]
        if request.fate.outcome == "ok":
            self._delivered.note(user, request.sent)
            if host is not None:
                host.acknowledged(user, request.sent)
            for item in items:
                if self._queue.get(item.id) is item:
                    del self._queue[item.id]
        else:
            if host is not None:
                host.failed(user)
            for item in items:
                self._failed(item, at, request.fate)
        self._pump(at)

    def _failed(self, entry: Entry, at: float, fate: Fate) -> None:
        if self._queue.get(entry.id) is not entry:
            return
        entry.leased = False
        entry.failures += 1
        if fate.outcome == "ok_false":
            entry.refusals += 1
            if entry.refusals >= MAX_REFUSALS:
                del self._queue[entry.id]  # dead-lettered
                return
        delay = fate.retry_after if fate.outcome == "429" else backoff(entry.failures)
        entry.not_before = at + delay
        self._schedule_run(entry.not_before)

    def _restart_worker(self, at: float) -> None:
        self._epoch += 1
        self._ready.clear()
        self._flying.clear()
        self._waiting.clear()
        self._delivered = self.policy.delivered()
        for entry in self._queue.values():
            if entry.leased:
                entry.leased = False
                entry.not_before = max(entry.not_before, at + LEASE)
        self._schedule_run(at + LEASE)


def simulate(schedule: Schedule, policy: Policy | None = None) -> tuple[Result, Result]:
    """Run ``schedule`` with coalescing, then the reference; return both results.

    The reference's fates follow :func:`reference_fate` (see the test module)."""
    policy = policy or Policy()
    coalesced = Simulation(schedule, policy, coalesce=True, fate=schedule.fate).run()
    reference = Simulation(
        schedule, Policy(), coalesce=False, fate=reference_fate(schedule, coalesced)
    ).run()
    return coalesced, reference


def reference_fate(schedule: Schedule, coalesced: Result) -> Callable[[int, int], Fate]:
    """The fate of copy ``c``'s ``n``-th request in the reference.

    It is the fate of the request that answered for ``c``'s ``n``-th attempt in the
    coalescing run (its own, one it rode on, or, for a call suppressed while an unsent
    copy stood for it, that copy's ``n``-th) if ``c`` was recorded by the time that
    request was sent; otherwise ``c``'s own drawn fate, independent of every other.
    """

    def fate(copy: int, attempt: int) -> Fate:
        requests = coalesced.answered_by.get(copy)
        if requests is None:
            stand_in = coalesced.stand_in.get(copy)
            requests = [] if stand_in is None else coalesced.answered_by.get(stand_in, [])
        if attempt <= len(requests):
            request = requests[attempt - 1]
            if schedule.calls[copy][0] <= request.sent:
                return request.fate
        return schedule.fate(copy, attempt)

    return fate


def counted(stamps: list[Stamp], length: float) -> dict[int, set[str]]:
    """Users Per counts in each aligned window of ``length`` seconds of its clock."""
    windows: dict[int, set[str]] = {}
    for stamp in stamps:
        windows.setdefault(math.floor(stamp.per / length), set()).add(stamp.user)
    return windows


def lengths(schedule: Schedule) -> list[tuple[float, ...]]:
    """The window lengths each recorder's promise is checked in: its own; every
    length in the schedule (and 2 s) for a recorder that does not coalesce."""
    positive = {spec.window for spec in schedule.recorders if spec.window > 0}
    every = tuple(sorted(positive | {2.0}))
    return [(spec.window,) if spec.window > 0 else every for spec in schedule.recorders]


def problems(schedule: Schedule, coalesced: Result, reference: Result) -> list[str]:
    """Where coalescing hid a user from a window, or counted one the reference did not."""
    per_recorder = lengths(schedule)
    every = sorted({length for group in per_recorder for length in group})
    with_c = {length: counted(coalesced.stamps, length) for length in every}
    without = {length: counted(reference.stamps, length) for length in every}
    found: list[str] = []
    for stamp in reference.stamps:
        at, index, user = schedule.calls[stamp.copy]
        for length in per_recorder[index]:
            window = math.floor(stamp.per / length)
            if math.floor((at + schedule.skew) / length) != window:
                continue  # a late delivery: no promise
            if user not in with_c[length].get(window, ()):
                found.append(
                    f"hidden: {user} in window {window} of {length:g} s (Per "
                    f"[{window * length:g}, {(window + 1) * length:g})): call {stamp.copy} "
                    f"at local {at:g} (recorder {index}), reference stamp {stamp.per:g}"
                )
    for stamp in coalesced.stamps:
        sent = reference.sent_at.get((stamp.copy, stamp.attempt))
        if sent is None or sent > stamp.sent:
            continue  # coalescing sent this very attempt earlier (or the reference lost it)
        for length in every:
            window = math.floor(stamp.per / length)
            if stamp.user not in without[length].get(window, ()):
                found.append(
                    f"invented: {stamp.user} in window {window} of {length:g} s from call "
                    f"{stamp.copy}'s attempt {stamp.attempt}, stamped {stamp.per:g}"
                )
    return sorted(set(found))
