"""The delivery worker's mechanics: claim from the durable queue, send, acknowledge.

One asyncio loop (in a daemon thread of the recording process, or in the drainer
process's main thread) drives ``concurrency`` wire channels by callbacks: no task
or future per request. Every decision about *whether* and *when* to send belongs to
the policies, not to this module: :mod:`per_buffer.flow` (in-flight limit, probe
mode, pauses, learned rate), :mod:`per_buffer.outcomes` (what an answer means) and
:mod:`per_buffer.backoff` (retry delays). This module keeps the books:

* entries are *claimed* (leased, never deleted) in batches and wait in ``ready``;
* an entry whose key Per already counted in this window (under the coalescing rule)
  is acknowledged without a request (``coalesced``); entries of a key whose copy is
  in flight ride along and share its outcome;
* outcomes are written back in batches: ack (delivered), release with a not-before
  time (retry later), dead letter (Per refused it ``max_attempts`` times, or it is
  too large); entries handed back unsent (a long pause, a stop) keep their counts;
* the recorder of this process, when there is one, hears every acknowledgement and
  every failure (its coalescer forgets failed keys at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .._version import __version__
from .._wire import Answer, Channel, RequestTarget, WireError, new_event_loop, open_channel
from ..backoff import Backoff
from ..client import error_for
from ..coalesce import DeliveredKeys
from ..errors import QueueError
from ..flow import FlowController, FlowState
from ..models import Activity
from ..outcomes import (
    AUTH,
    OK,
    RATE_LIMITED,
    REFUSED_BY_PER,
    TOO_LARGE,
    Verdict,
    judge,
    judge_fault,
    redact,
)
from ..queue import Claim, DurableQueue, Entry
from ._report import DeliveryFailure, DeliveryStats, FailureLog
from ._settings import DeliverySettings

__all__ = ["DeliveryWorker", "Feedback"]

logger = logging.getLogger("per_buffer.delivery")

_USER_AGENT = f"per-buffer/{__version__}"
_RECLAIM_EVERY = 30.0
_RECLAIM_FLUSHING = 1.0
_TICK = 0.25
_STATE_EVERY = 1.0  # the flow state is published this often (at once when its mode changes)
_HAND_BACK = 5.0  # a pause longer than this gives unsent claims back to the queue
_APPLY_RETRY = 0.5
_APPLY_BUDGET = 2.0  # seconds one pass of outcome writes may wait for a locked database
_STOP_BUDGET = 1.0  # seconds a stop may wait for it (leases bring back what is unwritten)
_ENDPOINT = "activities.add"
_GROUP_PER_SECOND = 10  # releases due within the same tenth of a second share a transaction
_CLAIM = 512  # entries per claim: one stored chunk, taken whole (no partial rewrite)
_APPLY_EVERY = 0.1  # outcomes are written at most this often (a crash re-sends them: harmless)
_APPLY_AT = 256  # ... or as soon as this many wait
_LATE_WINDOW = 900.0  # the window late_deliveries is counted in when coalescing is off

_Item = tuple[Claim, Entry]


class Feedback(Protocol):
    """What the worker tells the recorder of its own process (its coalescer)."""

    def acknowledged(self, key: Activity, sent_at: float) -> None:
        """Per acknowledged a copy of ``key`` sent at ``sent_at`` (the recorder's clock)."""

    def failed(self, keys: Iterable[Activity]) -> None:
        """Copies of ``keys`` failed, or were dead-lettered: forget them."""


class _Outcomes:
    """Outcomes waiting to be written to the queue, grouped into few transactions."""

    __slots__ = ("acks", "coalesced", "dead", "holds", "releases")

    def __init__(self) -> None:
        self.acks: dict[str, tuple[Claim, list[int]]] = {}
        self.coalesced: dict[str, tuple[Claim, list[int]]] = {}
        self.releases: dict[tuple[str, bool, bool, int], tuple[Claim, list[int], float, str]] = {}
        self.dead: list[tuple[Claim, list[int], str]] = []
        self.holds: dict[str, tuple[Claim, list[int]]] = {}

    def __bool__(self) -> bool:
        return bool(self.acks or self.coalesced or self.releases or self.dead or self.holds)


class _Attempt:
    """One request in flight: its channel, its entry, when it was sent, its riders."""

    __slots__ = ("channel", "claim", "entry", "riders", "sent", "sent_clock")

    def __init__(
        self, channel: Channel, claim: Claim, entry: Entry, sent: float, sent_clock: float
    ) -> None:
        self.channel = channel
        self.claim = claim
        self.entry = entry
        self.sent = sent  # monotonic
        self.sent_clock = sent_clock  # the recorder's clock (coalescing windows)
        self.riders: list[_Item] = []  # same-key entries recorded before it was sent


def _add(groups: dict[str, tuple[Claim, list[int]]], claim: Claim, entry_id: int) -> None:
    group = groups.get(claim.lease_id)
    if group is None:
        groups[claim.lease_id] = (claim, [entry_id])
    else:
        group[1].append(entry_id)


class DeliveryWorker:
    """Drains one :class:`~per_buffer.queue.DurableQueue` to Per.

    Args:
        queue: the durable queue to drain.
        settings: the delivery settings.
        feedback: the recorder of this process, told about acknowledgements and failures.
        accelerate: use uvloop when it is installed (the ``speedups`` extra).
        idle_poll: seconds between looks at an empty queue (default: ``poll_interval``);
            a drainer process, which hears of no commit, polls faster.
    """

    def __init__(
        self,
        queue: DurableQueue,
        settings: DeliverySettings,
        *,
        feedback: Feedback | None = None,
        accelerate: bool = True,
        idle_poll: float | None = None,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.stats = DeliveryStats()
        self._feedback = feedback
        self._accelerate = accelerate
        self._idle_poll = settings.poll_interval if idle_poll is None else idle_poll
        self._clock = settings.clock
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_max)
        self._flow = FlowController(
            settings.concurrency, self._backoff, auth_interval=settings.auth_probe_interval
        )
        self._delivered = DeliveredKeys()
        self._coalescing = (settings.coalesce_window, settings.coalesce_margin)  # rows of 0.1
        self._claim_size = _CLAIM
        self._failure_log = FailureLog()
        # thread control
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._progress = threading.Condition()
        self._stopped_event = threading.Event()
        self._flushing = 0
        self._until: Callable[[], bool] | None = None  # run_until(): stop when it says so
        # loop state (only the loop's thread touches these)
        self._target: RequestTarget | None = None
        self._channels: list[Channel] = []
        self._idle: list[Channel] = []
        self._ready: deque[_Item] = deque()
        # the latest request in flight per key; its riders are in the attempt
        self._flying: dict[Activity, _Attempt] = {}
        self._claims: dict[str, tuple[Claim, set[int]]] = {}
        self._in_flight = 0
        self._out = _Outcomes()
        self._out_count = 0  # outcomes waiting to be written
        self._apply_handle: asyncio.Handle | None = None
        self._apply_soon = False
        self._apply_after = 0.0
        self._pump_handle: asyncio.TimerHandle | None = None
        self._pump_at = math.inf
        self._maybe_empty = True  # the queue may hold ready work: try a claim
        self._polled = False  # that belief comes from a timer, not from news
        self._poll_handle: asyncio.TimerHandle | None = None
        self._next_poll = 0.0
        self._last_reclaim = 0.0
        self._last_state = 0.0
        self._state_key: tuple[Any, ...] | None = None
        self._stopping = False
        self._auth_logged = False
        self._finished: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ control (any thread)

    @property
    def running(self) -> bool:
        """True while the worker's loop runs."""
        return self._started.is_set() and not self._stopped_event.is_set()

    def start(self) -> None:
        """Run the worker in a daemon thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self.run, name="per-buffer-delivery", daemon=True)
        self._thread.start()
        self._started.wait(5.0)

    def run(self) -> None:
        """Run the worker in the calling thread until :meth:`stop` (a drainer's main loop)."""
        loop = new_event_loop(accelerate=self._accelerate)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except Exception:
            logger.exception("per_buffer: the delivery worker crashed; entries stay on disk")
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._stopped_event.set()
            self._started.set()
            with self._progress:
                self._progress.notify_all()

    def run_until(self, done: Callable[[], bool], deadline: float | None) -> None:
        """Run the worker in the calling thread, in flush mode, until ``done()`` or the
        monotonic ``deadline`` (checked every quarter second): delivery from an exit
        handler, where Python 3.12 starts no new thread."""

        def over() -> bool:
            return done() or (deadline is not None and time.monotonic() >= deadline)

        self._until = over
        self._flushing += 1
        self.run()

    def wake(self) -> None:
        """New entries may be ready (the committer calls this after a write)."""
        self._call(self._on_wake)

    def begin_flush(self) -> None:
        """Flush mode: claim waiting retries at once, probe a failing Per now."""
        self._call(self._on_flush)

    def end_flush(self) -> None:
        """Leave flush mode."""
        self._call(self._on_flush_end)

    def wait_progress(self, timeout: float) -> None:
        """Block until outcomes were written to the queue, or ``timeout`` seconds."""
        with self._progress:
            self._progress.wait(timeout)

    def stop(self, timeout: float) -> bool:
        """Stop sending, give unfinished claims back and end the loop; True when it ended.

        Requests in flight are abandoned (their entries stay on disk, unchanged).
        """
        if self._loop is None or self._stopped_event.is_set():
            return True
        self._call(self._begin_stop)
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return self._stopped_event.is_set()
        thread.join(max(timeout, 0.05))
        if thread.is_alive():
            logger.warning("per_buffer: the delivery thread did not stop within %.1f s", timeout)
            return False
        return True

    def _call(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # closed in between
            loop.call_soon_threadsafe(fn)

    # ------------------------------------------------------------------ the loop

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        self._target = RequestTarget(settings.base_url, settings.token, _USER_AGENT)
        self._channels = [
            open_channel(loop, self._target, timeout=settings.timeout, proxy=settings.proxy)
            for _ in range(settings.concurrency)
        ]
        self._idle = list(self._channels)
        self._finished = loop.create_future()
        self._started.set()
        self._tick()
        try:
            await self._finished
        finally:
            for channel in self._channels:
                with contextlib.suppress(Exception):
                    await channel.aclose()

    def _on_wake(self) -> None:
        self._maybe_empty = True
        self._pump()

    def _on_flush(self) -> None:
        self._flushing += 1
        self._maybe_empty = True
        self._flow.poke(time.monotonic())
        self._last_reclaim = min(self._last_reclaim, time.monotonic() - _RECLAIM_FLUSHING)
        self._pump()

    def _on_flush_end(self) -> None:
        self._flushing = max(0, self._flushing - 1)

    def _schedule_pump(self, at: float) -> None:
        """Run :meth:`_pump` at monotonic time ``at`` (keeps only the earliest timer)."""
        if at >= self._pump_at and self._pump_handle is not None:
            return
        if self._pump_handle is not None:
            self._pump_handle.cancel()
        loop = self._loop
        assert loop is not None
        self._pump_at = at
        self._pump_handle = loop.call_at(
            loop.time() + max(0.0, at - time.monotonic()), self._on_timer
        )

    def _on_timer(self) -> None:
        self._pump_handle = None
        self._pump_at = math.inf
        self._pump()

    def _pump(self) -> None:
        """Send what the flow controller admits; claim more when running low."""
        if self._stopping:
            return
        now = time.monotonic()
        flow = self._flow
        ready = self._ready
        if flow.probing and len(ready) > 1:  # one at a time now: the rest waits in the queue
            keep = ready.popleft()
            self._hand_back(time.time())
            ready.append(keep)
        if not ready:
            self._claim(now)
        while ready and self._idle:
            wait = flow.admit(now, self._in_flight)
            if wait > 0.0:
                if wait != math.inf:
                    self._schedule_pump(now + wait)
                    if wait > _HAND_BACK:
                        self._hand_back(time.time() + wait)
                break
            claim, entry = ready.popleft()
            key = entry.activity
            clock_now = self._clock()
            window, margin = entry.coalescing or self._coalescing
            if self._delivered.covered(key, clock_now, window, margin):
                _add(self._out.coalesced, claim, entry.id)
                self._out_count += 1
                continue
            flying = self._flying.get(key)
            if flying is not None and entry.recorded_at <= flying.sent_clock:
                # It was recorded before that copy was sent: its own request would have
                # gone out with it, so that answer is its answer. One recorded later gets
                # a request of its own: Per may have stamped the copy in flight before it
                # was recorded, and that copy may fail where its own would not.
                flying.riders.append((claim, entry))
                continue
            self._send(now, clock_now, claim, entry)
            if not ready:
                self._claim(now)
        self._schedule_apply()

    def _send(self, now: float, clock_now: float, claim: Claim, entry: Entry) -> None:
        target = self._target
        assert target is not None
        channel = self._idle.pop()
        self._in_flight += 1
        self._flow.started(now)
        self.stats.attempts += 1
        activity = entry.activity
        attempt = _Attempt(channel, claim, entry, now, clock_now)
        self._flying[activity] = attempt
        channel.send(
            target.activity(activity[0], activity[1], activity[2]),
            functools.partial(self._done, attempt),
        )

    def _claim(self, now: float) -> None:
        """Claim a batch if the queue may hold ready work and the flow lets anything out."""
        if not self._maybe_empty or self._stopping:
            return
        paused = self._flow.paused_until
        if paused is not None and paused > now:
            return
        want = 1 if self._flow.probing else self._claim_size
        if len(self._ready) >= want:
            return
        if self._polled and not self._flushing:  # a timer's look: a cheap read first
            self._polled = False
            try:
                pending, _ = self.queue.counts()
            except QueueError:
                pending = 1
            if not pending:
                self._maybe_empty = False
                self._next_poll = now + self._idle_poll
                self._schedule_poll()
                return
        try:
            claim = self.queue.claim(
                want - len(self._ready),
                lease_seconds=self.settings.lease_seconds,
                ignore_not_before=self._flushing > 0,
            )
        except QueueError as exc:
            self._queue_error(exc)
            self._maybe_empty = False
            self._next_poll = now + self._idle_poll
            return
        if claim is None or not claim.entries:
            self._maybe_empty = False
            self._next_poll = now + self._poll_delay()
            self._schedule_poll()
            self._notify_progress()
            return
        self._claims[claim.lease_id] = (claim, {entry.id for entry in claim.entries})
        self._ready.extend((claim, entry) for entry in claim.entries)

    def _schedule_poll(self) -> None:
        """Look at the queue again at ``_next_poll`` (between the quarter-second ticks)."""
        loop = self._loop
        if loop is None or self._next_poll - time.monotonic() >= _TICK:
            return  # the tick comes first
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        self._poll_handle = loop.call_at(
            loop.time() + max(0.0, self._next_poll - time.monotonic()), self._on_poll
        )

    def _on_poll(self) -> None:
        self._poll_handle = None
        if not self._maybe_empty and time.monotonic() >= self._next_poll:
            self._maybe_empty = self._polled = True
            self._pump()

    def _poll_delay(self) -> float:
        """Seconds until the next look at the queue: at the next retry time, at the latest."""
        try:
            ready_at = self.queue.next_ready_at()
        except QueueError:
            return self._idle_poll
        if ready_at is None:
            return self._idle_poll
        return max(0.001, min(self._idle_poll, ready_at - time.time()))

    def _hand_back(self, not_before: float) -> None:
        """A long pause: give unsent claims back so that they wait in the queue, not here."""
        out = self._out
        self._out_count += len(self._ready)
        while self._ready:
            claim, entry = self._ready.popleft()
            key = (claim.lease_id, False, False, int(not_before * _GROUP_PER_SECOND))
            group = out.releases.get(key)
            if group is None:
                out.releases[key] = (claim, [entry.id], not_before, "")
            else:
                group[1].append(entry.id)

    # ------------------------------------------------------------------ outcomes

    def _done(self, attempt: _Attempt, answer: Answer | WireError) -> None:
        self._idle.append(attempt.channel)
        self._in_flight -= 1
        entry = attempt.entry
        key = entry.activity
        sent_clock = attempt.sent_clock
        items = [(attempt.claim, entry), *attempt.riders]
        if self._flying.get(key) is attempt:
            del self._flying[key]
        self._out_count += len(items)
        if self._stopping:
            for item_claim, item in items:
                _add(self._out.holds, item_claim, item.id)
            return
        if type(answer) is Answer:
            verdict = judge(answer.status, answer.body, answer.header)
        else:
            assert isinstance(answer, WireError)
            verdict = judge_fault(answer.kind, str(answer))
        if verdict.kind != OK:
            verdict = redact(verdict, self.settings.token)  # a server may echo it
        now = time.monotonic()
        self._flow.finished(now, attempt.sent, verdict.kind, verdict.retry_after)
        self._failure_log.outcome(verdict)
        if verdict.kind == AUTH:
            self._auth_refused(verdict)
        elif self._auth_logged and verdict.kind == OK:
            self._auth_logged = False
            logger.info("per_buffer: Per accepts the token again; delivery resumed")
        if verdict.kind == OK:
            self._delivered.note(key, sent_clock)
            if self._feedback is not None:
                self._feedback.acknowledged(key, sent_clock)
            for item_claim, item in items:
                window = (item.coalescing or self._coalescing)[0] or _LATE_WINDOW
                if int(item.recorded_at // window) != int(sent_clock // window):
                    self.stats.late_deliveries += 1
                _add(self._out.acks, item_claim, item.id)
        else:
            self.stats.failures[verdict.kind] = self.stats.failures.get(verdict.kind, 0) + 1
            self.stats.last_error = verdict.detail
            if self._feedback is not None:
                self._feedback.failed([key])
            for item_claim, item in items:
                self._failed(now, item_claim, item, verdict)
        self._pump()

    def _auth_refused(self, verdict: Verdict) -> None:
        """Log a refused token once per pause: everything waits, nothing is dead-lettered."""
        if self._auth_logged:
            return
        self._auth_logged = True
        logger.error(
            "per_buffer: Per refused the activity token (%s); delivery is paused and every "
            "activity stays on disk (a probe every %g s). Fix the token and restart.",
            verdict.detail,
            self.settings.auth_probe_interval,
        )

    def _failed(self, now: float, claim: Claim, entry: Entry, verdict: Verdict) -> None:
        kind = verdict.kind
        wall = time.time()
        refused = kind == REFUSED_BY_PER
        if kind == TOO_LARGE or (refused and entry.attempts + 1 >= self.settings.max_attempts):
            self._out.dead.append((claim, [entry.id], verdict.detail))
            if kind == TOO_LARGE:
                logger.warning("per_buffer: an activity is dead-lettered: %s", verdict.detail)
            else:
                logger.warning(
                    "per_buffer: an activity is dead-lettered after %d refusals by Per: %s",
                    entry.attempts + 1,
                    verdict.detail,
                )
            self._notify(entry, verdict, True, None)
            return
        if kind in (AUTH, RATE_LIMITED):
            paused = self._flow.paused_until
            not_before = wall + (max(0.0, paused - now) if paused is not None else 0.0)
            counted = kind == RATE_LIMITED  # a refused token is nobody's failure: no backoff
        else:
            ratio = None if refused else self._flow.failure_ratio()
            not_before = wall + self._backoff.retry_delay(entry.failures + 1, ratio)
            counted = True
        group_key = (claim.lease_id, refused, counted, int(not_before * _GROUP_PER_SECOND))
        group = self._out.releases.get(group_key)
        if group is None:
            self._out.releases[group_key] = (claim, [entry.id], not_before, verdict.detail)
        else:
            group[1].append(entry.id)
            if not_before > group[2]:
                self._out.releases[group_key] = (claim, group[1], not_before, verdict.detail)
        self._notify(entry, verdict, False, not_before)

    def _notify(self, entry: Entry, verdict: Verdict, dead: bool, retry_at: float | None) -> None:
        callback = self.settings.on_error
        if callback is None:
            return
        refusals = entry.attempts + (1 if verdict.kind == REFUSED_BY_PER else 0)
        failure = DeliveryFailure(
            entry.activity, error_for(verdict, _ENDPOINT), refusals, dead, retry_at
        )
        try:
            callback(failure)
        except Exception:
            logger.exception("per_buffer: the on_error callback raised; ignored")

    def _schedule_apply(self) -> None:
        """Write outcomes in few, large transactions: every 20 ms, or once 256 wait, or at
        once while a flush waits (the rows a write rewrites cost the same for 1 or 256)."""
        if not self._out:
            return
        urgent = self._flushing > 0 or self._stopping or self._out_count >= _APPLY_AT
        handle = self._apply_handle
        if handle is not None:
            if not urgent or self._apply_soon:
                return
            handle.cancel()
        loop = self._loop
        assert loop is not None
        now = time.monotonic()
        delay = max(0.0, self._apply_after - now, 0.0 if urgent else _APPLY_EVERY)
        self._apply_soon = delay == 0.0
        if self._apply_soon:
            self._apply_handle = loop.call_soon(self._apply)
        else:
            self._apply_handle = loop.call_later(delay, self._apply)

    def _apply(self) -> None:
        """Write the waiting outcomes to the queue (few transactions, one per group).

        The writes together wait at most ``_APPLY_BUDGET`` for a database another process
        keeps locked (the loop is not theirs to stall for longer); what is not written
        is kept and tried again shortly.
        """
        if self._apply_handle is not None:
            self._apply_handle.cancel()  # called directly (a stop): no second pass
            self._apply_handle = None
        self._out_count = 0
        out, self._out = self._out, _Outcomes()
        with self.queue.deadline(time.monotonic() + _APPLY_BUDGET):
            kept = self._write_outcomes(out)
        if kept:  # the storage failed: keep them, and try again shortly
            self._merge_back(kept)
            self._out_count = _APPLY_AT  # written as soon as the storage lets us
            self._apply_after = time.monotonic() + _APPLY_RETRY
            self._schedule_apply()
        self._snapshot_flow(time.monotonic())
        self._notify_progress()
        if self._maybe_empty and not self._ready and not self._stopping:
            self._pump()

    def _write_outcomes(self, out: _Outcomes) -> _Outcomes:
        """Write ``out``, group by group; return what the storage did not take."""
        kept = _Outcomes()
        stats = self.stats
        queue = self.queue
        for lease_id, (claim, ids) in out.acks.items():
            done = self._write(claim, ids, functools.partial(queue.ack, claim, ids))
            if done is None:
                kept.acks[lease_id] = (claim, ids)
            else:
                stats.delivered += done
        for lease_id, (claim, ids) in out.coalesced.items():
            done = self._write(claim, ids, functools.partial(queue.ack, claim, ids, coalesced=True))
            if done is None:
                kept.coalesced[lease_id] = (claim, ids)
            else:
                stats.coalesced += done
        for key, (claim, ids, not_before, error) in out.releases.items():
            _, refused, counted, _ = key
            release = functools.partial(
                queue.release,
                claim,
                ids,
                not_before=not_before,
                error=error or None,
                refused=refused,
                failed=counted,
            )
            done = self._write(claim, ids, release)
            if done is None:
                kept.releases[key] = (claim, ids, not_before, error)
            else:
                self._maybe_empty = True  # they come back at their retry time: look again
                if counted or refused:
                    stats.retried += done
        for claim, ids, reason in out.dead:
            done = self._write(claim, ids, functools.partial(queue.dead_letter, claim, ids, reason))
            if done is None:
                kept.dead.append((claim, ids, reason))
            else:
                stats.dead_lettered += done
        for lease_id, (claim, ids) in out.holds.items():
            hold = functools.partial(
                queue.release, claim, ids, not_before=0.0, refused=False, failed=False
            )
            if self._write(claim, ids, hold) is None:
                kept.holds[lease_id] = (claim, ids)
        return kept

    def _write(self, claim: Claim, ids: list[int], op: Callable[[], int]) -> int | None:
        """Run one queue write and settle its ids; None (keep them) on a storage fault."""
        try:
            count = op()
        except QueueError as exc:
            self._queue_error(exc)
            return None
        state = self._claims.get(claim.lease_id)
        if state is not None:
            state[1].difference_update(ids)
            if not state[1]:
                del self._claims[claim.lease_id]
        return count

    def _merge_back(self, kept: _Outcomes) -> None:
        out = self._out
        for groups, into in ((kept.acks, out.acks), (kept.coalesced, out.coalesced)):
            for claim, ids in groups.values():
                for entry_id in ids:
                    _add(into, claim, entry_id)
        for claim, ids in kept.holds.values():
            for entry_id in ids:
                _add(out.holds, claim, entry_id)
        for key, value in kept.releases.items():
            out.releases.setdefault(key, value)
        out.dead.extend(kept.dead)

    def _notify_progress(self) -> None:
        with self._progress:
            self._progress.notify_all()

    # ------------------------------------------------------------------ housekeeping

    def _tick(self) -> None:
        """Every quarter second: poll, reclaim, publish the flow state."""
        loop = self._loop
        if loop is None or self._stopping:
            return
        if self._until is not None:
            try:
                over = self._until()
            except QueueError:
                over = False
            if over:
                self._begin_stop()
                return
        now = time.monotonic()
        if now >= self._next_poll and not self._maybe_empty:
            self._maybe_empty = self._polled = True
        reclaim_every = _RECLAIM_FLUSHING if self._flushing else _RECLAIM_EVERY
        if now - self._last_reclaim >= reclaim_every:
            self._last_reclaim = now
            try:
                if self.queue.reclaim():
                    self._maybe_empty = True
            except QueueError as exc:
                self._queue_error(exc)
        self._publish(now)
        self._pump()
        loop.call_later(_TICK, self._tick)

    def _snapshot_flow(self, now: float) -> FlowState:
        """The flow state into the stats other threads read (cheap: every write, every tick)."""
        flow = self._flow.state(now)
        stats = self.stats
        stats.flow = flow
        stats.pause_reason = flow.pause_reason
        stats.paused_until = None if flow.paused_for is None else time.time() + flow.paused_for
        return flow

    def _publish(self, now: float, *, force: bool = False) -> None:
        flow = self._snapshot_flow(now)
        stats = self.stats
        key = (flow.limit, flow.rate, flow.probing, flow.pause_reason, stats.attempts)
        previous = self._state_key
        changed_mode = previous is None or key[2:4] != previous[2:4]  # probing, pause: now
        if not force and not changed_mode:
            if now - self._last_state < _STATE_EVERY:
                return
            if key == previous and now - self._last_state < 30.0:
                return
        self._last_state = now
        self._state_key = key
        state = {
            "pid": os.getpid(),
            "updated_at": time.time(),
            "pause_reason": flow.pause_reason,
            "paused_until": stats.paused_until,
            "limit": flow.limit,
            "max_concurrency": flow.max_concurrency,
            "rate": flow.rate,
            "probing": flow.probing,
            "success_ratio": flow.success_ratio,
            "failures": dict(stats.failures),
            "delivered": stats.delivered,
            "coalesced": stats.coalesced,
            "retried": stats.retried,
            "dead_lettered": stats.dead_lettered,
            "late_deliveries": stats.late_deliveries,
            "attempts": stats.attempts,
            "last_error": stats.last_error,
        }
        try:
            self.queue.set_delivery_state(state)
        except QueueError as exc:
            self._queue_error(exc)

    def _queue_error(self, exc: QueueError) -> None:
        self.stats.last_error = str(exc)
        logger.warning("per_buffer: queue error in the delivery worker: %s", exc)

    # ------------------------------------------------------------------ stopping

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._pump_handle is not None:
            self._pump_handle.cancel()
        for claim, entry in self._ready:
            _add(self._out.holds, claim, entry.id)
        self._ready.clear()
        for channel in self._channels:
            channel.close()  # an in-flight request's done() arrives as a hold
        self._finish_stop(time.monotonic() + 1.0)

    def _finish_stop(self, deadline: float) -> None:
        loop = self._loop
        assert loop is not None
        if self._in_flight and time.monotonic() < deadline:
            loop.call_later(0.005, self._finish_stop, deadline)
            return
        for attempt in self._flying.values():  # riders of requests that never answered
            for claim, entry in attempt.riders:
                _add(self._out.holds, claim, entry.id)
            attempt.riders.clear()
        self._flying.clear()
        # a database another process keeps locked delays the stop by _STOP_BUDGET at most:
        # what is not written stays leased on disk and comes back when the lease expires
        with self.queue.deadline(time.monotonic() + _STOP_BUDGET):
            self._apply()
            for claim, _ in list(self._claims.values()):
                with contextlib.suppress(QueueError):
                    self.queue.release_claim(claim)
            self._claims.clear()
            self._publish(time.monotonic(), force=True)
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)
