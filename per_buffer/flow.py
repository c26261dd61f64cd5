"""Flow control: how many requests may be in flight, and when the next one may start.

A pure policy, driven only by the outcomes it is told about and the ``now``
(monotonic seconds) it is given, so it runs on simulated time in its tests. The
delivery worker asks :meth:`FlowController.admit` before each request, and
reports :meth:`~FlowController.started` and :meth:`~FlowController.finished`.

It combines four published models:

1. **Client-side adaptive throttling** (Google SRE book, "Handling Overload"):
   over the last attempts (at most 100, at most 30 s old) with ``requests`` sent
   and ``accepts`` answered by Per itself, the share to hold back is
   ``p = max(0, (requests - K * accepts) / (requests + 1))`` with ``K = 2``. The
   in-flight target is ``ceil(max_concurrency * (1 - p))``. Up to half of all
   requests failing leaves ``p = 0``: a partly failing Per gets the full
   concurrency, and goodput drops in proportion to the failures, no more.
2. **AIMD on the concurrency limit** (TCP's congestion window, Netflix's
   concurrency-limits): the limit grows by one per success (doubling per round
   trip) up to the target and drops to the target at once when it falls.
3. **Probe mode**: when Per fails (nearly) everything (``p >= 0.9``, about 5 %
   or fewer answers, or a run of ``max(10, 2 * limit)`` failures), one request
   at a time, with a jittered delay between probes that doubles from
   ``probe_initial`` up to ``probe_max`` (5 s). The first accepted answer ends it
   and the limit climbs back from one.
4. **A learned rate limit** (a token bucket, as GCRA/Stripe limiters enforce
   them): a 429 pauses everything for exactly its ``Retry-After`` (capped by the
   backoff policy, never lengthened) and cuts the send rate once per event
   (429s of requests sent before the cut belong to it). A first 429 after fewer
   than 8 answers only pauses, unless another follows within 10 s: one stray
   429 is no limit to learn. The cut:
   with no rate yet, 0.9 x what got through when a second or more of history
   exists, else half of what was sent; with a rate
   refused within a second of resuming, half of it or less, down to the share of
   requests that got through since resuming (at most 16x less; the limit is then
   expected near the new rate); with a rate kept longer, 0.9 x it (or 0.9 x what got through,
   if that was far less). The rate then grows 20 %/s up to 90 % of the refused
   rate, 0.5 % of it per second up to it (a plateau, as in TCP CUBIC, so a
   steady limit is met at about 95 % with a 429 every 20 s or so), and 10 %/s
   beyond it; it grows only while the bucket is what holds sending back, and is
   forgotten at four times the refused rate.

A refused token (``auth``) holds everything for ``auth_interval`` seconds, then
probes one request at a time until Per accepts the token again.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .backoff import Backoff
from .outcomes import AUTH, OK, RATE_LIMITED, REFUSED_BY_PER, TOO_LARGE, TRANSPORT_FAULTS

__all__ = ["FlowController", "FlowState"]

_K: Final = 2.0  # SRE throttling: accepts count K times as much as requests
_WINDOW_ITEMS: Final = 100
_WINDOW_AGE: Final = 30.0
_PROBE_P: Final = 0.9
_MINUTE: Final = 60
_RATE_SLOT: Final = 0.1  # seconds per slot of the send/accept rate ring
_RATE_SLOTS: Final = 20  # two seconds of history
_RATE_SPAN: Final = 2.0
_MIN_RATE: Final = 0.2  # requests/s: never slower than one request every 5 s
_CUT: Final = 0.9
_FAST_UP: Final = 0.2  # per success, i.e. +20 %/s while far below the refused rate
_PLATEAU: Final = 0.9
_SLOW_UP: Final = 0.005  # of the refused rate per second, near it
_FEW_THROUGH: Final = 0.8  # fewer accepted than this share of sent: the limit is well below
_MIN_SPAN: Final = 0.01
_EVIDENCE: Final = 8  # answers since resuming before a first 429 can set a rate alone
_LONE_WINDOW: Final = 10.0  # seconds in which a second early 429 sets a rate after all
_NEAR: Final = 1.25  # after a quick refusal the limit is expected within this factor of the cut
_DEEPEST: Final = 1 / 16  # the deepest single cut
_BEYOND_UP: Final = 0.1  # per success, i.e. +10 %/s above the refused rate
_FORGET: Final = 4.0
_WHOLE: Final = 1.0 - 1e-9  # a token (float rounding must not leave a request waiting 1e-16 s)
_TICK: Final = 1e-4  # the shortest wait admit() asks for
_ACCEPTED: Final = frozenset({OK, REFUSED_BY_PER, TOO_LARGE})


@dataclass(frozen=True)
class FlowState:
    """A snapshot of the flow controller, for stats and logs.

    Attributes:
        limit: requests allowed in flight now.
        max_concurrency: the configured ceiling of ``limit``.
        rate: learned requests/s after a rate limit, or None when no limit is known.
        success_ratio: share of attempts Per answered over the last minute, None without any.
        probing: True while Per fails (nearly) everything: one request at a time.
        paused_for: seconds left of a pause (rate limit or refused token), None when not paused.
        pause_reason: ``"rate_limited"`` or ``"auth"`` while paused or probing a refused token.
        throttle: the SRE throttle's hold-back share ``p`` over recent attempts.
    """

    limit: int
    max_concurrency: int
    rate: float | None
    success_ratio: float | None
    probing: bool
    paused_for: float | None
    pause_reason: str | None
    throttle: float


class FlowController:
    """Decides how many requests may be in flight and when the next may start.

    Args:
        max_concurrency: the most requests in flight (the ``concurrency`` setting).
        backoff: the backoff policy (``Retry-After`` cap, pauses without one).
        auth_interval: seconds between probes while the token is refused.
        probe_initial: first delay between probes of a failing Per.
        probe_max: longest delay between probes (5 s keeps recovery quick).
        rng: uniform [0, 1) source for the probe jitter.
    """

    def __init__(
        self,
        max_concurrency: int,
        backoff: Backoff,
        *,
        auth_interval: float = 60.0,
        probe_initial: float = 0.25,
        probe_max: float = 5.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.max_concurrency = max_concurrency
        self._backoff = backoff
        self._auth_interval = auth_interval
        self._probe_initial = probe_initial
        self._probe_max = probe_max
        self._rng = rng
        self.limit = max_concurrency
        # SRE throttle window: (time, accepted) of recent attempts
        self._recent: deque[tuple[float, bool]] = deque()
        self._accepts = 0
        self._run = 0  # consecutive transport faults
        # probe mode
        self.probing = False
        self._probe_since = 0.0
        self._failed_probes = 0
        self._next_probe = 0.0
        # pauses: rate limit (exact Retry-After) and refused token (hold)
        self._paused_until: float | None = None
        self._hold_until: float | None = None
        self._auth = False
        self._events = 0  # consecutive 429 events, for pauses without Retry-After
        # learned rate limit (token bucket)
        self.rate: float | None = None
        self._ceiling = 0.0
        self._tokens = 1.0
        self._stamp = 0.0
        self._cut_at = -math.inf
        self._active_since: float | None = None
        self._bound = False  # admit() waited for a token since the rate last grew
        self._sent_since = 0  # requests started since sending last resumed
        self._accepted_since = 0  # and accepted
        self._lone_429: float | None = None  # an early 429 that set no rate
        self._slots = [[-1, 0, 0] for _ in range(_RATE_SLOTS)]  # [slot number, sent, accepted]
        # last minute, for stats: [second, attempts, accepts]
        self._minute = [[-1, 0, 0] for _ in range(_MINUTE)]

    # ------------------------------------------------------------------ decisions

    def admit(self, now: float, in_flight: int) -> float:
        """Seconds to wait before the next request may start (0: now; inf: until one ends)."""
        if self._hold_until is not None:
            if now < self._hold_until:
                return self._hold_until - now
            return math.inf if in_flight else 0.0  # probe the refused token, one at a time
        paused = self._paused_until
        if paused is not None:
            if now < paused:
                return paused - now
            self._paused_until = None
        if self.probing:
            if in_flight:
                return math.inf
            return max(0.0, self._next_probe - now)
        if in_flight >= self.limit:
            return math.inf
        if self.rate is not None:
            self._refill(now)
            if self._tokens < _WHOLE:
                self._bound = True
                return max(_TICK, (1.0 - self._tokens) / self.rate)
        return 0.0

    def started(self, now: float) -> None:
        """A request was sent (it takes a token from the bucket)."""
        if self._active_since is None:
            self._active_since = now
        self._sent_since += 1
        if self.rate is not None:
            self._refill(now)
            self._tokens -= 1.0
        self._slot(now)[1] += 1

    def finished(
        self, now: float, sent_at: float, kind: str, retry_after: float | None = None
    ) -> None:
        """A request sent at ``sent_at`` ended with the outcome class ``kind``."""
        if kind == RATE_LIMITED:
            self._rate_limited(now, sent_at, retry_after)
        elif kind == AUTH:
            self._hold_until = now + self._auth_interval
            self._auth = True
        elif kind in _ACCEPTED:
            self._accepted(now)
        elif kind in TRANSPORT_FAULTS:
            self._failed(now, sent_at)

    def poke(self, now: float) -> None:
        """A flush wants progress: probe a failing Per or a refused token now (not a 429)."""
        if self._hold_until is not None:
            self._hold_until = min(self._hold_until, now)
        self._next_probe = min(self._next_probe, now)

    # ------------------------------------------------------------------ observation

    @property
    def paused_until(self) -> float | None:
        """Monotonic time a pause ends, None when not paused."""
        if self._hold_until is not None:
            return self._hold_until
        return self._paused_until

    @property
    def pause_reason(self) -> str | None:
        """``"auth"`` while the token is refused, ``"rate_limited"`` during a 429 pause."""
        if self._auth:
            return "auth"
        if self._paused_until is not None:
            return "rate_limited"
        return None

    def throttle(self) -> float:
        """The SRE throttle's share to hold back over recent attempts."""
        requests = len(self._recent)
        return max(0.0, (requests - _K * self._accepts) / (requests + 1))

    def failure_ratio(self) -> float | None:
        """Share of recent attempts that were transport faults (None without attempts)."""
        requests = len(self._recent)
        return None if not requests else 1.0 - self._accepts / requests

    def success_ratio(self, now: float) -> float | None:
        """Share of attempts over the last minute that Per answered (None without any)."""
        second = int(now)
        attempts = accepts = 0
        for stamp, sent, ok in self._minute:
            if second - _MINUTE < stamp <= second:
                attempts += sent
                accepts += ok
        return None if not attempts else accepts / attempts

    def state(self, now: float) -> FlowState:
        """A snapshot for stats."""
        paused = self.paused_until
        return FlowState(
            limit=1 if self.probing or self._hold_until is not None else self.limit,
            max_concurrency=self.max_concurrency,
            rate=self.rate,
            success_ratio=self.success_ratio(now),
            probing=self.probing,
            paused_for=None if paused is None or paused <= now else paused - now,
            pause_reason=self.pause_reason,
            throttle=self.throttle(),
        )

    # ------------------------------------------------------------------ outcomes

    def _note(self, now: float, accepted: bool) -> None:
        recent = self._recent
        if len(recent) >= _WINDOW_ITEMS and recent.popleft()[1]:
            self._accepts -= 1
        horizon = now - _WINDOW_AGE
        while recent and recent[0][0] < horizon:
            if recent.popleft()[1]:
                self._accepts -= 1
        recent.append((now, accepted))
        if accepted:
            self._accepts += 1
        second = int(now)
        bucket = self._minute[second % _MINUTE]
        if bucket[0] != second:
            bucket[0], bucket[1], bucket[2] = second, 0, 0
        bucket[1] += 1
        if accepted:
            bucket[2] += 1

    def _target(self) -> int:
        return max(1, math.ceil(self.max_concurrency * (1.0 - self.throttle())))

    def _accepted(self, now: float) -> None:
        self._run = 0
        self._events = 0
        if self._hold_until is not None or self._auth:
            self._hold_until = None
            self._auth = False
        if self.probing:
            self.probing = False
            self._recent.clear()
            self._accepts = 0
            self.limit = 1
        self._note(now, True)
        self._slot(now)[2] += 1
        self._accepted_since += 1
        if self.limit < self._target():
            self.limit += 1
        if self.rate is not None and (self._paused_until is None or now >= self._paused_until):
            self._grow_rate()

    def _failed(self, now: float, sent_at: float) -> None:
        self._note(now, False)
        self._run += 1
        target = self._target()
        self.limit = min(self.limit, target)
        if self.probing:
            if sent_at >= self._probe_since:
                self._failed_probes += 1
                self._next_probe = now + self._probe_delay()
            return
        if self.throttle() >= _PROBE_P or self._run >= max(10, 2 * self.limit):
            self.probing = True
            self._probe_since = now
            self._failed_probes = 0
            self._next_probe = now + self._probe_delay()

    def _probe_delay(self) -> float:
        ceiling = min(self._probe_max, self._probe_initial * 2.0**self._failed_probes)
        return ceiling * (0.5 + 0.5 * self._rng())

    # ------------------------------------------------------------------ rate limits

    def _rate_limited(self, now: float, sent_at: float, retry_after: float | None) -> None:
        if retry_after is not None:
            wait = self._backoff.cap(retry_after)
        else:
            wait = self._backoff.pause(self._events + 1)
        end = now + wait
        if self._paused_until is None or end > self._paused_until:
            self._paused_until = end
        if sent_at <= self._cut_at:
            return  # sent before the last cut: part of the same event
        self._events += 1
        self._cut_at = now
        rate, self._ceiling = self._cut(now)
        self.rate = rate
        self._tokens = 1.0
        self._stamp = end
        self._active_since = end
        self._sent_since = self._accepted_since = 0
        self._bound = False

    def _cut(self, now: float) -> tuple[float | None, float]:
        """The new rate (None: still none) and the rate it stays under, after a 429 event."""
        before = self.rate
        start = self._active_since if self._active_since is not None else now
        active = now - start
        span = min(_RATE_SPAN, active)
        sent, accepted = self._recent_counts(now, span)
        got_through = accepted / span if span >= 1.0 and accepted else None
        if before is not None:
            if span < 1.0:  # refused within a second of resuming: far too fast: at least
                # halve it, more when far fewer got through than were sent (a burst
                # allowance only makes that share look better, so the cut stays safe)
                share = min(0.5, _NEAR * self._accepted_since / max(1, self._sent_since))
                new = max(_MIN_RATE, before * max(_DEEPEST, share))
                return new, min(before, new * _NEAR)
            new = _CUT * before  # the rate we kept a while was refused: go just under it ...
            if got_through is not None and accepted < _FEW_THROUGH * sent:
                new = min(new, _CUT * got_through)  # ... or under what got through, if far less
            return max(_MIN_RATE, new), before
        answered = self._accepted_since + 1
        lone = self._lone_429 is None or now - self._lone_429 > _LONE_WINDOW
        if answered < _EVIDENCE and lone:
            self._lone_429 = now  # one stray 429 is no limit to learn: just pause,
            return None, self._ceiling  # unless another follows within _LONE_WINDOW
        if got_through is not None:  # no rate yet, but a second or more of history
            return max(_MIN_RATE, _CUT * got_through), got_through
        # too little history (a burst allowance fools any estimate of what got through):
        # half of what was sent
        send_rate = self._sent_since / max(active, _MIN_SPAN)
        return max(_MIN_RATE, 0.5 * send_rate), max(_MIN_RATE, send_rate)

    def _grow_rate(self) -> None:
        rate = self.rate
        assert rate is not None
        if not self._bound:  # the bucket is not what limits sending: nothing to learn
            return
        self._bound = False
        ceiling = self._ceiling
        if rate < _PLATEAU * ceiling:
            rate += _FAST_UP
        elif rate < ceiling:
            rate += _SLOW_UP * ceiling / rate
        else:
            rate += _BEYOND_UP
        if rate >= _FORGET * ceiling:
            self.rate = None
            return
        self.rate = rate

    def _refill(self, now: float) -> None:
        rate = self.rate
        assert rate is not None
        if now > self._stamp:
            burst = max(1.0, min(rate * 0.05, float(self.max_concurrency)))
            self._tokens = min(burst, self._tokens + (now - self._stamp) * rate)
            self._stamp = now

    def _slot(self, now: float) -> list[int]:
        number = int(now / _RATE_SLOT)
        slot = self._slots[number % _RATE_SLOTS]
        if slot[0] != number:
            slot[0], slot[1], slot[2] = number, 0, 0
        return slot

    def _recent_counts(self, now: float, span: float) -> tuple[int, int]:
        newest = int(now / _RATE_SLOT)
        oldest = newest - max(1, math.ceil(span / _RATE_SLOT)) + 1
        sent = accepted = 0
        for number, s, a in self._slots:
            if oldest <= number <= newest:
                sent += s
                accepted += a
        return sent, accepted
