"""Coalescing: which repeats may be left unsent without hiding a user from a report.

Per counts *distinct* users per (activity type, billing ID) over a report's range
and stamps each activity with its own clock when it arrives. A repeat of a key
adds nothing to any report whose bounds fall on window boundaries (multiples of
``window`` seconds in UTC) if another copy of the key lands in the same window,
by Per's clock. The host's clock may differ from Per's by up to ``margin``
seconds, so near a boundary nobody can tell on which side a copy will land.

The rule (for a repeat recorded at local time ``t`` in the window
``[start, end)``): it may be suppressed only when

* a copy of the key recorded by this process is still in its memory batch:
  it has not been sent, so it is sent (with its fate) no earlier than the repeat's
  own copy would be, and it leaves memory stamped with the time of the latest
  repeat it stood for (:meth:`Coalescer.take`), so that the delivery side never lets
  it ride on a request sent before that repeat was recorded (in sync mode there is
  no such copy: a repeat writes its own); or
* ``start + margin <= t < end - margin`` (outside the *uncertain zones* at both
  ends of the window) and Per acknowledged a copy of the key that was *sent* at or
  after ``start + margin`` in this window (by the local clock).

Nothing else stands for a repeat. A copy on disk, in flight or being retried does
not: its request may already have reached Per before the repeat was recorded (in
an earlier window), or it may fail while the repeat's own request would have
succeeded. A copy stops suppressing repeats when the committer takes it for the
disk (again if the write fails and it goes back to memory) and when it is dropped
from memory. Every window starts empty.

Why it is exact: an acknowledged copy sent at ``s >= start + margin`` was stamped
by Per between ``s`` and its answer, which came before the repeat was recorded at
``t < end - margin``: inside ``[start + margin - skew, end - margin + skew]`` of
Per's clock, i.e. inside the same Per window as the repeat, whatever the repeat's
own request would have met. ``tests/test_coalesce_model.py`` checks this against a
reference model of Per's counting, with requests in flight for several ticks, an
outcome of their own for every request and clock skews.

The delivery side applies the same rule to the entries it claims
(:class:`DeliveredKeys`): an entry whose key Per acknowledged under the rule, by the
time it is judged, is acknowledged without a request; the rule's window and margin
are the recorder's, stored with each entry.

:class:`Coalescer` is the recorder's (one per process); :class:`DeliveredKeys` is
the delivery side's, which acknowledges without sending an entry whose key Per
already acknowledged under the rule, whichever process recorded it. Neither is
thread-safe: callers hold a lock.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

__all__ = ["Coalescer", "DeliveredKeys"]


class _Window:
    """The current aligned window and its safe part."""

    __slots__ = ("end", "margin", "safe_end", "safe_start", "start", "window")

    def __init__(self, window: float, margin: float) -> None:
        if window < 0:
            raise ValueError("coalesce_window must be >= 0 seconds")
        if margin < 0:
            raise ValueError("coalesce_margin must be >= 0 seconds")
        self.window = float(window)
        self.margin = float(margin)
        self.start = self.end = self.safe_start = self.safe_end = 0.0

    def move(self, now: float) -> None:
        self.start = (now // self.window) * self.window
        self.end = self.start + self.window
        self.safe_start = self.start + self.margin
        self.safe_end = self.end - self.margin


class Coalescer:
    """The recorder's memory of keys already on their way to Per in this window.

    Args:
        window: window length in seconds; 0 disables coalescing (every call admitted).
        margin: seconds at each end of a window where only unsent copies suppress
            repeats (the largest difference expected between the host's clock and Per's).
        max_keys: most keys remembered at once; when full the memory is cleared,
            which only costs extra sends.
    """

    __slots__ = ("_seen", "_stood", "_unsent", "_w", "evictions", "max_keys")

    def __init__(self, window: float, margin: float = 30.0, max_keys: int = 1_000_000) -> None:
        if max_keys < 1:
            raise ValueError("coalesce_max_keys must be >= 1")
        self._w = _Window(window, margin)
        self.max_keys = max_keys
        self.evictions = 0
        # per key: the local send time of the latest acknowledged copy (>= 0), or
        # ``_unsent`` while a copy waits in the memory batch; each take moves ``_unsent``
        # (-1, -2, ...), so the anchors of the copies it took stop counting at once
        self._seen: dict[Hashable, float] = {}
        self._unsent = -1.0
        # per key with a copy in memory: the latest repeat suppressed in its favour
        self._stood: dict[Hashable, float] = {}

    @property
    def window(self) -> float:
        """Window length in seconds (0: coalescing off)."""
        return self._w.window

    @property
    def margin(self) -> float:
        """Seconds of uncertainty at each end of a window."""
        return self._w.margin

    def window_index(self, now: float) -> int:
        """The index of the window holding the unix time ``now`` (0 when disabled)."""
        return int(now // self._w.window) if self._w.window else 0

    def admit(self, key: Hashable, now: float, *, batched: bool = True) -> bool:
        """True if this call must be enqueued, False if it may be suppressed.

        ``batched``: the admitted copy waits in a memory batch (and suppresses repeats
        until :meth:`take`); False in sync mode, where each call is written before it
        returns and only an acknowledged copy suppresses repeats.
        """
        w = self._w
        seen = self._seen
        if not w.start <= now < w.end:
            if not w.window:
                return True
            w.move(now)  # a new window (or the clock went back): start afresh
            seen = self._seen = {}
        else:
            anchor = seen.get(key)
            if anchor is not None:
                if anchor == self._unsent:  # the copy in memory stands for this call
                    stood = self._stood
                    if now > stood.get(key, -1.0):
                        stood[key] = now
                    return False
                if w.safe_start <= anchor and w.safe_start <= now < w.safe_end:
                    return False
        if batched:
            if len(seen) >= self.max_keys:
                self.evictions += len(seen)
                seen.clear()
            seen[key] = self._unsent
        return True

    def take(self) -> dict[Hashable, float]:
        """The committer takes the whole memory batch (held copies included) for the
        disk: its copies stop suppressing repeats at once.

        Returns, per key, the local time of the latest call suppressed in favour of
        its copy: the copy must be stored with that time (if later than its own) as
        the time it was recorded, because it stands for that call.
        """
        self._unsent -= 1.0
        stood, self._stood = self._stood, {}
        return stood

    def held(self, keys: Iterable[Hashable]) -> None:
        """Taken copies of ``keys`` went back to memory (the write failed): they stand
        for repeats again until the next :meth:`take`."""
        seen = self._seen
        for key in keys:
            if key in seen or len(seen) < self.max_keys:
                seen[key] = self._unsent

    def acknowledged(self, key: Hashable, sent_at: float) -> None:
        """Per acknowledged a copy of ``key`` sent at local time ``sent_at``."""
        w = self._w
        if not w.start <= sent_at < w.end:
            return
        anchor = self._seen.get(key)
        if anchor is None:
            if len(self._seen) >= self.max_keys:
                return
            self._seen[key] = sent_at
        elif anchor != self._unsent and anchor < sent_at:
            self._seen[key] = sent_at

    def failed(self, key: Hashable) -> None:
        """A copy of ``key`` was dropped from memory (or failed): forget the key (a
        time noted for :meth:`take` is kept: a later stamp only costs a ride)."""
        self._seen.pop(key, None)

    def forget(self) -> None:
        """Forget every key (only costs extra sends)."""
        self._seen = {}

    def __len__(self) -> int:
        """Keys currently remembered."""
        return len(self._seen)


class DeliveredKeys:
    """The delivery side's memory of when Per acknowledged a copy of each key.

    It keeps, per key, the local time at which the latest acknowledged copy was sent,
    and judges an entry under the window and margin the entry was recorded with, so a
    drainer serves recorders with different settings (or coalescing off) at once.

    Args:
        max_keys: most keys remembered; past it the oldest are forgotten (extra sends).
    """

    __slots__ = ("_horizon", "_sent", "max_keys")

    def __init__(self, max_keys: int = 1_000_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.max_keys = max_keys
        self._sent: dict[Hashable, float] = {}
        self._horizon = 0.0  # the longest window judged: older sends can never cover

    def covered(self, key: Hashable, now: float, window: float, margin: float) -> bool:
        """True when an entry of ``key`` judged at local time ``now`` needs no request:
        Per acknowledged a copy sent at or after ``start + margin`` of the ``window``
        holding ``now``, and ``now`` is outside that window's uncertain zones."""
        if window <= 0.0:
            return False
        self._horizon = max(self._horizon, window)
        sent = self._sent.get(key)
        if sent is None:
            return False
        start = (now // window) * window
        safe_start = start + margin
        return safe_start <= sent < start + window and safe_start <= now < start + window - margin

    def note(self, key: Hashable, sent_at: float) -> None:
        """Per acknowledged a copy of ``key`` sent at local time ``sent_at``."""
        previous = self._sent.get(key)
        if previous is not None and previous >= sent_at:
            return
        if previous is None and len(self._sent) >= self.max_keys:
            self._prune(sent_at)
        self._sent[key] = sent_at

    def _prune(self, now: float) -> None:
        """Forget sends too old to cover anything; everything if that frees too little."""
        oldest = now - self._horizon
        kept = {key: at for key, at in self._sent.items() if at >= oldest}
        self._sent = kept if len(kept) < self.max_keys * 0.9 else {}

    def __len__(self) -> int:
        """Keys currently remembered."""
        return len(self._sent)
