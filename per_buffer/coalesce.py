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
  it has not been sent, so it lands no earlier than the repeat would (in sync
  mode there is no such copy: a repeat waits for, or writes, its own); or
* ``start + margin <= t < end - margin`` (outside the *uncertain zones* at both
  ends of the window), and either

  - (a) Per acknowledged a copy of the key that was *sent* at or after
    ``start + margin`` in this window (by the local clock), or
  - (b) a copy of the key was committed to the queue at or after
    ``start + margin`` in this window and has not failed: it is waiting, in
    flight or acknowledged, and lands no earlier than the window's safe part.

A key whose copy is dropped, dead-lettered, lost to a quarantine or fails a send
is forgotten at once, so its next repeat is enqueued. Every window starts empty.

Why it is exact: a suppressed repeat's own copy would have been stamped inside
``[start + margin - skew, end - margin + skew]`` of Per's clock, i.e. inside the
same Per window as the copy that covers it; a copy that fails is forgotten before
any later repeat is judged; a copy still waiting shares its fate with the
repeats queued behind it. ``tests/test_coalesce_model.py`` checks this against a
reference model of Per's counting under random fault schedules and clock skews.

:class:`Coalescer` is the recorder's (one per process); :class:`DeliveredKeys` is
the delivery side's, which acknowledges without sending an entry whose key Per
already acknowledged under rule (a), whichever process recorded it. Neither is
thread-safe: callers hold a lock.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

__all__ = ["Coalescer", "DeliveredKeys"]

_UNSENT = -1.0  # a copy waits in this process's memory batch


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

    __slots__ = ("_seen", "_w", "evictions", "max_keys")

    def __init__(self, window: float, margin: float = 30.0, max_keys: int = 1_000_000) -> None:
        if max_keys < 1:
            raise ValueError("coalesce_max_keys must be >= 1")
        self._w = _Window(window, margin)
        self.max_keys = max_keys
        self.evictions = 0
        self._seen: dict[Hashable, float] = {}

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
        until :meth:`committed`); False in sync mode, where each call is written before
        it returns and only a written copy suppresses repeats.
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
            if anchor is not None and (
                anchor == _UNSENT or (w.safe_start <= anchor and w.safe_start <= now < w.safe_end)
            ):
                return False
        if batched:
            if len(seen) >= self.max_keys:
                self.evictions += len(seen)
                seen.clear()
            seen[key] = _UNSENT
        return True

    def committed(self, keys: Iterable[Hashable], at: float) -> None:
        """Copies of ``keys`` reached the disk queue at local time ``at``."""
        w = self._w
        if not w.start <= at < w.end:
            return
        seen = self._seen
        for key in keys:
            anchor = seen.get(key)
            if anchor is None or anchor == _UNSENT or anchor < at:
                if anchor is None and len(seen) >= self.max_keys:
                    self.evictions += len(seen)
                    seen.clear()
                seen[key] = at

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
        elif anchor != _UNSENT and anchor < sent_at:
            self._seen[key] = sent_at

    def failed(self, key: Hashable) -> None:
        """A copy of ``key`` was dropped, dead-lettered or failed a send: forget the key."""
        self._seen.pop(key, None)

    def forget(self) -> None:
        """Forget every key (a quarantine lost the queued copies, or the feed overflowed)."""
        self._seen = {}

    def __len__(self) -> int:
        """Keys currently remembered."""
        return len(self._seen)


class DeliveredKeys:
    """The delivery side's memory of keys Per acknowledged in this window, by send time.

    An entry whose key is :meth:`covered` may be acknowledged without a request: Per
    already counted the key in this window under rule (a) of the module's rule.
    """

    __slots__ = ("_sent", "_w", "max_keys")

    def __init__(self, window: float, margin: float = 30.0, max_keys: int = 1_000_000) -> None:
        self._w = _Window(window, margin)
        self.max_keys = max_keys
        self._sent: dict[Hashable, float] = {}

    def covered(self, key: Hashable, now: float) -> bool:
        """True when a copy of ``key`` sent now would add nothing to any aligned report."""
        w = self._w
        if not w.window:
            return False
        if not w.start <= now < w.end:
            w.move(now)
            self._sent = {}
            return False
        if not w.safe_start <= now < w.safe_end:
            return False
        sent = self._sent.get(key)
        return sent is not None and sent >= w.safe_start

    def note(self, key: Hashable, sent_at: float) -> None:
        """Per acknowledged a copy of ``key`` sent at local time ``sent_at``."""
        w = self._w
        if not w.window:
            return
        if not w.start <= sent_at < w.end:
            if sent_at < w.start:
                return
            w.move(sent_at)
            self._sent = {}
        if len(self._sent) >= self.max_keys:
            self._sent.clear()
        previous = self._sent.get(key)
        if previous is None or previous < sent_at:
            self._sent[key] = sent_at

    def __len__(self) -> int:
        """Keys currently remembered."""
        return len(self._sent)
