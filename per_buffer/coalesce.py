"""Coalescing: drop repeats that cannot change Per's unique-user counts.

Per counts *distinct* users per (activity type, billing ID) over a report's
range. Two activities of the same key inside one window aligned to UTC
multiples of ``window`` seconds are indistinguishable to every report whose
start and end fall on window boundaries, so only the first is sent.
"""

from __future__ import annotations

from collections.abc import Hashable

__all__ = ["Coalescer"]


class Coalescer:
    """Remembers which keys were already admitted in the current window.

    Memory is bounded by ``max_keys``: when the set is full it is cleared, which
    can only cause a harmless extra send. Not thread-safe: callers hold a lock.

    Args:
        window: window length in seconds; 0 disables coalescing (every call admitted).
        max_keys: most keys remembered at once.
    """

    __slots__ = ("_end", "_seen", "_start", "evictions", "max_keys", "window")

    def __init__(self, window: float, max_keys: int = 1_000_000) -> None:
        if window < 0:
            raise ValueError("coalesce_window must be >= 0 seconds")
        if max_keys < 1:
            raise ValueError("coalesce_max_keys must be >= 1")
        self.window = float(window)
        self.max_keys = max_keys
        self.evictions = 0
        self._seen: set[Hashable] = set()
        self._start = self._end = 0.0  # the current window is [_start, _end)

    def window_index(self, now: float) -> int:
        """The index of the window holding the unix time ``now`` (0 when disabled)."""
        return int(now // self.window) if self.window else 0

    def admit(self, key: Hashable, now: float) -> bool:
        """Return True if ``key`` must be sent (first time in this window), else False."""
        seen = self._seen
        if self._start <= now < self._end:
            if key in seen:
                return False
        elif not self.window:
            return True
        else:  # a new window (or the clock went back): forget the old one
            self._start = (now // self.window) * self.window
            self._end = self._start + self.window
            seen = self._seen = set()
        if len(seen) >= self.max_keys:
            self.evictions += len(seen)
            seen.clear()
        seen.add(key)
        return True

    def forget(self) -> None:
        """Drop every remembered key (the next call of each key is admitted)."""
        self._seen = set()
        self._start = self._end = 0.0

    def __len__(self) -> int:
        """Keys currently remembered."""
        return len(self._seen)
