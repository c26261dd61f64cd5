"""What delivery tells the outside: counters, the failure callback's value, and its logs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..errors import PerError
from ..flow import FlowState
from ..models import Activity
from ..outcomes import FAILURE_CLASSES, OK, Verdict

__all__ = ["DeliveryFailure", "DeliveryStats", "FailureLog"]

logger = logging.getLogger("per_buffer.delivery")

_LOG_EVERY = 60.0
_RECOVERED = 20
_SAMPLE = 20  # failures before the first report ...
_SAMPLE_SECONDS = 5.0  # ... or seconds since the first of them
_OUTAGE = 5  # failures in a row, without a success, that are reported at once


@dataclass(frozen=True)
class DeliveryFailure:
    """What ``on_error`` receives for every failed attempt and every dead letter.

    Attributes:
        activity: the activity that failed.
        error: the typed error of the attempt (``error.kind`` is its error class).
        attempts: Per's own refusals of it so far, this one included (what
            ``max_attempts`` counts); 0 for a transport fault.
        dead_lettered: True when the activity was moved to the dead letters.
        retry_at: unix time of the next attempt, or None when dead-lettered.
    """

    activity: Activity
    error: PerError
    attempts: int
    dead_lettered: bool
    retry_at: float | None


class DeliveryStats:
    """Counters written by the worker's thread only (plain attribute reads are safe).

    Attributes:
        delivered: entries Per acknowledged (their removal from the queue applied).
        coalesced: entries acknowledged without a request (Per already counted the key).
        retried: entries given back for a retry.
        dead_lettered: entries moved to the dead letters.
        late_deliveries: deliveries that landed in a later coalescing window than recorded.
        attempts: requests sent.
        failures: failed attempts by error class (see :mod:`per_buffer.outcomes`).
        last_error: the last failure, one line, no token.
        flow: the flow controller's last snapshot.
        paused_until: unix time a pause ends (rate limit or refused token), else None.
        pause_reason: ``"rate_limited"`` or ``"auth"`` while paused, else None.
    """

    __slots__ = (
        "attempts",
        "coalesced",
        "dead_lettered",
        "delivered",
        "failures",
        "flow",
        "last_error",
        "late_deliveries",
        "pause_reason",
        "paused_until",
        "retried",
    )

    def __init__(self) -> None:
        self.delivered = 0
        self.coalesced = 0
        self.retried = 0
        self.dead_lettered = 0
        self.late_deliveries = 0
        self.attempts = 0
        self.failures: dict[str, int] = dict.fromkeys(FAILURE_CLASSES, 0)
        self.last_error: str | None = None
        self.flow: FlowState | None = None
        self.paused_until: float | None = None
        self.pause_reason: str | None = None


class FailureLog:
    """At most one WARNING a minute while attempts fail, naming the failing class and ratio;
    one INFO when delivery works again (a run of successes after a WARNING)."""

    __slots__ = ("_attempts", "_by_kind", "_failing", "_first_failure", "_last", "_run")

    def __init__(self) -> None:
        self._attempts = 0
        self._by_kind: dict[str, int] = {}
        self._failing = False
        self._last = -_LOG_EVERY
        self._run = 0  # consecutive successes
        self._first_failure: float | None = None  # of the failures not reported yet

    def outcome(self, verdict: Verdict) -> None:
        """Account for one attempt; log when the minute's budget allows."""
        self._attempts += 1
        kind = verdict.kind
        if kind == OK:
            self._run += 1
            if self._failing and self._run >= _RECOVERED:
                self._failing = False
                logger.info("per_buffer: delivery works again; Per accepts activities")
            return
        self._run = 0
        self._by_kind[kind] = self._by_kind.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._last < _LOG_EVERY:
            return
        if self._first_failure is None:
            self._first_failure = now
        failed = sum(self._by_kind.values())
        total = failed >= _OUTAGE and failed == self._attempts  # everything fails: say so now
        if not total and failed < _SAMPLE and now - self._first_failure < _SAMPLE_SECONDS:
            return  # a fair ratio needs a few failures, or a few seconds of them
        self._first_failure = None
        worst = max(self._by_kind, key=self._by_kind.__getitem__)
        ratio = self._by_kind[worst] / self._attempts
        others = sum(self._by_kind.values()) - self._by_kind[worst]
        logger.warning(
            "per_buffer: delivery failing: %s on %.0f%% of %d attempts since the last report "
            "(%s)%s; nothing is lost, failed activities are retried",
            worst,
            100 * ratio,
            self._attempts,
            verdict.detail if kind == worst else f"last: {verdict.detail}",
            f", and {others} other failures" if others else "",
        )
        self._last = now
        self._failing = True
        self._attempts = 0
        self._by_kind = {}
