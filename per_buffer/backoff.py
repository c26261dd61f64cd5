"""Backoff policy: how long a failed activity waits, and how long a pause lasts.

A policy object in the manner of urllib3's ``Retry``: pure arithmetic, no I/O,
no clock, unit-tested on its own. Delays come from tenacity's full-jitter
exponential backoff (``wait_random_exponential``: a uniform draw from
``[0, min(maximum, initial * 2 ** (n - 1))]``), with two rules on top:

* **Failures the current failure ratio explains are free.** When Per answers
  30 % of all requests with a 503, an activity failing seven times in a row is
  bad luck (a 0.02 % chance, so a few in a backlog of thousands), not evidence
  against it: it is retried within a fifth of ``initial``. Failures beyond the
  run that has at least a 0.01 % chance under the current ratio grow the delay
  exponentially, so an activity that always fails (a WAF rule against one user
  ID, say) fades to one attempt per ``maximum`` while the others flow. With a
  healthy Per (ratio 0) every failure counts.
* **A server's ``Retry-After`` is honoured exactly, never lengthened**, and
  capped at ``maximum``: a misconfigured ``Retry-After: 86400`` cannot stop
  delivery for a day.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import tenacity

__all__ = ["Backoff"]

_RARE = 1e-4  # a run of failures less likely than this under the current ratio is evidence
_FREE_SCALE = 0.2  # a failure the ratio explains waits at most this share of ``initial``
_MAX_FREE = 10


class Backoff:
    """Delays for retries and pauses.

    Args:
        initial: seconds; the scale of the exponential backoff.
        maximum: seconds; no delay or honoured ``Retry-After`` is longer.
        rng: uniform [0, 1) source (injectable for tests).
    """

    __slots__ = ("_rng", "_wait", "initial", "maximum")

    def __init__(
        self, initial: float, maximum: float, *, rng: Callable[[], float] = random.random
    ) -> None:
        if not (initial > 0 and maximum >= initial):
            raise ValueError("backoff needs 0 < initial <= maximum")
        self.initial = float(initial)
        self.maximum = float(maximum)
        self._rng = rng
        # tenacity's ceiling for attempt n is min(maximum, initial * 2 ** (n - 1)); the draw
        # is ours so that tests can fix the randomness
        self._wait = tenacity.wait_exponential(multiplier=self.initial, max=self.maximum)

    @staticmethod
    def free_failures(failure_ratio: float | None) -> int:
        """Consecutive failures that the current failure ratio explains (see the module doc)."""
        if failure_ratio is None or failure_ratio <= 0.0:
            return 0
        if failure_ratio >= 1.0:
            return _MAX_FREE
        return min(_MAX_FREE, int(math.log(_RARE) / math.log(failure_ratio)))

    def ceiling(self, attempt: int) -> float:
        """The longest delay after the ``attempt``-th counted failure (1-based)."""
        state = tenacity.RetryCallState(
            retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={}
        )
        state.attempt_number = max(1, attempt)
        return float(self._wait(state))

    def retry_delay(self, failures: int, failure_ratio: float | None = None) -> float:
        """Seconds before an activity that failed ``failures`` times is tried again.

        Args:
            failures: failed attempts of this activity so far, the last one included.
            failure_ratio: the share of recent attempts (of all activities) that failed.
        """
        counted = failures - self.free_failures(failure_ratio)
        if counted <= 0:  # bad luck under a known failure ratio: try again soon
            return self._rng() * self.initial * _FREE_SCALE
        return self._rng() * self.ceiling(counted)

    def pause(self, events: int) -> float:
        """Length of the ``events``-th consecutive rate-limit pause without ``Retry-After``.

        Half fixed, half jitter, so a pause is never close to zero.
        """
        ceiling = self.ceiling(events)
        return ceiling * (0.5 + 0.5 * self._rng())

    def cap(self, seconds: float) -> float:
        """A server-given delay, honoured exactly up to ``maximum``."""
        if not math.isfinite(seconds) or seconds < 0:
            return 0.0
        return min(seconds, self.maximum)
