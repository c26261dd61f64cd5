"""The delivery worker: drains the durable queue to Per.

One daemon thread runs an asyncio loop. A dispatcher claims entries from the
queue (leases, never deletes) and hands them to ``concurrency`` sender tasks,
each with its own :class:`~per_buffer.AsyncPerClient` holding one connection
(a shared pool measured far slower here). Outcomes go back to the queue in
batches: ack on success, release with a backoff for a retry, dead letter for
a permanent refusal.

Failure handling, by error class:

* retryable (:class:`PerTransportError`, 5xx, timeouts): the entry is released
  with full-jitter exponential backoff (tenacity's ``wait_random_exponential``)
  and the worker turns *degraded*: one request at a time, spaced by a growing
  probe delay, until a request succeeds;
* :class:`PerRateLimitError`: everything pauses until ``Retry-After`` (or the
  backoff, whichever is later);
* :class:`PerAuthError`: everything pauses, nothing is dead-lettered, a probe
  is sent every ``auth_probe_interval`` seconds;
* other :class:`PerError`: retried with backoff, dead-lettered after
  ``max_attempts``.

Every wait is interruptible by ``flush`` (one-shot) and ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import tenacity

from ._transport import LeanTransport, use_lean_transport
from .client import AsyncPerClient
from .errors import PerAuthError, PerError, PerRateLimitError, PerTransportError, QueueError
from .models import Activity
from .queue import Claim, DurableQueue, Entry

__all__ = ["DeliveryFailure", "DeliveryStats", "DeliveryWorker"]

logger = logging.getLogger("per_buffer.delivery")

_RECLAIM_EVERY = 30.0
_RECLAIM_FLUSHING = 1.0
_PROBE_DELAY_MAX = 5.0  # longest pause between probes of a failing Per: recovery is quick
_CLAIM_AHEAD = 16  # entries claimed ahead of the senders, so claims and acks are batched


@dataclass(frozen=True)
class DeliveryFailure:
    """What ``on_error`` receives for every failed attempt and every dead letter.

    Attributes:
        activity: the activity that failed.
        error: the typed error of the attempt.
        attempts: failed attempts so far, this one included.
        dead_lettered: True when the activity was moved to the dead letters.
        retry_at: unix time of the next attempt, or None when dead-lettered.
    """

    activity: Activity
    error: PerError
    attempts: int
    dead_lettered: bool
    retry_at: float | None


class DeliveryStats:
    """Counters written by the worker thread only (plain attribute reads are safe)."""

    __slots__ = (
        "dead_lettered",
        "delivered",
        "last_error",
        "late_deliveries",
        "pause_reason",
        "paused_until",
        "retried",
    )

    def __init__(self) -> None:
        self.delivered = 0
        self.retried = 0
        self.dead_lettered = 0
        self.late_deliveries = 0
        self.last_error: str | None = None
        self.paused_until: float | None = None
        self.pause_reason: str | None = None


_OK, _RETRY, _DEAD, _HOLD = range(4)


@dataclass
class _Outcome:
    claim: Claim
    entry: Entry
    kind: int
    not_before: float = 0.0
    error: str | None = None
    count_attempt: bool = True


class DeliveryWorker:
    """Drains one :class:`DurableQueue` to Per from a background thread.

    Args:
        queue: the durable queue to drain.
        token, base_url, timeout: passed to each sender's :class:`AsyncPerClient`.
        concurrency: requests in flight at once.
        max_attempts: attempts before a permanently refused entry is dead-lettered.
        backoff_initial, backoff_max: scale and cap of the per-entry backoff.
        auth_probe_interval: seconds between probes while the token is refused.
        poll_interval: seconds between looks for entries put by other processes.
        window: seconds of the coalescing window, for the late-delivery count.
        on_error: called (from the worker thread) for each failed attempt.
        clock: the recorder's unix time source, which decides late deliveries; timing
            (leases, backoff, pauses) always uses real time.
    """

    def __init__(
        self,
        queue: DurableQueue,
        *,
        token: str,
        base_url: str,
        timeout: float,
        concurrency: int,
        max_attempts: int,
        backoff_initial: float,
        backoff_max: float,
        auth_probe_interval: float,
        poll_interval: float,
        window: float,
        lease_seconds: float,
        on_error: Callable[[DeliveryFailure], None] | None = None,
        clock: Callable[[], float] = time.time,
        transport_factory: Callable[[], httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        self.queue = queue
        self.stats = DeliveryStats()
        self._token = token
        self._base_url = base_url
        self._timeout = timeout
        self._concurrency = concurrency
        self._batch = max(8, min(64, concurrency // 2))
        self._max_attempts = max_attempts
        self._backoff = tenacity.wait_random_exponential(
            multiplier=backoff_initial, max=backoff_max
        )
        self._retrying = tenacity.Retrying(wait=self._backoff)
        self._auth_probe_interval = auth_probe_interval
        self._poll_interval = poll_interval
        self._window = window or 900.0
        self._lease_seconds = lease_seconds
        self._on_error = on_error
        self._clock = clock  # the recorder's clock: only for the late-delivery count
        self._now = time.time  # leases, backoff and pauses always run on real time
        self._transport_factory = transport_factory

        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._interrupt: asyncio.Event | None = None
        self._work: asyncio.Queue[tuple[Claim, Entry] | None] | None = None
        self._probe_lock: asyncio.Lock | None = None
        self._started = threading.Event()
        self._stopping = False
        self._flushing = 0
        self._cond = threading.Condition()
        self._claims: dict[str, tuple[Claim, set[int]]] = {}
        self._held = 0  # entries claimed and not yet finished
        self._results: list[_Outcome] = []
        self._degraded = False
        self._probe_failures = 0
        self._degraded_until = 0.0
        self._auth_logged = False
        self._last_reclaim = 0.0

    # ------------------------------------------------------------------ control (any thread)

    @property
    def running(self) -> bool:
        """True while the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="per-buffer-delivery", daemon=True)
        self._thread.start()
        self._started.wait(5.0)

    def wake(self) -> None:
        """Tell the worker new entries may be ready (called once per commit at most)."""
        self._call_soon(self._set_wake)

    def begin_flush(self) -> None:
        """Enter flush mode: claim waiting retries at once, probe a failing Per now."""
        with self._cond:
            self._flushing += 1
        self._call_soon(self._flush_started)

    def end_flush(self) -> None:
        """Leave flush mode."""
        with self._cond:
            self._flushing = max(0, self._flushing - 1)

    def wait_drained(self, deadline: float | None) -> bool:
        """Block until the queue holds nothing undelivered, or ``deadline`` (monotonic)."""
        with self._cond:
            while True:
                if self._drained():
                    return True
                if not self.running:
                    return False
                if deadline is None:
                    self._cond.wait(0.25)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.25))

    def stop(self, timeout: float) -> None:
        """Stop sending, give unfinished claims back to the queue and end the thread."""
        self._stopping = True
        self._call_soon(self._poke_stop)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(timeout, 0.1))
            if thread.is_alive():
                logger.warning("per_buffer delivery thread did not stop within %.1f s", timeout)

    # ------------------------------------------------------------------ internals

    def _drained(self) -> bool:
        if self._held or self._results:
            return False
        try:
            pending, in_flight = self.queue.counts()
        except QueueError:
            return False
        return pending == 0 and in_flight == 0

    def _call_soon(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closed in between
            loop.call_soon_threadsafe(fn)

    def _set_wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _flush_started(self) -> None:
        """A flush cuts the current auth pause and probe delay short, once (not a 429)."""
        now = self._now()
        if self.stats.pause_reason == "auth" and self.stats.paused_until is not None:
            self.stats.paused_until = min(self.stats.paused_until, now)
        self._degraded_until = min(self._degraded_until, now)
        self._poke()

    def _poke(self) -> None:
        """Wake every interruptible sleeper once (flush)."""
        if self._interrupt is not None:
            self._interrupt.set()
            self._interrupt.clear()
        self._set_wake()

    def _poke_stop(self) -> None:
        if self._interrupt is not None:
            self._interrupt.set()
        self._set_wake()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except Exception:
            logger.exception("per_buffer delivery worker crashed; entries stay on disk")
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            with self._cond:
                self._cond.notify_all()

    def _make_client(self) -> AsyncPerClient:
        transport = (
            self._transport_factory()
            if self._transport_factory is not None
            else LeanTransport()
            if use_lean_transport()
            else httpx.AsyncHTTPTransport(
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)
            )
        )
        return AsyncPerClient(
            self._token, base_url=self._base_url, timeout=self._timeout, transport=transport
        )

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self._interrupt = asyncio.Event()
        self._work = asyncio.Queue()
        self._probe_lock = asyncio.Lock()
        clients = [self._make_client() for _ in range(self._concurrency)]
        senders = [asyncio.create_task(self._sender(client)) for client in clients]
        self._started.set()
        try:
            while not self._stopping:
                self._wake.clear()
                delay = self._dispatch() if self._apply_results() else self._poll_interval
                if delay == 0.0:
                    await asyncio.sleep(0)
                    continue
                await _wait_event(self._wake, delay)
        finally:
            for _ in senders:
                self._work.put_nowait(None)  # a sender between awaits ends on this
            for task in senders:
                task.cancel()  # a sender inside a request ends on this
            await asyncio.wait(senders, timeout=2.0)
            self._apply_results()
            self._return_unfinished()
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.aclose()

    def _dispatch(self) -> float | None:
        """Claim work if there is room; return seconds to wait (0: go again, None: on wake)."""
        assert self._work is not None
        now = self._now()
        # leases of dead or stuck processes come back; sooner while someone waits in flush
        if now - self._last_reclaim > (_RECLAIM_FLUSHING if self._flushing else _RECLAIM_EVERY):
            self._last_reclaim = now
            try:
                self.queue.reclaim()
            except QueueError as exc:
                self._note_queue_error(exc)
        paused = self.stats.paused_until
        if paused is not None and now < paused:
            return min(paused - now, self._poll_interval)
        if self._gated():  # failing: one entry at a time
            target, low = 1, 0
        else:  # keep up to `target` claimed; refill when down to `low`
            target = max(_CLAIM_AHEAD, 2 * self._concurrency)
            low = target // 2
        if self._held > low:
            return None
        want = target - self._held
        try:
            claim = self.queue.claim(
                want,
                lease_seconds=self._lease_seconds,
                ignore_not_before=self._flushing > 0,
            )
        except QueueError as exc:
            self._note_queue_error(exc)
            return self._poll_interval
        if claim is None or not claim.entries:
            with self._cond:
                self._cond.notify_all()
            try:
                ready_at = self.queue.next_ready_at()
            except QueueError:
                ready_at = None
            if ready_at is None:
                return self._poll_interval
            return max(0.001, min(self._poll_interval, ready_at - now))
        ids = {entry.id for entry in claim.entries}
        self._claims[claim.lease_id] = (claim, ids)
        self._held += len(ids)
        for entry in claim.entries:
            self._work.put_nowait((claim, entry))
        return 0.0

    async def _sender(self, client: AsyncPerClient) -> None:
        assert self._work is not None and self._probe_lock is not None
        work = self._work
        while True:
            item = await work.get()
            if item is None:
                return
            if self._stopping:
                self._finish(_Outcome(item[0], item[1], _HOLD))
                continue
            if self._gated():
                async with self._probe_lock:  # one request at a time while failing
                    await self._wait_gate()
                    if self._stop_requested():  # may have changed while waiting
                        self._finish(_Outcome(item[0], item[1], _HOLD))
                        continue
                    if self._gated():
                        await self._send(client, *item)
                        continue
            await self._send(client, *item)

    def _stop_requested(self) -> bool:
        return self._stopping

    def _gated(self) -> bool:
        return self._degraded or self.stats.paused_until is not None

    async def _wait_gate(self) -> None:
        """Sleep until a pause or the probe delay is over; a flush cuts it short (not a 429)."""
        while not self._stopping:
            now = self._now()
            paused = self.stats.paused_until
            if paused is not None and now < paused:
                if self.stats.pause_reason == "rate_limited":
                    await self._sleep(paused - now, flushable=False)
                elif await self._sleep(paused - now):
                    return  # flush: probe now
                continue
            if self._degraded and now < self._degraded_until:
                await self._sleep(self._degraded_until - now)
            return

    async def _sleep(self, seconds: float, *, flushable: bool = True) -> bool:
        """Sleep up to ``seconds``; True if cut short by close or (when flushable) flush."""
        assert self._interrupt is not None
        deadline = time.monotonic() + seconds
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0 or not await _wait_event(self._interrupt, left):
                return False
            if flushable:
                return True
        return True

    async def _send(self, client: AsyncPerClient, claim: Claim, entry: Entry) -> None:
        activity = entry.activity
        try:
            await client.add_activity(
                activity.billing_id, activity.user_id, activity.activity_type_id
            )
        except asyncio.CancelledError:
            self._finish(_Outcome(claim, entry, _HOLD))
            raise
        except PerError as exc:
            self._failed(claim, entry, exc)
            return
        except Exception as exc:  # a bug or an odd transport fault: keep the entry
            logger.exception("per_buffer: unexpected error while sending; will retry")
            error = PerTransportError(f"Unexpected error: {type(exc).__name__}.")
            self._failed(claim, entry, error)
            return
        now = self._clock()
        if int(entry.recorded_at // self._window) != int(now // self._window):
            self.stats.late_deliveries += 1
        self.stats.delivered += 1
        if self._degraded or self.stats.paused_until is not None:
            paused = self.stats.paused_until
            if self.stats.pause_reason == "rate_limited" and paused and self._now() < paused:
                self._degraded = False  # an earlier request succeeded: Retry-After still holds
            else:
                self._recovered()
        self._finish(_Outcome(claim, entry, _OK))

    def _recovered(self) -> None:
        if self.stats.pause_reason == "auth":
            logger.info("per_buffer: Per accepts the token again; delivery resumed")
        elif self._degraded:
            logger.info("per_buffer: Per is reachable again; delivery resumed")
        self._degraded = False
        self._probe_failures = 0
        self._auth_logged = False
        self.stats.paused_until = None
        self.stats.pause_reason = None

    def _failed(self, claim: Claim, entry: Entry, error: PerError) -> None:
        now = self._now()
        attempts = entry.attempts + 1
        self.stats.last_error = str(error)
        if isinstance(error, PerAuthError):
            self._pause(now + self._auth_probe_interval, "auth")
            if not self._auth_logged:
                self._auth_logged = True
                logger.error(
                    "per_buffer: Per refused the activity token; delivery is paused and every "
                    "activity stays on disk (next probe in %.0f s). Fix the token and restart.",
                    self._auth_probe_interval,
                )
            outcome = _Outcome(
                claim, entry, _RETRY, self.stats.paused_until or now, str(error), False
            )
            self._notify(entry, error, attempts, False, outcome.not_before)
            self._finish(outcome)
            return
        if isinstance(error, PerRateLimitError):
            wait = max(error.retry_after or 0.0, self._backoff_for(self._probe_failures + 1))
            self._pause(now + wait, "rate_limited")
            self._probe_failures += 1
            outcome = _Outcome(claim, entry, _RETRY, now + wait, str(error), False)
            self.stats.retried += 1
            self._notify(entry, error, attempts, False, outcome.not_before)
            self._finish(outcome)
            return
        if error.retryable:
            self._probe_failures += 1
            if not self._degraded:
                logger.warning("per_buffer: delivery failing (%s); probing one at a time", error)
            self._degraded = True
            self._degraded_until = now + min(
                _PROBE_DELAY_MAX, self._backoff_for(self._probe_failures)
            )
            retry_at = now + self._backoff_for(attempts)
            self.stats.retried += 1
            self._notify(entry, error, attempts, False, retry_at)
            self._finish(_Outcome(claim, entry, _RETRY, retry_at, str(error)))
            return
        if attempts >= self._max_attempts:
            self.stats.dead_lettered += 1
            logger.warning(
                "per_buffer: activity dead-lettered after %d attempts: %s", attempts, error
            )
            self._notify(entry, error, attempts, True, None)
            self._finish(_Outcome(claim, entry, _DEAD, 0.0, str(error)))
            return
        retry_at = now + self._backoff_for(attempts)
        self.stats.retried += 1
        self._notify(entry, error, attempts, False, retry_at)
        self._finish(_Outcome(claim, entry, _RETRY, retry_at, str(error)))

    def _backoff_for(self, attempt: int) -> float:
        state = tenacity.RetryCallState(retry_object=self._retrying, fn=None, args=(), kwargs={})
        state.attempt_number = max(1, attempt)
        return float(self._backoff(state))

    def _pause(self, until: float, reason: str) -> None:
        current = self.stats.paused_until
        if current is None or until > current:
            self.stats.paused_until = until
        self.stats.pause_reason = reason
        self._return_unsent(until)

    def _return_unsent(self, not_before: float) -> None:
        """On a pause, hand queued-but-unsent entries back to the disk queue."""
        work = self._work
        if work is None:
            return
        while True:
            try:
                item = work.get_nowait()
            except asyncio.QueueEmpty:
                return
            if item is None:
                work.put_nowait(None)
                return
            self._finish(_Outcome(item[0], item[1], _RETRY, not_before, None, False))

    def _notify(
        self, entry: Entry, error: PerError, attempts: int, dead: bool, retry_at: float | None
    ) -> None:
        callback = self._on_error
        if callback is None:
            return
        try:
            callback(DeliveryFailure(entry.activity, error, attempts, dead, retry_at))
        except Exception:
            logger.exception("per_buffer: on_error callback raised; ignored")

    def _finish(self, outcome: _Outcome) -> None:
        self._results.append(outcome)
        work = self._work
        if len(self._results) >= self._batch or work is None or work.empty():
            self._set_wake()

    def _apply_results(self) -> bool:
        """Write finished outcomes to the queue, grouped per claim and kind.

        Returns False when the queue refused some (disk full, locked): those
        outcomes are kept and written on a later pass, so our own lease never
        strands entries until it expires.
        """
        results, self._results = self._results, []
        if not results:
            return True
        unapplied: list[_Outcome] = []
        groups: dict[tuple[str, int, bool, int], list[_Outcome]] = {}
        for outcome in results:
            bucket = outcome.entry.attempts if outcome.kind == _RETRY else 0
            key = (outcome.claim.lease_id, outcome.kind, outcome.count_attempt, bucket)
            groups.setdefault(key, []).append(outcome)
        for (lease_id, kind, count_attempt, _), items in groups.items():
            claim = items[0].claim
            ids = [o.entry.id for o in items]
            try:
                if kind == _OK:
                    self.queue.ack(claim, ids)
                elif kind == _RETRY:
                    self.queue.release(
                        claim,
                        ids,
                        not_before=max(o.not_before for o in items),
                        error=items[0].error,
                        count_attempt=count_attempt,
                    )
                elif kind == _DEAD:
                    for outcome in items:
                        self.queue.dead_letter(claim, [outcome.entry.id], outcome.error or "")
                else:
                    self.queue.release(claim, ids, not_before=0.0, count_attempt=False)
            except QueueError as exc:
                self._note_queue_error(exc)
                unapplied.extend(items)
                continue
            state = self._claims.get(lease_id)
            if state is not None:
                state[1].difference_update(ids)
                if not state[1]:
                    del self._claims[lease_id]
            self._held -= len(ids)
        self._results[:0] = unapplied
        with self._cond:
            self._cond.notify_all()
        return not unapplied

    def _return_unfinished(self) -> None:
        for claim, _ in list(self._claims.values()):
            try:
                self.queue.release_claim(claim)
            except QueueError as exc:
                self._note_queue_error(exc)
        self._claims.clear()
        self._held = 0

    def _note_queue_error(self, exc: QueueError) -> None:
        self.stats.last_error = str(exc)
        logger.warning("per_buffer: queue error in the delivery worker: %s", exc)

    def snapshot(self) -> dict[str, Any]:
        """A few internals for debugging and the status command."""
        return {
            "degraded": self._degraded,
            "held": self._held,
            "claims": len(self._claims),
            "flushing": self._flushing > 0,
        }


async def _wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` up to ``timeout``; True if set. Unlike ``asyncio.wait_for`` on
    Python < 3.12, a cancellation arriving as the event fires is never swallowed."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        if not waiter.done():
            waiter.cancel()
    return bool(done)
