"""Signal safety: did the caller interrupt (or call back from) code of this library?

A signal handler runs on the main thread between two bytecodes of whatever it
interrupted. If that was library code holding one of its locks (the recorder's, the
default recorder's, a queue's storage lock, a thread's start-up, an ``Event``'s), a
handler that calls ``stats()``, ``flush()``, ``close()`` or ``shutdown()`` and waits
for that lock waits forever. The same holds for the delivery worker's own thread (an
``on_error`` callback that flushes would wait for itself).

The rule is systematic rather than a list of lock holders, so a new lock cannot be
forgotten: every lock of this library is taken by code of the packages in
:data:`LOCKING_PACKAGES` (or by code they call). :func:`reentrant` is True when, below
the API call being made (and whatever library code called it: ``shutdown()`` calls
``close()``), the stack holds a frame of foreign code (a signal handler, a callback)
and below that a frame of one of those packages. The public methods ask it first and
then take a path that waits for no lock: ``stats()`` reports the last figures read,
``flush()`` returns False, ``close()`` hands the work to a thread of its own.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Final

__all__ = ["LOCKING_PACKAGES", "reentrant"]

#: Packages whose code may hold a lock the recorder's API takes.
LOCKING_PACKAGES: Final = (
    "per_buffer.recorder",
    "per_buffer.queue",
    "per_buffer.delivery",
    "per_buffer.drainer",
)
_LIBRARY: Final = "per_buffer"


def _module(frame: FrameType) -> str:
    name = frame.f_globals.get("__name__")
    return name if isinstance(name, str) else ""


def _library(name: str) -> bool:
    return name == _LIBRARY or name.startswith(_LIBRARY + ".")


def reentrant() -> bool:
    """True when the API call in progress interrupted, or was called back from, code of
    :data:`LOCKING_PACKAGES` on this thread."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and _library(_module(frame)):  # the API call itself
        frame = frame.f_back
    while frame is not None:
        if _module(frame).startswith(LOCKING_PACKAGES):
            return True
        frame = frame.f_back
    return False
