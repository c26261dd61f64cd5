"""A discrete-event simulation of the delivery worker's flow control against model servers.

Simulated time only: a backlog of activities, ``max_concurrency`` senders that obey
:class:`per_buffer.flow.FlowController`, and a server model that answers each request
after its latency with an outcome class. Failed activities go back to the backlog
(the worker's retries); the simulation reports goodput and the outcome mix.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from per_buffer.backoff import Backoff
from per_buffer.flow import FlowController
from per_buffer.outcomes import OK, RATE_LIMITED, SERVER_ERROR

Answer = tuple[str, float | None]  # (outcome class, Retry-After)


@dataclass
class Result:
    """What one simulated run delivered."""

    delivered: int = 0
    attempts: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    finished_at: float | None = None
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (start time, outcome)
    max_in_flight_probing: int = 0
    probe_gaps: list[float] = field(default_factory=list)

    def share(self, kind: str, after: float = 0.0) -> float:
        """Share of the requests started after ``after`` that ended as ``kind``."""
        later = [k for t, k in self.timeline if t >= after]
        return 0.0 if not later else sum(1 for k in later if k == kind) / len(later)

    def goodput(self, start: float, end: float) -> float:
        """Successes per second among requests started in [start, end)."""
        ok = sum(1 for t, k in self.timeline if start <= t < end and k == OK)
        return ok / (end - start)


class TokenBucketServer:
    """A rate limiter like a gateway's: ``rate`` tokens/s, ``burst`` capacity, 429 + Retry-After."""

    def __init__(self, rate: float, burst: float, retry_after: bool = True) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = 0.0
        self.retry_after = retry_after

    def __call__(self, now: float) -> Answer:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return OK, None
        wait = math.ceil((1.0 - self.tokens) / self.rate) if self.retry_after else None
        return RATE_LIMITED, (float(max(1, wait)) if wait is not None else None)


def flaky(failure: float, rng: random.Random) -> Callable[[float], Answer]:
    """A server failing each request with probability ``failure`` (HTTP 503)."""

    def answer(now: float) -> Answer:
        return (SERVER_ERROR, None) if rng.random() < failure else (OK, None)

    return answer


def simulate(
    server: Callable[[float], Answer],
    *,
    items: int,
    concurrency: int,
    latency: Callable[[float], float] | float = 0.005,
    horizon: float = 120.0,
    seed: int = 1,
    flow: FlowController | None = None,
) -> Result:
    """Deliver ``items`` activities through ``server`` under flow control; return the tally."""
    rng = random.Random(seed)
    backoff = Backoff(0.5, 300.0, rng=rng.random)
    flow = flow or FlowController(concurrency, backoff, rng=rng.random)
    delay = latency if callable(latency) else (lambda _now, value=latency: value)
    result = Result()
    backlog = items
    in_flight = 0
    events: list[tuple[float, int, str, float]] = []  # (time, seq, kind, payload)
    seq = 0
    now = 0.0
    wake_at: float | None = None
    last_probe_start: float | None = None
    while now < horizon:
        # start as many requests as the controller admits
        while backlog > 0:
            wait = flow.admit(now, in_flight)
            if wait > 0:
                if math.isfinite(wait):
                    target = now + wait
                    if wake_at is None or target < wake_at or wake_at <= now:
                        wake_at = target
                        seq += 1
                        heapq.heappush(events, (target, seq, "wake", 0.0))
                break
            flow.started(now)
            if flow.probing:
                if last_probe_start is not None:
                    result.probe_gaps.append(now - last_probe_start)
                last_probe_start = now
            backlog -= 1
            in_flight += 1
            if flow.probing:
                result.max_in_flight_probing = max(result.max_in_flight_probing, in_flight)
            seq += 1
            heapq.heappush(events, (now + delay(now), seq, "done", now))
        if backlog == 0 and in_flight == 0:
            result.finished_at = now
            return result
        if not events:
            return result
        now, _, kind, sent_at = heapq.heappop(events)
        if kind == "wake":
            continue
        outcome, retry_after = server(now)
        in_flight -= 1
        result.attempts += 1
        result.by_kind[outcome] = result.by_kind.get(outcome, 0) + 1
        result.timeline.append((sent_at, outcome))
        flow.finished(now, sent_at, outcome, retry_after)
        if outcome == OK:
            result.delivered += 1
        else:
            backlog += 1  # retried later (the worker's retry space)
    return result


class StrayRateLimit:
    """A healthy server that answers the first ``count`` requests with 429 (Retry-After 1)."""

    def __init__(self, count: int = 1) -> None:
        self.left = count

    def __call__(self, now: float) -> Answer:
        if self.left > 0:
            self.left -= 1
            return RATE_LIMITED, 1.0
        return OK, None
