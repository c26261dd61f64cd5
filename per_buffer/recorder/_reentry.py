"""Signal safety: is the caller inside a frame of this library that may hold its locks?

A signal handler runs on the main thread between two bytecodes of whatever it
interrupted. If that was ``record()`` (holding the recorder's lock) or a queue
operation (holding the queue's), a handler that calls ``stats()``, ``flush()``,
``close()`` or ``shutdown()`` and waits for those locks waits forever. The public
methods ask :func:`reentrant` first and take a path that needs none of them. The
same holds for the delivery worker's own thread (an ``on_error`` callback that
flushes would wait for itself).
"""

from __future__ import annotations

import sys
from types import CodeType, FrameType

__all__ = ["LOCK_HOLDERS", "reentrant"]

#: Code objects of the functions that hold a recorder lock while they run.
LOCK_HOLDERS: set[CodeType] = set()
# every queue operation holds its lock; the delivery worker's thread cannot wait for itself
_LOCKING_MODULES = ("per_buffer.queue", "per_buffer.delivery")


def reentrant() -> bool:
    """True when a caller of the caller runs inside a lock-holding frame of this library."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame.f_code in LOCK_HOLDERS or frame.f_globals.get("__name__", "").startswith(
            _LOCKING_MODULES
        ):
            return True
        frame = frame.f_back
    return False
